"""FedAvg (McMahan et al. 2017) and FedAvgM (server momentum, Hsu et al. 2019)."""

from __future__ import annotations

from fedng.federated.algorithms.base import Algorithm


class FedAvg(Algorithm):
    """Local SGD, weighted mean of deltas, server learning rate (and momentum if configured)."""

    name = "fedavg"


class FedAvgM(Algorithm):
    """FedAvg with server heavy-ball momentum (`ServerConfig.server_momentum`)."""

    name = "fedavgm"
