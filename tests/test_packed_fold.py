"""The native helpers of the int8 curvature payload (`fedng.curvature.packed_fold`) against
float64 references: the one-pass int8 and bf16 folds, the sums of squares, the int8 quantization
of triangles with its certified error bound, and the scale-only check of int8 triangles."""

from __future__ import annotations

import math

import pytest
import torch
from _tols import assert_close
from fedng.curvature import pack_triangle, unpack_triangle
from fedng.curvature.packed_fold import (
    bf16_axpy,
    fold_update,
    int8_triangles,
    payload_axpy,
    payload_traces,
    sum_squares,
)
from fedng.curvature.quantize import (
    LOWRANK_RANK,
    QMAX,
    VEC_CHUNK,
    Segment,
    dequantize,
    dequantize_add,
    dequantize_vector,
    fold_plan,
    quantize,
    quantize_vector,
    side_traces,
)
from hypothesis import given, settings
from hypothesis import strategies as st

F64 = torch.float64


def payload(sizes: list[int], vec: int, seed: int) -> tuple[torch.Tensor, list[Segment]]:
    """A float32 payload of PSD triangles (spread scales, some rank-deficient) and one vector."""
    g = torch.Generator().manual_seed(seed)
    parts, segs = [], []
    for n in sizes:
        x = torch.randn(max(n // 2, 1), n, generator=g, dtype=F64)
        x = x * torch.logspace(-2, 0, n, dtype=F64)
        parts.append(pack_triangle(x.T @ x))
        segs.append(("tri", n))
    if vec:
        parts.append(torch.rand(vec, generator=g, dtype=F64))
        segs.append(("vec", vec))
    return torch.cat(parts).float(), segs


def triangle_ref(vec: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The float64 reference of one triangle's quantization: (int8 packed q, float32 D,
    ||C~ - C||_2 by an eigensolver)."""
    m = unpack_triangle(vec.double(), n)
    d = m.diagonal().float().double()
    root = d.clamp(min=0).sqrt()
    inv = torch.where(root > 0, 1.0 / root, torch.zeros_like(root))
    corr = m * inv[:, None] * inv[None, :]
    q = torch.round(corr * QMAX).clamp_(-QMAX, QMAX)
    q.fill_diagonal_(0.0)
    err = q / QMAX - corr
    err.fill_diagonal_(0.0)
    err = torch.tril(err) + torch.tril(err, -1).T
    rel = float(torch.linalg.eigvalsh(err).abs().max()) if n else 0.0
    return pack_triangle(q).to(torch.int8), d.float(), rel


@settings(max_examples=20, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=3),
    vec=st.integers(0, 3 * VEC_CHUNK),
    weight=st.floats(-3.0, 3.0, allow_nan=False),
    seed=st.integers(0, 1000),
)
def test_int8_fold_is_acc_plus_weight_times_dequantize(
    sizes: list[int], vec: int, weight: float, seed: int
) -> None:
    """`dequantize_add` = acc + w * dequantize (float64 reference), ragged segments."""
    data, segs = payload(sizes, vec, seed)
    q, side = quantize(data, segs)
    acc = torch.randn(data.numel(), generator=torch.Generator().manual_seed(seed))
    ref = acc.double() + weight * dequantize(q, side, segs).double()
    dequantize_add(acc, q, side, segs, weight)
    assert_close(acc, ref, torch.float32, "packed_fold")


@pytest.mark.parametrize("with_payload", [False, True])
def test_fold_update_is_every_axpy_in_one_call(with_payload: bool) -> None:
    """`fold_update` = acc + w * x per array (float32, bf16 read in place; fp16 and
    non-contiguous as copies) and acc + w * dequantize for the int8 payload (float64
    references); sizes that do not match are one-line errors, nothing written."""
    g = torch.Generator().manual_seed(3)
    xs = [
        torch.randn(0, generator=g),
        torch.randn(700, generator=g),
        torch.randn(33, generator=g).bfloat16(),
        torch.randn(40, generator=g).half(),
        torch.randn(9, 5, generator=g).T,
    ]
    accs = [torch.randn(x.numel(), generator=g) for x in xs]
    refs = [a.double() + 0.7 * x.double().reshape(-1) for a, x in zip(accs, xs, strict=True)]
    got8 = None
    if with_payload:
        data, segs = payload([30, 1, 17], 70, 5)
        segs = [*segs, ("lrtri", 300)]
        data = torch.cat([data, torch.rand(300 * 301 // 2, generator=g)])
        q, side = quantize(data, segs)
        flat, nacc, _, _ = fold_plan(segs)
        acc8 = torch.randn(nacc, generator=g)
        ref8 = acc8.double() + 0.7 * dequantize(q, side, segs).double()
        got8 = (acc8, q, side, flat, VEC_CHUNK)
    fold_update(accs, xs, 0.7, got8)
    for a, r in zip(accs, refs, strict=True):
        assert_close(a, r, torch.float32, "packed_fold")
    if got8 is not None:
        assert_close(got8[0], ref8, torch.float32, "packed_fold", scale=float(ref8.abs().max()))
    before = [a.clone() for a in accs]
    with pytest.raises(ValueError, match="fold_update"):
        fold_update(accs[:2], [xs[0], torch.zeros(3)], 1.0)
    with pytest.raises(ValueError, match="fold_update"):
        fold_update(accs[:1], [torch.zeros(0, dtype=torch.int64)], 1.0)
    assert all(torch.equal(a, b) for a, b in zip(accs, before, strict=True))


def test_quantize_vector_is_the_torch_arithmetic_bit_for_bit() -> None:
    """The native int8 vector quantization (the line-search probe) = the float64 torch
    reference bit for bit: ragged chunks, zeros, ties, tiny and huge scales, NaN / Inf; and its
    one-pass decode = `dequantize`'s."""
    from fedng.curvature.quantize import _quantize_vec_ref

    g = torch.Generator().manual_seed(0)
    sizes, scales = (0, 1, 63, 64, 65, 3000), (1e-30, 1.0, 1e30)
    cases = [torch.randn(n, generator=g) * sc for n in sizes for sc in scales]
    tie = torch.randn(200, generator=g)
    tie[:64] = torch.arange(64) * 0.5  # scale 1 (max 127): halves, rounded to even
    tie[63] = 127.0
    cases += [tie, torch.tensor([0.0, -0.0, 1e-45, 3e38, -3e38])]
    cases += [torch.tensor(v) for v in ([1.0, math.nan, 2.0], [math.inf, 1.0], [-math.inf, 0.5])]
    for x in cases:
        q, scale = quantize_vector(x)
        rq, rscale = _quantize_vec_ref(x)
        assert torch.equal(q, rq)
        assert torch.equal(scale.isnan(), rscale.isnan())
        assert torch.equal(scale.nan_to_num(), rscale.nan_to_num())
        if bool(torch.isfinite(x).all()):  # the one-pass decode = dequantize's torch path
            back = dequantize(rq, rscale, [("vec", x.numel())])
            assert torch.equal(dequantize_vector(q, scale), back)


def test_bf16_fold_and_sums_of_squares_match_float64() -> None:
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, generator=g).bfloat16() for n in (0, 1, 7, 5000)]
    accs = [torch.randn(x.numel(), generator=g) for x in xs]
    refs = [a.double() + 0.3 * x.double() for a, x in zip(accs, xs, strict=True)]
    bf16_axpy(accs, xs, 0.3)
    for a, r in zip(accs, refs, strict=True):
        assert_close(a, r, torch.float32, "packed_fold")
    ts = [torch.randn(3000, 7, generator=g), xs[3], torch.zeros(0), torch.randn(5).half()]
    got = torch.tensor(sum_squares(ts), dtype=torch.float32)  # float32 within blocks
    ref = torch.stack([(t.double() ** 2).sum() for t in ts])
    assert_close(got, ref, torch.float32, "sum_squares", scale=float(ref.max()))
    # finite entries whose float32 squares overflow stay finite; NaN / Inf come out as such
    big, nan, inf = sum_squares(
        [torch.tensor([3e30, 1.0]), torch.tensor([1.0, math.nan]), torch.tensor([-math.inf])]
    )
    assert big == pytest.approx(9e60, rel=1e-6) and math.isnan(nan) and inf == math.inf


@pytest.mark.parametrize("n,rank", [(1, 1), (10, 3), (65, 65), (200, 40), (300, 0), (520, 100)])
def test_int8_triangles_match_the_reference_with_a_certified_bound(n: int, rank: int) -> None:
    """q and D bit for bit as the float64 reference; delta >= ||C~ - C||_2 (what makes the
    receiver's matrix PSD) and within a few percent of it (the Cholesky certificate)."""
    g = torch.Generator().manual_seed(n)
    if rank:
        x = torch.randn(rank, n, generator=g, dtype=F64) * torch.logspace(-2, 0, n, dtype=F64)
        m = x.T @ x
    else:  # diagonal: every correlation exact, no error at all
        m = torch.diag(torch.rand(n, generator=g, dtype=F64))
    vec = pack_triangle(m).float()
    q, side = quantize(vec, [("tri", n)])
    q_ref, d_ref, rel = triangle_ref(vec, n)
    assert torch.equal(q, q_ref) and torch.equal(side[:n], d_ref)
    headroom = 8 * n * 2.0**-24
    bound = (float(side[n]) - headroom) / (1 + 1e-6)
    assert bound >= rel * (1 - 1e-6)
    assert bound <= 1.1 * rel + 1e-12


def test_side_traces_settle_honest_triangles_and_refuse_the_rest() -> None:
    data, segs = payload([30, 9], 0, 3)
    q, side = quantize(data, segs)
    got = side_traces(q, side, segs, 1e18)
    back = dequantize(q, side, segs).double()
    ref = [
        float(unpack_triangle(back[:465], 30).trace()),
        float(unpack_triangle(back[465:], 9).trace()),
    ]
    assert got is not None and got == pytest.approx(ref, rel=1e-12)
    for pos, val in ((3, -1.0), (30, -0.5), (31, math.nan), (0, math.inf)):  # D, delta, D, D
        bad = side.clone()
        bad[pos] = val
        assert side_traces(q, bad, segs, 1e18) is None
    assert side_traces(q, side, segs, 1e-3) is None  # a trace above the bound: read the entries
    vq, vside = quantize(*payload([4], 70, 1))
    assert side_traces(vq, vside, [("tri", 4), ("vec", 70)], 1e18) is None  # vectors: entries


def lowrank_ref(q: torch.Tensor, side: torch.Tensor, n: int) -> tuple[torch.Tensor, float]:
    """The float64 reference of a low-rank segment: (packed B~ B~^T + sigma I, its trace), the
    receiver's float32 B~ (two int8 digits per entry, per-column scales) multiplied in float64."""
    k = side.numel() - 1
    digits = q.float().reshape(2, n, k)
    b = ((digits[0] + digits[1] / (2 * QMAX)) * side[:-1]).double()
    m = b @ b.T + float(side[-1]) * torch.eye(n, dtype=F64)
    return pack_triangle(m), float(m.trace())


@pytest.mark.parametrize("n", [256, 300, 513])
def test_lowrank_fold_and_traces_match_float64(n: int) -> None:
    """The native low-rank fold (`B~ B~^T + sigma I` added to its packed triangle, the other
    segments around it) and its scale-only traces against float64 references."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(60, n, generator=g, dtype=F64) * torch.logspace(-2, 0, n, dtype=F64)
    tri, _ = payload([7], 0, n)
    data = torch.cat([tri, pack_triangle(x.T @ x).float(), tri])
    segs: list[Segment] = [("tri", 7), ("lrtri", n), ("tri", 7)]
    q, side = quantize(data, segs)
    nq, nt = 2 * n * LOWRANK_RANK, 7 * 8 // 2
    lq, lside = q[nt : nt + nq], side[8 : 8 + LOWRANK_RANK + 1]
    ref_m, ref_tr = lowrank_ref(lq, lside, n)
    acc = torch.randn(data.numel(), generator=g)
    ref = acc.double() + 0.7 * dequantize(q, side, segs).double()
    ref[nt : nt + ref_m.numel()] = acc[nt : nt + ref_m.numel()].double() + 0.7 * ref_m
    dequantize_add(acc, q, side, segs, 0.7)
    assert_close(acc, ref, torch.float32, "packed_fold", scale=float(ref.abs().max()))
    got = side_traces(q, side, segs, 1e18)
    tris = side_traces(q[:nt], side[:8], segs[:1], 1e18)
    assert got is not None and tris is not None
    assert got == pytest.approx([tris[0], ref_tr, tris[0]], rel=1e-12)
    # the bare kernel: offsets inside larger buffers, and refusals
    one = [2, 3, nt, 8, n, LOWRANK_RANK]
    acc2 = torch.zeros(ref_m.numel() + 3)
    payload_axpy(acc2, q, side, one, VEC_CHUNK, 2.0)
    assert_close(acc2[3:], 2.0 * ref_m, torch.float32, "packed_fold", scale=float(ref_m.max()))
    assert not acc2[:3].any()
    for pos, val in ((8, -1.0), (8 + LOWRANK_RANK, -0.5), (9, math.nan), (10, math.inf)):
        bad = side.clone()
        bad[pos] = val  # a column scale, sigma, NaN, Inf: read the entries instead
        assert payload_traces(q, bad, one, VEC_CHUNK) is None
        assert side_traces(q, bad, segs, 1e18) is None
    assert side_traces(q, side, segs, 0.5 * ref_tr) is None  # above the bound
    for bad_seg, why in (
        ([2, 4, nt, 8, n, LOWRANK_RANK], "runs past"),
        ([2, 3, q.numel() - nq + 1, 8, n, LOWRANK_RANK], "runs past"),
        ([2, 3, nt, 8, n, n + 1], "rank above"),
        ([3, 3, nt, 8, n, LOWRANK_RANK], "unknown form"),
    ):
        with pytest.raises(ValueError, match=why):
            payload_axpy(acc2, q, side, bad_seg, VEC_CHUNK, 1.0)
    with pytest.raises(ValueError, match="payload_axpy"):
        payload_axpy(acc2.double(), q, side, [], VEC_CHUNK, 1.0)
    with pytest.raises(ValueError, match="payload_traces"):
        payload_traces(q.float(), side, [], VEC_CHUNK)


def test_bad_buffers_are_one_line_errors() -> None:
    acc, q = torch.zeros(3), torch.zeros(3, dtype=torch.int8)
    side = torch.ones(3)
    with pytest.raises(ValueError, match="payload_axpy"):
        payload_axpy(acc.double(), q, side, [0, 0, 0, 0, 2, 0], VEC_CHUNK, 1.0)
    with pytest.raises(ValueError, match="payload_axpy"):
        payload_axpy(acc, q.float(), side, [0, 0, 0, 0, 2, 0], VEC_CHUNK, 1.0)
    with pytest.raises(ValueError, match="runs past"):
        payload_axpy(acc, q, side, [0, 0, 0, 0, 3, 0], VEC_CHUNK, 1.0)
    with pytest.raises(ValueError, match="bf16_axpy"):
        bf16_axpy([torch.zeros(2)], [torch.zeros(3).bfloat16()], 1.0)
    with pytest.raises(ValueError, match="runs past"):
        int8_triangles(torch.zeros(3), q, torch.zeros(2), [0, 0, 2])
    with pytest.raises(ValueError, match="sum_squares"):
        sum_squares([torch.zeros(2, dtype=torch.int64)])


def test_lazy_negations_are_folded_and_measured_by_value() -> None:
    """A neg view (`torch._neg_view`: the bit set, the memory not negated) is read by value:
    the kernels read raw memory, so it is materialized first; a neg-view sum or int8 payload
    is refused (one line)."""
    torch.manual_seed(0)
    x = torch.randn(7)
    neg, plain = torch._neg_view(x), -x
    assert neg.is_neg() and torch.equal(neg, plain)
    acc_a, acc_b = torch.zeros(7), torch.zeros(7)
    fold_update([acc_a], [neg], 0.5, None)
    fold_update([acc_b], [plain], 0.5, None)
    assert torch.equal(acc_a, acc_b) and torch.equal(acc_a, -0.5 * x)
    assert sum_squares([neg]) == sum_squares([plain])
    with pytest.raises(ValueError, match="fold_update"):
        fold_update([torch._neg_view(torch.zeros(7))], [x], 1.0, None)
    q, side = torch.zeros(3, dtype=torch.int8), torch.ones(3)
    with pytest.raises(ValueError, match="'side'"):
        payload_axpy(torch.zeros(3), q, torch._neg_view(side), [0, 0, 0, 0, 2, 0], VEC_CHUNK, 1.0)


def test_huge_segment_offsets_and_ranks_are_refused_not_wrapped() -> None:
    """Offsets near 2**63 and ranks whose value counts overflow int64 are one-line errors (the
    bounds are checked by differences: a sum would wrap past them)."""
    acc, q, side = torch.zeros(3), torch.zeros(3, dtype=torch.int8), torch.ones(3)
    big = 2**63 - 2
    for segs in ([0, big, 0, 0, 2, 0], [0, 0, big, 0, 2, 0], [0, 0, 0, big, 2, 0]):
        with pytest.raises(ValueError, match="runs past"):
            payload_axpy(acc, q, side, segs, VEC_CHUNK, 1.0)
    with pytest.raises(ValueError, match="huge"):  # 2 n k overflows int64
        payload_axpy(acc, q, side, [2, 0, 0, 0, 3_000_000_000, 3_000_000_000], VEC_CHUNK, 1.0)
    q = torch.tensor([5, -7, 127], dtype=torch.int8)
    huge, usual = torch.zeros(3), torch.zeros(3)  # a huge chunk is one chunk, not a wrap
    payload_axpy(huge, q, side, [1, 0, 0, 0, 3, 0], 2**63 - 1, 1.0)
    payload_axpy(usual, q, side, [1, 0, 0, 0, 3, 0], VEC_CHUNK, 1.0)
    assert torch.equal(huge, usual) and bool(usual.abs().sum() > 0)
