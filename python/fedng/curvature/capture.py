"""Module hooks that record layer inputs and output gradients, for any `nn.Module` tree.

Cost when not recording: one attribute test in a forward hook per supported module, nothing in
the backward pass (no backward hooks are registered: output gradients come from pre-hooks on the
output's autograd node, which the forward hook attaches only while recording; a tensor hook
where the output has no node). These see the gradient of a layer's output as it was before any
later in-place op (e.g. `ReLU(inplace=True)`), which module full-backward hooks refuse; for an
output that is a view of its whole base (nn.Linear on [B, T, n] inputs), on the base's node, since
an in-place op takes the view's own node out of the graph.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from fedng.curvature.blocks import Block
from fedng.curvature.discover import discover
from fedng.curvature.fisher import REDUCTIONS, Reduction, check_choice
from fedng.curvature.layers import Site
from fedng.curvature.stats import (
    BlockStats,
    ElementwiseStats,
    EmbeddingStats,
    KronStats,
    fisher_scale,
    of_type,
)


class UnsupportedLayerWarning(UserWarning):
    """Some layers or parameters of a model get no curvature (their gradients are left alone)."""


@dataclass(eq=False)
class _Record:
    """One observed (input, output) of a site in one forward pass (x its input, g_loss and
    g_fisher the gradients w.r.t. its output from the loss and the Fisher pass)."""

    site: int
    x: torch.Tensor
    extra: object
    forward: int = 0
    g_loss: torch.Tensor | None = None
    g_fisher: torch.Tensor | None = None


def _merge(pieces: list[tuple[int, BlockStats]], reduction: str) -> BlockStats:
    """One block's stats from several uses: tied weights or repeated calls within a forward pass
    (the same samples: their rows are joined per sample), several forward passes (gradient
    accumulation: different samples, stacked)."""
    if len(pieces) == 1:
        return pieces[0][1]
    passes: dict[int, list[BlockStats]] = {}
    for fwd, st in pieces:
        passes.setdefault(fwd, []).append(st)
    joined = [_join(group, True, reduction) for group in passes.values()]
    return _join(joined, False, reduction)


def _join(pieces: list[BlockStats], same_samples: bool, reduction: str) -> BlockStats:
    if len(pieces) == 1:
        return pieces[0]
    first = pieces[0]
    same = same_samples and all(p.batch_size == first.batch_size for p in pieces)
    b = first.batch_size if same else sum(p.batch_size for p in pieces)
    if isinstance(first, ElementwiseStats):
        rest_e = of_type(ElementwiseStats, pieces[1:])
        return first.join(rest_e, same, b, fisher_scale(b, reduction))
    if isinstance(first, KronStats):
        kron = of_type(KronStats, pieces)
        if not same and _unequal_rows(kron):  # unequal lengths: rows become samples
            kron = [p.rows_as_samples() for p in kron]
            b = sum(p.batch_size for p in kron)
        return kron[0].join(kron[1:], same, b, fisher_scale(b, reduction))
    emb = of_type(EmbeddingStats, pieces)
    if not same and _unequal_rows(emb):
        emb = [p.rows_as_samples() for p in emb]
        b = sum(p.batch_size for p in emb)
    return emb[0].join(emb[1:], same, b, fisher_scale(b, reduction))


def _unequal_rows(pieces: Sequence[KronStats | EmbeddingStats]) -> bool:
    """Whether the pieces have different numbers of rows per sample (T)."""
    return any(p.g.shape[1] != pieces[0].g.shape[1] for p in pieces)


class CurvatureCapture:
    """Finds the supported layers of a model and records what curvature estimates need.

    Typical use (NaturalGradient does this for you)::

        cap = CurvatureCapture(model)
        cap.recording = True
        loss = loss_fn(model(x), y)
        loss.backward()
        stats = cap.collect("empirical")   # one BlockStats (or None) per block

    Args:
        model: any module tree.
        dtype: float32 or float64: the dtype statistics are produced in (inputs recorded under
            autocast in bfloat16 are converted).
        reduction: how the training loss reduces over the batch, "mean" or "sum".
        warn: emit one `UnsupportedLayerWarning` listing what is left out.

    Attributes:
        blocks: the curvature blocks, in module order.
        unsupported: what is left out, one `name (Type): reason` line each.
        recording: whether forward passes are recorded.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        dtype: torch.dtype = torch.float32,
        reduction: Reduction = "mean",
        warn: bool = True,
    ) -> None:
        where = "CurvatureCapture"
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{where}: 'model' must be a torch.nn.Module, got {type(model).__name__}"
            )
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{where}: 'dtype' must be torch.float32 or torch.float64, got {dtype}")
        self.reduction: Reduction = check_choice(where, "reduction", reduction, REDUCTIONS)
        self.dtype = dtype
        found = discover(model)
        self.blocks: list[Block] = found.blocks
        self.sites: list[Site] = found.sites
        self.unsupported: tuple[str, ...] = tuple(found.unsupported)
        if warn and self.unsupported:
            warnings.warn(
                f"fedng: {len(self.unsupported)} layer(s)/parameter(s) get no curvature and keep"
                " their plain gradients: " + "; ".join(self.unsupported),
                UnsupportedLayerWarning,
                stacklevel=3,
            )
        self.recording: bool = False
        self._phase = "loss"
        self._records: list[_Record] = []
        self._forward = 0
        self._handles = [
            h
            for rule, ids in zip(found.rules, found.site_ids, strict=True)
            for h in rule.install(self, ids)
        ]
        self._handles.append(model.register_forward_pre_hook(self._on_forward))

    # --- hooks ----------------------------------------------------------------------------

    def _on_forward(self, module: nn.Module, args: object) -> None:
        if self.recording:
            self._forward += 1  # records of one forward pass see the same samples

    def observe(self, site: int, x: torch.Tensor, y: torch.Tensor, extra: object = None) -> None:
        """Records the input of a site and attaches a gradient hook to its output."""
        if not y.requires_grad:
            return
        rec = _Record(site, x, extra, self._forward)  # `collect` reads x under no_grad
        self._records.append(rec)
        base = y._base
        base_node = None if base is None else base.grad_fn
        if base is not None and base_node is not None and _whole_view(y, base):
            # A layer output that is a view of its whole base (nn.Linear on 3-D inputs): a later
            # in-place op takes the view's node out of the graph, so the hook goes on the base's
            # node, whose gradient is the view's before that op, in the base's shape.
            base_node.register_prehook(
                functools.partial(self._on_base_grad, rec, base.output_nr, y.shape)
            )
            return
        node = y.grad_fn
        if node is None:  # a leaf output: a tensor hook
            # torch declares Tensor.register_hook without annotations
            y.register_hook(functools.partial(self._on_grad, rec))  # type: ignore[no-untyped-call]
            return
        # A pre-hook on the node that made y sees the gradient of y as a tensor hook does (also
        # before a later in-place op: that op gets a node of its own), registered natively at a
        # quarter of `register_hook`'s cost (its Python wrapper, dict and handle).
        node.register_prehook(functools.partial(self._on_node_grad, rec, y.output_nr))

    def _on_node_grad(self, rec: _Record, nr: int, grads: tuple[torch.Tensor | None, ...]) -> None:
        g = grads[nr]
        if g is not None:
            self._on_grad(rec, g)

    def _on_base_grad(
        self, rec: _Record, nr: int, shape: torch.Size, grads: tuple[torch.Tensor | None, ...]
    ) -> None:
        g = grads[nr]
        if g is not None:
            self._on_grad(rec, g.reshape(shape))

    def _on_grad(self, rec: _Record, grad: torch.Tensor) -> None:
        g = grad.detach() if grad.requires_grad else grad
        if self._phase == "fisher":
            rec.g_fisher = g if rec.g_fisher is None else rec.g_fisher + g
        else:
            rec.g_loss = g if rec.g_loss is None else rec.g_loss + g

    # --- control --------------------------------------------------------------------------

    @contextmanager
    def record(self, on: bool = True) -> Iterator[CurvatureCapture]:
        """Context manager that sets `recording` (and restores it afterwards)."""
        before = self.recording
        self.recording = on
        try:
            yield self
        finally:
            self.recording = before

    @property
    def num_records(self) -> int:
        """Observations held since the last `collect`/`clear`."""
        return len(self._records)

    def fisher_backward(self, loss: torch.Tensor) -> None:
        """The Fisher pass: backpropagates `loss` (e.g. `sampled_loss`) to the recorded layers.

        Parameter gradients (`.grad`) are not touched and the graph is retained for the real
        backward that follows.
        """
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(
                "CurvatureCapture.fisher_backward: 'loss' must be a scalar tensor,"
                f" got {type(loss).__name__}"
                f"{'' if not isinstance(loss, torch.Tensor) else list(loss.shape)}"
            )
        weights = list({id(b.weight): b.weight for b in self.blocks}.values())
        if not weights or not loss.requires_grad:
            return
        self._phase = "fisher"
        try:
            torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True)
        finally:
            self._phase = "loss"

    def clear(self) -> None:
        """Drops everything recorded."""
        self._records.clear()

    def remove(self) -> None:
        """Removes all hooks (the capture is unusable afterwards)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def take_records(self) -> list[_Record]:
        """Hands over what was recorded since the last `collect`/`clear`, and clears it (a fused
        consumer reads the raw inputs and output gradients itself; see `stats_of`)."""
        records, self._records = self._records, []
        return records

    # --- statistics -----------------------------------------------------------------------

    def collect(self, fisher: str | None = "empirical") -> list[BlockStats | None]:
        """Turns what was recorded since the last call into per-block statistics, and clears it.

        Args:
            fisher: "empirical" (the Fisher pass is the loss pass), "mc" (the Fisher pass is the
                `fisher_backward` pass; required for every recorded forward that was
                backpropagated), or None (only the loss pass is needed).

        Returns:
            One `BlockStats` per block, None for blocks not seen in a backpropagated forward.
        """
        records, self._records = self._records, []
        with torch.no_grad():
            return self._stats(records, fisher)

    def stats_of(self, records: list[_Record], fisher: str | None) -> list[BlockStats | None]:
        """`collect` of records handed over by `take_records`."""
        with torch.no_grad():
            return self._stats(records, fisher)

    def _stats(self, records: list[_Record], fisher: str | None) -> list[BlockStats | None]:
        pieces: dict[int, list[tuple[int, BlockStats]]] = {}
        for rec in records:
            if fisher == "mc":
                if rec.g_fisher is None:
                    if rec.g_loss is None:
                        continue
                    raise RuntimeError(
                        "CurvatureCapture.collect: fisher='mc' but a recorded forward pass had no"
                        " Fisher pass; call NaturalGradient.mc_backward(outputs) (or"
                        " fisher_backward(sampled_loss(...))) after the forward pass"
                    )
                gf = rec.g_fisher
            else:
                if rec.g_loss is None:
                    continue
                gf = rec.g_loss
            gl = rec.g_loss if rec.g_loss is not None else gf
            site = self.sites[rec.site]
            for blk, st in zip(
                site.blocks,
                site.stats(rec.x, gf, gl, rec.extra, self.dtype, self.reduction),
                strict=True,
            ):
                if rec.g_loss is None and not isinstance(st, ElementwiseStats):
                    st.g_loss = None  # no loss pass: the batch cannot explain `.grad`
                pieces.setdefault(blk, []).append((rec.forward, st))
        return [
            _merge(pieces[i], self.reduction) if i in pieces else None
            for i in range(len(self.blocks))
        ]


def _whole_view(y: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether y is a reshaped view of all of its base, element for element (so the base's
    gradient, reshaped, is y's)."""
    return (
        base.numel() == y.numel()
        and base.is_contiguous()
        and y.is_contiguous()
        and y.storage_offset() == base.storage_offset()
    )
