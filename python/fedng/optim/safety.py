"""Graceful degradation of a natural-gradient step: the fallback chain and its counters.

Per block whose inverse failed (or whose preconditioned gradient is not finite), the step falls
back along one chain, each stage warned once (`fedng.errors.CurvatureWarning`) and counted:

1. "jitter": the Cholesky inverse already escalated the damping (x10 per try) until the matrix
   was positive definite (`CholeskyStatus.JITTER`); the block is preconditioned normally.
2. "diagonal": the inverse failed; the block's gradient is divided by its damped curvature
   diagonal, `g / (diag(F) + λ)`, when that diagonal is finite and non-negative.
3. "identity": otherwise the block keeps its plain gradient (still bounded by `kl_clip`).

A block whose inverse failed in the optimizer's own curvature is reset (forgotten; the next
batch starts it afresh), so that one bad batch does not poison its running average forever.
A step whose gradients are not finite is skipped (see `NaturalGradient.step`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from fedng import ops
from fedng.curvature.base import InverseReport
from fedng.curvature.block_diagonal import CurvatureSet
from fedng.errors import CurvatureWarning

FALLBACKS: tuple[str, ...] = ("jitter", "diagonal", "identity")
"""The stages of the fallback chain, mildest first."""

_MESSAGES: dict[str, str] = {
    "jitter": "some curvature matrices were not positive definite at the requested damping and"
    " were inverted after escalating it (consider a larger 'damping')",
    "diagonal": "an inverse failed (non-finite or indefinite curvature); those blocks were"
    " preconditioned with their damped diagonal for this step and their curvature was reset",
    "identity": "an inverse failed and no usable diagonal was left; those blocks kept their plain"
    " gradients for this step and their curvature was reset",
    "skipped": "a gradient was not finite: the step was skipped (every .grad set to None, so"
    " torch.optim leaves the parameters alone) and the curvature was not updated",
}


def new_stats() -> dict[str, Any]:
    """Zeroed counters: `inverse_fallbacks` per stage, `skipped_steps`, `clipped_steps`,
    `reset_blocks`."""
    return {
        "inverse_fallbacks": dict.fromkeys(FALLBACKS, 0),
        "skipped_steps": 0,
        "clipped_steps": 0,
        "reset_blocks": 0,
    }


class Safety:
    """The counters and once-per-kind warnings of one optimizer.

    Attributes:
        stats: the counters (`new_stats`).
        warned: the kinds already warned about.
    """

    def __init__(self) -> None:
        self.stats: dict[str, Any] = new_stats()
        self.warned: set[str] = set()

    def note(self, kind: str, count: int = 1, detail: str = "") -> None:
        """Counts `count` events of `kind` (a stage or "skipped") and warns the first time."""
        if count <= 0:
            return
        if kind == "skipped":
            self.stats["skipped_steps"] += count
        else:
            self.stats["inverse_fallbacks"][kind] += count
        if kind not in self.warned:
            self.warned.add(kind)
            warnings.warn(
                f"NaturalGradient: {_MESSAGES[kind]}{detail} (warned once; counted in"
                " NaturalGradient.stats)",
                CurvatureWarning,
                stacklevel=4,
            )

    def load(self, stats: dict[str, Any] | None) -> None:
        """Restores counters saved by `state_dict` (missing ones stay zero)."""
        self.stats = new_stats()
        if stats:
            self.stats["inverse_fallbacks"].update(stats.get("inverse_fallbacks", {}))
            for k in ("skipped_steps", "clipped_steps", "reset_blocks"):
                self.stats[k] = int(stats.get(k, 0))


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every entry of every tensor is finite.

    Fast path: one fused 2-norm per tensor and one sum (a single sync); NaN and Inf propagate into
    it. A 2-norm can also overflow on large finite entries, so a non-finite total is confirmed
    entry by entry (rare) before the answer is False.
    """
    if not tensors:
        return True
    norms = list(torch._foreach_norm(list(tensors)))
    if len({n.dtype for n in norms}) > 1:
        norms = [n.float() for n in norms]
    if math.isfinite(float(torch.stack(norms).sum())):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def failed_blocks(report: InverseReport | None, names: Sequence[str]) -> set[int]:
    """Indices of the blocks (by name) with a FAILED matrix in `report` (`fc.A` -> `fc`)."""
    if report is None:
        return set()
    index = {n: i for i, n in enumerate(names)}
    out: set[int] = set()
    for label in report.failed:
        if label in index:
            out.add(index[label])
        elif label.rsplit(".", 1)[0] in index:
            out.add(index[label.rsplit(".", 1)[0]])
    return out


def jittered(report: InverseReport | None) -> int:
    """How many matrices in `report` needed escalated damping."""
    if report is None:
        return 0
    return report.status.tolist().count(int(ops.CholeskyStatus.JITTER))


def fall_back(
    curvature: CurvatureSet,
    grads: Sequence[torch.Tensor | None],
    precond: list[torch.Tensor | None],
    bad: set[int],
    damping: float,
    relative: bool,
) -> dict[int, str]:
    """Replaces `precond[i]` for every block i in `bad` that has a gradient.

    Args:
        curvature: the set the step preconditioned with.
        grads: per block, its gradient [m, n] (or None).
        precond: per block, the preconditioned gradient (modified in place).
        bad: the blocks to fall back for.
        damping: λ, or the relative factor when `relative` (λ = damping x mean of the diagonal).
        relative: whether `damping` is relative to the block's curvature scale.

    Returns:
        Block index -> the stage used ("diagonal" or "identity").
    """
    out: dict[int, str] = {}
    for i in sorted(bad):
        g = grads[i]
        if g is None:
            continue
        rep, j = curvature.block_rep(i)
        d = rep.block_diagonal(j)
        p: torch.Tensor | None = None
        # An all-zero diagonal is no curvature (e.g. a set built from inverses only): identity.
        if d is not None and all_finite([d]) and float(d.min()) >= 0 and float(d.sum()) > 0:
            d = d.to(g.dtype)
            lam = damping * float(d.mean()) if relative else damping
            if lam > 0:
                p = g / (d + lam)
        if p is not None and all_finite([p]):
            out[i] = "diagonal"
        else:
            p, out[i] = g.clone(), "identity"
        precond[i] = p
    return out


def nonfinite_outputs(precond: Sequence[torch.Tensor | None]) -> set[int]:
    """Blocks whose preconditioned gradient is not finite."""
    live = [(i, p) for i, p in enumerate(precond) if p is not None]
    if not live or all_finite([p for _, p in live]):
        return set()
    return {i for i, p in live if not all_finite([p])}
