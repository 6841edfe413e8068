"""MNIST-1D regenerated procedurally with the `mnist1d` package (never downloaded).

Two models: an MLP 40-100-100-10 (task "mnist1d") or the 1-D CNN of `tasks.models.cnn1d_mnist1d`
(task "mnist1d-cnn"); the data and its partition are the same for both.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import nn

from fedng.federated.tasks.base import ClientData, FederatedTask, mlp, seeded_model
from fedng.federated.tasks.models import cnn1d_mnist1d, pick_builder
from fedng.federated.tasks.partition import dirichlet_label_skew, holdout

Mnist1dModel = Literal["mlp", "cnn"]
"""The MNIST-1D tasks' models: "mlp" or "cnn" (both take signals [n, 40])."""

_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "mlp": lambda: mlp([40, 100, 100, 10]),
    "cnn": cnn1d_mnist1d,
}


@functools.lru_cache(maxsize=4)
def generate_mnist1d(num_samples: int = 5000, seed: int = 42) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test) from `mnist1d.data.make_dataset` (80/20 split).

    The package seeds numpy's global RNG; its state is saved and restored around the call.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the mnist1d task needs the mnist1d package: pip install mnist1d"
        ) from err
    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    state = np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)
    return (
        d["x"].astype(np.float32),
        d["y"].astype(np.int64),
        d["x_test"].astype(np.float32),
        d["y_test"].astype(np.int64),
    )


def mnist1d_task(
    num_clients: int = 50,
    alpha: float = 0.1,
    seed: int = 0,
    num_samples: int = 5000,
    val_fraction: float = 0.1,
    model: Mnist1dModel = "mlp",
) -> FederatedTask:
    """MNIST-1D with Dirichlet(alpha) label skew; the generator's test split is the test set.

    Args:
        num_clients: clients.
        alpha: Dirichlet concentration of the label skew.
        seed: partition seed.
        num_samples: examples generated (80% train, 20% test).
        val_fraction: share of each client's part held out for validation.
        model: "mlp" (task "mnist1d") or "cnn" (task "mnist1d-cnn"); the data does not depend
            on it.

    Returns:
        The task.

    Raises:
        ValueError: an unknown `model`.
    """
    build = pick_builder("mnist1d_task", model, _BUILDERS)
    xtr, ytr, xte, yte = generate_mnist1d(num_samples)
    rng = np.random.default_rng(seed)
    parts = dirichlet_label_skew(ytr, num_clients, alpha, rng)
    x, y = torch.from_numpy(xtr), torch.from_numpy(ytr)
    clients = []
    for k, p in enumerate(parts):
        keep, val = holdout(p, val_fraction, rng)
        clients.append(ClientData(k, x[keep], y[keep], x[val], y[val]))
    return FederatedTask(
        name=f"{'mnist1d' if model == 'mlp' else 'mnist1d-cnn'}(alpha={alpha:g})",
        clients=clients,
        x_test=torch.from_numpy(xte),
        y_test=torch.from_numpy(yte),
        model_fn=lambda s: seeded_model(build, s),
        loss="cross_entropy",
        metric="accuracy",
        num_classes=10,
        info={"alpha": alpha, "sizes": [c.num_examples for c in clients]},
    )
