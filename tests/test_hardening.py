"""Regression tests of defects a review found: a negative-definite factor passed off as bf16
rounding, a zero learning rate, a checkpoint whose damping meant something else, a sketch rank the
payload does not back, an all-zero diagonal taken for curvature, zero curvature inverted at the
damping floor, and an overflowed own curvature that a mixed preconditioner kept inheriting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from fedng.curvature import CurvatureSet, LowRankFisher, Payload
from fedng.curvature.spec import BlockSpec
from fedng.curvature.validation import run_psd_checks, symmetric_check
from fedng.optim import NaturalGradient
from fedng.optim.safety import fall_back
from test_fed_robust import assert_rejected_cleanly, fresh, make_round
from torch import nn

BF16_EPS = torch.finfo(torch.bfloat16).eps


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _backward(model: nn.Module) -> None:
    torch.manual_seed(1)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("n", [64, 256, 1024])
def test_negative_definite_factor_is_not_bf16_rounding(n: int) -> None:
    """-I is rejected whatever the size (the old bound n * eps * max|M| reached max|M| at 128)."""
    with pytest.raises(ValueError, match="positive semi-definite"):
        run_psd_checks([symmetric_check("A", -torch.eye(n), 1e-3, BF16_EPS)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_psd_factor_rounded_for_the_wire_is_accepted(dtype: torch.dtype) -> None:
    """A rank-deficient PSD factor (zero eigenvalues) survives its own wire rounding."""
    torch.manual_seed(0)
    x = torch.randn(50, 300)
    a = ((x.T @ x) / 50).to(dtype).float()
    run_psd_checks([symmetric_check("A", a, 1e-3, torch.finfo(dtype).eps)])


def test_zero_learning_rate_with_kl_clip_is_a_step_not_an_error() -> None:
    """lr 0 (warm-up start, a schedule's end) with the default KL clip: finite grads, no clip."""
    model = _model()
    ng = NaturalGradient(model, lr=lambda: 0.0)
    _backward(model)
    ng.step()
    assert ng.last["kl_scale"] == 1.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_checkpoint_with_another_damping_scale_is_refused() -> None:
    """A relative factor is never read as an absolute λ, nor the other way round."""
    model = _model()
    absolute = NaturalGradient(model, damping=1e-3)
    state = absolute.state_dict()
    absolute.remove()
    relative = NaturalGradient(model)
    with pytest.raises(ValueError, match="damping_scale='absolute'"):
        relative.load_state_dict(state)
    legacy = {k: v for k, v in relative.state_dict().items() if k != "damping_scale"}
    with pytest.raises(ValueError, match="absolute"):
        relative.load_state_dict(legacy)  # checkpoints from before the scale were absolute
    relative.remove()
    again = NaturalGradient(model, damping=1e-3)
    again.load_state_dict(state)
    assert again.damping == 1e-3 and again.damping_scale == "absolute"


def test_sketch_rank_not_backed_by_the_payload_is_refused_before_drawing_omega() -> None:
    """A rank of 10**9 with a few numbers of data fails on the size, without drawing Ω."""
    spec = BlockSpec("fc", "kron", 256, 257)
    payload = Payload("lowrank", (spec,), torch.zeros(10), {"rank": 10**9, "seed": 0})
    with pytest.raises(ValueError, match="entries"):
        LowRankFisher.from_payload(payload)


def test_server_rejects_a_sketch_of_another_rank_or_seed() -> None:
    """Low-rank payloads must use the server's rank and sketch seed (else they cannot be summed)."""
    state, ups = make_round(extra={"curvature": "lowrank", "damping": 0.1}, n=4, rounds=0)
    for key, value in (("rank", 3), ("seed", 99)):
        bad = fresh(ups[-1])
        bad.meta["curv"]["rep_meta"]["lowrank"][key] = value
        assert_rejected_cleanly(state, ups[:-1], bad, "low-rank sketch")


def test_all_zero_diagonal_falls_back_to_the_identity() -> None:
    """A block whose curvature is all zeros (e.g. built from inverses only) is not divided by λ."""
    model = _model()
    ng = NaturalGradient(model, damping=1e-2, kl_clip=None)
    cs = ng.local_curvature  # never updated: every factor is zero
    grads: list[torch.Tensor | None] = [torch.ones(8, 7), torch.ones(3, 9)]
    precond: list[torch.Tensor | None] = [None, None]
    used = fall_back(cs, grads, precond, {0, 1}, 1e-2, False)
    assert used == {0: "identity", 1: "identity"}
    assert all(torch.equal(p, g) for p, g in zip(precond, grads, strict=True))  # type: ignore[arg-type]


def test_weight_zero_rep_does_not_make_a_block_seen() -> None:
    """combine([F], [0]) has no curvature: its blocks are not 'seen' (count 0), so nothing inverts
    zero factors at the damping floor."""
    model = _model()
    ng = NaturalGradient(model)
    _backward(model)
    ng.step()
    zero = CurvatureSet.combine([ng.local_curvature], [0.0])
    assert all(c == 0 for rep in zero.reps.values() for c in rep.counts)


def test_block_without_curvature_keeps_its_plain_gradient() -> None:
    """Zero output gradients (all curvature 0) but a gradient from an L2 term: relative damping
    would invert at the 1e-8 floor (a ~1e8 amplification); the block keeps its plain gradient."""
    model = _model()
    ng = NaturalGradient(model, kl_clip=None)
    for _ in range(2):
        model.zero_grad()
        out = model(torch.randn(16, 6))
        loss = (out * 0.0).sum() + sum((p**2).sum() for p in model.parameters())
        loss.backward()
        plain = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        ng.step()
    got = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.allclose(g, w) for g, w in zip(got, plain, strict=True))


def test_overflowed_own_curvature_is_reset_under_a_mixed_preconditioner() -> None:
    """With source "mixed", an own factor that overflowed fails every mixed inversion; the block
    falls back for that step and its own curvature is reset, so the next steps recover."""
    model = _model()
    ng = NaturalGradient(model, inverse_every=1, kl_clip=None)
    _backward(model)
    ng.step()
    ng.set_global(CurvatureSet.combine([ng.local_curvature], [1.0]), mix=0.5)
    ng.local_curvature.reps["kfac"].A[0].fill_(float("inf"))  # type: ignore[attr-defined]
    with pytest.warns(RuntimeWarning):
        _backward(model)
        ng.step()
    assert ng.stats["reset_blocks"] >= 1
    assert all(math.isfinite(t) for t in ng.local_curvature.reps["kfac"].block_traces())
    _backward(model)
    ng.step()
    assert not ng.last["fallbacks"]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
