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
from torch import nn


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


class _Shifted(nn.Module):
    """The blobs MLP with a raw output shift, a parameter outside every curvature block."""

    def __init__(self, inner: nn.Module, classes: int) -> None:
        super().__init__()
        self.inner = inner
        self.shift = nn.Parameter(torch.zeros(classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + self.shift


def _delta(
    algo: str, settings: dict[str, object], shifted: bool = False
) -> dict[str, torch.Tensor]:
    task = blobs_task(num_clients=1, seed=3)
    cc, sc = make_configs(algo, {"lr": 0.1, "local_steps": 5, **settings})
    cc = cc.replace(loss=task.loss)
    model = task.model_fn(0)
    if shifted:
        model = _Shifted(model, 3)
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


@pytest.mark.parametrize(
    "case",
    [
        {"shifted": True},  # a parameter no block covers keeps plain SGD's lr g
        {"settings": {"weight_decay": 0.01}},  # the decay stays lr wd, not lr λ wd
        {"settings": {"precond": "none"}},  # nothing preconditioned: FedAvg's step at any λ
    ],
    ids=["uncovered", "weight_decay", "precond_none"],
)
def test_sgd_units_leave_plain_gradients_and_the_decay_at_sgds_lr(
    case: dict[str, object],
) -> None:
    """Only the preconditioned gradients are scaled by λ: as λ grows the step tends to
    FedAvg's on every parameter, with a parameter outside every block, with weight decay, and
    with `precond="none"` (where it is FedAvg's step at any λ)."""
    shifted = bool(case.get("shifted", False))
    extra = dict(case.get("settings", {}))  # type: ignore[call-overload]
    avg_extra = {k: v for k, v in extra.items() if k == "weight_decay"}
    avg = _delta("fedavg", avg_extra, shifted)
    ng = {"damping_scale": "absolute", "lr_units": "sgd", "kl_clip": 0.0, **extra}
    far = _delta("fedng", {**ng, "damping": 1e10}, shifted)
    assert _rel(far, avg) < 1e-3
    assert all(_rel({k: far[k]}, {k: avg[k]}) < 1e-3 for k in avg)  # each parameter
    if "precond" in extra:
        assert _rel(_delta("fedng", {**ng, "damping": 1.0}), avg) < 1e-5
