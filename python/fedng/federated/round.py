"""One round of the federated protocol every algorithm speaks.

    client_step(model, data, server_message, config) -> ClientUpdate
    server_step(state, updates) -> (state, server_message)

Both are pure functions of tensors and configs: the client's result depends only on the message,
its data, its config (and its own persistent `client_state`, the analogue of a Flower ClientApp's
`context.state`); the server validates every update, aggregates the accepted ones and builds the
next broadcast, never mutating the state it was given.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from fedng._typing import Arrays
from fedng.federated.algorithms.base import State
from fedng.federated.algorithms.registry import get_algorithm
from fedng.federated.config.common import ClientConfig, ServerConfig
from fedng.federated.messages import ClientUpdate, ServerMessage, ServerState
from fedng.federated.tasks.base import ClientData
from fedng.federated.validate import validate_updates


def server_init(params: Arrays, config: ServerConfig) -> tuple[State, ServerMessage]:
    """The initial server state and the first round's message.

    Args:
        params: the initial global model (named arrays; cloned to fp32).
        config: the server config; `config.algorithm` picks the algorithm.

    Returns:
        (state, message for round 0).
    """
    algo = get_algorithm(config.algorithm)
    state = ServerState(0, {k: v.detach().float().clone() for k, v in params.items()}, config)
    state = algo.init_state(state)
    return state, algo.broadcast(state).seal()


def client_step(
    model: nn.Module,
    data: ClientData,
    server_message: ServerMessage,
    config: ClientConfig,
    client_state: Arrays | None = None,
) -> ClientUpdate:
    """Runs one client's local step.

    Args:
        model: a module of the task's architecture, used as workspace (its parameters are
            overwritten with `server_message.params`).
        data: the client's local data.
        server_message: the round's broadcast.
        config: the client config; `config.algorithm` must match the message's algorithm.
        client_state: what this client kept from its previous round (None the first time).

    Returns:
        The sealed `ClientUpdate` (its `client_state` is what to pass next time).

    Raises:
        ValueError: the config's algorithm is not the message's.
    """
    if config.algorithm != server_message.algorithm:
        raise ValueError(
            f"client_step: 'config.algorithm' must match the server message's algorithm"
            f" {server_message.algorithm!r}, got {config.algorithm!r}"
        )
    upd = get_algorithm(config.algorithm).client_step(
        model, data, server_message, config, dict(client_state or {})
    )
    return upd.seal()


def _non_finite(state: State) -> list[str]:
    """Names of the state's float arrays holding NaN or Inf."""
    return [
        k
        for k, v in {**state.params, **state.buffers}.items()
        if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]


def server_step(state: State, updates: list[ClientUpdate]) -> tuple[State, ServerMessage]:
    """Validates every update, aggregates the accepted ones, and builds the next message.

    A payload that fails validation is rejected with a reason in `state.log["rejected"]`; the
    round goes on with the rest. If aggregation produces a non-finite model, the round is
    rolled back (the returned state keeps the previous parameters) and logged.

    Args:
        state: the current server state (not modified).
        updates: the round's client updates (decoded from the wire).

    Returns:
        (new state, message for the next round).
    """
    t0 = time.perf_counter()
    algo = get_algorithm(state.config.algorithm)
    accepted, rejected = validate_updates(state, updates, algo)
    new = state.copy()
    new.log = {"accepted": [u.client_id for u in accepted], "rejected": rejected}
    if accepted:
        new = algo.aggregate(new, accepted)
        bad = _non_finite(new)
        if bad:
            new = state.copy()
            new.log = {
                "accepted": [],
                "rejected": rejected,
                "rolled_back": f"aggregation produced non-finite {bad[:5]}",
            }
    else:
        new.log["skipped"] = "no valid update this round"
    new.round = state.round + 1
    message = algo.broadcast(new).seal()
    new.log["server_time_s"] = time.perf_counter() - t0
    return new, message
