"""A 1-D Poisson PINN, domain-split: client k owns the collocation points of the k-th
sub-interval of (0, 1).

    -u''(x) = f(x) on (0, 1),  u(0) = u(1) = 0,
    u*(x) = sin(pi x) + 0.2 sin(4 pi x),  f = -u*'' = pi^2 (sin(pi x) + 3.2 sin(4 pi x)).

The model `PoissonPINN` builds the boundary conditions in (`u = x (1 - x) N(x)`) and computes
u'' by propagating (value, first, second derivative) through its layers in closed form (Taylor
mode), so the residual is a plain differentiable function of the parameters: local SGD, the
curvature hooks (each Linear sees the three streams as a batch with shared weights, the K-FAC
approximation for PINNs) and `torch.func` per-sample gradients all work unchanged. An input is
`[x, flag]`: flag 1 asks for the scaled residual `-u''(x) / pi^2` (training and client-held
validation: only f is known to a client), flag 0 for `u(x)` (the test set: relative L2 error
against u*).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from torch import nn

from fedng.federated.tasks.base import ClientData, FederatedTask, seeded_model
from fedng.federated.tasks.partition import domain_split, holdout

RESIDUAL_SCALE = 1.0 / math.pi**2
"""The residual and f are scaled by this (f / pi^2 is O(1))."""


def exact_solution(x: torch.Tensor) -> torch.Tensor:
    """u*(x) = sin(pi x) + 0.2 sin(4 pi x)."""
    return torch.sin(math.pi * x) + 0.2 * torch.sin(4 * math.pi * x)


def source(x: torch.Tensor) -> torch.Tensor:
    """f(x) = -u*''(x) = pi^2 sin(pi x) + 3.2 pi^2 sin(4 pi x)."""
    return math.pi**2 * (torch.sin(math.pi * x) + 3.2 * torch.sin(4 * math.pi * x))


class PoissonPINN(nn.Module):
    """u(x) = x (1 - x) N(x) with N a tanh MLP 1-width-...-1; input [n, 2] = (x, flag),
    output [n, 1]: u(x) where flag is 0, `-u''(x) * RESIDUAL_SCALE` where flag is 1.

    Args:
        width: hidden width.
        depth: hidden layers.
    """

    def __init__(self, width: int = 32, depth: int = 2) -> None:
        super().__init__()
        sizes = [1] + [width] * depth + [1]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        """u or the scaled residual per row (see the class docstring)."""
        x, flag = inp[:, :1], inp[:, 1:2]
        n = x.shape[0]
        h, h1, h2 = x, torch.ones_like(x), torch.zeros_like(x)
        last = len(self.layers) - 1
        for i, lin in enumerate(self.layers):
            z = lin(torch.cat([h, h1, h2]))  # one call: the weights are shared by the 3 streams
            z0, z1, z2 = z[:n], z[n : 2 * n] - lin.bias, z[2 * n :] - lin.bias
            if i == last:
                h, h1, h2 = z0, z1, z2
            else:  # tanh: a' = s z', a'' = s z'' - 2 a s z'^2 with s = 1 - a^2
                a = torch.tanh(z0)
                s = 1 - a * a
                h, h1, h2 = a, s * z1, s * z2 - 2 * a * s * z1 * z1
        g = x * (1 - x)
        u = g * h
        u2 = -2 * h + 2 * (1 - 2 * x) * h1 + g * h2
        return torch.where(flag > 0.5, -u2 * RESIDUAL_SCALE, u)


def residual_inputs(x: torch.Tensor) -> torch.Tensor:
    """[x, 1] rows: ask a `PoissonPINN` for its residual at x [n, 1]."""
    return torch.cat([x, torch.ones_like(x)], 1)


def value_inputs(x: torch.Tensor) -> torch.Tensor:
    """[x, 0] rows: ask a `PoissonPINN` for u at x [n, 1]."""
    return torch.cat([x, torch.zeros_like(x)], 1)


def pinn_task(
    num_clients: int = 8,
    num_points: int = 800,
    seed: int = 0,
    val_fraction: float = 0.1,
    num_test: int = 512,
    width: int = 32,
) -> FederatedTask:
    """Collocation points uniform in (0, 1), domain-split; test: rel. L2 of u against u*.

    Args:
        num_clients: clients (sub-intervals).
        num_points: collocation points in all.
        seed: data seed.
        val_fraction: share of each client's points held out (their residual is the
            validation metric).
        num_test: test grid points.
        width: hidden width of the PINN (two hidden layers).

    Returns:
        The task ("mse" loss on the scaled residual; metric "rel_l2").
    """
    rng = np.random.default_rng(seed)
    xs = rng.uniform(0, 1, num_points)
    x = torch.from_numpy(xs).float().unsqueeze(1)
    inp, target = residual_inputs(x), source(x) * RESIDUAL_SCALE
    parts = domain_split(xs, num_clients)
    clients = []
    for k, p in enumerate(parts):
        keep, val = holdout(p, val_fraction, rng)
        clients.append(ClientData(k, inp[keep], target[keep], inp[val], target[val]))
    grid = torch.linspace(0, 1, num_test).unsqueeze(1)
    return FederatedTask(
        name="pinn-poisson1d",
        clients=clients,
        x_test=value_inputs(grid),
        y_test=exact_solution(grid),
        model_fn=lambda s: seeded_model(lambda: PoissonPINN(width), s),
        loss="mse",
        metric="rel_l2",
        num_classes=0,
        info={"intervals": [[float(xs[p].min()), float(xs[p].max())] for p in parts]},
    )
