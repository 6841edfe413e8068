"""Cross-round reputation of the robust modes (`aggregation.robust.alignment`,
`update_reputation`, `distrusted`; `aggregation.stage.screen`): a consistent sign-flipper is
left out, a clean round keeps everyone, and the reputation survives a checkpoint and resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _fed import blobs_task
from fedng.federated.aggregation import robust
from fedng.federated.aggregation.stage import DISTRUSTED_KEY, REPUTATION_KEY
from fedng.federated.attacks import Attack
from fedng.federated.checkpoint import load_checkpoint
from fedng.federated.config import ServerConfig, make_configs
from fedng.federated.report.history import History
from fedng.federated.resume import CHECKPOINT_FILE
from fedng.federated.simulator import simulate

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def planted(k: int, flipped: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """k deltas = a shared direction + client noise; the first `flipped` times -10."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(40, generator=gen, dtype=F64)
    xs = [{"w": common + 1.5 * torch.randn(40, generator=gen, dtype=F64)} for _ in range(k)]
    return [{"w": -10 * x["w"]} if i < flipped else x for i, x in enumerate(xs)]


def test_alignment_is_negative_for_sign_flippers_and_positive_for_the_rest() -> None:
    scores = robust.alignment(planted(10, 2), 0.2)
    assert max(scores[:2]) < 0 < min(scores[2:])


def test_reputation_is_an_ema_and_keeps_absent_clients() -> None:
    rep = robust.update_reputation({}, {1: 0.4, 2: -0.2}, 0.75)
    assert rep == {1: 0.4, 2: -0.2}
    rep = robust.update_reputation(rep, {1: 0.0}, 0.75)
    assert rep == pytest.approx({1: 0.3, 2: -0.2})


def test_distrusted_caps_the_count_and_needs_a_positive_median() -> None:
    rep = {0: -0.3, 1: -0.1, 2: 0.05, 3: 0.3, 4: 0.35, 5: 0.4}
    ids = list(rep)
    assert robust.distrusted(rep, ids, 0.5, 3) == [0, 1, 2]
    assert robust.distrusted(rep, ids, 0.5, 2) == [0, 1]  # lowest first
    assert robust.distrusted(rep, ids, 0.0, 3) == []  # trust 0: off
    assert robust.distrusted({i: -1.0 for i in ids}, ids, 0.5, 3) == []  # no reference


@pytest.mark.parametrize(
    "bad",
    [
        lambda: robust.update_reputation({}, {}, 1.0),
        lambda: robust.distrusted({}, [], 1.0, 1),
        lambda: robust.distrusted({}, [], 0.5, -1),
        lambda: robust.alignment([], 0.2),
    ],
)
def test_bad_input_raises_one_line_value_error(bad: Any) -> None:
    with pytest.raises(ValueError) as err:
        bad()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("knobs", "match"),
    [
        ({"robust_trust": 1.0}, "'robust_trust' must be in"),
        ({"robust_trust": -0.1}, "'robust_trust' must be in"),
        ({"robust_memory": 1.0}, "'robust_memory' must be in"),
    ],
)
def test_server_config_rejects_bad_reputation_knobs(knobs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ServerConfig(**knobs)


def run(rounds: int, attackers: frozenset[int], **kw: Any) -> History:
    task = blobs_task(num_clients=8, n=40)
    cc, sc = make_configs(
        "fedavg", {"local_steps": 3, "batch_size": 8, "robust": "trimmed-mean", "robust_trim": 0.25}
    )
    tamper = Attack("signflip", attackers) if attackers else None
    return simulate(task, cc, sc, rounds=rounds, seed=0, tamper=tamper, **kw)


def distrusted_per_round(h: History) -> list[list[int]]:
    return [list(r.server_log.get("distrusted", [])) for r in h.rounds[1:]]


def test_a_consistent_sign_flipper_is_left_out_and_a_clean_run_keeps_everyone() -> None:
    attacked = run(4, frozenset({3}))
    assert all(d == [3] for d in distrusted_per_round(attacked))
    clean = run(4, frozenset())
    assert all(d == [] for d in distrusted_per_round(clean))


def test_reputation_survives_checkpoint_and_resume(tmp_path: Path) -> None:
    straight = run(4, frozenset({3}), checkpoint_dir=tmp_path / "a")
    run(2, frozenset({3}), checkpoint_dir=tmp_path / "b")
    mid = load_checkpoint(tmp_path / "b" / CHECKPOINT_FILE).state["server"]["meta"]
    assert set(mid[REPUTATION_KEY]) == set(range(8))
    resumed = run(4, frozenset({3}), checkpoint_dir=tmp_path / "b", resume=True)
    assert distrusted_per_round(resumed) == distrusted_per_round(straight)
    a, b = (
        load_checkpoint(p / CHECKPOINT_FILE).state["server"]
        for p in (tmp_path / "a", tmp_path / "b")
    )
    assert a["meta"][REPUTATION_KEY] == b["meta"][REPUTATION_KEY]
    # the left-out flipper's reputation is frozen while it is out; everyone else's moves on
    assert a["meta"][DISTRUSTED_KEY] == mid[DISTRUSTED_KEY] == [3]
    assert a["meta"][REPUTATION_KEY][3] == mid[REPUTATION_KEY][3]
    assert all(a["meta"][REPUTATION_KEY][c] != mid[REPUTATION_KEY][c] for c in range(8) if c != 3)
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
