"""FedNG's server-step decay (`FedNGConfig.server_decay`, `federated.algorithms.step_schedule`):
the factor per round against a float64 reference, the step untouched without a plan and before the
decay, the decayed step exactly the factor times the undecayed one, resume mid-decay bit for bit,
and the drivers (simulator, Flower) telling the server their number of rounds."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from _fed import blobs_task
from fedng.federated.algorithms.step_schedule import NUM_ROUNDS_KEY, decay_factor
from fedng.federated.client.params import get_params, set_params
from fedng.federated.config import make_configs
from fedng.federated.messages import ClientUpdate
from fedng.federated.report.history import History
from fedng.federated.round import client_step, plan_rounds, server_init, server_step
from fedng.federated.simulator import simulate

SMALL = {"local_steps": 3, "batch_size": 8}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def reference_factor(r: int, rounds: int, fraction: float) -> float:
    """The schedule from its definition, in float64: 1 for the first `(1 - fraction) R` rounds,
    then `(1 - cos(pi rho)) / 2` with `rho = (R - r) / (fraction R)` (zero one round after the
    last); past the plan, the last round's factor."""
    if fraction == 0:
        return 1.0
    r = min(r, rounds - 1)
    rho = (rounds - r) / (fraction * rounds)
    return 1.0 if rho >= 1 else (1.0 - math.cos(math.pi * rho)) / 2


@pytest.mark.parametrize(("rounds", "fraction"), [(30, 0.5), (50, 0.5), (7, 0.3), (4, 1.0)])
def test_factor_per_round_matches_the_reference(rounds: int, fraction: float) -> None:
    got = [decay_factor(r, rounds, fraction) for r in range(rounds + 2)]
    want = [reference_factor(r, rounds, fraction) for r in range(rounds + 2)]
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert all(a >= b for a, b in itertools.pairwise(got))  # non-increasing
    assert 0 < got[rounds - 1] < 1 and got[rounds] == got[rounds - 1]  # past the plan: kept
    stable = [r for r in range(rounds) if got[r] == 1.0]
    assert stable == list(range(math.floor((1 - fraction) * rounds) + 1))  # before the decay


def test_factor_at_the_documented_points() -> None:
    """30 rounds, the last half decaying: rounds 0-15 at 1, round 20 at 3/4 (rho = 2/3), the
    last round at sin^2(pi / 30)."""
    assert decay_factor(15, 30, 0.5) == 1.0 > decay_factor(16, 30, 0.5)
    assert decay_factor(20, 30, 0.5) == pytest.approx(0.75, rel=1e-12)
    assert decay_factor(29, 30, 0.5) == pytest.approx(math.sin(math.pi / 30) ** 2, rel=1e-12)
    assert decay_factor(29, 30, 0.0) == 1.0


def test_plan_validation() -> None:
    _, sc = make_configs("fedng", {})
    params = {"w": torch.zeros(2)}
    assert NUM_ROUNDS_KEY not in server_init(params, sc)[0].meta
    assert server_init(params, sc, 1.0, 12)[0].meta[NUM_ROUNDS_KEY] == 12
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_rounds"):
            server_init(params, sc, 1.0, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="server_decay"):
        make_configs("fedng", {"server_decay": 1.5})


def one_round(
    settings: dict[str, Any], num_rounds: int | None, round_: int
) -> tuple[dict[str, torch.Tensor], Any]:
    """One FedNG round of two clients from the same start, applied as round `round_` of a run
    planned for `num_rounds`; (start, new state)."""
    task = blobs_task(num_clients=2, n=40)
    cc, sc = make_configs("fedng", {**SMALL, **settings})
    model = task.model_fn(0)
    start = {k: v.clone() for k, v in get_params(model).items()}
    state, msg = server_init(start, sc, 1.0, num_rounds)
    state.round = msg.round = round_
    updates = []
    for c in task.clients:
        set_params(model, start)
        updates.append(client_step(model, c, msg, cc))
    new, _ = server_step(state, updates)
    return start, new


def test_without_a_plan_or_before_the_decay_the_step_is_bit_identical() -> None:
    old = {r: one_round({"server_decay": 0.0}, 10, r)[1] for r in (4, 9)}  # no schedule at all
    for settings, plan, r in (({}, None, 9), ({}, 10, 4), ({"server_decay": 0.0}, None, 9)):
        _, new = one_round(settings, plan, r)
        assert "step_decay" not in new.log
        for k, v in old[r].params.items():
            assert torch.equal(new.params[k], v), (settings, plan, r, k)


@pytest.mark.parametrize(("r", "fraction"), [(7, 0.5), (9, 0.5), (9, 1.0)])
def test_a_decayed_round_is_the_factor_times_the_step(r: int, fraction: float) -> None:
    start, full = one_round({"server_decay": 0.0}, 10, r)
    _, decayed = one_round({"server_decay": fraction}, 10, r)
    f = decayed.log["step_decay"]
    assert 0 < f < 1 and f == pytest.approx(reference_factor(r, 10, fraction), rel=1e-12)
    for k, v in start.items():
        torch.testing.assert_close(decayed.params[k] - v, f * (full.params[k] - v))


def _sim(rounds: int, **kw: Any) -> History:
    cc, sc = make_configs("fedng", {**SMALL, "curvature_ema": 0.5})
    task = blobs_task(num_clients=5, n=40)
    return simulate(task, cc, sc, rounds=rounds, participation=0.6, seed=1, **kw)


def _without_timings(h: History) -> str:
    """The history without wall times, as JSON (NaN, e.g. round 0's train loss, compares)."""
    d = h.to_dict()
    for r in d["rounds"]:
        for k in ("client_time_s", "server_time_s"):
            r.pop(k)
        r["server_log"].pop("server_time_s", None)
    return json.dumps(d, sort_keys=True)


def test_simulate_plans_its_rounds_and_resumes_mid_decay_bit_identical(tmp_path: Path) -> None:
    """An 8-round run decays over its rounds 5-7 (0-based; the default: the last half); killed
    inside round 6, mid-decay, it resumes from round 5's checkpoint and ends as the
    uninterrupted run."""
    straight = _sim(8)
    logged = [r.server_log.get("step_decay", 1.0) for r in straight.rounds[1:]]
    assert logged == pytest.approx([reference_factor(r, 8, 0.5) for r in range(8)], rel=1e-12)
    assert logged[4] == 1.0 > logged[5] > logged[6] > logged[7]

    def kill(r: int, upd: ClientUpdate) -> ClientUpdate:
        if r == 6:
            raise KeyboardInterrupt
        return upd

    with pytest.raises(KeyboardInterrupt):
        _sim(8, checkpoint_dir=tmp_path, tamper=kill)
    resumed = _sim(8, checkpoint_dir=tmp_path, resume=True)
    assert _without_timings(resumed) == _without_timings(straight)


def test_a_resumed_run_given_more_rounds_follows_the_new_plan(tmp_path: Path) -> None:
    """Rounds past the first call's plan follow the plan of the call that runs them."""
    _sim(3, checkpoint_dir=tmp_path)
    longer = _sim(8, checkpoint_dir=tmp_path, resume=True)
    logged = [r.server_log.get("step_decay", 1.0) for r in longer.rounds[4:]]
    assert logged == pytest.approx([reference_factor(r, 8, 0.5) for r in range(3, 8)], rel=1e-12)
    state, _ = server_init({"w": torch.zeros(1)}, make_configs("fedng", {})[1], 1.0, 3)
    plan_rounds(state, 8)
    assert state.meta[NUM_ROUNDS_KEY] == 8


def test_flower_tells_the_server_its_rounds() -> None:
    """The Flower strategy passes its `num_rounds`: the same decay as the simulator's."""
    pytest.importorskip("flwr", reason="needs the flower extra (Python >= 3.11)")
    from fedng.flower import RunSpec, make_client_app, run_server
    from fedng.flower.testing import LocalGrid

    spec = RunSpec(algorithm="fedng", rounds=4, participation=0.75, seed=5, settings=SMALL)

    def task_fn(spec: RunSpec) -> Any:
        return blobs_task(num_clients=4, n=40, seed=spec.seed)

    grid = LocalGrid(make_client_app(task_fn), 4, spec.to_run_config())
    strategy = run_server(grid, spec, task_fn(spec))
    logged = [r.server_log.get("step_decay", 1.0) for r in strategy.history.rounds[1:]]
    assert logged == pytest.approx([reference_factor(r, 4, 0.5) for r in range(4)], rel=1e-12)
    assert logged[-1] < 1
