"""Affine reparameterization invariance of the K-FAC natural gradient (and SGD's lack of it).

Two networks compute the same function: in the second, the input of the middle layer is first
mapped by an invertible affine map h -> M h + c (a fixed module) and the layer's weights absorb
the inverse map. K-FAC's natural-gradient step changes both networks' outputs identically (up
to the damping of A, which is the only part of the step that is not invariant: the gap shrinks like
sqrt(damping), about 2e-5 here); SGD's does not.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from fedng.optim.natural_gradient import NaturalGradient
from torch import nn

F64 = torch.float64
TOL = {"same_change": 1e-4, "sgd_differs": 0.1}


class Affine(nn.Module):
    """A fixed (parameter-free) invertible affine map h -> h M^T + c."""

    def __init__(self, m: torch.Tensor, c: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("m", m)
        self.register_buffer("c", c)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.m.T + self.c


def networks() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(20)
    base = nn.Sequential(
        nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)
    ).double()
    q1, _ = torch.linalg.qr(torch.randn(6, 6, dtype=F64))
    q2, _ = torch.linalg.qr(torch.randn(6, 6, dtype=F64))
    m = q1 @ torch.diag(torch.logspace(-0.7, 0.7, 6, dtype=F64)) @ q2  # condition number 25
    c = torch.randn(6, dtype=F64)
    layer = copy.deepcopy(base[2])
    m_inv = torch.linalg.inv(m)
    with torch.no_grad():
        layer.weight.copy_(base[2].weight @ m_inv)
        layer.bias.copy_(base[2].bias - base[2].weight @ m_inv @ c)
    reparam = nn.Sequential(
        copy.deepcopy(base[0]), nn.Tanh(), Affine(m, c), layer, nn.Tanh(), copy.deepcopy(base[4])
    )
    return base, reparam


def output_change(
    model: nn.Module, natural: bool, x: torch.Tensor, y: torch.Tensor, probe: torch.Tensor
) -> torch.Tensor:
    ng = NaturalGradient(model, damping=1e-14, inverse_every=1) if natural else None
    opt = torch.optim.SGD(model.parameters(), lr=0.005)
    with torch.no_grad():
        before = model(probe)
    F.cross_entropy(model(x), y).backward()
    if ng is not None:
        ng.step()
    opt.step()
    with torch.no_grad():
        return model(probe) - before


def test_kfac_step_is_invariant_and_sgd_is_not() -> None:
    base, reparam = networks()
    g = torch.Generator().manual_seed(21)
    x, y = torch.randn(64, 5, generator=g, dtype=F64), torch.randint(0, 3, (64,), generator=g)
    probe = torch.randn(16, 5, generator=g, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(reparam(probe), base(probe))  # the same function
    changes = {}
    for natural in (True, False):
        changes[natural] = [
            output_change(copy.deepcopy(net), natural, x, y, probe) for net in (base, reparam)
        ]
    ng_a, ng_b = changes[True]
    sgd_a, sgd_b = changes[False]
    ng_gap = float((ng_a - ng_b).norm() / ng_a.norm())
    sgd_gap = float((sgd_a - sgd_b).norm() / sgd_a.norm())
    assert ng_gap < TOL["same_change"], f"K-FAC output changes differ by {ng_gap:.2e}"
    assert sgd_gap > TOL["sgd_differs"], f"SGD output changes agree to {sgd_gap:.2e}"
