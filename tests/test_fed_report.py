"""The summary's flags on planted histories: divergence, rejected updates, stalls, one-shot."""

from __future__ import annotations

import json
import math

import pytest
from fedng.federated.report import (
    FLAG_DEFINITIONS,
    History,
    RoundRecord,
    divergence,
    flags_of,
    reason_kind,
    summarize,
    table,
)


def planted(
    metrics: list[float],
    train_losses: list[float] | None = None,
    *,
    algorithm: str = "fedng",
    seed: int = 0,
    rejected: dict[int, dict[str, str]] | None = None,
    metric: str = "accuracy",
    participants: int = 4,
) -> History:
    """A history with the given test metric per round (round 0 first) and train loss per round
    (rounds 1..; default 1.0), `participants` clients a round, `rejected` per round."""
    losses = train_losses or [1.0] * (len(metrics) - 1)
    h = History(
        "toy",
        algorithm,
        metric,
        metric == "accuracy",
        seed,
        {},
        {},
        {"rounds": len(metrics) - 1, "participation": 0.5, "num_clients": 8},
    )
    h.rounds.append(RoundRecord(0, metrics[0], 2.3, metrics[0], 2.3))
    for r, (m, tl) in enumerate(zip(metrics[1:], losses, strict=True), start=1):
        rec = RoundRecord(r, m, 2.0, m, 2.0, train_loss=tl)
        rec.participants = list(range(participants))
        rec.rejected = dict((rejected or {}).get(r, {}))
        rec.cum_bytes = 1000 * r
        h.rounds.append(rec)
    return h


def test_healthy_run_has_no_flag() -> None:
    h = planted([0.1, 0.5, 0.7, 0.8, 0.79], [2.0, 1.0, 0.6, 0.5])
    f = flags_of(h)
    assert f.diverged == [] and f.rejected == 0 and f.updates == 16 and f.stalled_rounds == 0
    s = summarize("fedavg", [h], 0.7)
    assert s.flags == [] and s.notes() == []
    assert FLAG_DEFINITIONS not in table([s], "accuracy", 0.7)


def test_the_issue_run_is_flagged_diverged() -> None:
    """The issue's mnist1d run: 0.36 at round 4, then chance with train loss 3e7."""
    h = planted([0.1, 0.2, 0.3, 0.33, 0.361, 0.1, 0.1], [2.3, 2.0, 1.9, 1.8, 3e7, math.nan])
    why = divergence(h)
    assert any("train loss 3e+07 at round 5 > 1000 x its first value 2.3" in w for w in why)
    assert any(
        "final accuracy 0.1000 is more than 0.1 below its best 0.3610 (round 4)" in w for w in why
    )
    s = summarize("fedng", [h, planted([0.1, 0.5, 0.6])], 0.3)
    assert s.diverged_seeds == 1 and s.flags == ["DIVERGED 1/2"]
    assert s.best_median == pytest.approx((0.361 + 0.6) / 2)
    text = table([s], "accuracy", 0.3)
    row = next(line for line in text.splitlines() if line.startswith("fedng"))
    assert row.rstrip().endswith("DIVERGED 1/2")
    assert "fedng: diverged on 1 of 2 seed(s): seed 0: train loss 3e+07" in text
    assert FLAG_DEFINITIONS in text


@pytest.mark.parametrize(
    ("metrics", "losses", "expected"),
    [
        ([0.1, 0.5, 0.45], [1.0, 1.0], None),  # a drop of 0.05 is noise, not divergence
        ([0.1, 0.5, 0.39], [1.0, 1.0], "more than 0.1 below"),  # final < best - 0.1
        ([0.1, 0.5, 0.5], [1.0, 1001.0], "> 1000 x its first value"),
        ([0.1, 0.5, 0.5], [1.0, 999.0], None),
        ([0.1, 0.5, 0.5], [1.0, math.inf], "non-finite train loss at round 2"),
        ([0.1, 0.5, math.nan], [1.0, 1.0], "non-finite test accuracy or loss at round 2"),
    ],
)
def test_divergence_thresholds(
    metrics: list[float], losses: list[float], expected: str | None
) -> None:
    why = divergence(planted(metrics, losses))
    if expected is None:
        assert why == []
    else:
        assert any(expected in w for w in why), why


def test_lower_is_better_metric_diverges_upward() -> None:
    ok = planted([1.0, 0.5, 0.55], metric="rel_l2")
    bad = planted([1.0, 0.3, 0.45], metric="rel_l2")
    assert divergence(ok) == []
    assert divergence(bad) == [
        "final rel_l2 0.4500 is more than 0.1 above its best 0.3000 (round 1)"
    ]


def test_rejections_are_counted_with_their_reasons_over_rounds_and_seeds() -> None:
    norm = "delta norm {} exceeds 10 x the reference {}"
    a = planted(
        [0.1, 0.2, 0.3],
        rejected={1: {"0": norm.format("3.2e+03", "12.1")}, 2: {"1": norm.format(41, "1.5")}},
    )
    b = planted(
        [0.1, 0.2, 0.3],
        seed=1,
        rejected={2: {"3": "delta: '0.weight' has NaN/Inf", "0": norm.format(5, 0.2)}},
    )
    s = summarize("fedng", [a, b], None)
    assert (s.rejected_updates, s.updates, s.stalled_rounds) == (4, 16, 0)
    assert s.rejected_reasons == {
        "delta norm # exceeds # x the reference #": 3,
        "delta: '…' has NaN/Inf": 1,
    }
    assert s.flags == ["REJECTED 4/16"]
    text = table([s], "accuracy", None)
    assert "fedng: 4 of 16 client updates rejected: 3 x delta norm # exceeds" in text
    assert json.loads(json.dumps(s.to_dict()))["rejected_reasons"] == s.rejected_reasons


def test_every_update_rejected_is_rejected_and_stalled_not_diverged() -> None:
    """A custom model whose every update is rejected: the model never moves (train loss NaN)."""
    why = "curvature scale kfac/0/G = 9.1e+04 exceeds 10 x the reference 3.2"
    h = planted(
        [0.1, 0.1, 0.1],
        [math.nan, math.nan],
        participants=2,
        rejected={r: {"0": why, "1": why + "; left out"} for r in (1, 2)},
    )
    f = flags_of(h)
    assert f.diverged == [] and f.rejected == 4 and f.stalled_rounds == 2
    assert reason_kind(why) == "curvature scale <block> = # exceeds # x the reference #"
    s = summarize("fedng", [h], None)
    assert s.flags == ["REJECTED 4/4", "STALLED 2"]
    assert any("2 round(s) (over all seeds) aggregated no update" in n for n in s.notes())


def test_rolled_back_round_is_stalled() -> None:
    h = planted([0.1, 0.1], [math.nan])
    h.rounds[1].server_log = {"rolled_back": "aggregation produced non-finite ['w']"}
    f = flags_of(h)
    assert f.stalled_rounds == 1 and f.diverged == []


def test_fedfisher_row_says_it_is_one_shot() -> None:
    h = planted([0.1, 0.6], algorithm="fedfisher")
    assert flags_of(h).round_limit == 1
    s = summarize("fedfisher", [h], 0.5)
    assert s.flags == ["ONE-SHOT"] and s.round_limit == 1
    text = table([s, summarize("fedavg", [planted([0.1, 0.3, 0.5])], 0.5)], "accuracy", 0.5)
    assert "fedfisher: one-shot by design (1 round(s) of communication)" in text
    fedavg_row = next(line for line in text.splitlines() if line.startswith("fedavg"))
    assert fedavg_row.rstrip().endswith("-")
    md = table([s], "accuracy", 0.5, markdown=True)
    assert "| ONE-SHOT |" in md and "- fedfisher: one-shot" in md


def test_reason_kind_blanks_particulars() -> None:
    assert reason_kind("answers round 3, the server is at round 4") == (
        "answers round #, the server is at round #"
    )
    assert reason_kind("aggregation produced non-finite ['a', 'b'] with this update; left out") == (
        "aggregation produced non-finite […] with this update; left out"
    )
    assert len(reason_kind("x" * 500)) == 100
