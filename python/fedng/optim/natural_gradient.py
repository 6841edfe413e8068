"""`NaturalGradient`: rewrites `.grad` into `(F + damping)^-1 grad` for any torch.optim optimizer.

Usage::

    ng = NaturalGradient(model, curvature="kfac", damping=1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in data:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        ng.step()        # .grad <- natural gradient
        opt.step()

With `fisher="mc"` call `ng.mc_backward(outputs)` between the forward pass and `loss.backward()`
(one extra backward pass with labels sampled from the model). With `damping_mode="adaptive"` pass
`closure` to `step` (a function returning the current batch's loss; it is evaluated without
gradients at θ and at θ + δ every `inverse_every` steps).

Per step: the recorded batch's statistics update the curvature (every `factor_every` steps, one
ragged native call per representation), the damped inverses are refreshed every `inverse_every`
steps (one call), and all gradients are preconditioned in one call, K-FAC using the batch's own
inputs and output gradients wherever that is cheaper than the dense product.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedng.curvature.base import FisherRepresentation, InverseReport
from fedng.curvature.capture import CurvatureCapture
from fedng.curvature.diagonal import DiagonalFisher
from fedng.curvature.fisher import FISHER_TYPES, LOSS_TYPES, REDUCTIONS, check_choice, sampled_loss
from fedng.curvature.kfac import KFAC, batch_form_cheaper
from fedng.curvature.lowrank import LowRankFisher
from fedng.curvature.stats import BlockStats
from fedng.optim.config import (
    WHERE,
    CurvatureSpec,
    assign,
    learning_rate,
    positive_float,
    positive_int,
)
from fedng.optim.damping import (
    DAMPING_MODES,
    LevenbergMarquardt,
    predicted_reduction,
    reduction_ratio,
)


class NaturalGradient:
    """Natural-gradient preconditioner for a model's `.grad`, composable with any optimizer.

    Args:
        model: any module tree; supported layers are found automatically (see
            `fedng.curvature`), unsupported ones keep their plain gradients (one warning).
        curvature: "kfac", "diag", "lowrank", or a per-layer mapping (block name, module name,
            module class or class name, or "default" -> representation). Normalization layers
            are always diagonal.
        damping: λ > 0 (the initial λ in adaptive mode).
        factor_every: update the curvature every this many steps.
        inverse_every: recompute the damped inverses every this many steps.
        factor_decay: EMA decay of the curvature in [0, 1), or None for a running mean.
        damping_mode: "tikhonov", "factored" or "adaptive" (see `fedng.optim.damping`).
        kl_clip: None, or bound the step's KL estimate `lr^2 sum p^T g` (p the preconditioned, g
            the raw gradient) by scaling the preconditioned gradients.
        lr: the learning rate the optimizer applies (a float or a callable returning it); used
            by `kl_clip` and by the adaptive damping's trial step.
        fisher: "empirical" (the loss's own gradients) or "mc" (sampled labels).
        loss: "cross_entropy" or "mse", the likelihood `fisher="mc"` samples from.
        loss_reduction: "mean" or "sum": how the training loss reduces over the batch.
        rank: sketch rank of low-rank blocks.
        seed: seed of the sketches and of the Monte-Carlo labels.
        damping_bounds: (min, max) of λ in adaptive mode.

    Attributes:
        capture: the `CurvatureCapture` (its `blocks` and `unsupported`).
        representations: representation name -> the object holding those blocks' curvature.
        damping: the current λ.
        last: what the last `step` did (kl scale, damping, reduction ratio, inverse reports).
    """

    def __init__(
        self,
        model: nn.Module,
        curvature: CurvatureSpec = "kfac",
        damping: float = 1e-3,
        factor_every: int = 1,
        inverse_every: int = 10,
        factor_decay: float | None = 0.95,
        damping_mode: str = "tikhonov",
        kl_clip: float | None = None,
        lr: float | Callable[[], float] = 1.0,
        fisher: str = "empirical",
        loss: str = "cross_entropy",
        loss_reduction: str = "mean",
        rank: int = 32,
        seed: int = 0,
        damping_bounds: tuple[float, float] = (1e-8, 1e3),
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{WHERE}: 'model' must be a torch.nn.Module, got {type(model).__name__}"
            )
        self.damping = positive_float("damping", damping)
        self.factor_every = positive_int("factor_every", factor_every)
        self.inverse_every = positive_int("inverse_every", inverse_every)
        if factor_decay is not None and (
            isinstance(factor_decay, bool)
            or not isinstance(factor_decay, (int, float))
            or not 0.0 <= factor_decay < 1.0
        ):
            raise ValueError(
                f"{WHERE}: 'factor_decay' must be None or a float in [0, 1), got {factor_decay!r}"
            )
        self.factor_decay = None if factor_decay is None else float(factor_decay)
        self.damping_mode = check_choice(WHERE, "damping_mode", damping_mode, DAMPING_MODES)
        self.kl_clip = positive_float("kl_clip", kl_clip, allow_none=True)
        self._lr = learning_rate(lr)
        self.fisher = check_choice(WHERE, "fisher", fisher, FISHER_TYPES)
        self.loss = check_choice(WHERE, "loss", loss, LOSS_TYPES)
        reduction = check_choice(WHERE, "loss_reduction", loss_reduction, REDUCTIONS)
        positive_int("rank", rank)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"{WHERE}: 'seed' must be an int >= 0, got {seed!r}")
        if (
            not isinstance(damping_bounds, tuple)
            or len(damping_bounds) != 2
            or not 0 < damping_bounds[0] <= damping_bounds[1]
        ):
            raise ValueError(
                f"{WHERE}: 'damping_bounds' must be a tuple (min, max) with"
                f" 0 < min <= max, got {damping_bounds!r}"
            )
        self._lm = LevenbergMarquardt.for_interval(self.inverse_every, *map(float, damping_bounds))
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        dtype = (
            torch.float64
            if params and all(p.dtype == torch.float64 for p in params)
            else torch.float32
        )
        self.dtype = dtype
        self.capture = CurvatureCapture(model, dtype=dtype, reduction=reduction)  # type: ignore[arg-type]
        kinds = assign(self.capture.blocks, curvature)
        self._members: dict[str, list[int]] = {}
        for i, k in enumerate(kinds):
            self._members.setdefault(k, []).append(i)
        self.representations: dict[str, FisherRepresentation] = {}
        for k, idx in self._members.items():
            specs = [self.capture.blocks[i].spec for i in idx]
            if k == "kfac":
                self.representations[k] = KFAC(specs, dtype)
            elif k == "diag":
                self.representations[k] = DiagonalFisher(specs, dtype)
            else:
                self.representations[k] = LowRankFisher(specs, rank, seed, dtype)
        self.steps = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._batch_form = False
        self._warned: set[str] = set()
        self.last: dict[str, Any] = {}
        self.capture.recording = True

    # --- the two calls of a training step -------------------------------------------------

    def mc_backward(self, outputs: torch.Tensor) -> None:
        """The Monte-Carlo Fisher pass (fisher="mc"): backpropagates a loss on sampled labels.

        Call it after the forward pass that produced `outputs` and before `loss.backward()`. It
        does nothing on steps that do not update the curvature, and never touches `.grad`.

        Args:
            outputs: the model outputs [B, ..., C] (logits, or means for "mse").
        """
        if self.fisher != "mc":
            raise ValueError(
                f"{WHERE}.mc_backward: needs fisher='mc', this one has fisher={self.fisher!r}"
            )
        if not isinstance(outputs, torch.Tensor) or not outputs.requires_grad:
            raise ValueError(
                f"{WHERE}.mc_backward: 'outputs' must be the model's output tensor"
                " (requiring grad), got"
                f" {outputs if not isinstance(outputs, torch.Tensor) else 'a tensor without grad'}"
            )
        if self.steps % self.factor_every:
            return
        self.capture.fisher_backward(
            sampled_loss(
                outputs,
                self.loss,
                self.capture.reduction,  # type: ignore[arg-type]
                self._generator,
            )
        )

    def step(self, closure: Callable[[], torch.Tensor | float] | None = None) -> None:
        """Rewrites the gradients of every block with curvature into natural gradients.

        Args:
            closure: required by damping_mode="adaptive" (on inverse steps): returns the loss of
                the current batch at the current parameters (called under `torch.no_grad`).
        """
        t = self.steps
        factor_step = t % self.factor_every == 0
        inverse_step = t % self.inverse_every == 0
        if self.damping_mode == "adaptive" and inverse_step and t > 0 and closure is None:
            raise ValueError(
                f"{WHERE}.step: damping_mode='adaptive' needs 'closure' (a function"
                " returning the current batch's loss) on inverse steps"
            )
        stats = self.capture.collect(self.fisher if factor_step else None)
        blocks = self.capture.blocks
        grads = [b.grad_matrix(self.dtype) for b in blocks]
        self._note_batch(stats)
        reports: dict[str, InverseReport] = {}
        precond: list[torch.Tensor | None] = [None] * len(blocks)
        for name, rep in self.representations.items():
            idx = self._members[name]
            sub = [stats[i] for i in idx]
            if factor_step and any(s is not None for s in sub):
                rep.update(sub, self.factor_decay)
            if inverse_step or any(
                c > 0 and not r for c, r in zip(rep.counts, rep.ready, strict=True)
            ):
                reports[name] = self._invert(rep)
            out = rep.precondition([grads[i] for i in idx], sub)
            for i, p in zip(idx, out, strict=True):
                precond[i] = p
        self._warn_unseen(grads, precond)
        live = [i for i, p in enumerate(precond) if p is not None]
        lr = float(self._lr())
        nu = 1.0
        if self.kl_clip is not None:
            g_dot_p = sum(float((precond[i] * grads[i]).sum()) for i in live)  # type: ignore[operator]
            if g_dot_p > 0:
                nu = min(1.0, math.sqrt(self.kl_clip / (lr * lr * g_dot_p)))
        rho = None
        if self.damping_mode == "adaptive" and inverse_step and t > 0 and live:
            if closure is None:
                raise ValueError(
                    "NaturalGradient.step: damping_mode='adaptive' needs step(closure=...)"
                )
            rho = self._adapt(closure, grads, precond, live, lr * nu)
        out = [precond[i] for i in live]
        if nu != 1.0:
            torch._foreach_mul_(out, nu)  # type: ignore[arg-type]
        dst: list[torch.Tensor] = []
        src: list[torch.Tensor] = []
        for i, p in zip(live, out, strict=True):
            blocks[i].grad_pairs(p, dst, src)  # type: ignore[arg-type]
        if dst:
            torch._foreach_copy_(dst, src)
        self.last = {
            "step": t,
            "kl_scale": nu,
            "damping": self.damping,
            "rho": rho,
            "inverse": reports,
            "preconditioned": [blocks[i].name for i in live],
        }
        self.steps += 1
        self.capture.recording = self._batch_form or self.steps % self.factor_every == 0

    # --- internals ------------------------------------------------------------------------

    def _invert(self, rep: FisherRepresentation) -> InverseReport:
        if isinstance(rep, KFAC):
            return rep.inverse(self.damping, factored=self.damping_mode != "tikhonov")
        return rep.inverse(self.damping)

    def _note_batch(self, stats: list[BlockStats | None]) -> None:
        """Keeps recording on every step when K-FAC's batch form is cheaper for some block."""
        idx = self._members.get("kfac", [])
        if all(stats[i] is None for i in idx):
            return
        self._batch_form = any(
            stats[i] is not None
            and self.capture.blocks[i].spec.kind == "kron"
            and batch_form_cheaper(
                stats[i].rows,
                self.capture.blocks[i].spec.m,  # type: ignore[union-attr]
                self.capture.blocks[i].spec.n,
            )
            for i in idx
        )

    def _warn_unseen(
        self, grads: list[torch.Tensor | None], precond: list[torch.Tensor | None]
    ) -> None:
        names = [
            b.name
            for b, g, p in zip(self.capture.blocks, grads, precond, strict=True)
            if g is not None and p is None and b.name not in self._warned
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
        grads: list[torch.Tensor | None],
        precond: list[torch.Tensor | None],
        live: list[int],
        step_size: float,
    ) -> float:
        """Levenberg–Marquardt: evaluates the proposed step δ = -step_size p, adjusts λ."""
        blocks = self.capture.blocks
        deltas: list[torch.Tensor | None] = [None] * len(blocks)
        for i in live:
            deltas[i] = precond[i] * (-step_size)  # type: ignore[operator]
        g_dot_d = sum(float((grads[i] * deltas[i]).sum()) for i in live)  # type: ignore[operator]
        d_sq = sum(float(deltas[i].square().sum()) for i in live)  # type: ignore[union-attr]
        d_f_d = sum(
            rep.quadratic([deltas[i] for i in self._members[name]])
            for name, rep in self.representations.items()
        )
        before = self._evaluate(closure)
        params = {
            id(p): p for i in live for p in (blocks[i].weight, blocks[i].bias) if p is not None
        }
        saved = {k: p.detach().clone() for k, p in params.items()}
        for i in live:
            blocks[i].add_to_params(deltas[i])  # type: ignore[arg-type]
        try:
            after = self._evaluate(closure)
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(saved[k])
        rho = reduction_ratio(
            after - before, predicted_reduction(g_dot_d, d_f_d, d_sq, self.damping)
        )
        self.damping = self._lm.adjust(self.damping, rho)
        return rho

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
        """Step counter, damping, curvature with inverses, and the sampling RNG state."""
        return {
            "steps": self.steps,
            "damping": self.damping,
            "batch_form": self._batch_form,
            "generator": self._generator.get_state(),
            "representations": {k: r.state_dict() for k, r in self.representations.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores `state_dict()`'s output; the next `step` is then identical to the original's.

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
        if set(reps) != set(self.representations):
            raise ValueError(
                f"{where}: representations must be {sorted(self.representations)},"
                f" got {sorted(reps)}"
            )
        for k, r in self.representations.items():
            r.load_state_dict(reps[k])
        self.steps = int(state["steps"])
        self.damping = float(state["damping"])
        self._batch_form = bool(state.get("batch_form", False))
        self._generator.set_state(state["generator"])
        self.capture.clear()
        self.capture.recording = self._batch_form or self.steps % self.factor_every == 0

    def remove(self) -> None:
        """Removes the hooks from the model."""
        self.capture.remove()
