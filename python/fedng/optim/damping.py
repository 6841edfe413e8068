"""Damping of the natural-gradient step: Tikhonov, factored (π) and adaptive Levenberg–Marquardt.

- "tikhonov": the curvature is damped by λ: K-FAC adds sqrt(λ) to each factor, diagonal and
  low-rank add λ.
- "factored": K-FAC splits sqrt(λ) between the factors by π = sqrt((tr A / n) / (tr G / m))
  (Martens & Grosse 2015, §6.3); others as Tikhonov.
- "adaptive": factored, with λ adjusted by the Levenberg–Marquardt rule on the reduction ratio
  `ρ = (L(θ + δ) - L(θ)) / M(δ)` of the proposed step δ, where
  `M(δ) = g^T δ + ½ δ^T F δ + ½ λ ||δ||^2` is the quadratic model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DAMPING_MODES: tuple[str, ...] = ("tikhonov", "factored", "adaptive")

PEAK_FRACTION = 1e-2
"""Relative damping never falls below this fraction of the largest λ the block has had."""


def predicted_reduction(
    g_dot_delta: float, delta_f_delta: float, delta_sq: float, damping: float
) -> float:
    """The quadratic model `M(δ) = g^T δ + ½ δ^T F δ + ½ λ ||δ||^2` (negative for a descent)."""
    return g_dot_delta + 0.5 * delta_f_delta + 0.5 * damping * delta_sq


def reduction_ratio(actual: float, predicted: float) -> float:
    """`ρ = actual / predicted`; -inf when the model predicts no decrease or the loss is not finite
    (both call for more damping)."""
    if not (math.isfinite(actual) and math.isfinite(predicted)) or predicted >= 0:
        return -math.inf
    return actual / predicted


@dataclass(frozen=True)
class LevenbergMarquardt:
    """The Levenberg–Marquardt rule: λ ← λ / ω when ρ > high, λ ← λ ω when ρ < low (ω < 1).

    Attributes:
        omega: shrink factor in (0, 1); Martens & Grosse use (19/20)^T for T steps between checks.
        low: ratio below which the model was too optimistic (more damping).
        high: ratio above which the model was trustworthy (less damping).
        min_damping: lower bound on λ.
        max_damping: upper bound on λ.
    """

    omega: float = 0.95
    low: float = 0.25
    high: float = 0.75
    min_damping: float = 1e-8
    max_damping: float = 1e3

    def adjust(self, damping: float, rho: float) -> float:
        """The new λ after observing ρ."""
        if rho > self.high:
            damping *= self.omega
        elif rho < self.low:
            damping /= self.omega
        return min(self.max_damping, max(self.min_damping, damping))

    @staticmethod
    def for_interval(steps: int, min_damping: float, max_damping: float) -> LevenbergMarquardt:
        """ω = (19/20)^steps, bounded to [0.5, 0.95], for a check every `steps` steps."""
        return LevenbergMarquardt(
            omega=min(0.95, max(0.5, 0.95**steps)), min_damping=min_damping, max_damping=max_damping
        )


@dataclass
class PeakFloor:
    """A floor under relative damping: `PEAK_FRACTION` x the largest λ each block has had.

    Relative damping follows the curvature's scale down as the loss vanishes (a memorized
    training set: the empirical Fisher's output factors shrink by orders of magnitude), and the
    preconditioner's gain `1/λ` on directions the recent batches did not see grows with it: one
    such step can throw a converged model far away. The floor keeps the gain bounded by the
    block's own history.

    Attributes:
        fraction: the floor as a fraction of the peak.
        peaks: per representation kind, per block, the largest λ seen.
    """

    fraction: float = PEAK_FRACTION
    peaks: dict[str, list[float]] = field(default_factory=dict)

    def apply(self, kind: str, values: list[float], least: float) -> list[float]:
        """`values` (this inversion's λ per block of `kind`; non-finite or <= 0 ones become
        `least`) raised to the floor; updates the peaks."""
        peaks = self.peaks.setdefault(kind, [0.0] * len(values))
        if len(peaks) != len(values):
            peaks[:] = [0.0] * len(values)
        out = []
        for j, v in enumerate(values):
            v = max(v, least) if math.isfinite(v) else least
            peaks[j] = max(peaks[j], v)
            out.append(max(v, self.fraction * peaks[j]))
        return out
