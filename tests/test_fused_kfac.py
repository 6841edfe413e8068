"""NaturalGradient's fused K-FAC step (`fedng.optim.fused_kfac`) against its general path: the
same `.grad`, factors, inverses and counters (float64, 1e-12) over steps that cross the inverse
cadence, with the trust region, relative damping and its floor, absolute damping, the batch
form, and the cases that must leave the fused step (tied layers, a skipped step, a failed
block)."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from fedng.optim.natural_gradient import NaturalGradient
from torch import nn

F64 = torch.float64


def mlp(widths: list[int], bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b, bias=bias or i == 0))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(F64)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def run(
    model: nn.Module, fused: bool, steps: int, batch: int, **kw: Any
) -> tuple[list[torch.Tensor], NaturalGradient, int]:
    """Trains `steps` steps; returns the parameters, the optimizer and the fused calls made."""
    model = copy.deepcopy(model)
    ng = NaturalGradient(model, lr=0.05, inverse_every=3, **kw)
    calls = 0
    if not fused:
        ng._fused = None
    elif ng._fused is not None:
        inner = ng._fused.step

        def counted(*a: Any, **k: Any) -> Any:
            nonlocal calls
            calls += 1
            return inner(*a, **k)

        ng._fused.step = counted  # type: ignore[method-assign]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    d_in = next(p for p in model.parameters()).shape[1]
    for _ in range(steps):
        x = torch.randn(batch, d_in, generator=g, dtype=F64)
        y = torch.randint(0, 3, (batch,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        ng.step()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], ng, calls


def assert_same(
    a: NaturalGradient, b: NaturalGradient, pa: list[torch.Tensor], pb: list[torch.Tensor]
) -> None:
    for x, y in zip(pa, pb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    ka, kb = a.local_curvature.reps["kfac"], b.local_curvature.reps["kfac"]
    assert ka.counts == kb.counts  # type: ignore[attr-defined]
    for x, y in zip(ka.A + ka.G, kb.A + kb.G, strict=True):  # type: ignore[attr-defined]
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    for x, y in zip(ka.a_inv + ka.g_inv, kb.a_inv + kb.g_inv, strict=True):  # type: ignore[attr-defined]
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    assert a.stats == b.stats
    assert a._batch_form == b._batch_form
    for k in ("kl_scale", "trust_radius", "damping"):
        assert (a.last[k] is None) == (b.last[k] is None)
        if a.last[k] is not None:
            assert a.last[k] == pytest.approx(b.last[k], rel=1e-12)


@pytest.mark.parametrize(
    "kw",
    [
        {},  # relative damping with its floor, adaptive trust region under the default kl_clip
        {"damping": 1e-3, "kl_clip": None},  # the bench's setting: absolute damping, unbounded
        {"damping": 1e-2, "trust": "fixed", "kl_clip": 1e-4, "curvature_decay": None},
        {"damping_mode": "factored"},
    ],
)
def test_fused_step_equals_the_general_step(kw: dict[str, Any]) -> None:
    model = mlp([7, 9, 8, 3])
    pa, a, calls = run(model, True, 8, 16, **kw)
    pb, b, _ = run(model, False, 8, 16, **kw)
    assert calls == 8
    assert_same(a, b, pa, pb)


def test_fused_batch_form_and_layers_without_bias() -> None:
    """Wide layers, few rows: the batch form (probe checked natively); biasless layers."""
    model = mlp([30, 40, 3], bias=False)
    pa, a, calls = run(model, True, 7, 4)
    pb, b, _ = run(model, False, 7, 4)
    assert calls == 7 and a._batch_form
    assert a._fused is not None and a._fused.plan().form.tolist() == [2, 1]  # the head: dense
    assert_same(a, b, pa, pb)


def test_tied_layers_and_other_sources_take_the_general_path() -> None:
    model = Tied().to(F64)
    pa, a, calls = run(model, True, 4, 8)
    pb, b, _ = run(model, False, 4, 8)
    assert a._fused is not None and calls == 0
    assert_same(a, b, pa, pb)
    assert NaturalGradient(mlp([4, 3]), fisher_type="mc")._fused is None
    assert NaturalGradient(mlp([4, 3]), curvature="diag")._fused is None


@pytest.mark.filterwarnings("ignore::fedng.errors.CurvatureWarning")
def test_skipped_step_and_reset_block_keep_the_paths_equal() -> None:
    """A non-finite gradient skips the step on both paths; a block whose curvature overflows
    is reset and stays unpreconditioned until re-inverted, through the general precondition."""
    model = mlp([5, 6, 3])
    outs = []
    for fused in (True, False):
        m = copy.deepcopy(model)
        ng = NaturalGradient(m, lr=0.05, inverse_every=2)
        if not fused:
            ng._fused = None
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(2)
        for t in range(7):
            x = torch.randn(8, 5, generator=g, dtype=F64)
            if t == 2:
                x[0, 0] = float("nan")
            if t == 4:
                x = x * 1e200  # the factors overflow: the block fails and is reset
            opt.zero_grad()
            F.cross_entropy(m(x), torch.randint(0, 3, (8,), generator=g)).backward()
            ng.step()
            opt.step()
        outs.append((ng, [p.detach().clone() for p in m.parameters()]))
    (a, pa), (b, pb) = outs
    assert a.stats["skipped_steps"] == 1
    assert_same(a, b, pa, pb)


def train(
    m: nn.Module, ng: NaturalGradient, opt: torch.optim.Optimizer, g: torch.Generator
) -> None:
    for _ in range(4):
        x = torch.randn(8, 6, generator=g, dtype=F64)
        opt.zero_grad()
        F.cross_entropy(m(x), torch.randint(0, 3, (8,), generator=g)).backward()
        ng.step()
        opt.step()


def test_resumed_optimizer_rebuilds_its_plan_on_the_loaded_factors() -> None:
    """`load_state_dict` replaces the factor tensors: the fused step must write the new ones."""
    model = mlp([6, 7, 3])
    done, plans = [], []
    for fused in (True, False):
        m = copy.deepcopy(model)
        first = NaturalGradient(m, lr=0.05, inverse_every=3)
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(4)
        train(m, first, opt, g)
        state = first.state_dict()
        first.remove()
        second = NaturalGradient(m, lr=0.05, inverse_every=3)
        if second._fused is not None:
            plans.append(second._fused.plan())  # built on the fresh factors, replaced by the load
            if not fused:
                second._fused = None
        second.load_state_dict(state)
        train(m, second, opt, g)
        done.append((second, [p.detach().clone() for p in m.parameters()]))
    (a, pa), (b, pb) = done
    assert a._fused is not None and a._fused.plan() is not plans[0]
    assert a._fused.plan().matches(a._fused.kfac.A, a._fused.kfac.G)
    assert_same(a, b, pa, pb)
