"""MNIST-1D regenerated procedurally with the `mnist1d` package (never downloaded).

Model: MLP 40-100-100-10.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from fedng.federated.tasks.base import ClientData, FederatedTask, mlp, seeded_model
from fedng.federated.tasks.partition import dirichlet_label_skew, holdout


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
) -> FederatedTask:
    """MNIST-1D with Dirichlet(alpha) label skew; the generator's test split is the test set."""
    xtr, ytr, xte, yte = generate_mnist1d(num_samples)
    rng = np.random.default_rng(seed)
    parts = dirichlet_label_skew(ytr, num_clients, alpha, rng)
    x, y = torch.from_numpy(xtr), torch.from_numpy(ytr)
    clients = []
    for k, p in enumerate(parts):
        keep, val = holdout(p, val_fraction, rng)
        clients.append(ClientData(k, x[keep], y[keep], x[val], y[val]))
    return FederatedTask(
        name=f"mnist1d(alpha={alpha:g})",
        clients=clients,
        x_test=torch.from_numpy(xte),
        y_test=torch.from_numpy(yte),
        model_fn=lambda s: seeded_model(lambda: mlp([40, 100, 100, 10]), s),
        loss="cross_entropy",
        metric="accuracy",
        num_classes=10,
        info={"alpha": alpha, "sizes": [c.num_examples for c in clients]},
    )
