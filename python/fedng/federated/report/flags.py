"""What a run's numbers must not hide: divergence, rejected updates, stalled rounds, one-shot.

Definitions (per history, i.e. one method on one seed):

- **diverged**: any of
  (a) a non-finite test metric or test loss in some round;
  (b) a non-finite training loss in a round where at least one update was aggregated;
  (c) a round's training loss above `LOSS_BLOWUP` (1000) times the first finite one of the run;
  (d) the final test metric worse than the run's best by more than `FINAL_DROP` (0.1, in the
      metric's units: final < best - 0.1 for accuracy, final > best + 0.1 for relative L2).
- **rejected**: client updates the server rejected (validation, or left out of a failed
  aggregation), out of all updates sent; each reason is counted by its `reason_kind` (the reason
  with numbers, quoted names and lists blanked out, so that equal causes add up).
- **stalled round**: a round in which no update was aggregated (all rejected, none valid, or the
  aggregation rolled back), so the model did not move.
- **one-shot**: the algorithm communicates for a fixed number of rounds by design
  (`Algorithm.max_rounds`, e.g. FedFisher: one round), so "rounds" and "best" cover that only.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

from fedng.federated.algorithms.registry import REGISTRY
from fedng.federated.report.history import History, RoundRecord

FINAL_DROP = 0.1
"""A final metric this much worse than the run's best (metric units) flags divergence."""
LOSS_BLOWUP = 1e3
"""A training loss this many times the run's first finite one flags divergence."""

_SCALE = re.compile(r"curvature scale \S+")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_LISTED = re.compile(r"\[[^\]]*\]")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_MAX_KIND = 100


@dataclass
class RunFlags:
    """The flags of one history.

    Attributes:
        diverged: why the run counts as diverged, one line per criterion met (empty: it did not).
        updates: client updates sent over all rounds.
        rejected: updates rejected.
        reasons: `reason_kind` of each rejection -> count.
        stalled_rounds: rounds in which no update was aggregated.
        round_limit: the algorithm's fixed number of rounds (None: no limit).
    """

    diverged: list[str] = field(default_factory=list)
    updates: int = 0
    rejected: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    stalled_rounds: int = 0
    round_limit: int | None = None


def reason_kind(reason: str) -> str:
    """A rejection reason without its particulars (numbers, quoted names, lists), so that
    rejections for the same cause count together.

    Args:
        reason: the reason as the history records it.

    Returns:
        e.g. "delta norm # exceeds # x the reference #" (at most 100 characters).
    """
    s = _SCALE.sub("curvature scale <block>", reason)
    s = _LISTED.sub("[…]", _QUOTED.sub("'…'", s))
    s = " ".join(_NUMBER.sub("#", s).split())
    return s if len(s) <= _MAX_KIND else s[: _MAX_KIND - 1] + "…"


def _stalled(r: RoundRecord) -> bool:
    """Whether no update was aggregated in round `r`."""
    log = r.server_log
    nothing = bool(r.participants) and len(r.rejected) >= len(r.participants)
    return nothing or "skipped" in log or "rolled_back" in log


def _loss_reason(h: History, blowup: float) -> str | None:
    """Criterion (b) or (c) of divergence, or None."""
    first: float | None = None
    for r in h.rounds[1:]:
        if not math.isfinite(r.train_loss):
            if not _stalled(r):
                return f"non-finite train loss at round {r.round}"
            continue
        if first is None:
            first = r.train_loss
        elif first > 0 and r.train_loss > blowup * first:
            return (
                f"train loss {r.train_loss:.3g} at round {r.round} > {blowup:g} x its first value"
                f" {first:.3g}"
            )
    return None


def _drop_reason(h: History, drop: float) -> str | None:
    """Criterion (d) of divergence, or None."""
    seen = [r for r in h.rounds if math.isfinite(r.metric)]
    final = h.rounds[-1].metric
    if not seen or not math.isfinite(final):
        return None
    values = [r.metric for r in seen]
    best = max(values) if h.higher_is_better else min(values)
    at = next(r.round for r in seen if r.metric == best)
    worse = final < best - drop if h.higher_is_better else final > best + drop
    if not worse:
        return None
    side = "below" if h.higher_is_better else "above"
    return (
        f"final {h.metric} {final:.4f} is more than {drop:g} {side} its best {best:.4f}"
        f" (round {at})"
    )


def divergence(h: History, drop: float = FINAL_DROP, blowup: float = LOSS_BLOWUP) -> list[str]:
    """Why a run counts as diverged (see the module docstring), one line per criterion met.

    Args:
        h: the run.
        drop: criterion (d)'s margin, in metric units.
        blowup: criterion (c)'s factor.

    Returns:
        The reasons (empty: the run did not diverge).
    """
    out = []
    bad = [
        r.round for r in h.rounds if not (math.isfinite(r.metric) and math.isfinite(r.test_loss))
    ]
    if bad:
        out.append(f"non-finite test {h.metric} or loss at round {bad[0]}")
    for why in (_loss_reason(h, blowup), _drop_reason(h, drop)):
        if why is not None:
            out.append(why)
    return out


def round_limit(algorithm: str) -> int | None:
    """The fixed number of rounds an algorithm communicates for (None: no limit or unknown)."""
    algo = REGISTRY.get(algorithm)
    return None if algo is None else algo.max_rounds


def flags_of(h: History, drop: float = FINAL_DROP, blowup: float = LOSS_BLOWUP) -> RunFlags:
    """Every flag of one run.

    Args:
        h: the run.
        drop: divergence criterion (d)'s margin, in metric units.
        blowup: divergence criterion (c)'s factor.

    Returns:
        Its `RunFlags`.
    """
    rounds = h.rounds[1:]
    return RunFlags(
        diverged=divergence(h, drop, blowup),
        updates=sum(len(r.participants) for r in rounds),
        rejected=sum(len(r.rejected) for r in rounds),
        reasons=Counter(reason_kind(why) for r in rounds for why in r.rejected.values()),
        stalled_rounds=sum(_stalled(r) for r in rounds),
        round_limit=round_limit(h.algorithm),
    )
