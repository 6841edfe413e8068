"""Where each curvature block lives among a model's named parameters, in plain JSON.

A holder of curvature without the model (a federated server) applies a block's curvature to
named arrays (a delta, a gradient) through the block's gradient-matrix layout ([m, n], bias folded
in as the last column, see `fedng.curvature.blocks.Block`) in terms of parameter *names*. It is a
few hundred bytes of JSON per model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedng._typing import Arrays
from fedng.curvature.blocks import Block
from fedng.curvature.spec import BlockSpec, check_block_kind

_FIELDS = ("name", "kind", "m", "n", "weight", "bias", "w_rows", "b_rows", "transpose")


@dataclass(frozen=True)
class BlockLayout:
    """One block in terms of parameter names.

    Attributes:
        name: the block's name (its `BlockSpec.name`).
        kind: "kron", "embedding" or "elementwise" (checked when `spec` is built).
        m: rows of the block matrix.
        n: columns.
        weight: the weight parameter's name.
        bias: the bias parameter's name, or None.
        w_rows: [start, stop) rows of the weight the block owns, or None for all.
        b_rows: [start, stop) entries of the bias, or None for all.
        transpose: the block matrix is `weight.T` (embeddings).
    """

    name: str
    kind: str
    m: int
    n: int
    weight: str
    bias: str | None
    w_rows: tuple[int, int] | None
    b_rows: tuple[int, int] | None
    transpose: bool

    @property
    def spec(self) -> BlockSpec:
        """The `BlockSpec` of this block.

        Raises:
            ValueError: an unknown kind or a non-positive size.
        """
        kind = check_block_kind(f"BlockSpec '{self.name}'", self.kind)
        return BlockSpec(self.name, kind, self.m, self.n)

    def to_json(self) -> list[Any]:
        """Compact JSON form: the fields in declaration order."""
        return [getattr(self, k) for k in _FIELDS]

    @staticmethod
    def from_json(x: list[Any]) -> BlockLayout:
        """Inverse of `to_json`.

        Raises:
            ValueError: a malformed entry.
        """
        if not isinstance(x, list) or len(x) != len(_FIELDS):
            raise ValueError(f"block layout must be a list of {len(_FIELDS)} fields, got {x!r}")
        name, kind, m, n, w, b, wr, br, tr = x
        return BlockLayout(
            str(name),
            str(kind),
            int(m),
            int(n),
            str(w),
            None if b is None else str(b),
            None if wr is None else (int(wr[0]), int(wr[1])),
            None if br is None else (int(br[0]), int(br[1])),
            bool(tr),
        )


def _rows(s: slice | None) -> tuple[int, int] | None:
    return None if s is None else (int(s.start), int(s.stop))


def layouts_of(model: nn.Module, blocks: list[Block]) -> list[BlockLayout]:
    """The layouts of a capture's blocks, naming parameters as `model.named_parameters()` does."""
    names = {id(p): k for k, p in model.named_parameters()}
    return [
        BlockLayout(
            b.spec.name,
            b.spec.kind,
            b.spec.m,
            b.spec.n,
            names[id(b.weight)],
            None if b.bias is None else names[id(b.bias)],
            _rows(b.w_rows),
            _rows(b.b_rows),
            bool(b.transpose),
        )
        for b in blocks
    ]


def check_layouts(layouts: list[BlockLayout], shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why layouts do not fit parameters of these shapes (None if they do)."""
    for lay in layouts:
        if lay.weight not in shapes or (lay.bias is not None and lay.bias not in shapes):
            return f"block {lay.name!r} names unknown parameters {lay.weight!r}/{lay.bias!r}"
        w = shapes[lay.weight]
        rows = w[0] if lay.w_rows is None else lay.w_rows[1] - lay.w_rows[0]
        wnum = rows * (math.prod(w[1:]) if len(w) > 1 else 1)
        bnum = 0
        if lay.bias is not None:
            b = shapes[lay.bias]
            bnum = b[0] if lay.b_rows is None else lay.b_rows[1] - lay.b_rows[0]
        if lay.m * lay.n != wnum + bnum:
            return (
                f"block {lay.name!r} is [{lay.m}, {lay.n}] but its parameters hold"
                f" {wnum + bnum} values"
            )
    return None


def _sl(r: tuple[int, int] | None) -> slice:
    return slice(None) if r is None else slice(r[0], r[1])


def to_matrix(arrays: Arrays, lay: BlockLayout, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The block matrix [m, n] (in `dtype`, fp32 by default) of named arrays (a delta, a
    gradient)."""
    w = arrays[lay.weight].to(dtype)[_sl(lay.w_rows)]
    if lay.kind == "elementwise":
        parts = [w.reshape(-1)]
        if lay.bias is not None:
            parts.append(arrays[lay.bias].to(dtype)[_sl(lay.b_rows)].reshape(-1))
        return torch.cat(parts).view(1, lay.n)
    if lay.transpose:
        return w.T.contiguous()
    if lay.bias is None:
        return w.reshape(lay.m, lay.n).contiguous()
    b = arrays[lay.bias].to(dtype)[_sl(lay.b_rows)]
    return torch.cat([w.reshape(lay.m, lay.n - 1), b.reshape(lay.m, 1)], 1)


def write_matrix(arrays: Arrays, lay: BlockLayout, mat: torch.Tensor) -> None:
    """Writes a block matrix [m, n] back into named arrays (in place, their dtype)."""
    w = arrays[lay.weight][_sl(lay.w_rows)]
    if lay.kind == "elementwise":
        k = w.numel()
        w.copy_(mat[0, :k].view_as(w))
        if lay.bias is not None:
            b = arrays[lay.bias][_sl(lay.b_rows)]
            b.copy_(mat[0, k:].view_as(b))
        return
    if lay.transpose:
        w.copy_(mat.T)
        return
    if lay.bias is None:
        w.copy_(mat.reshape(w.shape))
        return
    w.copy_(mat[:, :-1].reshape(w.shape))
    arrays[lay.bias][_sl(lay.b_rows)].copy_(mat[:, -1])
