"""`_C.fold_batch`: B replies folded in one pass over the running sums must leave exactly what B
`fold_update` calls in order leave (bit for bit), for every segment form and array dtype, and
write nothing when its arguments are bad."""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
import torch
from fedng._backend import native
from fedng.curvature.packed_fold import fold_update
from fedng.curvature.quantize import VEC_CHUNK, fold_plan, quantize
from fedng.curvature.spec import pack_triangle
from hypothesis import given, settings
from hypothesis import strategies as st

_SEGS = [("tri", 37), ("lrtri", 140), ("vec", 300), ("tri", 1), ("tri", 70)]


class _Reply(NamedTuple):
    xs: list[torch.Tensor]
    q: torch.Tensor
    side: torch.Tensor


def _reply(gen: torch.Generator, segs: list[tuple[str, int]], bf16: list[bool]) -> _Reply:
    """Random arrays (5000 and 9001 entries: more than one tile, ragged) and an int8 payload."""
    vals = []
    for form, n in segs:
        if form == "vec":
            vals.append(torch.randn(n, generator=gen))
        else:
            b = torch.randn(n, max(2, n // 3), generator=gen)
            vals.append(pack_triangle(b @ b.T / n))
    q, side = quantize(torch.cat(vals), segs)
    xs = [torch.randn(5000, generator=gen) * 3, torch.randn(9001, generator=gen)]
    xs = [x.bfloat16() if h else x for x, h in zip(xs, bf16, strict=True)]
    return _Reply(xs, q, side)


def _sums(nacc: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(99)
    return [torch.randn(5000, generator=gen), torch.randn(9001, generator=gen)], torch.randn(
        nacc, generator=gen
    )


def _batch(
    replies: list[_Reply],
    weights: list[float],
    segs: list[tuple[str, int]],
    bf16: list[bool],
) -> tuple[list[torch.Tensor], torch.Tensor]:
    flat, nacc, nq, nside = fold_plan(segs)
    accs, acc8 = _sums(nacc)
    native.fold_batch(
        xs=[x.data_ptr() for r in replies for x in r.xs],
        accs=[a.data_ptr() for a in accs],
        n=[a.numel() for a in accs],
        bf16=[int(h) for h in bf16],
        weights=weights,
        q=[r.q.data_ptr() for r in replies],
        side=[r.side.data_ptr() for r in replies],
        acc=acc8.data_ptr(),
        nq=nq,
        nside=nside,
        nacc=nacc,
        segs=list(flat),
        chunk=VEC_CHUNK,
    )
    return accs, acc8


def _sequential(
    replies: list[_Reply], weights: list[float], segs: list[tuple[str, int]]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    flat, nacc, _, _ = fold_plan(segs)
    accs, acc8 = _sums(nacc)
    for r, w in zip(replies, weights, strict=True):
        fold_update(accs, r.xs, w, (acc8, r.q, r.side, flat, VEC_CHUNK))
    return accs, acc8


@settings(max_examples=12, deadline=None)
@given(
    b=st.integers(1, 9),
    seed=st.integers(0, 2**16),
    bf16=st.lists(st.booleans(), min_size=2, max_size=2),
    wexp=st.lists(st.integers(-6, 6), min_size=9, max_size=9),
)
def test_fold_batch_is_fold_update_in_order_bit_for_bit(
    b: int, seed: int, bf16: list[bool], wexp: list[int]
) -> None:
    gen = torch.Generator().manual_seed(seed)
    replies = [_reply(gen, _SEGS, bf16) for _ in range(b)]
    weights = [float(torch.rand((), generator=gen)) * 10.0**e for e in wexp[:b]]
    got, got8 = _batch(replies, weights, _SEGS, bf16)
    want, want8 = _sequential(replies, weights, _SEGS)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert torch.equal(got8, want8)


def test_fold_batch_order_matters_and_is_kept() -> None:
    """Another order of the same replies gives other bits (the test above can fail): float32
    addition is not associative at these magnitudes."""
    gen = torch.Generator().manual_seed(3)
    segs = [("tri", 64)]
    replies = [_reply(gen, segs, [False, True]) for _ in range(4)]
    weights = [1e3, 1e-3, 7.0, 0.3]
    got, got8 = _batch(replies, weights, segs, [False, True])
    swapped, swapped8 = _sequential(replies[::-1], weights[::-1], segs)
    assert not torch.equal(got8, swapped8) and not torch.equal(got[0], swapped[0])
    want, want8 = _sequential(replies, weights, segs)
    assert torch.equal(got8, want8) and torch.equal(got[1], want[1])


def test_fold_batch_checks_before_writing() -> None:
    gen = torch.Generator().manual_seed(4)
    segs = [("tri", 8), ("lrtri", 140)]
    r = _reply(gen, segs, [False, False])
    flat, nacc, nq, nside = fold_plan(segs)
    accs, acc8 = _sums(nacc)
    before = [a.clone() for a in (*accs, acc8)]
    good: dict[str, Any] = {
        "xs": [x.data_ptr() for x in r.xs],
        "accs": [a.data_ptr() for a in accs],
        "n": [a.numel() for a in accs],
        "bf16": [0, 0],
        "weights": [1.0],
        "q": [r.q.data_ptr()],
        "side": [r.side.data_ptr()],
        "acc": acc8.data_ptr(),
        "nq": nq,
        "nside": nside,
        "nacc": nacc,
        "segs": list(flat),
        "chunk": VEC_CHUNK,
    }
    cases: tuple[tuple[dict[str, Any], str], ...] = (
        ({"weights": [1.0, 2.0]}, "'xs'"),
        ({"q": []}, "'q'"),
        ({"nacc": nacc - 1}, "runs past"),  # the low-rank segment, last: checked before writing
        ({"segs": [*flat[:6], 7, *flat[7:]]}, "unknown form"),
        ({"xs": [0, r.xs[1].data_ptr()]}, "null"),
        ({"side": [0]}, "null"),
    )
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            native.fold_batch(**{**good, **change})
        assert all(torch.equal(a, b) for a, b in zip((*accs, acc8), before, strict=True))
