"""Federated learning on one protocol: FedNG, first-order baselines, offline tasks, a simulator.

    client_step(model, data, server_message, config) -> ClientUpdate
    server_step(state, updates) -> (state, server_message)

Algorithms (`ClientConfig.algorithm` / `ServerConfig.algorithm`): fedavg, fedavgm, fedprox,
scaffold, fedadam, fedyogi, fedadagrad, fedng, fedfisher; each owns a typed config
(`ClientConfig.options`, e.g. `FedNGConfig`). Run them with `simulate` or `fedng simulate` (see
`fedng.cli`).

Sub-layers, lowest first (a module imports only from its own layer or lower ones; enforced by
tests/test_layering.py): wire, losses < messages < config, tasks < aggregation, client,
checkpoint < algorithms < validate < round < report < resume < simulator.
"""

from fedng.federated.algorithms.registry import get_algorithm
from fedng.federated.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    save_model,
)
from fedng.federated.config import (
    ALGORITHMS,
    AlgorithmConfig,
    ClientConfig,
    FedAvgConfig,
    FedFisherConfig,
    FedNGConfig,
    FedOptConfig,
    FedProxConfig,
    ScaffoldConfig,
    ServerConfig,
    make_configs,
)
from fedng.federated.messages import ClientUpdate, ServerMessage, ServerState
from fedng.federated.report.history import History, RoundRecord
from fedng.federated.round import client_step, server_init, server_step
from fedng.federated.simulator import simulate
from fedng.federated.tasks.base import ClientData, FederatedTask
from fedng.federated.tasks.registry import TASKS, make_task

__all__ = [
    "ALGORITHMS",
    "TASKS",
    "AlgorithmConfig",
    "Checkpoint",
    "CheckpointError",
    "ClientConfig",
    "ClientData",
    "ClientUpdate",
    "FedAvgConfig",
    "FedFisherConfig",
    "FedNGConfig",
    "FedOptConfig",
    "FedProxConfig",
    "FederatedTask",
    "History",
    "RoundRecord",
    "ScaffoldConfig",
    "ServerConfig",
    "ServerMessage",
    "ServerState",
    "client_step",
    "get_algorithm",
    "load_checkpoint",
    "make_configs",
    "make_task",
    "save_checkpoint",
    "save_model",
    "server_init",
    "server_step",
    "simulate",
]
