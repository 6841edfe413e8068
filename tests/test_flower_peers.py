"""Peer check of the baselines: the same client replies fed to fedng's server step and to Flower's
built-in strategy of the same name give the same new global model, round after round.

Config mapping (Flower 1.41 -> fedng):

    FedAvg()                                       fedavg
    FedAvgM(server_learning_rate, server_momentum) fedavgm: server_lr, server_momentum
    FedProx(proximal_mu)                           fedprox: prox_mu (Flower's server step is
                                                   FedAvg's; it sends mu as config "proximal-mu",
                                                   fedng's clients read it from their config)
    FedAdam(eta, beta_1, beta_2, tau)              fedadam: server_lr, beta1, beta2, tau
    FedYogi(eta, beta_1, beta_2, tau)              fedyogi: server_lr, beta1, beta2, tau
    FedAdagrad(eta, tau)                           fedadagrad: server_lr, tau (beta1 = 0)

Two documented differences, compensated here so that the rest is checked exactly: Flower starts
the second moment at v = 0 where fedng (Reddi et al. 2021, Alg. 2) starts at tau^2, and Flower's
FedAdam multiplies eta by the bias correction sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1)) at its
(1-based) round t, which fedng's FedAdam does not. Flower averages the clients' weights, fedng
their deltas: the two agree to float32 rounding (`_tols` row "flower_peer").
"""

from __future__ import annotations

import math
from typing import Any

import pytest

pytest.importorskip("flwr", reason="needs the flower extra (Python >= 3.11)")

import numpy as np
import torch
from _tols import assert_close
from fedng.federated import ClientUpdate, make_configs, server_init, server_step
from fedng.flower.testing import LocalGrid
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import strategy as fl

SHAPES = {"fc.weight": (4, 3), "fc.bias": (4,), "out.weight": (2, 4)}
NUM_EXAMPLES = (30, 50, 20)
ROUNDS = 3
ETA, BETA1, BETA2, TAU = 0.05, 0.9, 0.99, 1e-3

CASES: dict[str, tuple[Any, dict[str, Any]]] = {
    "fedavg": (fl.FedAvg(), {}),
    "fedavgm": (
        fl.FedAvgM(server_learning_rate=0.7, server_momentum=0.9),
        {"server_lr": 0.7, "server_momentum": 0.9},
    ),
    "fedprox": (fl.FedProx(proximal_mu=0.1), {"prox_mu": 0.1}),
    "fedadam": (
        fl.FedAdam(eta=ETA, beta_1=BETA1, beta_2=BETA2, tau=TAU),
        {"server_lr": ETA, "beta1": BETA1, "beta2": BETA2, "tau": TAU},
    ),
    "fedyogi": (
        fl.FedYogi(eta=ETA, beta_1=BETA1, beta_2=BETA2, tau=TAU),
        {"server_lr": ETA, "beta1": BETA1, "beta2": BETA2, "tau": TAU},
    ),
    "fedadagrad": (
        fl.FedAdagrad(eta=ETA, tau=TAU),
        {"server_lr": ETA, "tau": TAU, "beta1": 0.0},
    ),
}


def deltas(round_: int) -> list[dict[str, torch.Tensor]]:
    """The clients' updates of a round (seeded, similar norms: all pass fedng's validation)."""
    gen = torch.Generator().manual_seed(100 + round_)
    return [
        {k: 0.05 * torch.randn(s, generator=gen) for k, s in SHAPES.items()} for _ in NUM_EXAMPLES
    ]


def flower_replies(
    params: dict[str, np.ndarray], ds: list[dict[str, torch.Tensor]]
) -> list[Message]:
    """Flower replies carrying theta_k = theta + delta_k and num-examples."""
    out = []
    for node, (d, n) in enumerate(zip(ds, NUM_EXAMPLES, strict=True)):
        ins = Message(RecordDict(), node + 1, "train")
        arrays = ArrayRecord({k: Array(params[k] + d[k].numpy()) for k in SHAPES})
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})})
        out.append(Message(content, reply_to=ins))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_fedng_server_step_equals_flower_strategy(name: str) -> None:
    flower, settings = CASES[name]
    flower.min_train_nodes = flower.min_available_nodes = 1
    grid = LocalGrid(ClientApp(), len(NUM_EXAMPLES), {})
    gen = torch.Generator().manual_seed(7)
    theta = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    _, server = make_configs(name, settings)
    state, _ = server_init(theta, server)
    if name in ("fedadam", "fedyogi", "fedadagrad"):  # Flower's v starts at 0, fedng's at tau^2
        state.buffers = {
            k: torch.zeros_like(v) if k.startswith("v/") else v for k, v in state.buffers.items()
        }
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in theta.items()})
    for t in range(1, ROUNDS + 1):
        config = ConfigRecord()
        flower.configure_train(t, arrays, config, grid)
        if name == "fedprox":
            assert config["proximal-mu"] == settings["prox_mu"]
        ds = deltas(t)
        current = {k: a.numpy() for k, a in arrays.items()}
        new, _ = flower.aggregate_train(t, flower_replies(current, ds))
        assert new is not None
        arrays = new
        if name == "fedadam":  # Flower's bias-corrected step size at its round t
            lr = ETA * math.sqrt(1 - BETA2 ** (t + 1)) / (1 - BETA1 ** (t + 1))
            state.config = state.config.replace(server_lr=lr)
        updates = [
            ClientUpdate(c, state.round, d, n)
            for c, (d, n) in enumerate(zip(ds, NUM_EXAMPLES, strict=True))
        ]
        state, _ = server_step(state, updates)
        assert state.log["accepted"] == [0, 1, 2]
        for k in SHAPES:
            want = torch.from_numpy(arrays[k].numpy()).double()
            assert_close(state.params[k], want, torch.float32, "flower_peer")
