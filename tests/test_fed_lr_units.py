"""FedNG's `lr_units="sgd"`: the client step `lr (F/λ + I)^-1 g`, which moves from the natural
gradient to FedAvg's local SGD at the same `lr` as the absolute damping λ grows."""

from __future__ import annotations

import math

import pytest
import torch
from _fed import blobs_task
from fedng.federated.client import get_params
from fedng.federated.config import make_configs
from fedng.federated.round import client_step, server_init


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _delta(algo: str, settings: dict[str, object]) -> dict[str, torch.Tensor]:
    task = blobs_task(num_clients=1, seed=3)
    cc, sc = make_configs(algo, {"lr": 0.1, "local_steps": 5, **settings})
    cc = cc.replace(loss=task.loss)
    model = task.model_fn(0)
    _, msg = server_init(get_params(model), sc)
    return {k: v.double() for k, v in client_step(model, task.clients[0], msg, cc).delta.items()}


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a)
    return math.sqrt(num / sum(float((b[k] ** 2).sum()) for k in b))


def test_sgd_units_tend_to_fedavg_as_the_damping_grows() -> None:
    avg = _delta("fedavg", {})
    ng = {"damping_scale": "absolute", "lr_units": "sgd", "kl_clip": 0.0}
    gaps = [_rel(_delta("fedng", {**ng, "damping": lam}), avg) for lam in (1.0, 1e4, 1e10)]
    assert gaps[0] > 0.5  # λ 1: the curvature shapes the step
    # K-FAC's Tikhonov damping adds sqrt(λ) to each factor: (A + √λ)(G + √λ) / λ = 1 +
    # (A + G) / √λ + ..., so the gap closes as 1 / √λ (1e3 from λ 1e4 to 1e10), to FedAvg's
    # local SGD at the same lr
    assert 300 < gaps[1] / gaps[2] < 3000
    assert gaps[2] < 1e-3


def test_sgd_units_scale_the_natural_step_by_the_damping() -> None:
    base = {"damping_scale": "absolute", "kl_clip": 0.0, "damping": 0.5}
    natural = _delta("fedng", {**base, "lr": 0.1 * 0.5})
    sgd = _delta("fedng", {**base, "lr_units": "sgd"})
    assert _rel(sgd, natural) < 1e-6


def test_sgd_units_need_absolute_damping() -> None:
    with pytest.raises(ValueError, match="'lr_units' must be"):
        make_configs("fedng", {"lr_units": "sgd"})
    with pytest.raises(ValueError, match="'lr_units' must be one of"):
        make_configs("fedng", {"lr_units": "adam", "damping_scale": "absolute"})
