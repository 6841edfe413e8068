"""scikit-learn digits (8x8 images, bundled with the package: no download).

Two models: an MLP 64-64-10 on the flattened pixels (task "digits"), or the CNN of
`tasks.models.cnn_digits` on [1, 8, 8] images (task "digits-cnn"); the data and its partition
are the same for both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import nn

from fedng.federated.tasks.base import ClientData, FederatedTask, mlp, seeded_model
from fedng.federated.tasks.models import cnn_digits, pick_builder
from fedng.federated.tasks.partition import dirichlet_label_skew, holdout

DigitsModel = Literal["mlp", "cnn"]
"""The digits tasks' models: "mlp" (inputs [n, 64]) or "cnn" (inputs [n, 1, 8, 8])."""

_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "mlp": lambda: mlp([64, 64, 10]),
    "cnn": cnn_digits,
}


def digits_task(
    num_clients: int = 20,
    alpha: float = 0.1,
    seed: int = 0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    model: DigitsModel = "mlp",
) -> FederatedTask:
    """Digits with Dirichlet(alpha) label skew over `num_clients` clients.

    Pixels are scaled to [0, 1]. `test_fraction` of the data is a global test set; the rest is
    partitioned, and each client holds out `val_fraction` of its part for tuning.

    Args:
        num_clients: clients.
        alpha: Dirichlet concentration of the label skew.
        seed: data seed (split and partition).
        test_fraction: share of the data in the global test set.
        val_fraction: share of each client's part held out for validation.
        model: "mlp" (task "digits", inputs [n, 64]) or "cnn" (task "digits-cnn", inputs
            [n, 1, 8, 8]); the split and partition do not depend on it.

    Returns:
        The task.

    Raises:
        ValueError: an unknown `model`.
    """
    build = pick_builder("digits_task", model, _BUILDERS)
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the digits task needs scikit-learn: pip install scikit-learn") from err
    data = load_digits()
    x = torch.from_numpy(data.data / 16.0).float()
    if model == "cnn":
        x = x.view(-1, 1, 8, 8)
    y = torch.from_numpy(data.target.astype(np.int64))
    rng = np.random.default_rng(seed)
    train, test = holdout(np.arange(len(y)), test_fraction, rng)
    parts = dirichlet_label_skew(data.target[train], num_clients, alpha, rng)
    clients = []
    for k, p in enumerate(parts):
        keep, val = holdout(train[p], val_fraction, rng)
        clients.append(ClientData(k, x[keep], y[keep], x[val], y[val]))
    return FederatedTask(
        name=f"{'digits' if model == 'mlp' else 'digits-cnn'}(alpha={alpha:g})",
        clients=clients,
        x_test=x[test],
        y_test=y[test],
        model_fn=lambda s: seeded_model(build, s),
        loss="cross_entropy",
        metric="accuracy",
        num_classes=10,
        info={"alpha": alpha, "sizes": [c.num_examples for c in clients]},
    )
