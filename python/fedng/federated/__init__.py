"""Federated learning on one protocol: FedNG, first-order baselines, offline tasks, a simulator.

    client_step(model, data, server_message, config) -> ClientUpdate
    server_step(state, updates) -> (state, server_message)

Algorithms (`ClientConfig.algorithm` / `ServerConfig.algorithm`): fedavg, fedavgm, fedprox,
scaffold, fedadam, fedyogi, fedadagrad, fedng, fedfisher. Run them with `simulate` or
`fedng simulate` (see `fedng.cli`).
"""

from fedng.federated.config import ClientConfig, ServerConfig
from fedng.federated.history import History, RoundRecord
from fedng.federated.presets import make_configs
from fedng.federated.protocol import (
    ClientUpdate,
    ServerMessage,
    ServerState,
    client_step,
    server_init,
    server_step,
)
from fedng.federated.simulator import simulate
from fedng.federated.tasks.base import ClientData, FederatedTask
from fedng.federated.tasks.registry import TASKS, make_task

__all__ = [
    "TASKS",
    "ClientConfig",
    "ClientData",
    "ClientUpdate",
    "FederatedTask",
    "History",
    "RoundRecord",
    "ServerConfig",
    "ServerMessage",
    "ServerState",
    "client_step",
    "make_configs",
    "make_task",
    "server_init",
    "server_step",
    "simulate",
]
