"""Algorithm names -> implementations, built once at import (the names of
`fedng.federated.config.ALGORITHMS`)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from fedng.federated.algorithms.base import Algorithm
from fedng.federated.algorithms.fedavg import FedAvg
from fedng.federated.algorithms.fedfisher import FedFisher
from fedng.federated.algorithms.fedng import FedNG
from fedng.federated.algorithms.fedopt import FedOpt
from fedng.federated.algorithms.fedprox import FedProx
from fedng.federated.algorithms.fipa import FIPA
from fedng.federated.algorithms.scaffold import Scaffold
from fedng.federated.config.catalog import ALGORITHMS

REGISTRY: Mapping[str, Algorithm[Any]] = MappingProxyType(
    {
        a.name: a
        for a in (
            FedAvg("fedavg"),
            FedAvg("fedavgm"),
            FedProx("fedprox"),
            Scaffold("scaffold"),
            FedOpt("fedadam", "adam"),
            FedOpt("fedyogi", "yogi"),
            FedOpt("fedadagrad", "adagrad"),
            FedNG("fedng"),
            FedFisher("fedfisher"),
            FIPA("fipa"),
            FIPA("fipa_sketch", summable=True),
        )
    }
)
"""Every algorithm by name; FedAvgM is FedAvg under its own name (its preset adds momentum)."""


def get_algorithm(name: str) -> Algorithm[Any]:
    """The algorithm called `name` (one of `fedng.federated.config.ALGORITHMS`).

    Raises:
        ValueError: an unknown name.
    """
    if name not in REGISTRY:
        raise ValueError(f"get_algorithm: 'name' must be one of {list(ALGORITHMS)}, got {name!r}")
    return REGISTRY[name]
