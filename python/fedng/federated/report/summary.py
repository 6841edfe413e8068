"""Summaries of runs over seeds: final and best metric, rounds- and bytes-to-target, time, and
the flags of `report.flags` (diverged, rejected updates, stalled rounds, one-shot); `report.table`
prints them."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from fedng.federated.report.flags import flags_of
from fedng.federated.report.history import History
from fedng.federated.report.threats import attack_summary, privacy_summary, threat_notes


def _median(xs: list[float]) -> float:
    """Median where inf counts as 'never' (the median is inf if half or more never got there)."""
    return statistics.median(xs) if xs else math.nan


@dataclass
class Summary:
    """One method over its seeds.

    Attributes:
        label: the method.
        seeds: runs.
        final_median, final_min, final_max: the last-round test metric.
        best_median: the best test metric over rounds (median over seeds).
        rounds_to_target: median rounds to reach the target (inf: not reached by half).
        rounds_to_target_all: per seed (None: never).
        bytes_to_target: median uplink + downlink bytes to reach it.
        total_mb: median MB communicated over the whole run.
        client_s: median mean seconds of one client step.
        server_s: median mean seconds of one server step.
        diverged_seeds: seeds whose run diverged (`report.flags`).
        divergence: "seed S: why" for each of them.
        updates: client updates sent, summed over rounds and seeds.
        rejected_updates: updates rejected, summed over rounds and seeds.
        rejected_reasons: kind of reason (`report.flags.reason_kind`) -> rejections, most
            frequent first.
        stalled_rounds: rounds in which no update was aggregated, summed over seeds.
        round_limit: the algorithm's fixed number of rounds (e.g. 1: FedFisher is one-shot);
            None when it has no limit.
        flags: the short flags of the table's "flags" column.
        attack: the attack over seeds (`report.threats.attack_summary`), None if none.
        privacy: the DP calibration and the ε spent (`report.threats.privacy_summary`), None
            without DP.
    """

    label: str
    seeds: int
    final_median: float
    final_min: float
    final_max: float
    best_median: float
    rounds_to_target: float
    rounds_to_target_all: list[int | None]
    bytes_to_target: float
    total_mb: float
    client_s: float
    server_s: float
    diverged_seeds: int = 0
    divergence: list[str] = field(default_factory=list)
    updates: int = 0
    rejected_updates: int = 0
    rejected_reasons: dict[str, int] = field(default_factory=dict)
    stalled_rounds: int = 0
    round_limit: int | None = None
    flags: list[str] = field(default_factory=list)
    attack: dict[str, Any] | None = None
    privacy: dict[str, Any] | None = None

    def notes(self) -> list[str]:
        """One line per flag, with its particulars (empty when nothing is flagged)."""
        out = []
        if self.diverged_seeds:
            out.append(
                f"{self.label}: diverged on {self.diverged_seeds} of {self.seeds} seed(s): "
                + "; ".join(self.divergence)
            )
        if self.rejected_updates:
            kinds = "; ".join(f"{n} x {why}" for why, n in self.rejected_reasons.items())
            out.append(
                f"{self.label}: {self.rejected_updates} of {self.updates} client updates"
                f" rejected: {kinds}"
            )
        if self.stalled_rounds:
            out.append(
                f"{self.label}: {self.stalled_rounds} round(s) (over all seeds) aggregated no"
                " update: the model did not move"
            )
        if self.round_limit is not None:
            out.append(
                f"{self.label}: one-shot by design ({self.round_limit} round(s) of"
                " communication); its final and best are after that"
                if self.round_limit == 1
                else f"{self.label}: stops after {self.round_limit} rounds by design"
            )
        return out + threat_notes(self.label, self.attack, self.privacy)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (inf and NaN as None)."""
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in asdict(self).items()
        }


def _short_flags(
    diverged: int, seeds: int, rejected: int, updates: int, stalled: int, limit: int | None
) -> list[str]:
    """The table's flags column."""
    out = []
    if diverged:
        out.append(f"DIVERGED {diverged}/{seeds}")
    if rejected:
        out.append(f"REJECTED {rejected}/{updates}")
    if stalled:
        out.append(f"STALLED {stalled}")
    if limit == 1:
        out.append("ONE-SHOT")
    elif limit is not None:
        out.append(f"{limit} ROUNDS")
    return out


def summarize(label: str, hs: list[History], target: float | None) -> Summary:
    """Summarizes one method's histories against a target value of the test metric.

    Args:
        label: the method's name in the table.
        hs: its histories, one per seed.
        target: the test metric to reach (None: no target).

    Returns:
        The summary, flags included (`report.flags`).
    """
    fl = [flags_of(h) for h in hs]
    reasons: Counter[str] = Counter()
    for f in fl:
        reasons.update(f.reasons)
    diverged = [
        f"seed {h.seed}: " + ", ".join(f.diverged)
        for h, f in zip(hs, fl, strict=True)
        if f.diverged
    ]
    updates = sum(f.updates for f in fl)
    rejected = sum(f.rejected for f in fl)
    limit = fl[0].round_limit
    stalled = sum(f.stalled_rounds for f in fl)
    finals = [h.final() for h in hs]
    hib = hs[0].higher_is_better
    best = [max(h.series("metric")) if hib else min(h.series("metric")) for h in hs]
    rtt: list[int | None] = [h.rounds_to(target) if target is not None else None for h in hs]
    btt = [h.bytes_to(target) if target is not None else None for h in hs]
    inf = math.inf
    return Summary(
        label=label,
        seeds=len(hs),
        final_median=_median(finals),
        final_min=min(finals),
        final_max=max(finals),
        best_median=_median(best),
        rounds_to_target=_median([inf if r is None else float(r) for r in rtt]),
        rounds_to_target_all=rtt,
        bytes_to_target=_median([inf if b is None else float(b) for b in btt]),
        total_mb=_median([h.rounds[-1].cum_bytes / 1e6 for h in hs]),
        client_s=_median([_mean([r.client_time_s for r in h.rounds[1:]]) for h in hs]),
        server_s=_median([_mean([r.server_time_s for r in h.rounds[1:]]) for h in hs]),
        diverged_seeds=len(diverged),
        divergence=diverged,
        updates=updates,
        rejected_updates=rejected,
        rejected_reasons=dict(reasons.most_common()),
        stalled_rounds=stalled,
        round_limit=limit,
        flags=_short_flags(len(diverged), len(hs), rejected, updates, stalled, limit),
        attack=attack_summary(hs),
        privacy=privacy_summary(hs),
    )


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan
