"""`NaturalGradient`: rewrites `.grad` into `(F + damping)^-1 grad` for any torch.optim optimizer.

Usage::

    ng = NaturalGradient(model)                  # K-FAC, relative damping, a trust region
    opt = torch.optim.SGD(model.parameters(), lr=DEFAULT_LR)
    for x, y in data:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        ng.step()        # .grad <- natural gradient
        opt.step()

With `fisher_type="mc"` call `ng.mc_backward(outputs)` between the forward pass and
`loss.backward()` (one extra backward pass with labels sampled from the model). With
`damping_mode="adaptive"` pass `closure` to `step` (a function returning the current batch's loss;
it is evaluated without gradients at θ and at θ + δ every `inverse_every` steps).

Per step: the recorded batch's statistics update the optimizer's own curvature (every
`factor_every` steps, one ragged native call per representation), the preconditioner's damped
inverses are refreshed every `inverse_every` steps (one call), and all gradients are
preconditioned in one call, K-FAC using the batch's own inputs and output gradients wherever that
is cheaper than the dense product. When every block is a K-FAC `nn.Linear` block (the common
case; empirical Fisher, own curvature), update and preconditioning are one native call
(`fedng.optim.fused_kfac`), with the same results.

Safe by default: `damping` is relative to each block's curvature scale (λ_i = damping x
tr(F_i) / d_i, `damping_scale="relative"`, never below 1% of the largest λ the block has had),
every step's KL estimate is bounded by an adaptive trust region under the hard bound `kl_clip`
(`trust="adaptive"`, `fedng.optim.trust`: no closure needed), a block whose inverse fails falls
back (escalated damping -> damped diagonal -> plain gradient, see `fedng.optim.safety`), and a
step with a non-finite gradient is skipped. Each fallback warns once
(`fedng.errors.CurvatureWarning`) and is counted in `stats` (and `state_dict`). An explicit
`damping=λ` (absolute, as before), `kl_clip=None` (unbounded) and `trust="fixed"` give the old
behaviour.

The preconditioner comes from a source (see `fedng.optim.source`): "local" (the own curvature,
the default), "none" (gradients untouched; the own curvature still accumulates), and, after
`set_global(curvature)`, "global" (that curvature, e.g. a federated server's, with exactly its
inverses) or, after `set_global(curvature, mix=w)`, "mixed" (`(1 - w) F_global + w F_local`,
re-inverted every `inverse_every` steps). A federated client::

    ng = NaturalGradient(model, curvature="kfac", inverse_every=5)
    ng.set_global(server_curvature, mix=0.5)     # a CurvatureSet over ng.local_curvature's blocks
    for x, y in batches:                         # then the loop above, with any optimizer
        ...
    upload = ng.local_curvature                  # what the client accumulated
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedng.curvature.base import FisherRepresentation, InverseReport
from fedng.curvature.block_diagonal import CurvatureSet
from fedng.curvature.capture import CurvatureCapture
from fedng.curvature.fisher import (
    FISHER_TYPES,
    LOSS_TYPES,
    REDUCTIONS,
    LossType,
    Reduction,
    check_choice,
    sampled_loss,
)
from fedng.curvature.kfac import KFAC, batch_form_cheaper
from fedng.curvature.layout import layouts_of
from fedng.curvature.stats import BlockStats, KronStats
from fedng.optim.config import (
    DEFAULT_KL_CLIP,
    WHERE,
    CurvatureSpec,
    assign,
    check_damping_bounds,
    ema_decay,
    learning_rate,
    nonnegative_int,
    optional_positive_float,
    positive_int,
    renamed_keywords,
    resolve_damping,
)
from fedng.optim.damping import (
    DAMPING_MODES,
    LevenbergMarquardt,
    PeakFloor,
    predicted_reduction,
    reduction_ratio,
)
from fedng.optim.fused_kfac import BF16_MODES, FusedKFAC, FusedResult, Piece, Rows
from fedng.optim.gather import FlatGrads
from fedng.optim.safety import (
    Safety,
    all_finite,
    failed_blocks,
    fall_back,
    jittered,
    nonfinite_outputs,
)
from fedng.optim.source import INITIAL_SOURCES, DampingRule, PreconditionerSource
from fedng.optim.trust import TrustRegion, trust_region

DEFAULT_LR = 1.0
"""The learning rate of `torch.optim.SGD` for the defaults: the natural gradient's unit step
(the Newton step of the damped Fisher model), with the trust region bounding its KL estimate
(the `lr` argument's default, so the bound is in the step's own units). Measured on the model
zoo (`bench/bench_zoo.py`, `docs/natural_gradient.md`): within 2x of the best lr on all six
models."""


class NaturalGradient:
    """Natural-gradient preconditioner for a model's `.grad`, composable with any optimizer.

    Args:
        model: any module tree; supported layers are found automatically (see
            `fedng.curvature`), unsupported ones keep their plain gradients (one warning).
        curvature: "kfac", "diag", "lowrank", or a per-layer mapping (block name, module name,
            module class or class name, or "default" -> representation). Normalization layers
            get the diagonal Fisher unless mapped explicitly.
        damping: > 0: λ itself (`damping_scale="absolute"`) or its factor per block
            (`"relative"`): λ_i = damping x tr(F_i) / d_i, the block's mean eigenvalue (the initial
            value in adaptive mode). None: the scale's default (`DEFAULT_RELATIVE_DAMPING` or
            `DEFAULT_DAMPING`).
        damping_scale: "relative", "absolute", or None: "relative" when `damping` is None too,
            "absolute" when `damping` is given (an explicit λ keeps its old meaning). Relative
            damping splits each K-FAC block's λ between its factors by their traces (each factor
            gets sqrt(damping) x its mean eigenvalue).
        factor_every: update the own curvature every this many steps.
        inverse_every: recompute the damped inverses every this many steps (with the own
            curvature, a block that first gets curvature in between is inverted at once).
        curvature_decay: EMA decay of the own curvature in [0, 1), or None for a running mean.
        damping_mode: "tikhonov", "factored" or "adaptive" (see `fedng.optim.damping`;
            "adaptive" needs the own curvature, source "local").
        kl_clip: the hard bound on the step's KL estimate `lr^2 sum p^T g` (p the
            preconditioned, g the raw gradient), enforced by scaling the preconditioned gradients
            (default `DEFAULT_KL_CLIP`; see `trust` for the bound in force); None: unbounded.
        lr: the learning rate the optimizer applies (a float or a callable returning it); used
            by `kl_clip` and by the adaptive damping's trial step.
        fisher_type: "empirical" (the loss's own gradients) or "mc" (sampled labels).
        loss: "cross_entropy" or "mse", the likelihood `fisher_type="mc"` samples from.
        loss_reduction: "mean" or "sum": how the training loss reduces over the batch.
        rank: sketch rank of low-rank blocks.
        sketch_seed: seed of the low-rank sketches (shared by every party whose sketches are
            summed); it also seeds the Monte-Carlo labels unless `mc_backward` gets a generator.
        damping_bounds: (min, max) of λ in adaptive mode.
        trust: "adaptive" (default): the bound on the step's KL estimate is a radius that adapts
            inside `[start / 1000, kl_clip]` to the loss change observed along each step
            (`fedng.optim.trust`; no closure needed), starting at 1e-4 when `kl_clip` has the
            default value 0.1 (passed or not) and at `kl_clip` otherwise; "fixed": the bound is
            `kl_clip` itself. Ignored when `kl_clip` is None.
        source: "local" or "none" (`set_global` turns a "local" optimizer "global" or "mixed").
        warn_unsupported: warn about layers whose gradients stay plain: an
            `UnsupportedLayerWarning` for unsupported layers on construction, a RuntimeWarning for
            blocks never seen in a recorded forward pass on their first step. False for callers
            that build many optimizers over one model and warn once themselves (a federated
            client per round).
        bf16: bf16 GEMMs (float32 accumulation) for wide K-FAC Linear blocks (`max(m, n) >=
            fedng.optim.fused_kfac.BF16_MIN`, the fused step) where the CPU has bf16 GEMM
            instructions (`fedng.ops.bf16_gemm`; no effect elsewhere). "off" (default): float32
            only.
            "factors" (opt-in): the factors are folded from bf16-rounded batch rows, each the
            exact EMA of the Grams of rows within a relative 2^-8 of the recorded ones (still
            symmetric PSD); inverses and preconditioning stay float32. "all": also the batch
            form's products `P = g G^-1` and `P^T Q` in plain bf16 (each entry within 2^-7
            |a||b| of the exact product; ~0.5% of the step's scale on the bench MLP; opt-in).
        **deprecated: `factor_decay` (now `curvature_decay`), `fisher` (now `fisher_type`),
            `seed` (now `sketch_seed`), each with a DeprecationWarning.

    Attributes:
        capture: the `CurvatureCapture` (its `blocks` and `unsupported`).
        local_curvature: the own curvature (a `CurvatureSet` over `capture.blocks`).
        source: the preconditioner source (`source.mode` is the current one).
        damping: the current λ (or relative factor, see `damping_scale`).
        damping_scale: "absolute" or "relative".
        last: what the last `step` did (kl scale, damping, reduction ratio, inverse report,
            `skipped`, `fallbacks`: block name -> fallback stage).
        stats: counters since construction: `inverse_fallbacks` per stage ("jitter",
            "diagonal", "identity"), `skipped_steps`, `clipped_steps` (KL-clipped),
            `reset_blocks` (saved by `state_dict`).
    """

    def __init__(
        self,
        model: nn.Module,
        curvature: CurvatureSpec = "kfac",
        damping: float | None = None,
        factor_every: int = 1,
        inverse_every: int = 10,
        curvature_decay: float | None = 0.95,
        damping_mode: str = "tikhonov",
        kl_clip: float | None = DEFAULT_KL_CLIP,
        lr: float | Callable[[], float] = 1.0,
        fisher_type: str = "empirical",
        loss: LossType = "cross_entropy",
        loss_reduction: Reduction = "mean",
        rank: int = 16,
        sketch_seed: int = 0,
        damping_bounds: tuple[float, float] = (1e-8, 1e3),
        source: str = "local",
        warn_unsupported: bool = True,
        damping_scale: str | None = None,
        trust: str = "adaptive",
        bf16: str = "off",
        **deprecated: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{WHERE}: 'model' must be a torch.nn.Module, got {type(model).__name__}"
            )
        renamed = renamed_keywords(deprecated)
        self.damping_scale, self.damping = resolve_damping(damping, damping_scale)
        self.factor_every = positive_int("factor_every", factor_every)
        self.inverse_every = positive_int("inverse_every", inverse_every)
        self.curvature_decay = ema_decay(
            "curvature_decay", renamed.get("curvature_decay", curvature_decay)
        )
        self.damping_mode = check_choice(WHERE, "damping_mode", damping_mode, DAMPING_MODES)
        self.kl_clip = optional_positive_float("kl_clip", kl_clip)
        self._trust: TrustRegion | None = trust_region(trust, self.kl_clip)
        self._lr = learning_rate(lr)
        self.fisher_type = check_choice(
            WHERE, "fisher_type", renamed.get("fisher_type", fisher_type), FISHER_TYPES
        )
        self.loss = check_choice(WHERE, "loss", loss, LOSS_TYPES)
        reduction = check_choice(WHERE, "loss_reduction", loss_reduction, REDUCTIONS)
        self.rank = positive_int("rank", rank)
        self.sketch_seed = nonnegative_int("sketch_seed", renamed.get("sketch_seed", sketch_seed))
        mode = check_choice(WHERE, "source", source, INITIAL_SOURCES)
        self.bf16 = check_choice(WHERE, "bf16", bf16, BF16_MODES)
        if not isinstance(warn_unsupported, bool):
            raise TypeError(
                f"{WHERE}: 'warn_unsupported' must be a bool, got {type(warn_unsupported).__name__}"
            )
        self._lm = LevenbergMarquardt.for_interval(
            self.inverse_every, *check_damping_bounds(damping_bounds)
        )
        self.model = model
        # Checked for finite gradients every step; listed once (iterating modules costs ~20 us).
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.dtype = (
            torch.float64
            if self._params and all(p.dtype == torch.float64 for p in self._params)
            else torch.float32
        )
        self.capture = CurvatureCapture(
            model, dtype=self.dtype, reduction=reduction, warn=warn_unsupported
        )
        blocks = self.capture.blocks
        self.local_curvature = CurvatureSet.empty(
            layouts_of(model, blocks),
            assign(blocks, curvature),
            self.rank,
            self.sketch_seed,
            self.dtype,
        )
        self.source = PreconditionerSource(mode, self.local_curvature)
        # Gradients and results as views of two flat buffers (see `fedng.optim.gather`).
        self._flat = FlatGrads(blocks, self._params, self.dtype) if blocks else None
        # The common case (K-FAC Linear layers) in one native call per step, or None.
        self._fused = FusedKFAC.build(
            self.capture, self.local_curvature, self._flat, self.fisher_type, self.bf16
        )
        self._names = [b.name for b in blocks]
        self.steps = 0
        self._generator = torch.Generator().manual_seed(self.sketch_seed)
        self._batch_form = False
        self._warn_unseen_blocks = warn_unsupported
        self._warned: set[str] = set()
        self.last: dict[str, Any] = {}
        self._safety = Safety()
        self._damping_floor = PeakFloor()
        self._reset_names: set[str] = set()
        self._no_curvature: set[int] = set()  # blocks whose relative damping found no curvature
        self._skipped: list[Piece] = []  # weight gradients `backward` left out, with their rows
        self._block_params = list(
            {id(q): q for b in blocks for q in (b.weight, b.bias) if q is not None}.values()
        )
        self.capture.recording = True

    @property
    def stats(self) -> dict[str, Any]:
        """The fallback and clipping counters (see the class docstring)."""
        return self._safety.stats

    @property
    def trust(self) -> TrustRegion | None:
        """The adaptive trust region (None under `trust="fixed"` or no `kl_clip`)."""
        return self._trust

    @property
    def representations(self) -> dict[str, FisherRepresentation]:
        """The own curvature's representations by kind (`local_curvature.reps`)."""
        return dict(self.local_curvature.reps)

    def set_global(self, curvature: CurvatureSet, mix: float | None = None) -> None:
        """Preconditions with a given curvature from now on (e.g. a federated server's).

        Args:
            curvature: a `CurvatureSet` over the same blocks and kinds as `local_curvature`.
                Without `mix` (source "global") its inverses are used as they are: call its
                `inverse` or `load_inverse_arrays` first; blocks without one keep their plain
                gradients.
            mix: the weight w of the own curvature: source "mixed", `(1 - w) F_global + w F_local`
                re-inverted on the next step and every `inverse_every` steps (same dtype needed).

        Raises:
            ValueError: source "none", adaptive damping, or a curvature over other blocks.
        """
        if self.damping_mode == "adaptive":
            raise ValueError(f"{WHERE}.set_global: damping_mode='adaptive' needs source='local'")
        self.source.set_global(curvature, mix)

    # --- the two calls of a training step -------------------------------------------------

    def mc_backward(self, outputs: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """The Monte-Carlo Fisher pass (fisher_type="mc"): backpropagates a loss on sampled labels.

        Call it after the forward pass that produced `outputs` and before `loss.backward()`. It
        does nothing on steps that do not update the curvature, and never touches `.grad`.

        Args:
            outputs: the model outputs [B, ..., C] (logits, or means for "mse").
            generator: the labels' random stream (None: the optimizer's own, seeded by
                `sketch_seed` and saved by `state_dict`).
        """
        if self.fisher_type != "mc":
            raise ValueError(
                f"{WHERE}.mc_backward: needs fisher_type='mc', this one has"
                f" fisher_type={self.fisher_type!r}"
            )
        if not isinstance(outputs, torch.Tensor) or not outputs.requires_grad:
            raise ValueError(
                f"{WHERE}.mc_backward: 'outputs' must be the model's output tensor"
                " (requiring grad), got"
                f" {outputs if not isinstance(outputs, torch.Tensor) else 'a tensor without grad'}"
            )
        if self.steps % self.factor_every:
            return
        gen = self._generator if generator is None else generator
        self.capture.fisher_backward(sampled_loss(outputs, self.loss, self.capture.reduction, gen))

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()`, without the weight gradients the next `step` does not need.

        With kl_clip=None, a Linear layer (with a bias) whose batch is smaller than its width
        gets its natural gradient from the recorded rows, `(g G^-1)^T ([x 1] A^-1)`, so
        autograd's weight gradient `g^T x` (a third of the layer's backward flops) is not formed:
        between this call and `step` those weights' `.grad` stay None (bias gradients and every
        other parameter's are formed as usual), and `step` writes their natural gradient. A
        step that needs them after all forms them from the rows, so the result is the same as
        after `loss.backward()` (`tests/test_fused_kfac.py`). Anything else that reads `.grad`
        between the two calls (gradient clipping, hooks) should use `loss.backward()`.

        Args:
            loss: the scalar training loss of the forward pass just recorded.
        """
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(
                f"{WHERE}.backward: 'loss' must be a scalar tensor, got"
                f" {type(loss).__name__}"
                f"{'' if not isinstance(loss, torch.Tensor) else list(loss.shape)}"
            )
        fused = self._fused
        if fused is not None and self._skipped:  # a second backward before the step
            fused.materialize(self._skipped)
            self._skipped = []
        skip = (
            fused.skippable(self.capture)
            if fused is not None and self.kl_clip is None and self.source.mode == "local"
            else ()
        )
        if skip:
            skip = fused.used_once(loss, skip)  # type: ignore[union-attr]
        if not skip:
            loss.backward()  # type: ignore[no-untyped-call]  # unannotated in torch
            return
        skipped = {id(fused.weights[i]) for i in skip}  # type: ignore[union-attr]
        keep = [p for p in self._params if id(p) not in skipped]
        torch.autograd.backward(loss, inputs=keep)
        self._skipped = fused.snapshot(self.capture, skip)  # type: ignore[union-attr]

    def step(self, closure: Callable[[], torch.Tensor | float] | None = None) -> None:
        """Rewrites the gradients of every block with a preconditioner into natural gradients.

        A step whose gradients (of any parameter of the model) are not all finite is skipped:
        the curvature is not updated, every parameter's `.grad` is set to None (so that a
        `torch.optim` optimizer leaves the parameters alone, momentum included), `last["skipped"]`
        is True and `stats["skipped_steps"]` counts it (one `CurvatureWarning`).

        Args:
            closure: required by damping_mode="adaptive" (on inverse steps after the first):
                returns the loss of the current batch at the current parameters (called under
                `torch.no_grad`).
        """
        t = self.steps
        factor_step = t % self.factor_every == 0
        inverse_step = t % self.inverse_every == 0
        adapt = self.damping_mode == "adaptive" and inverse_step and t > 0
        if adapt and closure is None:
            raise ValueError(
                f"{WHERE}.step: damping_mode='adaptive' needs 'closure' (a function"
                " returning the current batch's loss) on inverse steps"
            )
        fused = self._fused
        if self._quick(t, factor_step, inverse_step):
            return
        rows = (
            fused.take(self.capture, factor_step)
            if fused is not None and self.source.mode == "local" and fused.flat is self._flat
            else None
        )
        # Weight gradients `backward` left out: kept out if the rows explain them exactly, else
        # formed now from the rows, as autograd would have.
        pieces, self._skipped = self._skipped, []
        skip: tuple[int, ...] = ()
        if pieces and fused is not None:
            if rows is None or self.kl_clip is not None or not fused.rows_explain(rows, pieces):
                fused.materialize(pieces)
            else:
                skip = tuple(sorted(i for i, _, _ in pieces))
        stats = (
            None
            if rows is not None
            else self.capture.collect(self.fisher_type if factor_step else None)
        )
        flat = self._flat
        gathered = flat.gather(skip) if flat is not None else None
        if gathered is None and skip and fused is not None and rows is not None:
            fused.materialize(pieces)  # another parameter has no gradient
            skip = ()
            gathered = flat.gather() if flat is not None else None
        if rows is not None and gathered is None:  # the fused step reads the gathered gradients
            fisher = self.fisher_type if factor_step else None
            stats, rows = self.capture.stats_of(rows.records, fisher), None
        if gathered is not None and flat is not None:
            grads: list[torch.Tensor | None] = list(gathered)
            # The fused step sums the gathered gradients natively (before changing anything).
            finite = (rows is not None or flat.grads_finite()) and (
                not flat.uncovered or all_finite(self._uncovered())
            )
            if not finite and not all_finite([p.grad for p in self._params if p.grad is not None]):
                self._skip(t)
                return
        else:
            if not all_finite([p.grad for p in self._params if p.grad is not None]):
                self._skip(t)
                return
            grads = [b.grad_matrix(self.dtype) for b in self.capture.blocks]
        blocks = self.capture.blocks
        factored = self.damping_mode != "tikhonov" or self._relative
        precond: list[torch.Tensor | None]
        if rows is not None and fused is not None:  # the fused K-FAC step (fedng.optim.fused_kfac)
            fz, rz = fused, rows  # narrowed, for the closure

            def fused_step(check: bool) -> FusedResult | None:
                return fz.step(
                    self.capture,
                    lambda: self.source.current(inverse_step, self._damping_rule(), factored),
                    rz,
                    self.curvature_decay,
                    inverse_step,
                    grads,
                    check,
                    factor_step,
                    skip,
                )

            done = fused_step(True)
            if done is None and all_finite([p.grad for p in self._params if p.grad is not None]):
                done = fused_step(False)  # finite entries whose sum overflowed
            if done is None:  # a non-finite gradient: nothing was updated
                self._skip(t)
                return
            pre, report, precond = done
            if skip and (
                not math.isfinite(fused.dot)
                or failed_blocks(report, self._names)
                or self._no_curvature
                or adapt
            ):
                fused.fill(rows, skip)  # what follows reads the skipped blocks' gradients
            if rows.records:  # as `_note_batch`: nothing recorded keeps the last answer
                self._batch_form = fused.batch_form(rows)
        else:
            if stats is None:  # unreachable: the rows went to the general path's stats above
                stats = [None] * len(blocks)
            self._note_batch(stats)
            if factor_step:
                self.local_curvature.update(stats, self.curvature_decay)
            pre, report = self.source.current(inverse_step, self._damping_rule(), factored)
            precond = (
                [None] * len(blocks)
                if pre is None
                else pre.precondition(
                    grads,
                    stats,
                    out=flat.outs if flat is not None and gathered is not None else None,
                )
            )
        self._finish(t, pre, report, grads, precond, rows, skip, pieces, adapt, closure, gathered)

    def _finish(
        self,
        t: int,
        pre: CurvatureSet | None,
        report: InverseReport | None,
        grads: list[torch.Tensor | None],
        precond: list[torch.Tensor | None],
        rows: Rows | None,
        skip: tuple[int, ...],
        pieces: list[Piece],
        adapt: bool,
        closure: Callable[[], torch.Tensor | float] | None,
        gathered: list[torch.Tensor] | None,
    ) -> None:
        """The step after preconditioning: fallbacks, the KL scale, the adaptive damping, the
        preconditioned gradients written into `.grad`, `last`."""
        flat, fused, blocks = self._flat, self._fused, self.capture.blocks
        # All outputs in the flat buffer: one reduction is both their finiteness check and, with
        # the KL clip, sum <p, g> (an overflow or a non-finite output takes the exact path).
        dot = math.nan
        if flat is not None and gathered is not None and flat.holds_outputs(precond):
            fused_dot = math.nan if rows is None or fused is None else fused.dot
            dot = fused_dot if math.isfinite(fused_dot) else flat.dot()
        fallbacks = self._fall_back(pre, report, grads, precond, math.isfinite(dot))
        for i in self._no_curvature:
            if precond[i] is not None:
                precond[i] = grads[i]
        if self.source.mode == "local" and self._warn_unseen_blocks:
            self._warn_unseen(grads, precond)
        fast = flat is not None and math.isfinite(dot) and flat.holds_outputs(precond)
        live = [
            (i, g, p)
            for i, (g, p) in enumerate(zip(grads, precond, strict=True))
            if g is not None and p is not None
        ]
        lr = float(self._lr())
        nu = 1.0
        if self.kl_clip is not None:  # the FedNG client's formula
            g_dot_p = dot if fast else sum(float((p * g).sum()) for _, g, p in live)
            nu = self._kl_scale(g_dot_p, lr)
        self.stats["clipped_steps"] += nu < 1.0
        rho = None
        if adapt and closure is not None and live:
            rho = self._adapt(closure, live, lr * nu)
        if fast and flat is not None:
            flat.write_back(nu)
        else:
            if skip and fused is not None:  # the raw gradient where no output replaces it
                fused.materialize(pieces)
            out = [p for _, _, p in live]
            if nu != 1.0:
                torch._foreach_mul_(out, nu)
            dst: list[torch.Tensor] = []
            src: list[torch.Tensor] = []
            for (i, _, _), p in zip(live, out, strict=True):
                blocks[i].grad_pairs(p, dst, src)
            if dst:
                torch._foreach_copy_(dst, src)
        preconditioned = list(self._names) if fast else [blocks[i].name for i, _, _ in live]
        self._done(t, nu, rho, report, preconditioned, fallbacks)

    def _kl_scale(self, g_dot_p: float, lr: float) -> float:
        """The KL clip's scale ν of the preconditioned gradients (`kl_clip` set) from
        `g_dot_p = sum <p, g>`, after the trust region observed the raw gradients; the step is
        remembered for the next observation."""
        nu = 1.0
        raw = self._raw_grads()
        bound = self._bound(raw)
        if g_dot_p > 0 and lr > 0:  # lr 0 (warm-up, a schedule's end): no step to bound
            nu = min(1.0, math.sqrt(bound / (lr**2 * g_dot_p)))
        if self._trust is not None and raw is not None:
            taken = lr**2 * nu**2 * g_dot_p
            self._trust.remember(self._block_params, raw, taken, nu < 1.0, lr**2 * g_dot_p)
        return nu

    def _done(
        self,
        t: int,
        nu: float,
        rho: float | None,
        report: InverseReport | None,
        preconditioned: list[str],
        fallbacks: dict[str, str],
    ) -> None:
        """`last`, the step counter and whether the next forward pass records."""
        self.last = {
            "step": t,
            "kl_scale": nu,
            "damping": self.damping,
            "rho": rho,
            "trust_radius": None if self._trust is None else self._trust.radius,
            "inverse": report,
            "preconditioned": preconditioned,
            "skipped": False,
            "fallbacks": fallbacks,
        }
        self.steps += 1
        self.capture.recording = self._batch_form or self.steps % self.factor_every == 0

    def _quick(self, t: int, factor_step: bool, inverse_step: bool) -> bool:
        """The common step in a few Python operations: the fused K-FAC step (`FusedKFAC.step`)
        of the own curvature, every block ready, no left-out weight gradient, not adaptive.
        Returns False, with nothing changed, when the step does not fit before the native call
        (the general path then takes it); after it, a step with a non-finite output, an
        inversion that escalated or failed, or a block without curvature finishes as the
        general path does (`_finish`)."""
        fused, flat = self._fused, self._flat
        if (
            fused is None
            or flat is None
            or fused.flat is not flat
            or self._skipped
            or self.damping_mode == "adaptive"
            or self.source.mode != "local"
            or flat.uncovered
            or not fused.ready()
        ):
            return False
        grads = flat.gather()
        if grads is None:
            return False
        rows = fused.take(self.capture, factor_step)
        if rows is None:
            return False
        factored = self.damping_mode != "tikhonov" or self._relative

        def current() -> tuple[CurvatureSet | None, InverseReport | None]:
            return self.source.current(inverse_step, self._damping_rule(), factored)

        got: list[torch.Tensor | None] = list(grads)
        args = (self.capture, current, rows, self.curvature_decay, inverse_step, got)
        done = fused.step(*args, True, factor_step)
        if done is None and all_finite([p.grad for p in self._params if p.grad is not None]):
            done = fused.step(*args, False, factor_step)  # finite entries whose sum overflowed
        if done is None:  # a non-finite gradient: nothing was updated
            self._skip(t)
            return True
        pre, report, precond = done
        if rows.records:  # as `_note_batch`: nothing recorded keeps the last answer
            self._batch_form = fused.batch_form(rows)
        dot = fused.dot
        if (
            not math.isfinite(dot)
            or self._no_curvature
            or pre is not self.local_curvature
            or (report is not None and any(report.status.tolist()))  # not all OK
            or not flat.holds_outputs(precond)
        ):
            self._finish(t, pre, report, got, precond, rows, (), [], False, None, grads)
            return True
        nu = 1.0 if self.kl_clip is None else self._kl_scale(dot, float(self._lr()))
        self.stats["clipped_steps"] += nu < 1.0
        flat.write_back(nu)
        self._done(t, nu, None, report, list(self._names), {})
        return True

    # --- internals ------------------------------------------------------------------------

    def _raw_grads(self) -> list[torch.Tensor] | None:
        """The blocks' parameters' gradients as they are now (None when one is missing)."""
        out = [q.grad for q in self._block_params]
        return None if any(g is None for g in out) else out  # type: ignore[return-value]

    def _bound(self, raw: list[torch.Tensor] | None) -> float:
        """This step's bound on the KL estimate: `kl_clip`, or the adaptive radius after
        observing the previous step's outcome (`fedng.optim.trust`)."""
        if self._trust is None:
            return math.inf if self.kl_clip is None else self.kl_clip
        if raw is None:
            self._trust.forget()
            return self._trust.radius
        return self._trust.observe(self._block_params, raw)

    def _uncovered(self) -> list[torch.Tensor]:
        """Gradients of the parameters no block covers entirely."""
        flat = self._flat
        return [] if flat is None else [p.grad for p in flat.uncovered if p.grad is not None]

    @property
    def _relative(self) -> bool:
        return self.damping_scale == "relative"

    def _damping_rule(self) -> DampingRule:
        """λ, or (relative) a function of the curvature about to be inverted giving per block
        `damping x tr(F_i) / d_i`, at least `damping_bounds[0]`."""
        if not self._relative:
            return self.damping
        rel, floor = self.damping, self._lm.min_damping

        def per_block(curvature: CurvatureSet) -> dict[str, list[float]]:
            lams = curvature.relative_damping(rel)
            # A block with no curvature (trace 0, e.g. zero output gradients while an L2 term
            # still gives it a gradient) would be inverted at the floor λ and amplify its gradient
            # ~1/floor: it keeps its plain gradient until it has curvature (see `step`).
            self._no_curvature = {
                curvature.groups[k][j]
                for k, values in lams.items()
                for j, v in enumerate(values)
                if not (math.isfinite(v) and v > 0)
            }
            return {k: self._damping_floor.apply(k, values, floor) for k, values in lams.items()}

        return per_block

    def _skip(self, t: int) -> None:
        """Skips step t: no curvature update, every `.grad` None, counted and warned once."""
        for p in self.model.parameters():
            p.grad = None
        if self._trust is not None:
            self._trust.forget()
        self._safety.note("skipped")
        self.last = {
            "step": t,
            "kl_scale": 0.0,
            "damping": self.damping,
            "rho": None,
            "inverse": None,
            "preconditioned": [],
            "skipped": True,
            "fallbacks": {},
        }
        self.steps += 1
        self.capture.recording = self._batch_form or self.steps % self.factor_every == 0

    def _fall_back(
        self,
        pre: CurvatureSet | None,
        report: InverseReport | None,
        grads: list[torch.Tensor | None],
        precond: list[torch.Tensor | None],
        outputs_finite: bool = False,
    ) -> dict[str, str]:
        """The fallback chain (`fedng.optim.safety`) for this step's failed or non-finite blocks;
        block name -> stage used. Failed blocks of the own curvature are reset.
        `outputs_finite`: the outputs are already known finite (their check is skipped)."""
        self._safety.note("jitter", jittered(report))
        if pre is None:
            return {}
        blocks = self.capture.blocks
        failed = failed_blocks(report, self._names)
        bad = failed if outputs_finite else failed | nonfinite_outputs(precond)
        if not bad:
            return {}
        used = fall_back(pre, grads, precond, bad, self.damping, self._relative)
        for stage in ("diagonal", "identity"):
            names = sorted(blocks[i].name for i, s in used.items() if s == stage)
            self._safety.note(stage, len(names), f": {names}")
        if pre is self.local_curvature:
            reset = sorted(bad)
        else:
            # A mixed preconditioner inherits an overflow of the own curvature at every later
            # inversion (and the client would upload it): reset the own blocks that are not finite.
            reset = [i for i in sorted(bad) if not self._own_block_finite(i)]
        for i in reset:
            rep, j = self.local_curvature.block_rep(i)
            rep.reset([j])
            self._reset_names.add(blocks[i].name)
        self.stats["reset_blocks"] += len(reset)
        return {blocks[i].name: s for i, s in used.items()}

    def _own_block_finite(self, i: int) -> bool:
        """Whether block i of the own curvature has a finite trace (an overflow makes it inf)."""
        rep, j = self.local_curvature.block_rep(i)
        return math.isfinite(rep.block_traces()[j])

    def _note_batch(self, stats: list[BlockStats | None]) -> None:
        """Keeps recording on every step when K-FAC's batch form is cheaper for some block."""
        idx = self.local_curvature.groups.get(KFAC.kind, [])
        if all(stats[i] is None for i in idx):
            return
        self._batch_form = False
        for i in idx:
            st, spec = stats[i], self.capture.blocks[i].spec
            if isinstance(st, KronStats) and batch_form_cheaper(st.rows, spec.m, spec.n):
                self._batch_form = True

    def _warn_unseen(
        self, grads: list[torch.Tensor | None], precond: list[torch.Tensor | None]
    ) -> None:
        names = [
            b.name
            for b, g, p in zip(self.capture.blocks, grads, precond, strict=True)
            if g is not None
            and p is None
            and b.name not in self._warned
            and b.name not in self._reset_names
        ]
        if names:
            self._warned.update(names)
            warnings.warn(
                f"{WHERE}: blocks {names} have gradients but no curvature yet: they were never"
                " seen in a recorded forward pass (a layer called functionally, e.g. through"
                " F.linear with its weight, is invisible to module hooks); their gradients are"
                " left as they are",
                RuntimeWarning,
                stacklevel=3,
            )

    def _adapt(
        self,
        closure: Callable[[], torch.Tensor | float],
        live: list[tuple[int, torch.Tensor, torch.Tensor]],
        step_size: float,
    ) -> float:
        """Levenberg–Marquardt: evaluates the proposed step δ = -step_size p, adjusts λ."""
        blocks = self.capture.blocks
        deltas: list[torch.Tensor | None] = [None] * len(blocks)
        moves = [(i, g, p * (-step_size)) for i, g, p in live]
        for i, _, d in moves:
            deltas[i] = d
        g_dot_d = sum(float((g * d).sum()) for _, g, d in moves)
        d_sq = sum(float(d.square().sum()) for _, _, d in moves)
        d_f_d = self.local_curvature.quadratic(deltas)
        before = self._evaluate(closure)
        params = {
            id(q): q
            for i, _, _ in live
            for q in (blocks[i].weight, blocks[i].bias)
            if q is not None
        }
        saved = {k: q.detach().clone() for k, q in params.items()}
        for i, _, d in moves:
            blocks[i].add_to_params(d)
        try:
            after = self._evaluate(closure)
        finally:
            with torch.no_grad():
                for k, q in params.items():
                    q.copy_(saved[k])
        rho = reduction_ratio(
            after - before, predicted_reduction(g_dot_d, d_f_d, d_sq, self._model_damping())
        )
        self.damping = self._lm.adjust(self.damping, rho)
        return rho

    def _model_damping(self) -> float:
        """λ of the quadratic model: the damping, or (relative) damping x tr(F) / d overall."""
        if not self._relative:
            return self.damping
        dims = sum(lay.spec.numel for lay in self.local_curvature.layouts)
        return self.damping * max(self.local_curvature.trace(), 0.0) / max(dims, 1)

    def _evaluate(self, closure: Callable[[], torch.Tensor | float]) -> float:
        """The closure's loss without gradients, recording, or changes to buffers (BN stats)."""
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        try:
            with torch.no_grad(), self.capture.record(False):
                value = closure()
        finally:
            for b, old in buffers:
                b.copy_(old)
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(
                    f"{WHERE}.step: 'closure' must return a scalar loss, got shape"
                    f" {list(value.shape)}"
                )
            return float(value)
        if isinstance(value, (int, float)):
            return float(value)
        raise TypeError(
            f"{WHERE}.step: 'closure' must return a tensor or float, got {type(value).__name__}"
        )

    # --- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Step counter, damping, own curvature with inverses, the mixed preconditioner (source
        "mixed"), and the sampling RNG state. A given global curvature is not included."""
        return {
            "steps": self.steps,
            "damping": self.damping,
            "batch_form": self._batch_form,
            "generator": self._generator.get_state(),
            "representations": {k: r.state_dict() for k, r in self.local_curvature.reps.items()},
            "source": self.source.state_dict(),
            "damping_scale": self.damping_scale,
            "stats": copy.deepcopy(self.stats),
            "trust": None if self._trust is None else self._trust.state_dict(),
            "damping_peaks": copy.deepcopy(self._damping_floor.peaks),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores `state_dict()`'s output; the next `step` is then identical to the original's
        (for source "global"/"mixed", call `set_global` first).

        Raises:
            ValueError: if the state belongs to a different model or configuration.
        """
        where = f"{WHERE}.load_state_dict"
        if not isinstance(state, dict) or not {
            "steps",
            "damping",
            "representations",
            "generator",
        } <= set(state):
            raise ValueError(
                f"{where}: 'state' must be a NaturalGradient state dict, got keys"
                f" {sorted(state) if isinstance(state, dict) else type(state)}"
            )
        reps = state["representations"]
        own = self.local_curvature.reps
        if set(reps) != set(own):
            raise ValueError(f"{where}: representations must be {sorted(own)}, got {sorted(reps)}")
        for k, r in own.items():
            r.load_state_dict(reps[k])
        self.source.load_state_dict(state.get("source", {}))
        self.steps = int(state["steps"])
        # The scale gives the damping its meaning; checkpoints from before it existed were absolute.
        scale = state.get("damping_scale", "absolute")
        if scale != self.damping_scale:
            raise ValueError(
                f"{where}: the state's damping is {scale}, this NaturalGradient's is"
                f" {self.damping_scale}; build it with damping_scale={scale!r}"
            )
        self.damping = float(state["damping"])
        self._batch_form = bool(state.get("batch_form", False))
        self._generator.set_state(state["generator"])
        self._safety.load(state.get("stats"))
        self._damping_floor.peaks = copy.deepcopy(state.get("damping_peaks", {}))
        if self._trust is not None:
            trust = state.get("trust")
            if isinstance(trust, dict):
                self._trust.load_state_dict(trust)
            else:  # a checkpoint from before the trust region: start afresh
                self._trust = trust_region("adaptive", self.kl_clip)
        self.capture.clear()
        self.capture.recording = self._batch_form or self.steps % self.factor_every == 0

    def remove(self) -> None:
        """Removes the hooks from the model."""
        self.capture.remove()
