"""`Block`: one curvature block bound to the parameters of a model, and its gradient matrix."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedng.curvature.spec import BlockSpec


@dataclass(eq=False)
class Block:
    """A curvature block: (part of) a weight, with its bias folded in as the last column.

    The block's gradient matrix is `[m, n]` in the Linear orientation: `weight.grad[w_rows]`
    flattened to `[m, n_w]`, with `bias.grad[b_rows]` appended as a column. Embeddings use the
    transpose of their `[V, d]` weight (`transpose=True`); elementwise blocks a single row holding
    the flattened weight and bias.

    Attributes:
        spec: the model-free description.
        weight: the weight parameter.
        bias: the bias parameter, or None.
        w_rows: the rows of `weight` the block owns (None: all).
        b_rows: the entries of `bias` the block owns (None: all).
        transpose: the gradient matrix is `weight.grad.T` (embeddings).
        owner: qualified name of the module the block belongs to.
        owner_type: that module's class.
    """

    spec: BlockSpec
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    w_rows: slice | None = None
    b_rows: slice | None = None
    transpose: bool = False
    owner: str = ""
    owner_type: type[nn.Module] | None = None

    @property
    def name(self) -> str:
        """The block's name."""
        return self.spec.name

    def _w(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.w_rows is None else t[self.w_rows]

    def _b(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.b_rows is None else t[self.b_rows]

    def _grads(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Views of the block's part of `weight.grad` and `bias.grad` (None without a bias);
        None when a gradient is missing."""
        wg = self.weight.grad
        if wg is None:
            return None
        if self.bias is None:
            return self._w(wg), None
        bg = self.bias.grad
        return None if bg is None else (self._w(wg), self._b(bg))

    def grad_views(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Views of the block's part of `weight.grad` [rows, ...] and `bias.grad` [rows] (None
        without a bias); None when a gradient is missing. Writing into them writes the grads."""
        return self._grads()

    def _grads_to_write(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        grads = self._grads()
        if grads is None:
            raise ValueError(f"Block '{self.name}': its parameters have no gradients to write")
        return grads

    def grad_matrix(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The block's gradient as a contiguous [m, n] tensor in `dtype`, or None without grads."""
        grads = self._grads()
        if grads is None:
            return None
        wg, bg = grads
        m, n = self.spec.m, self.spec.n
        if self.spec.kind == "elementwise":
            parts = [wg.reshape(-1)] if bg is None else [wg.reshape(-1), bg.reshape(-1)]
            return torch.cat(parts).to(dtype).view(1, n)
        if self.transpose:
            return wg.T.to(dtype).contiguous()
        if bg is None:
            return wg.reshape(m, n).to(dtype).contiguous()
        out = torch.cat([wg.reshape(m, n - 1), bg.unsqueeze(1)], 1)
        return out if out.dtype == dtype else out.to(dtype)

    def grad_pairs(self, p: torch.Tensor, dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        """Appends (gradient view, matching view of `p` [m, n]) pairs: `write_grad` in bulk."""
        wg, bg = self._grads_to_write()
        if self.spec.kind == "elementwise":
            k = wg.numel()
            dst.append(wg)
            src.append(p[0, :k].view(wg.shape))
            if bg is not None:
                dst.append(bg)
                src.append(p[0, k:].view(bg.shape))
        elif self.transpose:
            dst.append(wg)
            src.append(p.T)
        elif bg is None:
            dst.append(wg)
            src.append(p.view(wg.shape))
        else:
            dst.append(wg)
            src.append(p[:, :-1] if wg.dim() == 2 else p[:, :-1].reshape(wg.shape))
            dst.append(bg)
            src.append(p[:, -1])

    def param_grads(self, out: list[torch.Tensor]) -> bool:
        """Appends the block's gradient parts in `grad_pairs` order (views of `weight.grad` and
        `bias.grad`); False (nothing appended) when one is missing."""
        grads = self._grads()
        if grads is None:
            return False
        out.append(grads[0])
        if grads[1] is not None:
            out.append(grads[1])
        return True

    def write_grad(self, p: torch.Tensor) -> None:
        """Overwrites the block's gradients with the [m, n] matrix `p` (cast to their dtype)."""
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        self.grad_pairs(p, dst, src)
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)

    def add_to_params(self, delta: torch.Tensor) -> None:
        """Adds the [m, n] matrix `delta` to the block's parameters (weight and bias), in place."""
        with torch.no_grad():
            w = self._w(self.weight)
            b = None if self.bias is None else self._b(self.bias)
            if self.spec.kind == "elementwise":
                k = w.numel()
                w.add_(delta[0, :k].view_as(w).to(w.dtype))
                if b is not None:
                    b.add_(delta[0, k:].view_as(b).to(b.dtype))
            elif self.transpose:
                w.add_(delta.T.to(w.dtype))
            elif b is None:
                w.add_(delta.reshape(w.shape).to(w.dtype))
            else:
                w.add_(delta[:, :-1].reshape(w.shape).to(w.dtype))
                b.add_(delta[:, -1].to(b.dtype))
