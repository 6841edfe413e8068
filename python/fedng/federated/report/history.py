"""The per-round log of a simulation and its JSON form."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class RoundRecord:
    """One round's log (round 0 is the initial model, before any communication).

    Attributes:
        round: rounds completed.
        metric: test metric (accuracy, or relative L2 for regression).
        test_loss: test loss.
        val_metric: metric on the clients' held-out validation data (for tuning).
        val_loss: validation loss.
        train_loss: mean local training loss of the round's accepted clients.
        bytes_up: uplink bytes this round (sum of serialized client updates).
        bytes_down: downlink bytes this round (serialized message x participants).
        cum_bytes: uplink + downlink bytes so far.
        client_time_s: mean wall time of one client's step.
        server_time_s: wall time of the server step.
        participants: client ids sampled this round.
        rejected: client id (as str) -> reason.
        server_log: the rest of the server's log (e.g. rollbacks, CG iterations).
    """

    round: int
    metric: float
    test_loss: float
    val_metric: float
    val_loss: float
    train_loss: float = math.nan
    bytes_up: int = 0
    bytes_down: int = 0
    cum_bytes: int = 0
    client_time_s: float = 0.0
    server_time_s: float = 0.0
    participants: list[int] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    server_log: dict[str, Any] = field(default_factory=dict)


@dataclass
class History:
    """A whole run: what ran and every round's record.

    Attributes:
        task: task name.
        algorithm: algorithm name.
        metric: metric name ("accuracy" or "rel_l2").
        higher_is_better: the metric's direction.
        seed: the run's seed.
        client_config: the client config as a dict.
        server_config: the server config as a dict.
        sim: simulation settings (rounds, participation).
        rounds: the records.
    """

    task: str
    algorithm: str
    metric: str
    higher_is_better: bool
    seed: int
    client_config: dict[str, Any]
    server_config: dict[str, Any]
    sim: dict[str, Any]
    rounds: list[RoundRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        return asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text (NaN written as null); also written to `path` when given."""
        text = json.dumps(_nan_to_none(self.to_dict()), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @staticmethod
    def from_dict(d: dict[str, Any]) -> History:
        """Inverse of `to_dict` (null floats come back as NaN)."""
        records: list[dict[str, Any]] = [
            {k: (math.nan if v is None else v) for k, v in r.items()} for r in d["rounds"]
        ]
        rounds = [RoundRecord(**r) for r in records]
        return History(**{**d, "rounds": rounds})

    def series(self, key: str) -> list[float]:
        """One field over the rounds."""
        return [float(getattr(r, key)) for r in self.rounds]

    def final(self) -> float:
        """The test metric after the last round."""
        return self.rounds[-1].metric

    def rounds_to(self, target: float) -> int | None:
        """First round whose test metric reaches `target` (None if never)."""
        for r in self.rounds:
            if (r.metric >= target) if self.higher_is_better else (r.metric <= target):
                return r.round
        return None

    def bytes_to(self, target: float) -> int | None:
        """Cumulative bytes when the test metric first reaches `target` (None if never)."""
        for r in self.rounds:
            if (r.metric >= target) if self.higher_is_better else (r.metric <= target):
                return r.cum_bytes
        return None


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def fill_round(
    rec: RoundRecord,
    server_log: dict[str, Any],
    failed: dict[int, str],
    losses: dict[int, float],
    participants: list[int],
) -> RoundRecord:
    """Fills `rec` from the server's log and the replies that never reached it.

    Args:
        rec: the record (metrics, bytes and times already set).
        server_log: the server state's `log` after the round.
        failed: client id -> why its reply never reached the server step (error, timeout, bytes
            that do not decode).
        losses: client id -> its reported training loss.
        participants: the sampled client ids.

    Returns:
        `rec`, filled.
    """
    log = dict(server_log)
    reasons = {c: [why] for c, why in failed.items()}
    for c, whys in log.pop("rejected", {}).items():
        reasons.setdefault(c, []).extend(whys)
    rec.rejected = {str(c): "; ".join(whys) for c, whys in sorted(reasons.items())}
    accepted = set(log.pop("accepted", []))
    rec.server_time_s = float(log.pop("server_time_s", 0.0))
    rec.server_log = log
    kept = [losses.get(c, math.nan) for c in participants if c in accepted]
    rec.train_loss = float(np.mean(kept)) if kept else math.nan
    rec.participants = list(participants)
    return rec
