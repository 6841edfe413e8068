"""FedNG variants as configuration, payload dtypes, upload cadence, and real federated runs."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from _fed import blobs_task
from fedng.curvature import UnsupportedLayerWarning
from fedng.federated.client import get_params
from fedng.federated.config import make_configs
from fedng.federated.round import client_step, server_init, server_step
from fedng.federated.simulator import simulate
from fedng.federated.tasks.base import mlp, seeded_model
from torch import nn


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.mark.parametrize("precond", ["global", "local", "global_local", "none"])
@pytest.mark.parametrize("curvature", ["kfac", "diag", "lowrank", "kfac,2=lowrank"])
def test_variants_run_and_learn(precond: str, curvature: str) -> None:
    task = blobs_task(num_clients=3, n=40)
    cc, sc = make_configs(
        "fedng",
        {
            "precond": precond,
            "curvature": curvature,
            "rank": 4,
            "local_steps": 4,
            "lr": 0.1,
            "damping": 0.1,
            "kl_clip": 1e-2,
            "aggregation": "fisher" if precond != "local" else "mean",
            "fisher_center": "mean",
            "fisher_damping": 0.1,
        },
    )
    h = simulate(task, cc, sc, rounds=3, seed=0)
    assert h.final() > 0.7, h.series("metric")
    assert all(not r.rejected for r in h.rounds)


def test_global_preconditioner_reaches_clients() -> None:
    task = blobs_task(num_clients=3, n=30)
    for precond, bc, want in (
        ("global", "inverse", "inv/"),
        ("global", "auto", "curv/"),
        ("global_local", "auto", "curv/"),
    ):
        cc, sc = make_configs("fedng", {"precond": precond, "broadcast": bc, "local_steps": 2})
        model = task.model_fn(0)
        state, msg = server_init(get_params(model), sc)
        assert not msg.extras
        ups = [client_step(model, c, msg, cc) for c in task.clients]
        assert all(u.metrics["precond_mode"] == 1.0 for u in ups)  # round 0: own curvature
        state, msg = server_step(state, ups)
        assert msg.extras and all(k.startswith(want) for k in msg.extras)
        u = client_step(model, task.clients[0], msg, cc)
        assert u.metrics["precond_mode"] == (2.0 if precond == "global" else 3.0)


def test_payload_dtype_and_upload_cadence() -> None:
    task = blobs_task(num_clients=2, n=30)
    sizes = {}
    for dt in ("fp32", "bf16", "fp16"):
        cc, sc = make_configs(
            "fedng", {"payload_dtype": dt, "local_steps": 2, "compression": "none"}
        )
        model = task.model_fn(0)
        _, msg = server_init(get_params(model), sc)
        u = client_step(model, task.clients[0], msg, cc)
        sizes[dt] = sum(v.numel() * v.element_size() for v in u.curvature.values())
        assert u.nbytes == len(u.to_bytes())
    assert sizes["bf16"] * 2 == sizes["fp32"] == sizes["fp16"] * 2
    cc, sc = make_configs("fedng", {"upload_every": 2, "local_steps": 2})
    h = simulate(task, cc, sc, rounds=4, seed=0)
    up = [r.bytes_up for r in h.rounds[1:]]
    assert up[0] > up[1] and up[2] > up[3]


def test_without_preconditioner_fedng_is_fedavg() -> None:
    """With the preconditioner off and mean aggregation, FedNG's rounds are FedAvg's exactly
    (curvature is still collected and uploaded, but nothing reads it); turning the global
    preconditioner on changes the trajectory."""
    task = blobs_task(num_clients=4, n=40)
    base = {"lr": 0.1, "local_steps": 4}
    runs = {
        "fedavg": make_configs("fedavg", base),
        "plain": make_configs("fedng", {**base, "precond": "none", "aggregation": "mean"}),
        "global": make_configs("fedng", {**base, "precond": "global", "aggregation": "mean"}),
    }
    params = {}
    for name, (cc, sc) in runs.items():
        model = task.model_fn(0)
        state, msg = server_init(get_params(model), sc)
        for _ in range(3):
            ups = [client_step(model, c, msg, cc) for c in task.clients[:3]]
            state, msg = server_step(state, ups)
        params[name] = state.params
        if name == "plain":
            assert not msg.extras and all(u.curvature for u in ups)
    for k in params["fedavg"]:
        assert torch.equal(params["plain"][k], params["fedavg"][k]), k
    assert any(not torch.equal(params["global"][k], params["fedavg"][k]) for k in params["fedavg"])


def test_fedfisher_is_one_shot() -> None:
    task = blobs_task(num_clients=3, n=40)
    cc, sc = make_configs("fedfisher", {"lr": 0.1, "local_epochs": 3.0})
    h = simulate(task, cc, sc, rounds=5, seed=0)
    assert len(h.rounds) == 2
    assert h.final() > 0.7


class Scaled(nn.Module):
    """The blobs MLP with a learned output scale: a parameter no supported layer covers."""

    def __init__(self) -> None:
        super().__init__()
        self.body = mlp([5, 8, 3])
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.scale


@pytest.mark.parametrize("algorithm", ["fedng", "fedfisher"])
def test_unsupported_layers_warn_once_per_run(algorithm: str) -> None:
    """Clients rebuild their curvature capture every round, silently; the run warns once."""
    task = dataclasses.replace(
        blobs_task(num_clients=3, n=20), model_fn=lambda s: seeded_model(Scaled, s)
    )
    cc, sc = make_configs(algorithm, {"local_steps": 2})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        simulate(task, cc, sc, rounds=2, seed=0)
    assert [w.category for w in caught] == [UnsupportedLayerWarning]
    assert "scale" in str(caught[0].message)
