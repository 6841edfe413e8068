"""The same federation on Flower (its Message API, the real ClientApp/ServerApp components, an
in-process Grid: no Ray, no SuperLink) gives the same history as fedng's simulator for the same
seed: same sampled clients, same metrics every round, same byte counts, same final model bit for
bit."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr", reason="needs the flower extra (Python >= 3.11)")

import torch
from _fed import blobs_task
from fedng.federated import FederatedTask, History, simulate
from fedng.flower import RunSpec, make_client_app, run_server
from fedng.flower.apps import client_app as ready_client_app
from fedng.flower.testing import LocalGrid
from flwr.app import ArrayRecord, ConfigRecord

TIMINGS = ("client_time_s", "server_time_s")


def small_task(spec: RunSpec) -> FederatedTask:
    """The user's own model and data: 4 clients of Gaussian blobs, an MLP."""
    return blobs_task(num_clients=4, n=40, seed=spec.seed)


def comparable(h: History) -> dict[str, Any]:
    """The history without wall times (NaN made comparable)."""
    d = h.to_dict()
    for r in d["rounds"]:
        for k in TIMINGS:
            r.pop(k)
        r["server_log"].pop("server_time_s", None)
    return _nan_free(d)


def _nan_free(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if isinstance(x, dict):
        return {k: _nan_free(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_free(v) for v in x]
    return x


def simulated(spec: RunSpec, task: FederatedTask) -> History:
    client, server = spec.configs()
    return simulate(
        task, client, server, rounds=spec.rounds, participation=spec.participation, seed=spec.seed
    )


@pytest.mark.parametrize(
    ("algorithm", "settings"),
    [
        ("fedavg", {}),
        ("fedavgm", {}),
        ("fedprox", {"prox_mu": 0.1}),
        ("scaffold", {}),
        ("fedadam", {"server_lr": 0.05}),
        ("fedng", {}),
        ("fedng", {"curvature": "diag", "aggregation": "fisher", "update_dtype": "bf16"}),
        ("fedfisher", {}),
    ],
)
def test_flower_history_equals_simulator(algorithm: str, settings: dict[str, Any]) -> None:
    """Every algorithm, partial participation, 3 rounds, replies arriving out of send order: the
    Flower run's history (sampling, metrics, bytes, rejections) and final model equal the
    simulator's."""
    spec = RunSpec(
        algorithm=algorithm,
        rounds=3,
        participation=0.75,
        seed=5,
        settings={"local_steps": 3, "batch_size": 16, **settings},
    )
    task = small_task(spec)
    expected = simulated(spec, task)
    grid = LocalGrid(make_client_app(small_task), 4, spec.to_run_config(), last_first=True)
    strategy = run_server(grid, spec, task)
    assert comparable(strategy.history) == comparable(expected)
    assert strategy.state is not None
    assert strategy.state.round == len(expected.rounds) - 1
    assert any(r.bytes_up > 0 for r in expected.rounds[1:])


def test_ready_made_apps_on_a_fedng_task(tmp_path: Path) -> None:
    """The FAB's components (`fedng.flower.apps`) on the digits task named in the run config
    match `simulate`, and write the same final model and the history to `checkpoint-dir`."""
    spec = RunSpec(
        algorithm="fedng",
        rounds=2,
        participation=1.0,
        seed=1,
        task="digits",
        task_args={"num_clients": 3, "seed": 1},
        settings={"local_steps": 2},
        checkpoint_dir=str(tmp_path / "flower"),
    )
    task = spec.make_task()
    client, server = spec.configs()
    expected = simulate(
        task, client, server, rounds=2, seed=1, checkpoint_dir=tmp_path / "simulated"
    )
    grid = LocalGrid(ready_client_app, 3, spec.to_run_config())
    strategy = run_server(grid, spec, task)
    assert comparable(strategy.history) == comparable(expected)
    saved = History.from_dict(json.loads((tmp_path / "flower" / "history.json").read_text()))
    assert comparable(saved) == comparable(expected)
    model = torch.load(tmp_path / "flower" / "model.pt")
    want = torch.load(tmp_path / "simulated" / "model.pt")
    assert set(model) == set(want) and all(torch.equal(model[k], v) for k, v in want.items())


@pytest.mark.parametrize("algorithm", ["fedavg", "fedadam", "scaffold"])
def test_resume_after_a_crash(tmp_path: Path, algorithm: str) -> None:
    """A Flower run stopped after round 2 and resumed (`resume = true`) ends with the
    uninterrupted run's history and model — bit for bit for algorithms without client state;
    SCAFFOLD's control variates live on the nodes and restart (documented), so only its first
    rounds match."""
    full = RunSpec(algorithm=algorithm, rounds=4, participation=0.5, seed=3)
    task = small_task(full)
    want = run_server(LocalGrid(make_client_app(small_task), 4, full.to_run_config()), full, task)
    ckpt = str(tmp_path / "ckpt")
    first = replace(full, rounds=2, checkpoint_dir=ckpt)
    run_server(LocalGrid(make_client_app(small_task), 4, first.to_run_config()), first, task)
    again = replace(full, checkpoint_dir=ckpt, resume=True)
    got = run_server(LocalGrid(make_client_app(small_task), 4, again.to_run_config()), again, task)
    assert got.state is not None and want.state is not None
    a, b = comparable(got.history), comparable(want.history)
    assert a["rounds"][:3] == b["rounds"][:3]
    same = all(torch.equal(got.state.params[k], v) for k, v in want.state.params.items())
    assert (a == b and same) == (algorithm != "scaffold")


def test_resume_refuses_another_runs_checkpoint(tmp_path: Path) -> None:
    spec = RunSpec(algorithm="fedavg", rounds=1, seed=3, checkpoint_dir=str(tmp_path))
    task = small_task(spec)
    run_server(LocalGrid(make_client_app(small_task), 4, spec.to_run_config()), spec, task)
    other = replace(spec, seed=4, resume=True)
    with pytest.raises(ValueError, match="of another run: seed differs"):
        run_server(LocalGrid(make_client_app(small_task), 4, other.to_run_config()), other, task)


def test_client_state_lives_in_context_state() -> None:
    """SCAFFOLD's control variate persists per node in `Context.state` between rounds (and
    only on the nodes that trained)."""
    spec = RunSpec(algorithm="scaffold", rounds=2, participation=0.5, seed=2)
    task = small_task(spec)
    grid = LocalGrid(make_client_app(small_task), 4, spec.to_run_config())
    strategy = run_server(grid, spec, task)
    trained = {c for r in strategy.history.rounds for c in r.participants}
    for node, ctx in grid.contexts.items():
        has = "fedng.client_state" in ctx.state.array_records
        assert has == (strategy.client_of[node] in trained)


def test_a_round_driven_through_flowers_strategy_interface() -> None:
    """After `start`, one more round driven by hand (`configure_train`, the grid's
    send_and_receive, `aggregate_train`) is the round `start` would have run."""
    spec = RunSpec(algorithm="fedadam", rounds=2, participation=0.5, seed=6)
    task = small_task(spec)
    want = run_server(
        LocalGrid(make_client_app(small_task), 4, spec.to_run_config()),
        replace(spec, rounds=3),
        task,
    )
    grid = LocalGrid(make_client_app(small_task), 4, spec.to_run_config())
    strategy = run_server(grid, spec, task)
    msgs = strategy.configure_train(3, ArrayRecord(), ConfigRecord(), grid)
    arrays, _ = strategy.aggregate_train(3, grid.send_and_receive(msgs))
    assert strategy.state is not None and want.state is not None and arrays is not None
    assert strategy.state.round == 3
    assert all(torch.equal(strategy.state.params[k], v) for k, v in want.state.params.items())


@pytest.mark.parametrize("algorithm", ["fedavg", "fedng"])
def test_streaming_strategy_equals_the_streaming_simulator(algorithm: str) -> None:
    """`streaming = true`: each reply is validated and folded as it arrives (`ServerRound`, and
    FedNG's line search on the grid). Replies in send order give `simulate(streaming=True)`'s
    history bit for bit; in another order, the same run up to float summation order."""
    spec = RunSpec(
        algorithm=algorithm,
        rounds=3,
        participation=0.75,
        seed=5,
        streaming=True,
        settings={"local_steps": 3, "batch_size": 16},
    )
    task = small_task(spec)
    client, server = spec.configs()
    expected = simulate(task, client, server, rounds=3, participation=0.75, seed=5, streaming=True)
    assert all(r.rejected == {} for r in expected.rounds)
    grid = LocalGrid(make_client_app(small_task), 4, spec.to_run_config())
    strategy = run_server(grid, spec, task)
    assert comparable(strategy.history) == comparable(expected)
    if algorithm == "fedng":
        assert expected.rounds[-1].server_log["probe_answered"] == 3
    shuffled = run_server(
        LocalGrid(make_client_app(small_task), 4, spec.to_run_config(), last_first=True),
        spec,
        task,
    )
    for got, want in zip(shuffled.history.rounds, expected.rounds, strict=True):
        assert got.participants == want.participants and got.rejected == want.rejected
        # the payloads' JSON metrics (train loss) may print a digit more or less
        assert abs(got.bytes_up - want.bytes_up) <= 8 * len(want.participants)
        assert got.bytes_down == want.bytes_down
        assert math.isclose(got.test_loss, want.test_loss, rel_tol=1e-4, abs_tol=1e-6)
