"""Block layouts (blocks among named parameters) and the packed-triangle wire form."""

from __future__ import annotations

import json

import pytest
import torch
from fedng.curvature import (
    BlockLayout,
    CurvatureCapture,
    check_layouts,
    layouts_of,
    pack_triangle,
    to_matrix,
    unpack_triangle,
    write_matrix,
)
from fedng.curvature.spec import triangle_size
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.conv = nn.Conv2d(2, 4, 3, groups=2)
        self.ln = nn.LayerNorm(4)
        self.attn = nn.MultiheadAttention(4, 2)
        self.fc = nn.Linear(4, 3, bias=False)


def test_layouts_name_parameters_and_round_trip_through_json() -> None:
    net = Net()
    cap = CurvatureCapture(net)
    layouts = layouts_of(net, cap.blocks)
    by_name = {lay.name: lay for lay in layouts}
    assert by_name["emb"].transpose and by_name["emb"].weight == "emb.weight"
    assert by_name["conv.g1"].w_rows == (2, 4) and by_name["conv.g1"].bias == "conv.bias"
    assert by_name["attn.k"].w_rows == (4, 8) and by_name["attn.k"].weight == "attn.in_proj_weight"
    assert by_name["fc"].bias is None
    assert [lay.spec for lay in layouts] == [b.spec for b in cap.blocks]
    back = [
        BlockLayout.from_json(x) for x in json.loads(json.dumps([x.to_json() for x in layouts]))
    ]
    assert back == layouts
    with pytest.raises(ValueError, match="list of 9 fields"):
        BlockLayout.from_json(["fc", "kron"])
    with pytest.raises(ValueError, match="'kind' must be"):
        _ = BlockLayout("x", "dense", 1, 1, "w", None, None, None, False).spec
    cap.remove()


def test_to_and_write_matrix_match_the_block_gradient() -> None:
    torch.manual_seed(0)
    net = Net()
    cap = CurvatureCapture(net)
    grads = {k: torch.randn_like(p) for k, p in net.named_parameters()}
    for k, p in net.named_parameters():
        p.grad = grads[k].clone()
    out = {k: torch.zeros_like(v) for k, v in grads.items()}
    for blk, lay in zip(cap.blocks, layouts_of(net, cap.blocks), strict=True):
        mat = to_matrix(grads, lay)
        assert torch.equal(mat, blk.grad_matrix(torch.float32))
        write_matrix(out, lay, mat)
    covered = {k for lay in layouts_of(net, cap.blocks) for k in (lay.weight, lay.bias) if k}
    for k in covered:
        assert torch.equal(out[k], grads[k]), k
    cap.remove()


def test_check_layouts_explains_a_mismatch() -> None:
    net = Net()
    cap = CurvatureCapture(net)
    layouts = layouts_of(net, cap.blocks)
    shapes = {k: tuple(p.shape) for k, p in net.named_parameters()}
    assert check_layouts(layouts, shapes) is None
    assert "unknown parameters" in str(check_layouts(layouts, {}))
    shapes["fc.weight"] = (3, 5)
    assert (
        check_layouts(layouts, shapes) == "block 'fc' is [3, 4] but its parameters hold 15 values"
    )
    cap.remove()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_triangle_packing_round_trip_is_exact(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    m = torch.randn(5, 5, generator=g).to(dtype)
    m = m + m.T
    m[3, 1] = m[1, 3] = -0.0  # signed zeros survive
    v = pack_triangle(m)
    assert v.shape == (triangle_size(5),) and v.dtype == dtype
    assert v.tolist() == [m[i, j].item() for i in range(5) for j in range(i + 1)]  # row by row
    back = unpack_triangle(v, 5)
    assert back.dtype == dtype
    assert torch.equal(back, m)
    assert torch.signbit(back[3, 1]) and torch.signbit(back[1, 3])
    assert unpack_triangle(v, 5, torch.float64).dtype == torch.float64


def test_triangle_packing_checks_shapes() -> None:
    with pytest.raises(ValueError, match="square matrix"):
        pack_triangle(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="expected 6 values for n = 3"):
        unpack_triangle(torch.zeros(5), 3)
