"""Both configs of an algorithm from one flat dict of settings (the CLI's and the benchmark's)."""

from __future__ import annotations

from typing import Any

from fedng.federated.config.catalog import ALGORITHMS, SERVER_PRESETS, config_type, owners
from fedng.federated.config.common import COMMON_KEYS, ClientConfig, ServerConfig


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


def setting_names(algorithm: str) -> frozenset[str]:
    """The keys `make_configs(algorithm, ...)` takes: the common knobs and the algorithm's own.

    Raises:
        ValueError: an unknown algorithm.
    """
    return COMMON_KEYS | frozenset(config_type(algorithm, "setting_names").field_names())


def make_configs(
    algorithm: str, settings: dict[str, Any] | None = None
) -> tuple[ClientConfig, ServerConfig]:
    """Client and server configs of `algorithm`: its defaults, then `settings` on top.

    A key goes to the config that has it: `ClientConfig`, `ServerConfig`, or the algorithm's own
    config (shared by both). FedAvgM, FedAdam, FedYogi and FedAdagrad preset common server knobs
    (`SERVER_PRESETS`).

    Raises:
        ValueError: an unknown algorithm, or a key that is not a setting of `algorithm` (one
            line, naming the algorithms that own it and the valid keys).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"'algorithm' must be one of {list(ALGORITHMS)}, got {algorithm!r}")
    given = {k: v for k, v in (settings or {}).items() if k != "algorithm"}
    valid = setting_names(algorithm)
    unknown = sorted(set(given) - valid)
    if unknown:
        elsewhere = [f"'{k}' is a setting of {', '.join(owners(k))}" for k in unknown if owners(k)]
        hint = f" ({'; '.join(elsewhere)})" if elsewhere else ""
        raise ValueError(
            f"unknown setting(s) {unknown} for {algorithm}{hint}; valid keys: {sorted(valid)}"
        )
    kind = config_type(algorithm, "make_configs")
    options = kind(**{k: v for k, v in given.items() if k in kind.field_names()})
    client = ClientConfig(
        algorithm=algorithm,
        options=options,
        **{k: v for k, v in given.items() if k in ClientConfig.common_names()},
    )
    server = ServerConfig(
        algorithm=algorithm,
        options=options,
        **{
            **SERVER_PRESETS.get(algorithm, {}),
            **{k: v for k, v in given.items() if k in ServerConfig.common_names()},
        },
    )
    return client, server
