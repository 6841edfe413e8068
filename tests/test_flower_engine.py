"""The same federation on Flower (its Message API, the real ClientApp/ServerApp components, an
in-process Grid: no Ray, no SuperLink) gives the same history as fedng's simulator for the same
seed: same sampled clients, same metrics every round, same byte counts, same final model bit for
bit."""

from __future__ import annotations

import math
from typing import Any

import pytest

pytest.importorskip("flwr", reason="needs the flower extra (Python >= 3.11)")

import torch
from _fed import blobs_task
from fedng.federated import FederatedTask, History, simulate
from fedng.flower import RunSpec, make_client_app, run_server
from fedng.flower.apps import client_app as ready_client_app
from fedng.flower.testing import LocalGrid

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


def test_ready_made_apps_on_a_fedng_task(tmp_path: Any) -> None:
    """The FAB's components (`fedng.flower.apps`) on the digits task named in the run config
    match `fedng simulate`, and write the history and final model to `checkpoint-dir`."""
    spec = RunSpec(
        algorithm="fedng",
        rounds=2,
        participation=1.0,
        seed=1,
        task="digits",
        task_args={"num_clients": 3, "seed": 1},
        settings={"local_steps": 2},
        checkpoint_dir=str(tmp_path),
    )
    task = spec.make_task()
    expected = simulated(spec, task)
    grid = LocalGrid(ready_client_app, 3, spec.to_run_config())
    strategy = run_server(grid, spec, task)
    assert comparable(strategy.history) == comparable(expected)
    saved = History.from_dict(__import__("json").loads((tmp_path / "history.json").read_text()))
    assert comparable(saved) == comparable(expected)
    model = torch.load(tmp_path / "model.pt")
    assert strategy.state is not None
    assert all(torch.equal(model[k], v) for k, v in strategy.state.params.items())


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
