"""FedAvg (McMahan et al. 2017); FedAvgM (Hsu et al. 2019) is FedAvg with server momentum."""

from __future__ import annotations

from fedng.federated.algorithms.base import Algorithm
from fedng.federated.config.first_order import FedAvgConfig


class FedAvg(Algorithm[FedAvgConfig]):
    """Local SGD, weighted mean of deltas, server learning rate and heavy-ball momentum
    (`ServerConfig.server_momentum`; "fedavgm" presets it to 0.9)."""

    config_type = FedAvgConfig
