"""FedNG's participation-aware server step: the sampled clients' mean delta shrunk by its
estimated signal-to-noise ratio.

Under partial participation the round's mean delta `M = sum_k p_k delta_k` over m sampled clients
estimates the mean over all K clients with the sampling variance of a mean drawn without
replacement, `v = s^2 / m_eff * (1 - f)` (f the sampled fraction, `s^2` the unbiased spread of the
sampled deltas around M, `m_eff = (sum w)^2 / sum w^2` for unequal weights). The server step is
multiplied by the Wiener factor `||M||^2 / (||M||^2 + v)`: near 1 while the clients agree on a
direction (early rounds), small once the sample's disagreement dominates what it agrees on (the
plateau, where a step toward the few sampled clients' optimum costs the others). It is exactly 1 at
full participation (f = 1: no sampling noise, the step is left untouched bit for bit), with one
client, and wherever the server sees no individual deltas (secure aggregation folds one pooled
update; under DP every accepted update carries the same noised mean).

Opt-in (`FedNGConfig.sample_shrink`): it steadies the late rounds at 30% participation, but on
heterogeneous tasks the sampled deltas disagree from the first round and the factor (0.4-0.7)
slows the early rounds too (docs/federated.md, "FedNG under partial participation").
"""

from __future__ import annotations

import math

import torch

from fedng.curvature.packed_fold import sum_squares

PARTICIPATION_KEY = "participation"
"""`ServerState.meta` key of the fraction of clients sampled per round (absent: every client)."""


class SampleSpread:
    """Running weighted sums of the clients' squared delta norms (three floats; streams)."""

    def __init__(self) -> None:
        self.weight = 0.0
        self.weight_sq = 0.0
        self.norm_sq = 0.0
        self.count = 0

    def fold(self, delta: dict[str, torch.Tensor], weight: float) -> None:
        """Adds `weight * ||delta||^2` (one native pass over the delta)."""
        self.norm_sq += weight * math.fsum(sum_squares(list(delta.values())))
        self.weight += weight
        self.weight_sq += weight * weight
        self.count += 1

    def shrink(self, mean: dict[str, torch.Tensor], participation: float) -> float:
        """The Wiener factor `||M||^2 / (||M||^2 + v)` of the mean delta `mean` (see the module
        docstring); 1.0 when there is no sampling noise to estimate.

        Args:
            mean: M, the weighted mean of the folded deltas (named arrays).
            participation: the fraction f of the clients sampled per round, in (0, 1].
        """
        if participation >= 1.0 or self.count < 2 or self.weight <= 0:
            return 1.0
        m_eff = self.weight**2 / self.weight_sq
        if m_eff <= 1.0:
            return 1.0
        msq = math.fsum(sum_squares(list(mean.values())))
        spread = max(self.norm_sq / self.weight - msq, 0.0)  # sum_k p_k ||delta_k - M||^2
        noise = spread / (m_eff - 1.0) * (1.0 - participation)
        if not (math.isfinite(msq) and math.isfinite(noise)) or msq + noise <= 0:
            return 1.0
        return msq / (msq + noise)
