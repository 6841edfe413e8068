"""`FusedKFAC`: the K-FAC step of `NaturalGradient` on Linear layers in one native call.

The general step turns each recorded layer into `KronStats` (a `torch.cat` for the bias column),
groups blocks by decay, calls `kron_accumulate`, then per block runs the batch form's probe check
in torch and calls `kron_precondition` twice: ~100 Python frames per step, which on a small MLP
cost more than the kernels. Here the hooks' raw records (inputs, output gradients) go straight
to `fedng.ops.kfac_step`, which updates every A and G and preconditions every gradient into the
flat output buffer, with the same formulas (equal up to rounding; `tests/test_fused_kfac.py`).

It applies when every block is a K-FAC `nn.Linear` block fed by one 2-D call per forward pass,
with the empirical Fisher and the own curvature as the preconditioner; any step that does not
fit (a tied layer, a 3-D input, autocast, a missing output gradient, another source) takes the
general path, unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedng.curvature.base import InverseReport
from fedng.curvature.block_diagonal import CurvatureSet
from fedng.curvature.capture import CurvatureCapture
from fedng.curvature.ema import ema_weights
from fedng.curvature.kfac import KFAC, batch_form_cheaper
from fedng.curvature.layers import LinearSite
from fedng.curvature.stats import fisher_scale
from fedng.ops.kfac_step import KfacStepPlan
from fedng.optim.gather import FlatGrads

FusedResult = tuple[CurvatureSet | None, InverseReport | None, list[torch.Tensor | None]]
"""The preconditioner, the inversion report, the preconditioned gradients."""


@dataclass
class Rows:
    """One step's batch rows, per block: inputs [B, k], output gradients [B, m] (loss pass)."""

    records: list  # type: ignore[type-arg]  # capture records, for the general path's stats
    x: list[torch.Tensor]
    g: list[torch.Tensor]


class FusedKFAC:
    """The fused step for one model (see the module docstring); `build` says if it applies."""

    def __init__(
        self,
        capture: CurvatureCapture,
        curvature: CurvatureSet,
        kfac: KFAC,
        flat: FlatGrads,
        site_block: dict[int, int],
    ) -> None:
        self.kfac, self.flat = kfac, flat
        self.curvature = curvature
        self.dtype = kfac.dtype
        self.site_block = site_block
        self.bias = [b.bias is not None for b in capture.blocks]
        self.specs = [(b.spec.m, b.spec.n) for b in capture.blocks]
        self.count = len(capture.blocks)
        self.reduction = capture.reduction
        self._plan: KfacStepPlan | None = None
        self.dot = math.nan
        """`sum_i <p_i, g_i>` of the last `step`'s fused preconditioning (NaN if none)."""

    @classmethod
    def build(
        cls,
        capture: CurvatureCapture,
        curvature: CurvatureSet,
        flat: FlatGrads | None,
        fisher_type: str,
    ) -> FusedKFAC | None:
        """The fused step, or None when the model or options need the general path."""
        blocks = capture.blocks
        if flat is None or not blocks or fisher_type != "empirical":
            return None
        if set(curvature.reps) != {KFAC.kind} or curvature.groups[KFAC.kind] != list(
            range(len(blocks))
        ):
            return None
        kfac = curvature.reps[KFAC.kind]
        if not isinstance(kfac, KFAC) or any(s.kind != "kron" for s in kfac.specs):
            return None
        site_block: dict[int, int] = {}
        for s, site in enumerate(capture.sites):
            if not isinstance(site, LinearSite) or site.batch_dim != 0 or len(site.blocks) != 1:
                return None
            site_block[s] = site.blocks[0]
        if sorted(site_block.values()) != list(range(len(blocks))):
            return None
        return cls(capture, curvature, kfac, flat, site_block)

    def plan(self) -> KfacStepPlan:
        """The native plan over the current factor tensors (rebuilt if they were replaced)."""
        kfac = self.kfac
        if self._plan is None or not self._plan.matches(kfac.A, kfac.G):
            probes = [kfac._probe(i) for i in range(self.count)]
            self._plan = KfacStepPlan(
                kfac.A,
                kfac.G,
                self.flat.grads,
                self.flat.outs,
                [u for u, _ in probes],
                [v for _, v in probes],
                self.bias,
            )
        return self._plan

    def take(self, capture: CurvatureCapture) -> Rows | None:
        """This step's rows, handed over from the capture, when they fit the fused step (one
        2-D, contiguous record per block, of the curvature dtype, with its loss gradient); else
        None, the records left for `collect`."""
        records = capture._records
        if len(records) != self.count:
            return None
        xs: list[torch.Tensor | None] = [None] * self.count
        gs: list[torch.Tensor | None] = [None] * self.count
        forward = records[0].forward
        dtype = self.dtype
        for rec in records:
            x, g = rec.x, rec.g_loss
            i = self.site_block[rec.site]
            if (
                xs[i] is not None
                or g is None
                or rec.g_fisher is not None
                or rec.forward != forward
                or x.dim() != 2
                or g.dim() != 2
                or x.dtype != dtype
                or g.dtype != dtype
                or x.shape[0] == 0
                or g.shape[0] != x.shape[0]
                or not x.is_contiguous()
                or not g.is_contiguous()
            ):
                return None
            xs[i], gs[i] = x, g
        return Rows(capture.take_records(), xs, gs)  # type: ignore[arg-type]

    def batch_form(self, rows: Rows) -> bool:
        """Whether the batch form is cheaper for some block (`NaturalGradient._note_batch`)."""
        return any(
            batch_form_cheaper(x.shape[0], m, n)
            for x, (m, n) in zip(rows.x, self.specs, strict=True)
        )

    def update(
        self, rows: Rows, decay: float | None, *, precondition: bool, check_finite: bool
    ) -> bool:
        """Folds the rows into A and G as `KFAC.update` does (then, if `precondition`,
        preconditions the flat gradients with the inverses the factors have now). With
        `check_finite`, False (nothing done) when a gathered gradient does not sum to a finite
        value."""
        kfac = self.kfac
        old, new = ema_weights(kfac.counts, decay)
        a_scale = [w / x.shape[0] for w, x in zip(new, rows.x, strict=True)]
        g_scale = [
            w * fisher_scale(x.shape[0], self.reduction) for w, x in zip(new, rows.x, strict=True)
        ]
        inverses = (kfac.a_inv, kfac.g_inv) if precondition else None
        plan = self.plan()
        plan(
            rows.x,
            rows.g,
            old,
            a_scale,
            g_scale,
            update=True,
            inverses=inverses,  # type: ignore[arg-type]
            check_finite=check_finite,
        )
        sums = plan.sums.tolist()
        if check_finite and not math.isfinite(sum(sums[: self.count])):
            return False
        self.dot = sum(sums[self.count :]) if precondition else math.nan
        for i in range(self.count):
            kfac.counts[i] += 1
        return True

    def precondition(self, rows: Rows) -> None:
        """Preconditions the flat gradients into the flat outputs (every block ready)."""
        kfac = self.kfac
        zeros = [0.0] * self.count
        plan = self.plan()
        plan(
            rows.x,
            rows.g,
            zeros,
            zeros,
            zeros,
            update=False,
            inverses=(kfac.a_inv, kfac.g_inv),  # type: ignore[arg-type]
        )
        self.dot = sum(plan.sums.tolist()[self.count :])

    def ready(self) -> bool:
        """Whether every block has curvature and an inverse."""
        kfac = self.kfac
        return all(c > 0 for c in kfac.counts) and all(kfac.ready)

    def step(
        self,
        capture: CurvatureCapture,
        source_current: Callable[[], tuple[CurvatureSet | None, InverseReport | None]],
        rows: Rows,
        decay: float | None,
        inverse_step: bool,
        grads: list[torch.Tensor | None],
        check_finite: bool,
    ) -> FusedResult | None:
        """Update, inversion when due (`source_current`), preconditioning: the preconditioner,
        the inversion report and the preconditioned gradients (the flat outputs when fused; then
        `dot` is `sum_i <p_i, g_i>`, else NaN). None, with nothing changed, when `check_finite`
        finds a gradient that does not sum to a finite value."""
        outs: list[torch.Tensor | None] = list(self.flat.outs)
        self.dot = math.nan
        if not inverse_step and self.ready():  # no inversion can fall due: one call
            if not self.update(rows, decay, precondition=True, check_finite=check_finite):
                return None
            return self.curvature, None, outs  # what source "local" returns without inverting
        if not self.update(rows, decay, precondition=False, check_finite=check_finite):
            return None
        pre, report = source_current()
        if pre is None:
            return None, report, [None] * self.count
        if self.ready():
            self.precondition(rows)
            return pre, report, outs
        stats = capture.stats_of(rows.records, "empirical")
        return pre, report, pre.precondition(grads, stats, out=self.flat.outs)
