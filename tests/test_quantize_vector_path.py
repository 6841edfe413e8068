"""`quantize_vector`'s direct path is `quantize` of one vector segment, bit for bit."""

from __future__ import annotations

import pytest
import torch
from fedng.curvature.quantize import VEC_CHUNK, quantize, quantize_vector


@pytest.mark.parametrize("shape", [(0,), (1,), (VEC_CHUNK + 3,), (7, 130), (3, 2, 65)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_quantize_vector_is_quantize_of_one_vector(
    shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 1e-3).to(dtype)
    if x.numel() > 5:
        x.view(-1)[2] = 0.0
        x.view(-1)[4] = float("nan")
    for inp in (x, torch._neg_view(x) if dtype != torch.bfloat16 else -x):
        q, scale = quantize_vector(inp)
        ref_q, ref_s = quantize(inp.resolve_neg().reshape(-1), [("vec", inp.numel())])
        assert q.shape == inp.shape and q.dtype == torch.int8
        assert torch.equal(q.reshape(-1), ref_q)
        assert torch.equal(scale.view(torch.int32), ref_s.view(torch.int32))  # NaN scales too


def test_quantize_reads_a_negated_view_as_its_values() -> None:
    """`quantize`'s vector segments resolve a lazily negated view (the native call reads raw
    memory): the same int8 values and scales as the materialized tensor."""
    from fedng.curvature.quantize import quantize

    x = torch.randn(300, generator=torch.Generator().manual_seed(7))
    neg = x.neg().resolve_neg()
    view = torch._neg_view(x)
    got = quantize(view, [("vec", 300)])
    exp = quantize(neg, [("vec", 300)])
    assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])
