"""The FedNG client carries its adaptive trust region across its rounds (`FedNGConfig.carry_trust`,
`client_state["trust"]`, `fedng.optim.trust.carried` / `resume`): the radius adapts over rounds of
few local steps, and a checkpointed run resumes exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _fed import blobs_task
from fedng.federated.checkpoint import load_checkpoint
from fedng.federated.client.natural_gradient import TRUST_KEY
from fedng.federated.config import make_configs
from fedng.federated.report.history import History
from fedng.federated.resume import CHECKPOINT_FILE
from fedng.federated.simulator import simulate
from fedng.optim.trust import DEFAULT_INITIAL_RADIUS, carried, resume, trust_region


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def run(rounds: int, **kw: Any) -> History:
    carry = kw.pop("carry_trust", True)
    task = blobs_task(num_clients=4, n=40)
    # kl_clip 0.1: the radius starts at 1e-4 and may move; 3 local steps give 2 observations a
    # round, fewer than the rule's warm-up (5): only a carried region can act
    cc, sc = make_configs(
        "fedng", {"local_steps": 3, "batch_size": 8, "kl_clip": 0.1, "carry_trust": carry}
    )
    return simulate(task, cc, sc, rounds=rounds, seed=0, **kw)


def client_states(folder: Path) -> dict[int, dict[str, torch.Tensor]]:
    states: dict[int, dict[str, torch.Tensor]] = load_checkpoint(folder / CHECKPOINT_FILE).state[
        "client_states"
    ]
    return states


def test_carried_state_round_trips_without_the_previous_step() -> None:
    a = trust_region("adaptive", 0.1)
    assert a is not None
    theta, g = [torch.zeros(2, dtype=torch.float64)], [-torch.ones(2, dtype=torch.float64)]
    for t in range(12):  # too-short steps: the radius grows, the average fills
        a.observe([theta[0] + t], [0.9 * g[0]])
        a.remember([theta[0] + t], g, taken=1.0, clipped=True, energy=2.0)
    vec = carried(a)
    assert vec.dtype == torch.float64 and vec.shape == (14,)
    b = trust_region("adaptive", 0.1)
    assert b is not None
    resume(b, vec)
    assert b.radius == a.radius > DEFAULT_INITIAL_RADIUS and b.grown == a.grown
    assert b.average() == a.average() and b._prev is None  # the server moved the model since
    with pytest.raises(ValueError, match="14 entries"):
        resume(b, vec[:5])


def test_the_radius_adapts_across_rounds_only_when_carried(tmp_path: Path) -> None:
    run(6, checkpoint_dir=tmp_path / "on")
    states = client_states(tmp_path / "on")
    radii = [float(s[TRUST_KEY][0]) for s in states.values()]
    assert len(radii) == 4 and any(r != DEFAULT_INITIAL_RADIUS for r in radii)
    assert all(float(s[TRUST_KEY][4]) > 0 for s in states.values())  # observations carried
    run(6, checkpoint_dir=tmp_path / "off", carry_trust=False)
    assert all(TRUST_KEY not in s for s in client_states(tmp_path / "off").values())


def test_a_resumed_run_equals_a_straight_one(tmp_path: Path) -> None:
    straight = run(4, checkpoint_dir=tmp_path / "a")
    run(2, checkpoint_dir=tmp_path / "b")
    resumed = run(4, checkpoint_dir=tmp_path / "b", resume=True)
    assert [r.metric for r in resumed.rounds] == [r.metric for r in straight.rounds]
    a, b = client_states(tmp_path / "a"), client_states(tmp_path / "b")
    assert set(a) == set(b)
    for c in a:
        torch.testing.assert_close(a[c][TRUST_KEY], b[c][TRUST_KEY], rtol=0, atol=0, equal_nan=True)
    wa, wb = (
        load_checkpoint(p / CHECKPOINT_FILE).state["workspace"]
        for p in (tmp_path / "a", tmp_path / "b")
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
