"""scikit-learn digits (8x8 images, bundled with the package: no download), MLP 64-64-10."""

from __future__ import annotations

import numpy as np
import torch

from fedng.federated.tasks.base import ClientData, FederatedTask, mlp, seeded_model
from fedng.federated.tasks.partition import dirichlet_label_skew, holdout


def digits_task(
    num_clients: int = 20,
    alpha: float = 0.1,
    seed: int = 0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
) -> FederatedTask:
    """Digits with Dirichlet(alpha) label skew over `num_clients` clients.

    Pixels are scaled to [0, 1]. `test_fraction` of the data is a global test set; the rest is
    partitioned, and each client holds out `val_fraction` of its part for tuning.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the digits task needs scikit-learn: pip install scikit-learn") from err
    data = load_digits()
    x = torch.from_numpy(data.data / 16.0).float()
    y = torch.from_numpy(data.target.astype(np.int64))
    rng = np.random.default_rng(seed)
    train, test = holdout(np.arange(len(y)), test_fraction, rng)
    parts = dirichlet_label_skew(data.target[train], num_clients, alpha, rng)
    clients = []
    for k, p in enumerate(parts):
        keep, val = holdout(train[p], val_fraction, rng)
        clients.append(ClientData(k, x[keep], y[keep], x[val], y[val]))
    return FederatedTask(
        name=f"digits(alpha={alpha:g})",
        clients=clients,
        x_test=x[test],
        y_test=y[test],
        model_fn=lambda s: seeded_model(lambda: mlp([64, 64, 10]), s),
        loss="cross_entropy",
        metric="accuracy",
        num_classes=10,
        info={"alpha": alpha, "sizes": [c.num_examples for c in clients]},
    )
