"""What one recorded batch tells about one curvature block: one statistics class per block kind.

Conventions (B samples, T rows per sample: tokens, spatial positions, or repeated uses of a tied
layer; rows are sample-major):

- `KronStats` (`kron` blocks): `a` [B, T, n] are the layer inputs (a ones column last when the
  bias is folded in) and `g` [B, T, m] the gradients of the loss w.r.t. the layer outputs, as
  captured. The gradient of the block is `sum_rows g_r a_r^T` and the per-sample gradient
  `g[b]^T a[b]`.
- `EmbeddingStats` (`embedding` blocks): `ids` [B, T] int64 and `g` [B, T, m]; the one-hot input
  makes A diagonal.
- `ElementwiseStats` (`elementwise` blocks): `psg` [B, 1, n], the per-sample gradients directly.

`fisher_scale` turns sums of captured outer products into the Fisher of the per-sample loss:
with a mean-reduced loss the captured gradients are the per-sample ones divided by B, so
`F = (1/B) sum_b (B g_b)(B g_b)^T = B * sum_b g_b g_b^T`, i.e. `fisher_scale = B`; with a
sum-reduced loss, `fisher_scale = 1 / B`.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch

from fedng.curvature.spec import BlockKind

if TYPE_CHECKING:
    from typing_extensions import Self

CHUNK_BYTES = 64 << 20
"""Per-sample gradients are materialized in chunks of about this many bytes."""


def fisher_scale(batch: int, reduction: str) -> float:
    """B for a mean-reduced loss, 1/B for a sum (see the module docstring)."""
    return float(batch) if reduction == "mean" else 1.0 / batch


@dataclasses.dataclass(kw_only=True)
class _Stats(ABC):
    """Fields and helpers every kind shares.

    Attributes:
        batch_size: B.
        fisher_scale: see the module docstring.
    """

    kind: ClassVar[BlockKind]
    batch_size: int
    fisher_scale: float

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """The float dtype of the statistics."""

    def chunk(self, numel: int) -> int:
        """Samples per chunk so that `chunk * numel` floats stay near `CHUNK_BYTES`."""
        itemsize = 8 if self.dtype == torch.float64 else 4
        return max(1, min(self.batch_size, CHUNK_BYTES // max(1, numel * itemsize)))


@dataclasses.dataclass(kw_only=True)
class _OutputGradStats(_Stats):
    """Stats of a layer seen through its output gradients (`kron` and `embedding`).

    Attributes:
        g: [B, T, m] output gradients of the Fisher pass (the loss itself, or sampled labels).
        g_loss: [B, T, m] output gradients of the loss pass (the same tensor as `g` for the
            empirical Fisher; None when only a Fisher pass was recorded);
            `sum_rows g_loss^T a` is the block's gradient.
    """

    g: torch.Tensor
    g_loss: torch.Tensor | None

    @property
    def rows(self) -> int:
        """B * T."""
        return self.g.shape[0] * self.g.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype of the statistics."""
        return self.g.dtype

    def g_rows(self) -> torch.Tensor:
        """`g` as a contiguous [B*T, m] matrix."""
        return self.g.reshape(-1, self.g.shape[-1]).contiguous()

    def g_loss_rows(self) -> torch.Tensor | None:
        """`g_loss` as a contiguous [B*T, m] matrix (None without a loss pass)."""
        g = self.g_loss
        return None if g is None else g.reshape(-1, g.shape[-1]).contiguous()

    input_field: ClassVar[str]
    """The name of the inputs field."""

    @property
    @abstractmethod
    def inputs(self) -> torch.Tensor:
        """The layer inputs, [B, T, ...] (the `input_field`)."""

    def _with(
        self,
        batch_size: int,
        scale: float,
        g: torch.Tensor,
        g_loss: torch.Tensor | None,
        inputs: torch.Tensor,
    ) -> Self:
        """Stats of the same class built from these parts."""
        parts: dict[str, Any] = {"g": g, "g_loss": g_loss, self.input_field: inputs}
        return dataclasses.replace(self, batch_size=batch_size, fisher_scale=scale, **parts)

    def join(
        self, pieces: Sequence[Self], same_samples: bool, batch_size: int, scale: float
    ) -> Self:
        """`self` and `pieces` (self first): rows joined per sample when they are the same samples
        (tied or repeated uses), else samples stacked."""
        everything = [self, *pieces]
        dim = 1 if same_samples else 0
        g = torch.cat([p.g for p in everything], dim)
        losses = [p.g_loss for p in everything]
        known = [t for t in losses if t is not None]
        if all(p.g_loss is p.g for p in everything):
            g_loss: torch.Tensor | None = g
        else:
            g_loss = torch.cat(known, dim) if len(known) == len(losses) else None
        inputs = torch.cat([p.inputs for p in everything], dim)
        return self._with(batch_size, scale, g, g_loss, inputs)

    def rows_as_samples(self) -> Self:
        """[B, T, *] -> [B*T, 1, *]: each row its own sample."""
        g = self.g.reshape(-1, 1, self.g.shape[-1])
        gl = self.g_loss
        g_loss = g if gl is self.g else (None if gl is None else gl.reshape(-1, 1, gl.shape[-1]))
        x = self.inputs
        inputs = x.reshape(-1, 1, *x.shape[2:])
        return self._with(g.shape[0], self.fisher_scale, g, g_loss, inputs)


@dataclasses.dataclass(kw_only=True)
class KronStats(_OutputGradStats):
    """Stats of a `kron` block (Linear, Conv2d patches, attention projections).

    Attributes:
        a: [B, T, n] inputs, a ones column last when the bias is folded in.
    """

    kind: ClassVar[BlockKind] = "kron"
    input_field: ClassVar[str] = "a"
    a: torch.Tensor

    def a_rows(self) -> torch.Tensor:
        """`a` as a contiguous [B*T, n] matrix."""
        return self.a.reshape(-1, self.a.shape[-1]).contiguous()

    def per_sample(self, lo: int, hi: int, n: int) -> torch.Tensor:
        """Per-sample gradients (Fisher pass) of samples lo..hi-1, flattened: [hi-lo, m*n]."""
        return torch.bmm(self.g[lo:hi].transpose(1, 2), self.a[lo:hi]).reshape(hi - lo, -1)

    def squared_sum(self, m: int, n: int) -> torch.Tensor:
        """`sum_b psg_b^2` elementwise, [m, n]: the unscaled diagonal of the Fisher.

        One GEMM `(g^2)^T (a^2)` when each sample has one row; otherwise per-sample gradients in
        bounded chunks.
        """
        b, t, _ = self.g.shape
        if t == 1:
            return self.g[:, 0].square().T @ self.a[:, 0].square()
        out = torch.zeros(m * n, dtype=self.g.dtype)
        step = self.chunk(m * n)
        for lo in range(0, b, step):
            out += self.per_sample(lo, min(b, lo + step), n).square().sum(0)
        return out.view(m, n)

    @property
    def inputs(self) -> torch.Tensor:
        """`a`."""
        return self.a


@dataclasses.dataclass(kw_only=True)
class EmbeddingStats(_OutputGradStats):
    """Stats of an `embedding` block.

    Attributes:
        ids: [B, T] int64 token ids.
    """

    kind: ClassVar[BlockKind] = "embedding"
    input_field: ClassVar[str] = "ids"
    ids: torch.Tensor

    def frequencies(self, n: int) -> torch.Tensor:
        """How often each of the n ids occurs, int64 [n]."""
        return torch.bincount(self.ids.reshape(-1), minlength=n)

    def per_sample(self, lo: int, hi: int, n: int) -> torch.Tensor:
        """Per-sample gradients of samples lo..hi-1 (n: the vocabulary size): [hi-lo, m*n]."""
        g = self.g[lo:hi]
        k, t, m = g.shape
        out = torch.zeros(k, n, m, dtype=g.dtype)
        sample = torch.arange(k).repeat_interleave(t)
        out.index_put_((sample, self.ids[lo:hi].reshape(-1)), g.reshape(-1, m), accumulate=True)
        return out.transpose(1, 2).reshape(k, -1)

    def squared_sum(self, m: int, n: int) -> torch.Tensor:
        """`sum_b psg_b^2` elementwise, [m, n]: the squares of per-(sample, id) sums."""
        b, t, _ = self.g.shape
        keys = torch.arange(b).repeat_interleave(t) * n + self.ids.reshape(-1)
        uniq, inverse = torch.unique(keys, return_inverse=True)
        sums = torch.zeros(uniq.numel(), m, dtype=self.g.dtype)
        sums.index_add_(0, inverse, self.g.reshape(-1, m))
        out = torch.zeros(n, m, dtype=self.g.dtype)
        out.index_add_(0, uniq % n, sums.square())
        return out.T.contiguous()

    @property
    def inputs(self) -> torch.Tensor:
        """`ids`."""
        return self.ids


@dataclasses.dataclass(kw_only=True)
class ElementwiseStats(_Stats):
    """Stats of an `elementwise` block (normalization layers).

    Attributes:
        psg: [B, 1, n] per-sample gradients of the Fisher pass.
    """

    kind: ClassVar[BlockKind] = "elementwise"
    psg: torch.Tensor

    @property
    def rows(self) -> int:
        """B (one row per sample)."""
        return self.psg.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype of the statistics."""
        return self.psg.dtype

    def per_sample(self, lo: int, hi: int, n: int) -> torch.Tensor:
        """Per-sample gradients of samples lo..hi-1: [hi-lo, n]."""
        return self.psg[lo:hi, 0].contiguous()

    def squared_sum(self, m: int, n: int) -> torch.Tensor:
        """`sum_b psg_b^2` elementwise, [1, n]."""
        return self.psg.square().sum(0)

    def join(
        self, pieces: Sequence[ElementwiseStats], same_samples: bool, batch_size: int, scale: float
    ) -> ElementwiseStats:
        """`self` and `pieces` (self first): per-sample gradients of the same samples add up,
        different samples stack."""
        psg = [p.psg for p in (self, *pieces)]
        joined = torch.stack(psg).sum(0) if same_samples else torch.cat(psg, 0)
        return ElementwiseStats(batch_size=batch_size, fisher_scale=scale, psg=joined)


BlockStats = KronStats | EmbeddingStats | ElementwiseStats
"""The statistics of one block: the class says the block kind (`type(st).kind`)."""

STATS_TYPES: dict[BlockKind, type[BlockStats]] = {
    KronStats.kind: KronStats,
    EmbeddingStats.kind: EmbeddingStats,
    ElementwiseStats.kind: ElementwiseStats,
}
"""The statistics class of each block kind."""

S = TypeVar("S", KronStats, EmbeddingStats, ElementwiseStats)


def of_type(cls: type[S], items: Sequence[BlockStats]) -> list[S]:
    """`items`, all of class `cls` (TypeError naming the first that is not)."""
    out = [st for st in items if isinstance(st, cls)]
    if len(out) != len(items):
        bad = next(type(st).__name__ for st in items if not isinstance(st, cls))
        raise TypeError(f"expected {cls.__name__} for every piece, got {bad}")
    return out
