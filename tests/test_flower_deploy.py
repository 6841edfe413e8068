"""Flower's deployment engine with real processes (slow): a SuperLink and 3 SuperNodes on
127.0.0.1 with TLS (certificates made for the run) and SuperNode authentication, FedNG on the
digits task for 3 rounds via `flwr run` (scripts/flower_deploy.py).

Checks: the run completed (from `flwr ls --format json`, not `flwr run`'s exit code); the final
model and the history equal fedng's in-process simulator's for the same seed and partitions (bit
for bit: the strategy folds replies in client-id order whatever order they arrive in); a SuperNode
whose key was not registered is refused; a second run in which one SuperNode is killed after the
first round still completes with the other two; no process is left running.

On an overloaded machine a ClientApp process can start too slowly for Flower's task heartbeat
(30 s interval, patience 2): its task then fails ("Runtime task-token authentication failed")
and the round records that reply as missing; the killed-node check therefore asks for one later
round that trains on every surviving node, not for all of them.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("flwr", reason="needs the flower extra (Python >= 3.11)")

import torch
from fedng.federated import History, simulate
from fedng.flower import RunSpec

ROOT = Path(__file__).resolve().parents[1]
NODES, ROUNDS = 3, 3


def deploy_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "flower_deploy", ROOT / "scripts" / "flower_deploy.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def app_spec(rounds: int) -> RunSpec:
    """The run examples/flower-digits makes with the script's overrides."""
    return RunSpec(
        algorithm="fedng",
        rounds=rounds,
        seed=0,
        task="digits",
        task_args={"num_clients": NODES, "alpha": 0.5, "seed": 0},
        settings={"local_steps": 5, "lr": 0.05},
    )


def strip(h: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for r in h["rounds"]:
        r = {k: v for k, v in r.items() if k not in ("client_time_s", "server_time_s")}
        r["server_log"] = {k: v for k, v in r["server_log"].items() if k != "server_time_s"}
        out.append(
            {k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
        )
    return out


def processes_under(folder: Path) -> list[int]:
    """PIDs whose command line mentions `folder` (what the script started there)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if str(folder).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.slow
def test_deployment_with_tls_and_node_auth(tmp_path: Path) -> None:
    script = deploy_script()
    rep = script.deploy(tmp_path / "full", nodes=NODES, rounds=ROUNDS, timeout=120.0)
    assert rep["left_running"] == [] and processes_under(tmp_path / "full") == []
    assert rep["status"]["status"] == "finished:completed", rep["status"]
    assert rep["intruder"]["refused"], rep["intruder"]
    assert rep["registered_online"] == NODES

    spec = app_spec(ROUNDS)
    task = spec.make_task()
    client, server = spec.configs()
    sim_dir = tmp_path / "simulated"
    expected = simulate(
        task, client, server, rounds=ROUNDS, participation=1.0, seed=0, checkpoint_dir=sim_dir
    )
    history = History.from_dict(rep["history"])
    # same metrics, bytes, participants and rejections every round, and the same final model
    assert strip(history.to_dict()) == strip(expected.to_dict())
    model, want = torch.load(rep["model"]), torch.load(sim_dir / "model.pt")
    assert set(model) == set(want)
    assert all(torch.equal(model[k], v) for k, v in want.items())

    killed = script.deploy(
        tmp_path / "killed",
        nodes=NODES,
        rounds=ROUNDS,
        timeout=120.0,
        kill_node_after_round=1,
        intruder=False,
    )
    assert killed["left_running"] == [] and processes_under(tmp_path / "killed") == []
    assert killed["status"]["status"] == "finished:completed", killed["status"]
    victim = str(killed["killed"]["node"])
    rounds = killed["history"]["rounds"]
    assert len(rounds) == ROUNDS + 1
    after = rounds[killed["killed"]["after_round"] + 1 :]
    # the killed node costs its own replies only: a later round trains on all the others
    assert all(victim in r["rejected"] for r in after), after
    assert any(set(r["rejected"]) == {victim} for r in after), after
