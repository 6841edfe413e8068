"""Summaries of runs over seeds: final metric, rounds- and bytes-to-target, time, as a table."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from fedng.federated.report.history import History


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

    def to_dict(self) -> dict[str, Any]:
        """Plain data (inf and NaN as None)."""
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in asdict(self).items()
        }


def summarize(label: str, hs: list[History], target: float | None) -> Summary:
    """Summarizes one method's histories against a target value of the test metric."""
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
    )


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _fmt(x: float, spec: str) -> str:
    return "never" if x == math.inf else ("-" if not math.isfinite(x) else format(x, spec))


def table(rows: list[Summary], metric: str, target: float | None, markdown: bool = False) -> str:
    """The summary table (plain text, or markdown)."""
    head = [
        "method",
        f"final {metric} (median [min, max])",
        "best",
        "rounds→target",
        "MB→target",
        "MB total",
        "client s",
        "server s",
    ]
    body = []
    for r in rows:
        body.append(
            [
                r.label,
                f"{r.final_median:.4f} [{r.final_min:.4f}, {r.final_max:.4f}]",
                f"{r.best_median:.4f}",
                _fmt(r.rounds_to_target, ".0f"),
                _fmt(
                    r.bytes_to_target / 1e6
                    if math.isfinite(r.bytes_to_target)
                    else r.bytes_to_target,
                    ".2f",
                ),
                f"{r.total_mb:.2f}",
                f"{r.client_s * 1e3:.1f}ms",
                f"{r.server_s * 1e3:.1f}ms",
            ]
        )
    note = f"target {metric} = {target:.4f}" if target is not None else "no target"
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines) + f"\n\n{note}\n"
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    lines += [fmt.format(*row) for row in body]
    return "\n".join(lines) + f"\n{note}"
