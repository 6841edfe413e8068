"""NaturalGradient's safe defaults and fallback chain: every path ends finite, warned, counted."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from fedng.curvature.diagonal import DiagonalFisher
from fedng.curvature.kfac import KFAC
from fedng.curvature.lowrank import LowRankFisher
from fedng.errors import CurvatureWarning
from fedng.optim.config import DEFAULT_DAMPING, DEFAULT_KL_CLIP, DEFAULT_RELATIVE_DAMPING
from fedng.optim.damping import PEAK_FRACTION, PeakFloor
from fedng.optim.natural_gradient import NaturalGradient
from torch import nn


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 6, generator=g), torch.randint(0, 4, (32,), generator=g)


def run(
    ng: NaturalGradient,
    steps: int,
    lr: float = 0.3,
    before_step: Callable[[int], None] | None = None,
) -> list[float]:
    """`steps` SGD steps on one batch; `before_step(t)` may sabotage things after backward."""
    model = ng.model
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = batch()
    losses = []
    for t in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if before_step is not None:
            before_step(t)
        ng.step()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def finite_params(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def curvature_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, CurvatureWarning)]


# --- defaults ------------------------------------------------------------------------------


def test_defaults_are_relative_damping_and_a_kl_clip() -> None:
    ng = NaturalGradient(mlp())
    assert ng.damping_scale == "relative" and ng.damping == DEFAULT_RELATIVE_DAMPING
    assert ng.kl_clip == DEFAULT_KL_CLIP
    explicit = NaturalGradient(mlp(), damping=0.05)  # an explicit λ keeps its old meaning
    assert explicit.damping_scale == "absolute" and explicit.damping == 0.05
    absolute = NaturalGradient(mlp(), damping_scale="absolute")
    assert absolute.damping == DEFAULT_DAMPING
    with pytest.raises(ValueError, match="'damping_scale'"):
        NaturalGradient(mlp(), damping_scale="weird")


def test_explicit_kl_clip_none_is_unbounded() -> None:
    ng = NaturalGradient(mlp(), kl_clip=None, damping=1e-2)
    run(ng, 3, lr=1.0)
    assert ng.last["kl_scale"] == 1.0 and ng.stats["clipped_steps"] == 0
    clipped = NaturalGradient(mlp())
    run(clipped, 3, lr=1.0)
    assert clipped.stats["clipped_steps"] >= 1 and clipped.last["kl_scale"] < 1.0


def test_relative_damping_is_each_blocks_trace_per_dimension() -> None:
    ng = NaturalGradient(mlp(), inverse_every=1, kl_clip=None)
    run(ng, 1, lr=0.0)
    kfac = ng.local_curvature.reps["kfac"]
    assert isinstance(kfac, KFAC)
    report = ng.last["inverse"]
    rel = DEFAULT_RELATIVE_DAMPING
    for i, spec in enumerate(kfac.specs):
        a_mean = float(kfac.A[i].diagonal().mean())
        g_mean = float(kfac.G[i].diagonal().mean())
        used = dict(zip(report.names, report.damping.tolist(), strict=True))
        # λ_i = rel tr(A) tr(G) / (n m), split by π: each factor gets sqrt(rel) x its mean
        assert used[f"{spec.name}.A"] == pytest.approx(math.sqrt(rel) * a_mean, rel=1e-5)
        assert used[f"{spec.name}.G"] == pytest.approx(math.sqrt(rel) * g_mean, rel=1e-5)


# --- non-finite gradients ----------------------------------------------------------------------


def test_nan_gradient_skips_the_step() -> None:
    model = mlp()
    ng = NaturalGradient(model)
    run(ng, 2)
    counts = list(ng.local_curvature.reps["kfac"].counts)
    before = copy.deepcopy(model.state_dict())

    def poison(t: int) -> None:
        model[0].weight.grad[0, 0] = math.nan

    with pytest.warns(CurvatureWarning, match="not finite: the step was skipped"):
        run(ng, 1, before_step=poison)
    assert ng.last["skipped"] is True and ng.stats["skipped_steps"] == 1
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # SGD skipped every parameter
    assert ng.local_curvature.reps["kfac"].counts == counts  # the curvature was not updated
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(ng, 2, before_step=poison)  # counted again, not warned again
        run(ng, 2)
    assert not curvature_warnings(caught)
    assert ng.stats["skipped_steps"] == 3 and ng.last["skipped"] is False
    assert finite_params(model)


# --- inverse failures -----------------------------------------------------------------------


def kfac_of(ng: NaturalGradient) -> KFAC:
    rep = ng.local_curvature.reps["kfac"]
    assert isinstance(rep, KFAC)
    return rep


@pytest.mark.parametrize(
    "sabotage,stage",
    [
        ("nan_factor", "identity"),
        ("hugely_negative", "identity"),
        ("indefinite_with_diagonal", "diagonal"),
        ("exploding", "identity"),
    ],
)
def test_failed_kfac_inverse_falls_back_and_recovers(sabotage: str, stage: str) -> None:
    model = mlp()
    ng = NaturalGradient(model, inverse_every=1)
    run(ng, 2)
    kfac = kfac_of(ng)

    def break_factor(t: int) -> None:
        if t != 0:
            return
        a = kfac.A[0]
        n = a.shape[0]
        if sabotage == "nan_factor":
            a[0, 0] = math.nan
        elif sabotage == "hugely_negative":
            kfac.G[0].copy_(-1e30 * torch.eye(kfac.G[0].shape[0]))
        elif sabotage == "indefinite_with_diagonal":  # diagonal 1, eigenvalue 1 - 1e6
            a.copy_(torch.eye(n) + 1e6 * (torch.ones(n, n) - torch.eye(n)))
        else:  # curvature overflowing float32 (Inf entries)
            a.mul_(1e30).mul_(1e30)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # the sabotage lands after backward, before the step's update: decay 0.95 keeps it
        run(ng, 1, before_step=break_factor)
        first = dict(ng.last["fallbacks"])
        run(ng, 5)
    assert finite_params(model)
    fb = ng.stats["inverse_fallbacks"]
    assert first == {"0": stage}
    assert fb[stage] == 1 and ng.stats["reset_blocks"] == 1
    msgs = curvature_warnings(caught)
    assert len(msgs) == 1 and "'0'" in msgs[0]
    assert ng.last["fallbacks"] == {} and "0" in ng.last["preconditioned"]  # recovered
    state = ng.state_dict()
    assert state["stats"] == ng.stats
    other = NaturalGradient(mlp())
    other.load_state_dict(state)
    assert other.stats == ng.stats and other.stats is not ng.stats


def test_jitter_is_counted_and_warned_once() -> None:
    model = mlp()
    ng = NaturalGradient(model, damping=1e-8, inverse_every=1)  # absolute, tiny
    run(ng, 1)
    kfac = kfac_of(ng)

    def indefinite(t: int) -> None:  # slightly indefinite: more damping makes it invertible
        g = kfac.G[1]
        g.copy_(g - 1e-3 * torch.eye(g.shape[0]))

    with pytest.warns(CurvatureWarning, match="escalating"):
        run(ng, 1, before_step=indefinite)
    assert ng.stats["inverse_fallbacks"]["jitter"] >= 1
    assert ng.last["fallbacks"] == {} and finite_params(model)


@pytest.mark.parametrize("kind,stage", [("diag", "identity"), ("lowrank", "diagonal")])
def test_nan_curvature_of_other_kinds_falls_back(kind: str, stage: str) -> None:
    """A NaN diagonal leaves nothing to fall back on; a NaN sketch leaves the diagonal of the
    last decomposition."""
    model = mlp()
    ng = NaturalGradient(model, curvature=kind, inverse_every=1, rank=4)
    run(ng, 2)
    rep = ng.local_curvature.reps[kind]

    def poison(t: int) -> None:
        if isinstance(rep, DiagonalFisher):
            rep.diag[0][0, 0] = math.nan
        elif isinstance(rep, LowRankFisher):
            rep.Y[0][0, 0] = math.nan

    with pytest.warns(CurvatureWarning, match="plain" if stage == "identity" else "diagonal"):
        run(ng, 1, before_step=poison)
    assert ng.last["fallbacks"] == {"0": stage}
    assert ng.stats["inverse_fallbacks"][stage] == 1
    run(ng, 3)
    assert finite_params(model) and "0" in ng.last["preconditioned"]


def test_huge_finite_curvature_gives_tiny_finite_steps() -> None:
    model = mlp()
    ng = NaturalGradient(model, inverse_every=1)
    run(ng, 1)
    kfac = kfac_of(ng)

    def blow_up(t: int) -> None:
        kfac.A[0].mul_(1e15)
        kfac.G[0].mul_(1e15)

    before = [p.detach().clone() for p in model[0].parameters()]
    run(ng, 1, before_step=blow_up)
    assert finite_params(model)
    moved = max(
        float((p.detach() - q).abs().max())
        for p, q in zip(model[0].parameters(), before, strict=True)
    )
    assert moved < 1e-6


def test_nonfinite_preconditioned_gradient_falls_back() -> None:
    """An inverse that went bad after it was computed (e.g. loaded) never reaches .grad."""
    model = mlp()
    ng = NaturalGradient(model, inverse_every=100)
    run(ng, 2)
    kfac = kfac_of(ng)
    a_inv = kfac.a_inv[0]
    assert a_inv is not None
    a_inv[0, 0] = math.inf
    with pytest.warns(CurvatureWarning):
        run(ng, 1)
    assert ng.last["fallbacks"]["0"] in ("diagonal", "identity")
    assert finite_params(model)


# --- the damping floor ---------------------------------------------------------------------


def test_peak_floor_keeps_relative_damping_above_a_fraction_of_its_peak() -> None:
    floor = PeakFloor(fraction=1e-2)
    assert floor.apply("kfac", [1.0, 0.5], least=1e-8) == [1.0, 0.5]
    assert floor.apply("kfac", [1e-4, 1e-5], least=1e-8) == pytest.approx([1e-2, 5e-3])
    assert floor.apply("kfac", [2.0, math.nan], least=1e-8) == pytest.approx([2.0, 5e-3])
    assert floor.apply("diag", [0.0], least=1e-8) == [1e-8]  # no curvature: the least λ
    assert floor.apply("kfac", [1e-4], least=1e-8) == [1e-4]  # other blocks: peaks restart


def test_vanishing_curvature_keeps_the_damping_of_its_history() -> None:
    model = mlp()
    ng = NaturalGradient(model, inverse_every=1, curvature_decay=0.0, kl_clip=None)
    x, y = batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    lams = []
    for scale in (1.0, 1e-4):  # the loss fades 1e4-fold: its gradient curvature 1e8-fold
        opt.zero_grad()
        (scale * F.cross_entropy(model(x), y)).backward()
        ng.step()
        report = ng.last["inverse"]
        d = dict(zip(report.names, report.damping.tolist(), strict=True))
        # K-FAC splits a block's λ between its factors: λ = λ_A λ_G
        lams.append([d[f"{b}.A"] * d[f"{b}.G"] for b in ("0", "2")])
    for before, after in zip(*lams, strict=True):
        assert after == pytest.approx(PEAK_FRACTION * before, rel=1e-4)  # 1e-8 x without it
