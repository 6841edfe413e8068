"""Default hyperparameters per algorithm, and `key=value` overrides (CLI and benchmark)."""

from __future__ import annotations

import dataclasses
from typing import Any

from fedng.federated.config import ALGORITHMS, ClientConfig, ServerConfig

PRESETS: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "fedavgm": {"server_momentum": 0.9},
    "fedprox": {"prox_mu": 0.01},
    "scaffold": {},
    "fedadam": {"server_lr": 0.03},
    "fedyogi": {"server_lr": 0.03},
    "fedadagrad": {"server_lr": 0.1},
    "fedng": {
        "precond": "global_local",
        "curvature": "kfac",
        "damping": 0.01,
        "aggregation": "fisher",
        "fisher_center": "mean",
        "fisher_damping": 0.1,
    },
    "fedfisher": {"curvature": "diag", "local_epochs": 5.0, "aggregation": "fisher"},
}
"""Per-algorithm defaults (keys of ClientConfig and/or ServerConfig; `damping` sets both).

FedNG's default is the configuration the tuning of `bench/bench_fl.py` picked on both benchmark
tasks under its default criterion (mean validation accuracy over rounds; see
bench/results/bench_fl.md): the server's K-FAC curvature refreshed by the client's own, and
K-FAC Fisher-weighted aggregation with the damping centered on the mean delta."""

_CLIENT = {f.name for f in dataclasses.fields(ClientConfig)}
_SERVER = {f.name for f in dataclasses.fields(ServerConfig)}


def parse_value(text: str) -> Any:
    """'1' -> 1, '0.5' -> 0.5, 'true' -> True, anything else -> the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def make_configs(
    algorithm: str, settings: dict[str, Any] | None = None
) -> tuple[ClientConfig, ServerConfig]:
    """Client and server configs of `algorithm`: its preset, then `settings` on top.

    A key goes to whichever config has it (both, for shared names such as `damping`).

    Raises:
        ValueError: an unknown algorithm or key.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"'algorithm' must be one of {list(ALGORITHMS)}, got {algorithm!r}")
    merged = {**PRESETS.get(algorithm, {}), **(settings or {})}
    unknown = sorted(k for k in merged if k not in _CLIENT | _SERVER)
    if unknown:
        raise ValueError(
            f"unknown setting(s) {unknown} for {algorithm}; expected fields of"
            " ClientConfig or ServerConfig"
        )
    if algorithm == "fedng" and "broadcast" not in (settings or {}):
        precond = merged.get("precond", "global")
        merged["broadcast"] = {"global": "inverse", "global_local": "factors"}.get(precond, "none")
    client = ClientConfig(
        algorithm=algorithm,
        **{k: v for k, v in merged.items() if k in _CLIENT and k != "algorithm"},
    )
    server = ServerConfig(
        algorithm=algorithm,
        **{k: v for k, v in merged.items() if k in _SERVER and k != "algorithm"},
    )
    return client, server
