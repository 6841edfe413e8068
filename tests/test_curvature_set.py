"""`CurvatureSet`: a model's block-diagonal curvature over K-FAC, diagonal and low-rank blocks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from fedng.curvature import (
    CurvatureCapture,
    CurvatureSet,
    layouts_of,
    pack_triangle,
    unpack_triangle,
)
from fedng.curvature.stats import BlockStats
from fedng.optim.config import assign
from torch import nn

MAPPING = {"0": "kfac", "2": "lowrank", "default": "diag"}  # blocks 0, 1 (LayerNorm), 2


def model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3))


def fitted(
    seed: int, batch: int = 6, rank: int = 4
) -> tuple[CurvatureSet, list[BlockStats | None], list[torch.Tensor | None]]:
    """A set fitted on one batch, that batch's stats and block gradients."""
    net = model()
    cap = CurvatureCapture(net)
    cap.recording = True
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(batch, 4, generator=g), torch.randint(0, 3, (batch,), generator=g)
    F.cross_entropy(net(x), y).backward()
    stats = cap.collect()
    grads = [b.grad_matrix(torch.float32) for b in cap.blocks]
    cs = CurvatureSet.empty(
        layouts_of(net, cap.blocks), assign(cap.blocks, MAPPING), rank=rank, sketch_seed=5
    )
    cs.update(stats, 0.9)
    cap.remove()
    return cs, stats, grads


def tensors(cs: CurvatureSet) -> list[torch.Tensor]:
    k, d, low = cs.reps["kfac"], cs.reps["diag"], cs.reps["lowrank"]
    return [*k.A, *k.G, *d.diag, *low.Y]  # type: ignore[attr-defined]


def test_blocks_are_grouped_by_kind_in_registry_order() -> None:
    cs, _, _ = fitted(0)
    assert cs.kinds == ["kfac", "diag", "lowrank"]
    assert list(cs.reps) == ["kfac", "diag", "lowrank"]
    assert cs.groups == {"kfac": [0], "diag": [1], "lowrank": [2]}
    assert [lay.weight for lay in cs.layouts] == ["0.weight", "1.weight", "2.weight"]
    with pytest.raises(ValueError, match="bad kinds"):
        CurvatureSet.empty(cs.layouts, ["kfac", "diag"])
    with pytest.raises(ValueError, match="bad kinds"):
        CurvatureSet.empty(cs.layouts, ["kfac", "diag", "dense"])


def test_inverse_pending_inverts_only_kinds_with_uninverted_curvature() -> None:
    cs, _, _ = fitted(0)
    assert CurvatureSet.empty(cs.layouts, cs.kinds).inverse_pending(0.1) is None  # no curvature
    cs.inverse(0.1)
    assert cs.inverse_pending(0.1) is None  # everything with curvature has an inverse
    fresh, _, _ = fitted(1)
    fresh.reps["kfac"].inverse(0.1)
    report = fresh.inverse_pending(0.1)
    assert report is not None and all(fresh.ready)
    assert report.names == ["1", "2"]  # the diagonal and low-rank kinds, not K-FAC again


def test_combine_is_the_exact_weighted_sum() -> None:
    (a, _, _), (b, _, _) = fitted(0), fitted(1)
    out = CurvatureSet.combine([a, b], [0.25, 0.75])
    for got, ta, tb in zip(tensors(out), tensors(a), tensors(b), strict=True):
        expected = torch.zeros_like(ta)
        expected.add_(ta, alpha=0.25).add_(tb, alpha=0.75)
        assert torch.equal(got, expected)
    assert not any(out.ready)  # inverses are not carried over
    other, _, _ = fitted(0, rank=3)
    with pytest.raises(ValueError, match="sketch_seed, rank"):
        CurvatureSet.combine([a, other], [0.5, 0.5])
    a_diag = CurvatureSet.empty(a.layouts, ["diag"] * 3)
    with pytest.raises(ValueError, match="different blocks or kinds"):
        CurvatureSet.combine([a, a_diag], [0.5, 0.5])


def test_wire_round_trip() -> None:
    cs, _, _ = fitted(0)
    arrays, meta = cs.to_arrays(torch.float32)
    assert list(arrays) == ["kfac", "diag", "lowrank"]
    meta = json.loads(json.dumps(meta))  # plain JSON
    assert meta["rep_meta"]["lowrank"] == {"rank": 4, "seed": 5}
    back = CurvatureSet.from_arrays(arrays, meta)
    assert back.kinds == cs.kinds and back.layouts == cs.layouts
    for got, want in zip(tensors(back), tensors(cs), strict=True):
        assert torch.equal(got, want)
    half, meta16 = cs.to_arrays(torch.bfloat16)
    approx = CurvatureSet.from_arrays({k: v.float() for k, v in half.items()}, meta16)
    for got, want in zip(tensors(approx), tensors(cs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))
    with pytest.raises(ValueError, match="do not match kinds"):
        CurvatureSet.from_arrays({"kfac": arrays["kfac"]}, meta)
    with pytest.raises(ValueError, match="must be 1-D with"):
        CurvatureSet.from_arrays({**arrays, "diag": arrays["diag"][:-1]}, meta)


def test_inverse_packing_round_trip() -> None:
    cs, stats, grads = fitted(0)
    report = cs.inverse(1e-2)
    assert report.failed == [] and report.names == ["0.A", "0.G", "1", "2"]
    arrays, sym = cs.inverse_arrays()
    assert sorted(sym) == ["kfac/0/A_inv", "kfac/0/G_inv"]
    assert sorted(arrays) == sorted(
        [
            "kfac/0/A_inv",
            "kfac/0/G_inv",
            "diag/1/inv",
            "lowrank/2/U",
            "lowrank/2/S",
            "lowrank/2/lambda",
        ]
    )
    # symmetric inverses travel as their triangles
    wire = {k: pack_triangle(v) if k in sym else v for k, v in arrays.items()}
    received = {
        k: unpack_triangle(v, arrays[k].shape[0]) if k in sym else v for k, v in wire.items()
    }
    glob = CurvatureSet.empty(cs.layouts, cs.kinds, rank=4, sketch_seed=5)
    glob.load_inverse_arrays(received)
    assert glob.ready == [True, True, True]
    want = cs.precondition(grads, stats)
    for got, w in zip(glob.precondition(grads, stats), want, strict=True):
        assert got is not None and w is not None
        # Inverses symmetrized by the wire; float32 rounding of the low-rank apply, relative to
        # the block's scale (an entry near zero may differ by a few ulps of the largest one).
        torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-6 * float(w.abs().max()))
    glob.load_inverse_arrays({})  # nothing there: nothing changes
    assert glob.ready == [True, True, True]
    with pytest.raises(ValueError, match="needs"):
        glob.load_inverse_arrays({"kfac/0/A_inv": arrays["kfac/0/A_inv"]})
    with pytest.raises(ValueError, match="must have shape"):
        glob.load_inverse_arrays({"diag/1/inv": torch.zeros(2, 2)})


def test_inverse_arrays_are_exact_without_packing() -> None:
    cs, stats, grads = fitted(0)
    cs.inverse(1e-2)
    arrays, _ = cs.inverse_arrays()
    glob = CurvatureSet.empty(cs.layouts, cs.kinds, rank=4, sketch_seed=5)
    glob.load_inverse_arrays(arrays)
    for kind, got, want in zip(
        cs.kinds, glob.precondition(grads, stats), cs.precondition(grads, stats), strict=True
    ):
        assert got is not None and want is not None
        if kind == "lowrank":  # lambda travels rounded to float32 (LowRank.inverse_arrays)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
        else:
            assert torch.equal(got, want)


def test_trace_and_relative_damping() -> None:
    cs, _, _ = fitted(0)
    k, d, low = cs.reps["kfac"], cs.reps["diag"], cs.reps["lowrank"]
    kfac_tr = float(k.A[0].trace()) * float(k.G[0].trace())  # type: ignore[attr-defined]
    diag_tr = float(d.diag[0].sum())  # type: ignore[attr-defined]
    low_tr = float((low.Y[0] * low.omega[0]).sum()) / 4  # type: ignore[attr-defined]
    assert cs.trace() == pytest.approx(kfac_tr + diag_tr + low_tr, rel=1e-6)
    lam = cs.relative_damping(0.1)
    assert lam["kfac"] == [pytest.approx(0.1 * kfac_tr / 25, rel=1e-6)]
    assert lam["diag"] == [pytest.approx(0.1 * diag_tr / 10, rel=1e-6)]
    assert lam["lowrank"] == [pytest.approx(0.1 * max(low_tr, 0.0) / 18, rel=1e-6)]


def test_validate_accepts_a_fisher() -> None:
    cs, _, _ = fitted(0)
    cs.validate()
    cs.validate(1e-3, torch.finfo(torch.bfloat16).eps)


def _broken(part: str) -> CurvatureSet:
    cs, _, _ = fitted(0)
    k, d, low = cs.reps["kfac"], cs.reps["diag"], cs.reps["lowrank"]
    if part == "asym":
        k.A[0][0, 1] += 1.0  # type: ignore[attr-defined]
    elif part == "indefinite":
        k.G[0].neg_()  # type: ignore[attr-defined]
    elif part == "nan":
        d.diag[0][0, 2] = float("nan")  # type: ignore[attr-defined]
    elif part == "negative":
        d.diag[0][0, 2] = -1.0  # type: ignore[attr-defined]
    elif part == "overflow":
        k.G[0].mul_(1e25)  # type: ignore[attr-defined]
    else:
        low.Y[0] = torch.randn_like(low.Y[0])  # type: ignore[attr-defined]
    return cs


@pytest.mark.parametrize(
    "part,message",
    [
        ("asym", "kfac block '0' A is not symmetric"),
        ("indefinite", "kfac block '0' G is not positive semi-definite"),
        ("nan", "diag block '1' diag has NaN/Inf entries"),
        ("negative", "diag block '1' diag has a negative entry"),
        ("overflow", "kfac block '0' G has entries of size .* overflow float32"),
        ("sketch", "lowrank block '2' sketch is not"),
    ],
)
def test_validate_names_the_block(part: str, message: str) -> None:
    cs = _broken(part)
    with pytest.raises(ValueError, match=message):
        cs.validate()
    rep = next(r for r in cs.reps.values() if r.kind == message.split()[0])
    with pytest.raises(ValueError, match=message):
        rep.validate()  # each representation checks itself the same way


def test_validate_tolerates_rounding_of_the_wire_dtype() -> None:
    cs, _, _ = fitted(0)
    g = cs.reps["kfac"].G[0]  # type: ignore[attr-defined]
    g[0, 1] += 2e-3 * float(g.abs().max())  # asymmetric by more than tol = 1e-3 ...
    with pytest.raises(ValueError, match="not symmetric"):
        cs.validate(1e-3)
    # ... but within what bf16 rounding can do to it: eps * ||G||_F (>= eps * max|G|)
    cs.validate(1e-3, wire_eps=torch.finfo(torch.bfloat16).eps)


def test_update_and_precondition_check_lengths() -> None:
    cs, stats, grads = fitted(0)
    with pytest.raises(ValueError, match="'stats' must have 3 entries"):
        cs.update(stats[:2], 0.9)
    with pytest.raises(ValueError, match="'grads' must have 3 entries"):
        cs.precondition(grads[:2])
    assert cs.precondition(grads) == [None, None, None]  # nothing inverted yet
    assert cs.dtype == torch.float32


def test_quadratic_sums_the_kinds() -> None:
    cs, _, grads = fitted(0)
    cs.inverse(1e-2)
    parts = [rep.quadratic([grads[i] for i in cs.groups[kind]]) for kind, rep in cs.reps.items()]
    assert cs.quadratic(grads) == sum(parts)
