"""The int8 triangles' values and certificate on sizes the vectorized passes split unevenly
(column passes with remainders, one clone per CPU): the values are the float64
reference's, and `delta` is a tight upper bound on `||C~ - C||_2`."""

from __future__ import annotations

import pytest
import torch
from fedng.curvature import pack_triangle
from fedng.curvature.quantize import quantize

F64 = torch.float64


def _reference_q(m: torch.Tensor) -> torch.Tensor:
    """`clamp(round_half_even(127 C_ij), +-127)` of the correlations, in float64."""
    d = m.diagonal().clamp(min=0)
    inv = torch.where(d > 0, 1 / d.sqrt(), torch.zeros_like(d))
    c = m * inv[:, None] * inv[None, :]
    q = torch.round(c * 127).clamp(-127, 127)  # torch.round: half to even
    q.fill_diagonal_(0)
    return q


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 33, 130])
def test_triangle_values_and_certificate(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n + 3, n, generator=g, dtype=F64) * torch.logspace(-2, 0, n, dtype=F64)
    m = (x.T @ x / (n + 3)).float()
    if n > 4:
        m[2, 2] = 0.0  # a zero variance: its row and column of C are 0
        m[2, :] = 0.0
        m[:, 2] = 0.0
    q, side = quantize(pack_triangle(m), [("tri", n)])
    m64 = m.double()
    ref = _reference_q(m64)
    got = torch.zeros(n, n, dtype=F64)
    rows, cols = torch.tril_indices(n, n)
    got[rows, cols] = q.double()
    assert torch.equal(got.tril(-1), ref.tril(-1))
    assert torch.equal(side[:n], m.diagonal())
    d = m64.diagonal()
    inv = torch.where(d > 0, 1 / d.sqrt(), torch.zeros_like(d))
    e = ref / 127 - m64 * inv[:, None] * inv[None, :]
    e.fill_diagonal_(0)
    norm = float(torch.linalg.matrix_norm(e, 2))
    delta = float(side[n])
    assert delta >= norm
    # tight: the semicircle start, 5% steps (on tiny matrices the start is looser)
    assert delta <= (1.06 if n >= 8 else 1.3) * norm + 1e-5
