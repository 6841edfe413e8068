"""A 1-D nonlinear regression split by domain: client k owns the k-th sub-interval of [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedng.federated.tasks.base import ClientData, FederatedTask, mlp, seeded_model
from fedng.federated.tasks.partition import domain_split, holdout


def target_function(x: np.ndarray) -> np.ndarray:
    """f(x) = sin(2 pi x) + 0.3 sin(6 pi x) + 0.5 x on [-1, 1]."""
    return np.sin(2 * np.pi * x) + 0.3 * np.sin(6 * np.pi * x) + 0.5 * x


def regression_task(
    num_clients: int = 10,
    num_samples: int = 2000,
    noise: float = 0.05,
    seed: int = 0,
    val_fraction: float = 0.1,
    num_test: int = 1000,
) -> FederatedTask:
    """Noisy samples of `target_function`, domain-split; test on a clean uniform grid (rel. L2).

    Model: MLP 1-64-64-1 with tanh.
    """
    rng = np.random.default_rng(seed)
    xs = rng.uniform(-1, 1, num_samples)
    ys = target_function(xs) + noise * rng.standard_normal(num_samples)
    x = torch.from_numpy(xs).float().unsqueeze(1)
    y = torch.from_numpy(ys).float().unsqueeze(1)
    clients = []
    for k, p in enumerate(domain_split(xs, num_clients)):
        keep, val = holdout(p, val_fraction, rng)
        clients.append(ClientData(k, x[keep], y[keep], x[val], y[val]))
    grid = np.linspace(-1, 1, num_test)
    return FederatedTask(
        name="regression1d",
        clients=clients,
        x_test=torch.from_numpy(grid).float().unsqueeze(1),
        y_test=torch.from_numpy(target_function(grid)).float().unsqueeze(1),
        model_fn=lambda s: seeded_model(lambda: mlp([1, 64, 64, 1], nn.Tanh), s),
        loss="mse",
        metric="rel_l2",
        num_classes=0,
        info={
            "noise": noise,
            "intervals": [
                [float(xs[c].min()), float(xs[c].max())] for c in domain_split(xs, num_clients)
            ],
        },
    )
