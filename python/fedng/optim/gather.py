"""`FlatGrads`: every block's gradient matrix and preconditioned gradient in two flat buffers.

A step of `NaturalGradient` needs, per block, its gradient as a contiguous [m, n] matrix (weight
and bias side by side), a preconditioned [m, n] result, a finiteness check of both and, with a KL
clip, `sum_i <p_i, g_i>`. Done block by block that is a concatenation, an allocation and a
reduction with a host sync per block: on small layers more time than the kernels. Here the
matrices are fixed views of two flat buffers, allocated once per model: one batched copy gathers
all gradients, the preconditioner writes straight into the output views, and one reduction over
each buffer answers the finiteness checks and the KL product together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedng.curvature.blocks import Block


def _views(flat: torch.Tensor, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    out, at = [], 0
    for m, n in shapes:
        out.append(flat[at : at + m * n].view(m, n))
        at += m * n
    return out


class FlatGrads:
    """Two flat buffers of a model's blocks: gradients (`grads`) and preconditioned ones (`outs`).

    Args:
        blocks: the curvature blocks.
        params: every trainable parameter of the model.
        dtype: the curvature dtype.

    Attributes:
        grads: per block, a view [m, n] of the gradient buffer.
        outs: per block, a view [m, n] of the output buffer.
        uncovered: the parameters no block covers entirely (checked separately).
    """

    def __init__(
        self, blocks: Sequence[Block], params: Sequence[torch.Tensor], dtype: torch.dtype
    ) -> None:
        self.blocks = list(blocks)
        shapes = [(b.spec.m, b.spec.n) for b in self.blocks]
        total = sum(m * n for m, n in shapes)
        self.g_flat = torch.zeros(total, dtype=dtype)
        self.p_flat = torch.zeros(total, dtype=dtype)
        self.grads = _views(self.g_flat, shapes)
        self.outs = _views(self.p_flat, shapes)
        covered: dict[int, int] = {}
        for b in self.blocks:
            covered[id(b.weight)] = covered.get(id(b.weight), 0) + b._w(b.weight).numel()
            if b.bias is not None:
                covered[id(b.bias)] = covered.get(id(b.bias), 0) + b._b(b.bias).numel()
        self.uncovered = [p for p in params if covered.get(id(p), 0) < p.numel()]
        # The buffers' side of every (parameter gradient, matrix part) pair, built once.
        self._g_parts: list[torch.Tensor] | None = None
        self._p_parts: list[torch.Tensor] | None = None
        self._src: list[torch.Tensor] = []
        self._fresh: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (block, weight, part)
        self._given: dict[int, torch.Tensor] = {}
        self._dst: list[torch.Tensor] = []  # the output parts `write_back` copies into `_src`
        # Where no block owns only some rows of a parameter, `param_grads` order is every
        # block's weight and bias: the gradients are then read in one list comprehension.
        self._whole = [
            q
            for b in self.blocks
            for q in (b.weight, b.bias)
            if q is not None and b.w_rows is None and b.b_rows is None
        ]
        if len(self._whole) != sum(1 + (b.bias is not None) for b in self.blocks):
            self._whole = []

    def _parts(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self._g_parts is None or self._p_parts is None:
            g_parts: list[torch.Tensor] = []
            p_parts: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            for b, gv, pv in zip(self.blocks, self.grads, self.outs, strict=True):
                b.grad_pairs(gv, grads, g_parts)
                b.grad_pairs(pv, grads, p_parts)
            self._g_parts, self._p_parts = g_parts, p_parts
        return self._g_parts, self._p_parts

    def gather(self, skip: Sequence[int] = ()) -> list[torch.Tensor] | None:
        """Copies every block's gradient into `grads` (one batched copy) and returns `grads`;
        None (nothing copied) when some block's parameters have no gradient.

        Blocks in `skip` (Linear blocks with a bias whose weight gradient was not formed, see
        `NaturalGradient.backward`) gather their bias column only: the rest of their view is
        stale, and `write_back` gives their weight a new `.grad`."""
        if skip:
            return self._gather_skipping(set(skip))
        src: list[torch.Tensor] = []
        if self._whole:
            src = [q.grad for q in self._whole]  # type: ignore[misc]
            if any(g is None for g in src):
                return None
        else:
            for b in self.blocks:
                if not b.param_grads(src):
                    return None
        if src:
            torch._foreach_copy_(self._parts()[0], src)
        self._src, self._fresh, self._given = src, [], {}
        self._dst = self._parts()[1]
        return self.grads

    def _gather_skipping(self, skip: set[int]) -> list[torch.Tensor] | None:
        src: list[torch.Tensor] = []
        g_dst: list[torch.Tensor] = []
        p_src: list[torch.Tensor] = []
        fresh: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        for i, (b, gv, pv) in enumerate(zip(self.blocks, self.grads, self.outs, strict=True)):
            if i in skip:
                bg = None if b.bias is None else b.bias.grad
                if bg is None or b.weight.grad is not None:
                    return None
                src.append(bg)
                g_dst.append(gv[:, -1])
                p_src.append(pv[:, -1])
                fresh.append((i, b.weight, pv[:, :-1]))
                continue
            grads: list[torch.Tensor] = []
            if not b.param_grads(grads):
                return None
            src += grads
            b.grad_pairs(gv, [], g_dst)
            b.grad_pairs(pv, [], p_src)
        if src:
            torch._foreach_copy_(g_dst, src)
        self._src, self._dst, self._fresh, self._given = src, p_src, fresh, {}
        return self.grads

    def write_back(self, scale: float) -> None:
        """Copies every block's output (times `scale`, unless 1) into the gradients gathered by
        the last `gather` (a skipped weight gets its part of the output as a new `.grad`)."""
        if scale != 1.0:
            self.p_flat.mul_(scale)
        if self._src:
            torch._foreach_copy_(self._src, self._dst)
        for i, w, part in self._fresh:
            given = self._given.get(i)
            if given is not None:  # the output part, already a tensor of its own
                w.grad = given if scale == 1.0 else given.mul_(scale)
            else:
                w.grad = part.to(w.dtype, copy=True, memory_format=torch.contiguous_format)
        self._src, self._fresh, self._given = [], [], {}  # nothing of this step kept

    def give(self, i: int, weight_grad: torch.Tensor) -> None:
        """Block i's weight part of the output as a tensor of its own [m, n - 1] (the weight's
        dtype, contiguous): `write_back` makes it the skipped weight's `.grad` without a copy.
        Its view of `outs` is then stale until `complete`."""
        self._given[i] = weight_grad

    def complete(self) -> None:
        """Copies the given weight parts into their views of `outs` (for code that reads them)."""
        for i, part in self._given.items():
            self.outs[i][:, :-1].copy_(part)

    def grads_finite(self) -> bool | None:
        """Whether the gathered gradients are all finite: True/False, or None when the one sum
        overflowed on finite entries and only an entry-wise check can tell."""
        return True if math.isfinite(float(self.g_flat.sum())) else None

    def holds_outputs(self, precond: Sequence[torch.Tensor | None]) -> bool:
        """Whether every block's preconditioned gradient is its view of `outs`."""
        return all(p is o for p, o in zip(precond, self.outs, strict=True))

    def dot(self) -> float:
        """`sum_i <p_i, g_i>` over all blocks (NaN/Inf if an output is not finite, or overflow)."""
        return float(torch.dot(self.p_flat, self.g_flat))
