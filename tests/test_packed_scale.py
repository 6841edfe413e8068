"""`scale_packed` (LAPACK slaqsp on packed triangles) against a dense float64 reference, and the
int8 `dequantize` built on it against the module docstring's formula."""

from __future__ import annotations

import pytest
import torch
from _tols import assert_close
from fedng.curvature.packed_scale import scale_packed
from fedng.curvature.quantize import QMAX, VEC_CHUNK, dequantize
from fedng.curvature.spec import pack_triangle, triangle_size, unpack_triangle


def test_scale_packed_matches_dense_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    sizes = [7, 1, 0, 33]
    vals = torch.randn(sum(triangle_size(n) for n in sizes) + 3, generator=gen)
    s = torch.rand(sum(sizes) + 2, generator=gen) + 0.5
    want = vals.double().clone()
    tris, at, sat = [], 2, 1
    for n in sizes:
        m = unpack_triangle(want[at : at + triangle_size(n)], n)
        sc = s[sat : sat + n].double()
        want[at : at + triangle_size(n)] = pack_triangle(sc[:, None] * m * sc[None, :])
        tris.append((at, sat, n))
        at, sat = at + triangle_size(n), sat + n
    got = vals.clone()
    scale_packed(got, s, tris)
    assert_close(got, want, torch.float32, "default")


@pytest.mark.parametrize("bad", ["dtype", "range"])
def test_scale_packed_rejects_bad_input(bad: str) -> None:
    vals, s = torch.ones(6), torch.ones(3)
    if bad == "dtype":
        with pytest.raises(ValueError, match="float32"):
            scale_packed(vals.double(), s, [(0, 0, 3)])
    else:
        with pytest.raises(ValueError, match="runs past"):
            scale_packed(vals, s, [(1, 0, 3)])


def test_dequantize_is_the_documented_formula() -> None:
    """tri: q_ij sqrt(D_i D_j) / 127 off the diagonal, D_i (1 + delta) on it; vec: q times its
    chunk's scale (float64 reference)."""
    gen = torch.Generator().manual_seed(1)
    segs = [("tri", 9), ("vec", VEC_CHUNK + 5), ("tri", 1)]
    q = torch.randint(-127, 128, (triangle_size(9) + VEC_CHUNK + 5 + 1,), generator=gen)
    q = q.to(torch.int8)
    side = torch.rand(10 + 2 + 2, generator=gen)
    got = dequantize(q, side, segs)
    d, delta = side[:9].double(), float(side[9])
    m = unpack_triangle(q[:45].double(), 9) * (d.sqrt()[:, None] * d.sqrt()[None, :]) / QMAX
    m.diagonal().copy_(d * (1 + delta))
    assert_close(got[:45], pack_triangle(m), torch.float32, "default")
    scales = side[10:12].double().repeat_interleave(VEC_CHUNK)[: VEC_CHUNK + 5]
    assert_close(got[45:-1], q[45:-1].double() * scales, torch.float32, "default")
    assert_close(got[-1:], side[12:13].double() * (1 + float(side[13])), torch.float32, "default")
