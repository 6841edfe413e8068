"""The algorithm names, the config type each one owns, and the common server knobs each presets.

`fedng.federated.algorithms.REGISTRY` holds the implementations under the same names.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from fedng.federated.config.base import AlgorithmConfig
from fedng.federated.config.curvature import FedFisherConfig, FedNGConfig
from fedng.federated.config.fipa import FIPAConfig
from fedng.federated.config.first_order import (
    FedAvgConfig,
    FedOptConfig,
    FedProxConfig,
    ScaffoldConfig,
)

CONFIG_TYPES: Mapping[str, type[AlgorithmConfig]] = MappingProxyType(
    {
        "fedavg": FedAvgConfig,
        "fedavgm": FedAvgConfig,
        "fedprox": FedProxConfig,
        "scaffold": ScaffoldConfig,
        "fedadam": FedOptConfig,
        "fedyogi": FedOptConfig,
        "fedadagrad": FedOptConfig,
        "fedng": FedNGConfig,
        "fedfisher": FedFisherConfig,
        "fipa": FIPAConfig,
        "fipa_sketch": FIPAConfig,
    }
)
"""Algorithm name -> the type of its own config."""

ALGORITHMS: tuple[str, ...] = tuple(CONFIG_TYPES)
"""Algorithm names understood by `client_step` / `server_step`."""

SERVER_PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "fedavgm": {"server_momentum": 0.9},
        "fedadam": {"server_lr": 0.03},
        "fedyogi": {"server_lr": 0.03},
        "fedadagrad": {"server_lr": 0.1},
    }
)
"""Common `ServerConfig` knobs an algorithm name presets in `make_configs` (FedAvgM is FedAvg with
server momentum)."""


def config_type(algorithm: str, where: str) -> type[AlgorithmConfig]:
    """The config type `algorithm` owns.

    Raises:
        ValueError: an unknown algorithm (naming `where`).
    """
    if algorithm not in CONFIG_TYPES:
        raise ValueError(
            f"{where}: 'algorithm' must be one of {list(ALGORITHMS)}, got {algorithm!r}"
        )
    return CONFIG_TYPES[algorithm]


def owners(key: str) -> list[str]:
    """The algorithms whose own config has a knob called `key`."""
    return [a for a, t in CONFIG_TYPES.items() if key in t.field_names()]
