"""Small shared helpers of the federated tests."""

from __future__ import annotations

from typing import Any

import torch
from fedng.federated import server_round, validate
from fedng.federated.client import get_params
from fedng.federated.config import make_configs
from fedng.federated.messages import ClientUpdate, ServerState
from fedng.federated.round import client_step, server_init, server_step
from fedng.federated.tasks.base import ClientData, FederatedTask, mlp, seeded_model
from torch import nn


def blobs_task(
    num_clients: int = 4, n: int = 60, dim: int = 5, classes: int = 3, seed: int = 0
) -> FederatedTask:
    """A tiny separable classification task (Gaussian blobs), IID over clients."""
    gen = torch.Generator().manual_seed(seed)
    centers = 3.0 * torch.randn(classes, dim, generator=gen)

    def draw(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, classes, (k,), generator=gen)
        return centers[y] + torch.randn(k, dim, generator=gen), y

    clients = []
    for c in range(num_clients):
        x, y = draw(n)
        xv, yv = draw(10)
        clients.append(ClientData(c, x, y, xv, yv))
    xt, yt = draw(200)
    return FederatedTask(
        "blobs",
        clients,
        xt,
        yt,
        lambda s: seeded_model(lambda: mlp([dim, 8, classes]), s),
        "cross_entropy",
        "accuracy",
        classes,
    )


def linear_task(n: int = 24, dim: int = 3, seed: int = 0) -> FederatedTask:
    """One client, a linear regression (MSE), model nn.Linear(dim, 1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    y = x @ torch.randn(dim, 1, generator=gen) + 0.1 * torch.randn(n, 1, generator=gen)
    c = ClientData(0, x, y, x[:4], y[:4])
    return FederatedTask(
        "linear",
        [c],
        x,
        y,
        lambda s: seeded_model(lambda: nn.Linear(dim, 1), s),
        "mse",
        "rel_l2",
        0,
    )


def fed_round(
    algo: str, extra: dict[str, Any] | None = None, n: int = 5, rounds: int = 0
) -> tuple[ServerState[Any], list[ClientUpdate]]:
    """On `blobs_task(n)`: the server state after `rounds` honest rounds, and the next round's
    updates (each decoded from its bytes, as the server receives it)."""
    task = blobs_task(num_clients=n, n=30)
    cc, sc = make_configs(algo, {"local_steps": 3, **(extra or {})})
    model = task.model_fn(0)
    state, msg = server_init(get_params(model), sc)

    def updates() -> list[ClientUpdate]:
        return [
            ClientUpdate.from_bytes(client_step(model, c, msg, cc).to_bytes()) for c in task.clients
        ]

    for _ in range(rounds):
        state, msg = server_step(state, updates())
    return state, updates()


def count_python_checks(monkeypatch: Any) -> list[int]:
    """The client ids of the replies `ServerRound` sends through the Python checks
    (`validate.safe_check`), appended as they come (the fast paths skip them)."""
    checked: list[int] = []
    real = validate.safe_check

    def counted(*a: Any) -> str | None:
        checked.append(a[1].client_id)
        return real(*a)

    monkeypatch.setattr(server_round, "safe_check", counted)  # what ServerRound calls
    return checked


def replay(u: ClientUpdate, cid: int, **change: Any) -> ClientUpdate:
    """A fresh copy of `u` decoded from its bytes (as a server receives it) under client id
    `cid`, with the given attributes replaced."""
    out = ClientUpdate.from_bytes(u.to_bytes())
    out.client_id = cid
    for k, v in change.items():
        setattr(out, k, v)
    return out
