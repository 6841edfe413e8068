"""Diagonal and low-rank Fisher against dense references; the shared protocol of all three.

The dense reference: per-sample gradients from torch.func give the empirical Fisher
`F = (1/B) sum_b j_b j_b^T` of each block explicitly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fedng import reference
from fedng.curvature import lowrank as lowrank_mod
from fedng.curvature.base import FisherRepresentation
from fedng.curvature.capture import CurvatureCapture
from fedng.curvature.diagonal import DiagonalFisher
from fedng.curvature.kfac import KFAC
from fedng.curvature.lowrank import LowRankFisher
from fedng.curvature.spec import Payload
from fedng.curvature.stats import BlockStats
from torch import nn

F64 = torch.float64
TOL = {"f64": 1e-9, "bf16": 1e-2}
B = 8


def model_and_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model, torch.randn(B, 4, dtype=F64), torch.randint(0, 3, (B,))


def capture(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[CurvatureCapture, list[BlockStats | None], list[torch.Tensor]]:
    cap = CurvatureCapture(model, dtype=F64)
    cap.recording = True
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    stats = cap.collect()
    grads = [b.grad_matrix(F64) for b in cap.blocks]
    cap.remove()
    return cap, stats, grads


def explicit_fishers(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Per block, the dense empirical Fisher [d, d] in the block's [m, n] row-major layout."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            torch.func.functional_call(model, p, (xb.unsqueeze(0),)), yb.unsqueeze(0)
        )

    g = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    jac = [
        torch.cat([g["0.weight"], g["0.bias"][:, :, None]], 2).reshape(B, -1),
        torch.cat([g["1.weight"], g["1.bias"]], 1),
        torch.cat([g["3.weight"], g["3.bias"][:, :, None]], 2).reshape(B, -1),
    ]
    return [j.T @ j / B for j in jac]


def test_diagonal_matches_dense_fisher_diagonal() -> None:
    model, x, y = model_and_data()
    cap, stats, grads = capture(model, x, y)
    rep = DiagonalFisher([b.spec for b in cap.blocks], F64)
    rep.update(stats)
    lam = 1e-3
    rep.inverse(lam)
    out = rep.precondition(grads)
    for d, fisher, g, p in zip(rep.diag, explicit_fishers(model, x, y), grads, out, strict=True):
        torch.testing.assert_close(
            d.reshape(-1), fisher.diagonal(), rtol=TOL["f64"], atol=TOL["f64"]
        )
        torch.testing.assert_close(p.reshape(-1), g.reshape(-1) / (fisher.diagonal() + lam))


def test_diagonal_with_sequence_rows_uses_per_sample_sums() -> None:
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(20, 2)).double()
    x, y = torch.randn(6, 5, 3, dtype=F64), torch.randint(0, 2, (6,))
    cap = CurvatureCapture(model, dtype=F64)
    cap.recording = True
    F.cross_entropy(model(x), y).backward()
    rep = DiagonalFisher([b.spec for b in cap.blocks], F64)
    rep.update(cap.collect())
    params = {n: p.detach() for n, p in model.named_parameters()}
    g = torch.func.vmap(
        torch.func.grad(
            lambda p, xb, yb: F.cross_entropy(
                torch.func.functional_call(model, p, (xb[None],)), yb[None]
            )
        ),
        in_dims=(None, 0, 0),
    )(params, x, y)
    j = torch.cat([g["0.weight"], g["0.bias"][:, :, None]], 2).reshape(6, -1)
    torch.testing.assert_close(
        rep.diag[0].reshape(-1), (j * j).mean(0), rtol=TOL["f64"], atol=TOL["f64"]
    )


def test_lowrank_full_rank_is_the_dense_fisher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lowrank_mod, "CHUNK_BYTES", 200 * 8)  # several sketch calls per update
    model, x, y = model_and_data()
    cap, stats, grads = capture(model, x, y)
    rep = LowRankFisher([b.spec for b in cap.blocks], rank=64, sketch_seed=3, dtype=F64)
    rep.update(stats)
    fishers = explicit_fishers(model, x, y)
    for yk, om, fisher in zip(rep.Y, rep.omega, fishers, strict=True):
        torch.testing.assert_close(yk, fisher @ om, rtol=TOL["f64"], atol=TOL["f64"])
    lam = 1e-2
    rep.inverse(lam)
    for p, g, fisher in zip(rep.precondition(grads), grads, fishers, strict=True):
        eye = torch.eye(len(fisher), dtype=F64)
        expected = torch.linalg.solve(fisher + lam * eye, g.reshape(-1))
        torch.testing.assert_close(p.reshape(-1), expected, rtol=1e-7, atol=1e-9)


def test_lowrank_truncated_matches_nystrom_reference() -> None:
    model, x, y = model_and_data()
    cap, stats, grads = capture(model, x, y)
    rep = LowRankFisher([b.spec for b in cap.blocks], rank=3, sketch_seed=5, dtype=F64)
    rep.update(stats)
    lam = 1e-2
    rep.inverse(lam)
    for k, (p, g) in enumerate(zip(rep.precondition(grads), grads, strict=True)):
        ((u, s),) = reference.nystrom_ref([rep.Y[k]], [rep.omega[k]], 0.0)
        dense = u @ torch.diag(s) @ u.T + lam * torch.eye(len(u), dtype=F64)
        torch.testing.assert_close(
            p.reshape(-1), torch.linalg.solve(dense, g.reshape(-1)), rtol=1e-6, atol=1e-8
        )


def test_lowrank_eigendecompositions_are_those_of_inverse_and_leave_it_alone() -> None:
    model, x, y = model_and_data()
    cap, stats, _ = capture(model, x, y)
    rep = LowRankFisher([b.spec for b in cap.blocks], rank=3, sketch_seed=5, dtype=F64)
    assert rep.eigendecompositions() == [None] * 3  # no curvature yet
    rep.update([stats[0], None, stats[2]])
    eig = rep.eigendecompositions()
    assert eig[1] is None and not any(rep.ready)
    rep.inverse(0.1)
    for k in (0, 2):
        e = eig[k]
        assert e is not None and torch.equal(e[0], rep.U[k]) and torch.equal(e[1], rep.S[k])


def build(kind: str, cap: CurvatureCapture) -> FisherRepresentation:
    specs = [b.spec for b in cap.blocks]
    if kind == "kfac":
        return KFAC([s for s in specs if s.kind != "elementwise"], F64)
    if kind == "diag":
        return DiagonalFisher(specs, F64)
    return LowRankFisher(specs, rank=4, sketch_seed=9, dtype=F64)


def fit(kind: str, cap: CurvatureCapture, stats: list[BlockStats | None]) -> FisherRepresentation:
    rep = build(kind, cap)
    rep.update([s for s in stats if kind != "kfac" or s.kind != "elementwise"])
    return rep


def state_tensors(rep: FisherRepresentation) -> list[torch.Tensor]:
    if isinstance(rep, KFAC):
        return rep.A + rep.G
    if isinstance(rep, DiagonalFisher):
        return rep.diag
    return rep.Y


@pytest.mark.parametrize("kind", ["kfac", "diag", "lowrank"])
def test_aggregate_is_exact_for_sums(kind: str) -> None:
    model, x, y = model_and_data()
    cap, full, _ = capture(model, x, y)
    halves = [capture(model, x[s], y[s])[1] for s in (slice(0, 3), slice(3, B))]
    whole = fit(kind, cap, full)
    parts = [fit(kind, cap, h) for h in halves]
    agg = type(whole).aggregate(parts, [3 / B, 5 / B])
    for a, w in zip(state_tensors(agg), state_tensors(whole), strict=True):
        torch.testing.assert_close(a, w, rtol=TOL["f64"], atol=TOL["f64"])
    with pytest.raises(ValueError, match="'weights' must have 2 values"):
        type(whole).aggregate(parts, [1.0])


def test_lowrank_aggregate_needs_the_same_seed() -> None:
    model, x, y = model_and_data()
    cap, _, _ = capture(model, x, y)
    specs = [b.spec for b in cap.blocks]
    a, b = (
        LowRankFisher(specs, 4, sketch_seed=1, dtype=F64),
        LowRankFisher(specs, 4, sketch_seed=2, dtype=F64),
    )
    with pytest.raises(ValueError, match="sketch_seed, rank"):
        LowRankFisher.aggregate([a, b], [0.5, 0.5])


@pytest.mark.parametrize("kind", ["kfac", "diag", "lowrank"])
def test_payload_roundtrip_and_exact_nbytes(kind: str) -> None:
    model, x, y = model_and_data()
    cap, stats, _ = capture(model, x, y)
    rep = fit(kind, cap, stats)
    specs = rep.specs
    expected_numbers = {
        "kfac": sum(s.n * (s.n + 1) // 2 + s.m * (s.m + 1) // 2 for s in specs),
        "diag": sum(s.m * s.n for s in specs),
        "lowrank": sum(s.m * s.n * 4 for s in specs),
    }[kind]
    assert rep.nbytes == 8 * expected_numbers
    pay = rep.to_payload(F64)
    assert pay.nbytes == rep.nbytes and pay.data.numel() == expected_numbers
    back = type(rep).from_payload(pay, F64)
    for a, b in zip(state_tensors(back), state_tensors(rep), strict=True):
        assert torch.equal(a, b)
    half = rep.to_payload(torch.bfloat16)
    assert half.nbytes == 2 * expected_numbers
    approx = type(rep).from_payload(half, F64)
    for a, b in zip(state_tensors(approx), state_tensors(rep), strict=True):
        torch.testing.assert_close(a, b, rtol=TOL["bf16"], atol=TOL["bf16"] * float(b.abs().max()))
    truncated = Payload(pay.kind, pay.specs, pay.data[:-1], pay.meta)
    with pytest.raises(ValueError, match=f"must be 1-D with {expected_numbers} entries"):
        type(rep).from_payload(truncated, F64)
    wrong = Payload("other", pay.specs, pay.data, pay.meta)
    with pytest.raises(ValueError, match=r"'payload\.kind'"):
        type(rep).from_payload(wrong, F64)


@pytest.mark.parametrize("kind", ["kfac", "diag", "lowrank"])
def test_state_dict_roundtrip_preconditions_identically(kind: str) -> None:
    model, x, y = model_and_data()
    cap, stats, grads = capture(model, x, y)
    rep = fit(kind, cap, stats)
    rep.inverse(1e-2)
    fresh = build(kind, cap)
    fresh.load_state_dict(rep.state_dict())
    g = grads if kind != "kfac" else [grads[0], grads[2]]
    for a, b in zip(fresh.precondition(g), rep.precondition(g), strict=True):
        assert torch.equal(a, b)
    other = build("diag" if kind != "diag" else "kfac", cap)
    with pytest.raises(ValueError, match="state"):
        other.load_state_dict(rep.state_dict())


def test_validate_names_the_bad_block() -> None:
    model, x, y = model_and_data()
    cap, stats, _ = capture(model, x, y)
    diag = fit("diag", cap, stats)
    diag.validate()
    diag.diag[1][0, 2] = -1.0
    with pytest.raises(ValueError, match="diag block '1' diag has a negative entry"):
        diag.validate()
    low = fit("lowrank", cap, stats)
    low.validate()
    low.Y[2] = torch.randn_like(low.Y[2])  # not F Ω for any symmetric F
    with pytest.raises(ValueError, match="block '3'"):
        low.validate()
    low.Y[2][0, 0] = float("nan")
    with pytest.raises(ValueError, match="lowrank block '3' sketch has NaN"):
        low.validate()


def test_precondition_rejects_wrong_shapes() -> None:
    model, x, y = model_and_data()
    cap, stats, grads = capture(model, x, y)
    rep = fit("diag", cap, stats)
    rep.inverse(1e-3)
    with pytest.raises(ValueError, match=r"block '0' must have shape \[5, 5\], got \[5, 4\]"):
        rep.precondition([grads[0][:, :4], None, None])
    with pytest.raises(ValueError, match="'damping' must be finite and > 0"):
        rep.inverse(0.0)


@pytest.mark.parametrize("kind", ["diag", "lowrank"])
def test_non_finite_curvature_fails_softly(kind: str) -> None:
    model, x, y = model_and_data()
    cap, stats, grads = capture(model, x, y)
    rep = fit(kind, cap, stats)
    rep.inverse(1e-2)
    before = rep.precondition(grads)
    state_tensors(rep)[1].fill_(float("nan"))
    report = rep.inverse(1e-2)
    assert report.status.tolist() == [0, 2, 0] and report.failed == ["1"]
    after = rep.precondition(grads)
    assert torch.equal(after[1], before[1])  # the previous inverse is kept: no NaN step


@pytest.mark.parametrize("kind", ["kfac", "diag", "lowrank"])
def test_gradient_accumulation_equals_the_full_batch(kind: str) -> None:
    model, x, y = model_and_data()
    cap, full, _ = capture(model, x, y)
    acc = CurvatureCapture(model, dtype=F64)
    acc.recording = True
    model.zero_grad()
    for part in (slice(0, 4), slice(4, B)):  # two micro-batches, the loss averaged over both
        (F.cross_entropy(model(x[part]), y[part]) / 2).backward()
    merged = acc.collect()
    assert merged[0].batch_size == B
    for a, b in zip(
        state_tensors(fit(kind, cap, merged)), state_tensors(fit(kind, cap, full)), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=TOL["f64"], atol=TOL["f64"])
