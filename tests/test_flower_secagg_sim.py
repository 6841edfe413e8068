"""FedNG under SecAgg+ on Flower's simulation engine (Ray; slow): a simulation SuperLink on
127.0.0.1, `flwr run` of the secure components (`fedng.flower.apps:secure_server_app` /
`secure_client_app`) through `scripts/flower_deploy.py --simulation --secagg`.

Checks: the run completed (`flwr ls`), no process is left, every round ran its three SecAgg+
passes with nothing clipped and no client rejected, and each round's accuracy is the plaintext
simulator's up to two test examples (SecAgg+ rounds stochastically: the in-process comparison,
tests/test_flower_secagg.py, bounds the sums; over two rounds the model gap measured there, at
most ~5e-4, flips at most a prediction or two).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="needs the flower extra (Python >= 3.11)")
pytest.importorskip("ray", reason="needs flwr[simulation] (Ray)")

from fedng.federated import simulate
from fedng.flower import RunSpec
from test_flower_deploy import deploy_script, processes_under

NODES, ROUNDS = 3, 2


@pytest.mark.slow
def test_secure_fedng_on_the_simulation_engine(tmp_path: Path) -> None:
    rep = deploy_script().simulate_engine(tmp_path, nodes=NODES, rounds=ROUNDS, secagg=True)
    assert rep["left_running"] == [] and processes_under(tmp_path) == []
    assert rep["status"]["status"] == "finished:completed", rep["status"]
    rounds = rep["history"]["rounds"]
    assert len(rounds) == ROUNDS + 1
    spec = RunSpec(
        algorithm="fedng",
        rounds=ROUNDS,
        seed=0,
        task="digits",
        task_args={"num_clients": NODES, "alpha": 0.5, "seed": 0},
        settings={"local_steps": 5, "lr": 0.05},
    )
    task = spec.make_task()
    client, server = spec.configs()
    plain = simulate(task, client, server, rounds=ROUNDS, participation=1.0, seed=0)
    one = 1.0 / len(task.y_test)
    for got, want in zip(rounds[1:], plain.rounds[1:], strict=True):
        log = got["server_log"]["secagg"]
        assert log["passes"] == 3 and log["clipped_fraction"] == 0.0, log
        assert got["rejected"] == {} and sorted(got["participants"]) == list(range(NODES))
        assert abs(got["metric"] - want.metric) <= 2 * one + 1e-12, (got["metric"], want.metric)
