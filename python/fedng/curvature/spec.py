"""Model-free descriptions of curvature blocks and their wire format (payloads).

A representation (`KFAC`, `DiagonalFisher`, `LowRankFisher`) never sees a module: it sees a list of
`BlockSpec`s, one per curvature block, and the gradient of each block as a matrix `[m, n]` in the
Linear orientation (rows = output features, columns = input features, the bias folded in as the
last column). That is what lets a federated server hold and aggregate curvature without the model.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from fedng.curvature.packed_fold import unpack_into

BlockKind = Literal["kron", "embedding", "elementwise"]
"""`kron`: Linear-like (Linear, Conv2d, attention projections): K-FAC with dense A and G.
`embedding`: K-FAC with a diagonal A (one-hot inputs). `elementwise`: normalization layers, whose
parameters act elementwise: no Kronecker structure."""

BLOCK_KINDS: tuple[BlockKind, ...] = ("kron", "embedding", "elementwise")


def check_block_kind(where: str, kind: object) -> BlockKind:
    """`kind` as a `BlockKind`, else ValueError naming `where`."""
    for k in BLOCK_KINDS:
        if kind == k:
            return k
    raise ValueError(f"{where}: 'kind' must be 'kron', 'embedding' or 'elementwise', got {kind!r}")


WIRE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
"""Dtypes a payload may be sent in."""


@dataclass(frozen=True)
class BlockSpec:
    """One curvature block: a weight matrix (with its bias) or an elementwise parameter group.

    Attributes:
        name: stable identifier (the module's qualified name, plus a suffix for split blocks).
        kind: see `BlockKind`.
        m: rows of the block's gradient matrix (output features; 1 for `elementwise`).
        n: columns (input features, +1 with a bias; vocabulary size for `embedding`; the number of
            parameters for `elementwise`).
    """

    name: str
    kind: BlockKind
    m: int
    n: int

    def __post_init__(self) -> None:
        check_block_kind(f"BlockSpec '{self.name}'", self.kind)
        if self.m < 1 or self.n < 1:
            raise ValueError(
                f"BlockSpec '{self.name}': 'm' and 'n' must be >= 1, got m={self.m}, n={self.n}"
            )

    @property
    def numel(self) -> int:
        """Parameters in the block (m * n)."""
        return self.m * self.n

    def to_dict(self) -> dict[str, object]:
        """Plain-data form (for JSON or a state dict)."""
        return {"name": self.name, "kind": self.kind, "m": self.m, "n": self.n}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> BlockSpec:
        """Inverse of `to_dict`."""
        name = str(d["name"])
        kind = check_block_kind(f"BlockSpec '{name}'", d["kind"])
        return BlockSpec(name, kind, int(d["m"]), int(d["n"]))


def check_specs(where: str, got: Sequence[BlockSpec], expected: Sequence[BlockSpec]) -> None:
    """Raises ValueError naming the first block whose spec differs."""
    if len(got) != len(expected):
        raise ValueError(f"{where}: expected {len(expected)} blocks, got {len(got)}")
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        if g != e:
            raise ValueError(f"{where}: block {i} must be {e}, got {g}")


@dataclass(frozen=True)
class Payload:
    """A representation packed for the wire: one flat tensor plus the block specs.

    Symmetric matrices are stored as their lower triangle, row by row. `nbytes` is the exact size
    of the numbers sent; the specs are structural metadata both sides derive from the model.

    Attributes:
        kind: "kfac", "diag" or "lowrank".
        specs: the blocks, in order.
        data: 1-D tensor in the wire dtype.
        meta: small integers a representation needs to rebuild itself (e.g. the sketch seed).
    """

    kind: str
    specs: tuple[BlockSpec, ...]
    data: torch.Tensor
    meta: dict[str, int] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        """The wire dtype."""
        return self.data.dtype

    @property
    def nbytes(self) -> int:
        """Exact bytes of `data`."""
        return self.data.numel() * self.data.element_size()


def check_wire_dtype(where: str, dtype: torch.dtype) -> None:
    """Raises TypeError unless `dtype` is a supported wire dtype."""
    if dtype not in WIRE_DTYPES:
        raise TypeError(f"{where}: 'dtype' must be one of {list(WIRE_DTYPES)}, got {dtype}")


def triangle_size(n: int) -> int:
    """Entries in the lower triangle (with diagonal) of an n x n matrix."""
    return n * (n + 1) // 2


@functools.lru_cache(maxsize=64)
def _tril_index(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns of the lower triangle of an n x n matrix, row by row (int64 each)."""
    rows, cols = torch.tril_indices(n, n)
    return rows, cols


@functools.lru_cache(maxsize=64)
def _tril_flat(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions in a row-major n x n matrix of its lower triangle's entries, row by row,
    and of their mirror images (one `index_select` / `index_copy_` each: 2-3x faster than
    indexing with (rows, cols) pairs)."""
    rows, cols = _tril_index(n)
    return rows * n + cols, cols * n + rows


def pack_triangle(mat: torch.Tensor) -> torch.Tensor:
    """The lower triangle (with diagonal) of a square matrix, row by row.

    Args:
        mat: [n, n], symmetric in every use here (the upper triangle is not read).

    Returns:
        [n (n + 1) / 2], same dtype.

    Raises:
        ValueError: `mat` is not square.
    """
    if mat.dim() != 2 or mat.shape[0] != mat.shape[1]:
        raise ValueError(f"pack_triangle: expected a square matrix [n, n], got {list(mat.shape)}")
    lower, _ = _tril_flat(mat.shape[0])
    return mat.reshape(-1).index_select(0, lower)


def unpack_triangle(vec: torch.Tensor, n: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The symmetric matrix whose packed lower triangle is `vec` (inverse of `pack_triangle`).

    Both triangles are written from `vec`, so every entry (signed zeros included) is a copy.

    Args:
        vec: [n (n + 1) / 2].
        n: the matrix size.
        dtype: the result's dtype (None: `vec`'s).

    Returns:
        [n, n].

    Raises:
        ValueError: `vec` is not 1-D with n (n + 1) / 2 entries.
    """
    if vec.dim() != 1 or vec.numel() != triangle_size(n):
        raise ValueError(
            f"unpack_triangle: expected {triangle_size(n)} values for n = {n}, got {vec.numel()}"
        )
    values = vec if dtype is None else vec.to(dtype)
    fast = unpack_into(values, n)  # float32/float64: one native tiled pass, the same copies
    if fast is not None:
        return fast
    lower, upper = _tril_flat(n)
    out = torch.empty(n * n, dtype=values.dtype)
    out.index_copy_(0, upper, values)
    out.index_copy_(0, lower, values)  # the diagonal is in both: written from `values` twice
    return out.view(n, n)


class PayloadReader:
    """Reads consecutive pieces of a payload's flat data, checking that it has exactly enough."""

    def __init__(self, where: str, payload: Payload, expected_kind: str, total: int) -> None:
        if not isinstance(payload, Payload):
            raise TypeError(f"{where}: 'payload' must be a Payload, got {type(payload).__name__}")
        if payload.kind != expected_kind:
            raise ValueError(
                f"{where}: 'payload.kind' must be {expected_kind!r}, got {payload.kind!r}"
            )
        if payload.data.dim() != 1 or payload.data.numel() != total:
            raise ValueError(
                f"{where}: 'payload.data' must be 1-D with {total} entries for these"
                f" blocks, got shape {list(payload.data.shape)}"
            )
        self.data = payload.data
        self.offset = 0

    def take(self, count: int) -> torch.Tensor:
        """The next `count` entries."""
        out = self.data[self.offset : self.offset + count]
        self.offset += count
        return out
