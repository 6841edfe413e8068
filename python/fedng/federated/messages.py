"""The messages of the one federated protocol: what a client sends, what the server broadcasts,
and the server's state.

Updates and messages are named arrays plus JSON scalars, and each knows its exact serialized size
(`len(update.to_bytes())`, the `fedng.federated.wire` format).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from fedng._typing import Arrays
from fedng.federated import wire

ConfigT = TypeVar("ConfigT")
"""The type of the config a `ServerState` carries (`ServerConfig`; kept generic so that message
types do not depend on the config layer)."""


def _prefixed(prefix: str, arrays: Arrays) -> Arrays:
    return {f"{prefix}/{k}": v for k, v in arrays.items()}


def _split(arrays: Arrays, prefixes: tuple[str, ...]) -> dict[str, Arrays]:
    out: dict[str, Arrays] = {p: {} for p in prefixes}
    for k, v in arrays.items():
        head, sep, tail = k.partition("/")
        if not sep or head not in out:
            raise wire.PayloadError(f"payload array {k!r:.60} has no known prefix ({prefixes})")
        out[head][tail] = v
    return out


def _int(meta: dict[str, Any], key: str, low: int) -> int:
    """`meta[key]`, which must be a JSON integer >= `low` (not a float, not a bool)."""
    v = meta.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise wire.PayloadError(f"payload '{key}' must be an integer >= {low}, got {v!r:.40}")
    return v


def _obj(meta: dict[str, Any], key: str) -> dict[str, Any]:
    """`meta[key]`, which must be a JSON object."""
    v = meta.get(key)
    if not isinstance(v, dict):
        raise wire.PayloadError(f"payload '{key}' must be an object, got {type(v).__name__}")
    return v


def _metrics(meta: dict[str, Any]) -> dict[str, float]:
    """`meta["metrics"]`: an object of numbers (not bools)."""
    m = _obj(meta, "metrics")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in m.values()):
        raise wire.PayloadError("payload 'metrics' must map names to numbers")
    return {k: float(v) for k, v in m.items()}


def _check_type(meta: dict[str, Any], expected: str) -> None:
    if meta.get("type") != expected:
        raise wire.PayloadError(f"expected a {expected} payload, got type {meta.get('type')!r:.40}")


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
        """The update's wire bytes (`fedng.federated.wire` format)."""
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
        return wire.pack(arrays, meta=meta, symmetric=[f"curv/{s}" for s in self.symmetric])

    def seal(self) -> ClientUpdate:
        """Sets `nbytes` to the exact serialized size; returns self."""
        self.nbytes = len(self.to_bytes())
        return self

    @staticmethod
    def from_bytes(data: bytes) -> ClientUpdate:
        """Decodes `to_bytes()` (the server's side of the wire).

        Integers must be JSON integers (`num_examples` 2.7, 1e9 or `true` is rejected); the
        server's own bounds (e.g. `ServerConfig.max_num_examples`) are checked by
        `fedng.federated.validate`.

        Raises:
            PayloadError: corrupt bytes or not a well-formed client update (the only exception
                this raises).
        """
        p = wire.unpack(data)
        _check_type(p.meta, "client_update")
        parts = _split(p.arrays, ("delta", "curv", "extra"))
        sym = frozenset(s.partition("/")[2] for s in p.symmetric)
        if any(not s.startswith("curv/") for s in p.symmetric):
            raise wire.PayloadError("only curvature arrays may travel as packed triangles")
        return ClientUpdate(
            client_id=_int(p.meta, "client_id", 0),
            round=_int(p.meta, "round", 0),
            delta=parts["delta"],
            num_examples=_int(p.meta, "num_examples", 1),
            curvature=parts["curv"],
            extras=parts["extra"],
            metrics=_metrics(p.meta),
            meta=dict(_obj(p.meta, "meta")),
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

    def _wire_meta(self) -> dict[str, Any]:
        return {
            "type": "server_message",
            "round": self.round,
            "algorithm": self.algorithm,
            "dtype": self.dtype,
            "meta": self.meta,
        }

    def to_bytes(self) -> bytes:
        """The message's wire bytes."""
        extras = {
            k: v.to(wire.wire_dtype(self.dtype)) if v.is_floating_point() else v
            for k, v in self.extras.items()
        }
        arrays = {**_prefixed("param", self.params), **_prefixed("extra", extras)}
        return wire.pack(
            arrays, meta=self._wire_meta(), symmetric=[f"extra/{s}" for s in self.symmetric]
        )

    def seal(self) -> ServerMessage:
        """Casts `extras` to the wire dtype (what clients will see), sets `nbytes` (the exact
        `len(self.to_bytes())`, counted without serializing); returns self."""
        wd = wire.wire_dtype(self.dtype)
        self.extras = {
            k: v.to(wd).float() if v.is_floating_point() else v for k, v in self.extras.items()
        }
        self.nbytes = wire.packed_size(
            [(f"param/{k}", v.dtype, v.shape) for k, v in self.params.items()]
            + [
                (f"extra/{k}", wd if v.is_floating_point() else v.dtype, v.shape)
                for k, v in self.extras.items()
            ],
            meta=self._wire_meta(),
            symmetric=[f"extra/{s}" for s in self.symmetric],
        )
        return self

    @staticmethod
    def from_bytes(data: bytes) -> ServerMessage:
        """Decodes `to_bytes()` (the client's side of the wire); float extras come back fp32.

        Raises:
            PayloadError: corrupt bytes or not a well-formed server message (the only exception
                this raises).
        """
        p = wire.unpack(data)
        _check_type(p.meta, "server_message")
        parts = _split(p.arrays, ("param", "extra"))
        extras = {k: v.float() if v.is_floating_point() else v for k, v in parts["extra"].items()}
        algorithm, dtype = p.meta.get("algorithm"), p.meta.get("dtype")
        if not isinstance(algorithm, str) or dtype not in wire.FLOAT_WIRE:
            raise wire.PayloadError("server message: bad 'algorithm' or 'dtype'")
        return ServerMessage(
            round=_int(p.meta, "round", 0),
            algorithm=algorithm,
            params=parts["param"],
            extras=extras,
            meta=dict(_obj(p.meta, "meta")),
            symmetric=frozenset(s.partition("/")[2] for s in p.symmetric),
            dtype=str(dtype),
            nbytes=len(data),
        )


@dataclass
class ServerState(Generic[ConfigT]):
    """The server's whole state; `server_step` returns a new one and never mutates its input.

    Attributes:
        round: rounds completed.
        params: the global model theta_t (fp32 named arrays).
        config: the server config (a `fedng.federated.config.ServerConfig`).
        buffers: algorithm state as named arrays (momentum, moments, control variates, curvature).
        meta: JSON scalars of the algorithm state.
        log: the last round's server log (accepted / rejected clients with reasons, timings).
    """

    round: int
    params: Arrays
    config: ConfigT
    buffers: Arrays = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    log: dict[str, Any] = field(default_factory=dict)

    def copy(self) -> ServerState[ConfigT]:
        """A deep copy (tensors cloned)."""
        return ServerState(
            round=self.round,
            params={k: v.clone() for k, v in self.params.items()},
            config=self.config,
            buffers={k: v.clone() for k, v in self.buffers.items()},
            meta=copy.deepcopy(self.meta),
            log=copy.deepcopy(self.log),
        )
