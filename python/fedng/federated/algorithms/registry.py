"""Algorithm names -> implementations."""

from __future__ import annotations

import functools

from fedng.federated.algorithms.base import Algorithm
from fedng.federated.config import ALGORITHMS


@functools.cache
def get_algorithm(name: str) -> Algorithm:
    """The algorithm called `name` (one of `fedng.federated.config.ALGORITHMS`).

    Raises:
        ValueError: an unknown name.
    """
    from fedng.federated.algorithms.fedavg import FedAvg, FedAvgM
    from fedng.federated.algorithms.fedopt import FedAdagrad, FedAdam, FedYogi
    from fedng.federated.algorithms.fedprox import FedProx
    from fedng.federated.algorithms.scaffold import Scaffold

    table: dict[str, type[Algorithm]] = {
        "fedavg": FedAvg,
        "fedavgm": FedAvgM,
        "fedprox": FedProx,
        "scaffold": Scaffold,
        "fedadam": FedAdam,
        "fedyogi": FedYogi,
        "fedadagrad": FedAdagrad,
    }
    if name in ("fedng", "fedfisher"):
        from fedng.federated.algorithms.fedfisher import FedFisher
        from fedng.federated.algorithms.fedng import FedNG

        table["fedng"], table["fedfisher"] = FedNG, FedFisher
    if name not in table:
        raise ValueError(f"get_algorithm: 'name' must be one of {list(ALGORITHMS)}, got {name!r}")
    return table[name]()
