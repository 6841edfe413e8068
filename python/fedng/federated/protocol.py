"""The one federated protocol every algorithm speaks.

    client_step(model, data, server_message, config) -> ClientUpdate
    server_step(state, updates) -> (state, server_message)

Both are pure functions of tensors and configs: the client's result depends only on the message,
its data, its config (and its own persistent `client_state`, the analogue of a Flower ClientApp's
`context.state`); the server never mutates the state it was given. Updates and messages are named
arrays plus JSON scalars, and each knows its exact serialized size: `len(update.to_bytes())`.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedng.federated import serialize
from fedng.federated.config import ClientConfig, ServerConfig
from fedng.federated.tasks.base import ClientData

Arrays = dict[str, torch.Tensor]
"""Named arrays (the unit of everything on the wire)."""


def _prefixed(prefix: str, arrays: Arrays) -> Arrays:
    return {f"{prefix}/{k}": v for k, v in arrays.items()}


def _split(arrays: Arrays, prefixes: tuple[str, ...]) -> dict[str, Arrays]:
    out: dict[str, Arrays] = {p: {} for p in prefixes}
    for k, v in arrays.items():
        head, sep, tail = k.partition("/")
        if not sep or head not in out:
            raise ValueError(f"payload array {k!r} has no known prefix (expected {prefixes})")
        out[head][tail] = v
    return out


@dataclass
class ClientUpdate:
    """What one client sends back after its local step.

    Attributes:
        client_id: the client.
        round: the server round it answers.
        delta: named arrays, `theta_k - theta_t` per parameter (wire dtype).
        curvature: the curvature payload as named arrays (empty when none is sent this round).
        extras: algorithm-specific named arrays (e.g. SCAFFOLD's control-variate delta).
        num_examples: local training examples (the aggregation weight).
        metrics: local scalars (loss, accuracy, client time).
        meta: JSON metadata the algorithm needs to decode `curvature` (kind, block specs).
        symmetric: names in `curvature` that travel as packed triangles.
        client_state: the client's persistent state after this round; kept locally, never sent.
        nbytes: exact serialized size, `len(self.to_bytes())`; set by `seal()`.
    """

    client_id: int
    round: int
    delta: Arrays
    num_examples: int
    curvature: Arrays = field(default_factory=dict)
    extras: Arrays = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    symmetric: frozenset[str] = frozenset()
    client_state: Arrays = field(default_factory=dict)
    nbytes: int = -1

    def to_bytes(self) -> bytes:
        """The update's wire bytes (`fedng.federated.serialize` format)."""
        arrays = {
            **_prefixed("delta", self.delta),
            **_prefixed("curv", self.curvature),
            **_prefixed("extra", self.extras),
        }
        meta = {
            "type": "client_update",
            "client_id": self.client_id,
            "round": self.round,
            "num_examples": self.num_examples,
            "metrics": self.metrics,
            "meta": self.meta,
        }
        return serialize.pack(arrays, meta=meta, symmetric=[f"curv/{s}" for s in self.symmetric])

    def seal(self) -> ClientUpdate:
        """Sets `nbytes` to the exact serialized size; returns self."""
        self.nbytes = len(self.to_bytes())
        return self

    @staticmethod
    def from_bytes(data: bytes) -> ClientUpdate:
        """Decodes `to_bytes()` (the server's side of the wire).

        Raises:
            ValueError: corrupt bytes or not a client update.
        """
        p = serialize.unpack(data)
        if p.meta.get("type") != "client_update":
            raise ValueError(f"expected a client_update payload, got type {p.meta.get('type')!r}")
        parts = _split(p.arrays, ("delta", "curv", "extra"))
        sym = frozenset(s.partition("/")[2] for s in p.symmetric)
        return ClientUpdate(
            client_id=int(p.meta["client_id"]),
            round=int(p.meta["round"]),
            delta=parts["delta"],
            num_examples=int(p.meta["num_examples"]),
            curvature=parts["curv"],
            extras=parts["extra"],
            metrics={k: float(v) for k, v in p.meta["metrics"].items()},
            meta=dict(p.meta["meta"]),
            symmetric=sym,
            nbytes=len(data),
        )


@dataclass
class ServerMessage:
    """What the server broadcasts at the start of a round.

    Attributes:
        round: the round about to run (0-based).
        algorithm: the algorithm name.
        params: the global model theta_t as named arrays.
        extras: algorithm-specific named arrays (SCAFFOLD's control variate, FedNG's
            preconditioner).
        meta: JSON scalars (e.g. the damping the preconditioner was built with).
        symmetric: names in `extras` that travel as packed triangles.
        dtype: wire dtype of `extras` ("fp32", "bf16", "fp16"); params always travel as fp32.
        nbytes: exact serialized size, `len(self.to_bytes())`; set by `seal()`.
    """

    round: int
    algorithm: str
    params: Arrays
    extras: Arrays = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    symmetric: frozenset[str] = frozenset()
    dtype: str = "fp32"
    nbytes: int = -1

    def to_bytes(self) -> bytes:
        """The message's wire bytes."""
        extras = {
            k: v.to(serialize.wire_dtype(self.dtype)) if v.is_floating_point() else v
            for k, v in self.extras.items()
        }
        arrays = {**_prefixed("param", self.params), **_prefixed("extra", extras)}
        meta = {
            "type": "server_message",
            "round": self.round,
            "algorithm": self.algorithm,
            "dtype": self.dtype,
            "meta": self.meta,
        }
        return serialize.pack(arrays, meta=meta, symmetric=[f"extra/{s}" for s in self.symmetric])

    def seal(self) -> ServerMessage:
        """Casts `extras` to the wire dtype (what clients will see), sets `nbytes`; returns self."""
        wd = serialize.wire_dtype(self.dtype)
        self.extras = {
            k: v.to(wd).float() if v.is_floating_point() else v for k, v in self.extras.items()
        }
        self.nbytes = len(self.to_bytes())
        return self

    @staticmethod
    def from_bytes(data: bytes) -> ServerMessage:
        """Decodes `to_bytes()` (the client's side of the wire); float extras come back fp32."""
        p = serialize.unpack(data)
        if p.meta.get("type") != "server_message":
            raise ValueError(f"expected a server_message payload, got type {p.meta.get('type')!r}")
        parts = _split(p.arrays, ("param", "extra"))
        extras = {k: v.float() if v.is_floating_point() else v for k, v in parts["extra"].items()}
        return ServerMessage(
            round=int(p.meta["round"]),
            algorithm=str(p.meta["algorithm"]),
            params=parts["param"],
            extras=extras,
            meta=dict(p.meta["meta"]),
            symmetric=frozenset(s.partition("/")[2] for s in p.symmetric),
            dtype=str(p.meta["dtype"]),
            nbytes=len(data),
        )


@dataclass
class ServerState:
    """The server's whole state; `server_step` returns a new one and never mutates its input.

    Attributes:
        round: rounds completed.
        params: the global model theta_t (fp32 named arrays).
        buffers: algorithm state as named arrays (momentum, moments, control variates, curvature).
        config: the server config.
        meta: JSON scalars of the algorithm state.
        log: the last round's server log (accepted / rejected clients with reasons, timings).
    """

    round: int
    params: Arrays
    config: ServerConfig
    buffers: Arrays = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    log: dict[str, Any] = field(default_factory=dict)

    def copy(self) -> ServerState:
        """A deep copy (tensors cloned)."""
        return ServerState(
            round=self.round,
            params={k: v.clone() for k, v in self.params.items()},
            config=self.config,
            buffers={k: v.clone() for k, v in self.buffers.items()},
            meta=copy.deepcopy(self.meta),
            log=copy.deepcopy(self.log),
        )


# --- dispatch ----------------------------------------------------------------------------------


def server_init(params: Arrays, config: ServerConfig) -> tuple[ServerState, ServerMessage]:
    """The initial server state and the first round's message.

    Args:
        params: the initial global model (named arrays; cloned to fp32).
        config: the server config; `config.algorithm` picks the algorithm.

    Returns:
        (state, message for round 0).
    """
    from fedng.federated.algorithms.registry import get_algorithm

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
    from fedng.federated.algorithms.registry import get_algorithm

    if config.algorithm != server_message.algorithm:
        raise ValueError(
            f"client_step: 'config.algorithm' must match the server message's algorithm"
            f" {server_message.algorithm!r}, got {config.algorithm!r}"
        )
    upd = get_algorithm(config.algorithm).client_step(
        model, data, server_message, config, dict(client_state or {})
    )
    return upd.seal()


def server_step(
    state: ServerState, updates: list[ClientUpdate]
) -> tuple[ServerState, ServerMessage]:
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
    from fedng.federated.algorithms.registry import get_algorithm
    from fedng.federated.validate import validate_updates

    t0 = time.perf_counter()
    algo = get_algorithm(state.config.algorithm)
    accepted, rejected = validate_updates(state, updates, algo)
    new = state.copy()
    new.log = {"accepted": [u.client_id for u in accepted], "rejected": rejected}
    if accepted:
        new = algo.aggregate(new, accepted)
        bad = [
            k
            for k, v in {**new.params, **new.buffers}.items()
            if v.is_floating_point() and not bool(torch.isfinite(v).all())
        ]
        if bad:
            rolled = state.copy()
            rolled.log = {
                "accepted": [],
                "rejected": rejected,
                "rolled_back": f"aggregation produced non-finite {bad[:5]}",
            }
            new = rolled
    else:
        new.log["skipped"] = "no valid update this round"
    new.round = state.round + 1
    message = algo.broadcast(new).seal()
    new.log["server_time_s"] = time.perf_counter() - t0
    return new, message


def weights_of(updates: list[ClientUpdate]) -> list[float]:
    """Aggregation weights p_k = n_k / sum n (uniform if every n_k is 0)."""
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        return [1.0 / len(updates)] * len(updates)
    return [u.num_examples / total for u in updates]
