"""What one recorded batch tells about one curvature block, and the per-sample algebra on it.

Conventions (B samples, T rows per sample: tokens, spatial positions, or repeated uses of a tied
layer; rows are sample-major):

- `kron` blocks: `a` [B, T, n] are the layer inputs (a ones column last when the bias is folded
  in) and `g` [B, T, m] the gradients of the loss w.r.t. the layer outputs, as captured. The
  gradient of the block is `sum_rows g_r a_r^T` and the per-sample gradient `g[b]^T a[b]`.
- `embedding` blocks: `ids` [B, T] int64 and `g` [B, T, m]; the one-hot input makes A diagonal.
- `elementwise` blocks: `psg` [B, 1, n], the per-sample gradients directly.

`fisher_scale` turns sums of captured outer products into the Fisher of the per-sample loss:
with a mean-reduced loss the captured gradients are the per-sample ones divided by B, so
`F = (1/B) sum_b (B g_b)(B g_b)^T = B * sum_b g_b g_b^T`, i.e. `fisher_scale = B`; with a
sum-reduced loss, `fisher_scale = 1 / B`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedng.curvature.spec import BlockKind

_CHUNK_BYTES = 64 << 20
"""Per-sample gradients are materialized in chunks of about this many bytes."""


@dataclass
class BlockStats:
    """Statistics of one block from one recorded batch (all float tensors in the curvature dtype).

    Attributes:
        kind: the block kind.
        batch_size: B.
        fisher_scale: see the module docstring.
        g: [B, T, m] output gradients of the Fisher pass (the loss itself, or sampled labels).
        g_loss: [B, T, m] output gradients of the loss pass (the same tensor as `g` for the
            empirical Fisher); `sum_rows g_loss^T a` is the block's gradient.
        a: [B, T, n] inputs (`kron`).
        ids: [B, T] int64 (`embedding`).
        psg: [B, 1, n] per-sample gradients of the Fisher pass (`elementwise`).
    """

    kind: BlockKind
    batch_size: int
    fisher_scale: float
    g: torch.Tensor | None = None
    g_loss: torch.Tensor | None = None
    a: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    psg: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        """B * T."""
        if self.psg is not None:
            return self.psg.shape[0]
        if self.g is None:
            raise RuntimeError("fedng internal invariant broken: self.g is not None")
        return self.g.shape[0] * self.g.shape[1]

    def a_rows(self) -> torch.Tensor:
        """`a` as a contiguous [B*T, n] matrix (`kron`)."""
        if self.a is None:
            raise RuntimeError("fedng internal invariant broken: self.a is not None")
        return self.a.reshape(-1, self.a.shape[-1]).contiguous()

    def g_rows(self, loss_pass: bool = False) -> torch.Tensor:
        """`g` (or `g_loss`) as a contiguous [B*T, m] matrix."""
        g = self.g_loss if loss_pass else self.g
        if g is None:
            raise RuntimeError("fedng internal invariant broken: g is not None")
        return g.reshape(-1, g.shape[-1]).contiguous()

    def per_sample(self, lo: int, hi: int, n: int) -> torch.Tensor:
        """Per-sample gradients (Fisher pass) of samples lo..hi-1, flattened: [hi-lo, m*n].

        Args:
            lo: first sample.
            hi: one past the last sample.
            n: columns of the block's gradient matrix (the vocabulary size for `embedding`).
        """
        if self.kind == "elementwise":
            if self.psg is None:
                raise RuntimeError("fedng internal invariant broken: self.psg is not None")
            return self.psg[lo:hi, 0].contiguous()
        if self.g is None:
            raise RuntimeError("fedng internal invariant broken: self.g is not None")
        g = self.g[lo:hi]
        if self.kind == "kron":
            if self.a is None:
                raise RuntimeError("fedng internal invariant broken: self.a is not None")
            return torch.bmm(g.transpose(1, 2), self.a[lo:hi]).reshape(hi - lo, -1)
        if self.ids is None:
            raise RuntimeError("fedng internal invariant broken: self.ids is not None")
        k, t, m = g.shape
        out = torch.zeros(k, n, m, dtype=g.dtype)
        sample = torch.arange(k).repeat_interleave(t)
        out.index_put_((sample, self.ids[lo:hi].reshape(-1)), g.reshape(-1, m), accumulate=True)
        return out.transpose(1, 2).reshape(k, -1)

    def chunk(self, numel: int) -> int:
        """Samples per chunk so that `chunk * numel` floats stay near the chunk budget."""
        itemsize = 8 if self.dtype == torch.float64 else 4
        return max(1, min(self.batch_size, _CHUNK_BYTES // max(1, numel * itemsize)))

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype of the statistics."""
        t = self.psg if self.psg is not None else self.g
        if t is None:
            raise RuntimeError("fedng internal invariant broken: t is not None")
        return t.dtype

    def squared_sum(self, m: int, n: int) -> torch.Tensor:
        """`sum_b psg_b^2` elementwise, [m, n]: the unscaled diagonal of the empirical Fisher.

        One GEMM `(g^2)^T (a^2)` when each sample has one row; otherwise per-sample gradients in
        bounded chunks; for embeddings, the squares of per-(sample, id) sums.
        """
        if self.kind == "elementwise":
            if self.psg is None:
                raise RuntimeError("fedng internal invariant broken: self.psg is not None")
            return self.psg.square().sum(0)
        if self.g is None:
            raise RuntimeError("fedng internal invariant broken: self.g is not None")
        b, t, _ = self.g.shape
        if self.kind == "kron" and t == 1:
            if self.a is None:
                raise RuntimeError("fedng internal invariant broken: self.a is not None")
            return self.g[:, 0].square().T @ self.a[:, 0].square()
        if self.kind == "embedding":
            if self.ids is None:
                raise RuntimeError("fedng internal invariant broken: self.ids is not None")
            keys = torch.arange(b).repeat_interleave(t) * n + self.ids.reshape(-1)
            uniq, inverse = torch.unique(keys, return_inverse=True)
            sums = torch.zeros(uniq.numel(), m, dtype=self.g.dtype)
            sums.index_add_(0, inverse, self.g.reshape(-1, m))
            out = torch.zeros(n, m, dtype=self.g.dtype)
            out.index_add_(0, uniq % n, sums.square())
            return out.T.contiguous()
        out = torch.zeros(m * n, dtype=self.g.dtype)
        step = self.chunk(m * n)
        for lo in range(0, b, step):
            out += self.per_sample(lo, min(b, lo + step), n).square().sum(0)
        return out.view(m, n)
