"""Configs: the knobs every algorithm shares (`ClientConfig`, `ServerConfig`) and each
algorithm's own typed config (`FedProxConfig`, `FedOptConfig`, `FedNGConfig`, ...)."""

from fedng.federated.config.base import AlgorithmConfig
from fedng.federated.config.catalog import ALGORITHMS, CONFIG_TYPES, SERVER_PRESETS
from fedng.federated.config.common import ClientConfig, ServerConfig
from fedng.federated.config.curvature import (
    CurvatureConfig,
    FedFisherConfig,
    FedNGConfig,
    curvature_mapping,
    parse_curvature,
)
from fedng.federated.config.fipa import FIPAConfig
from fedng.federated.config.first_order import (
    FedAvgConfig,
    FedOptConfig,
    FedProxConfig,
    ScaffoldConfig,
)
from fedng.federated.config.make import make_configs, parse_value, setting_names

__all__ = [
    "ALGORITHMS",
    "CONFIG_TYPES",
    "SERVER_PRESETS",
    "AlgorithmConfig",
    "ClientConfig",
    "CurvatureConfig",
    "FIPAConfig",
    "FedAvgConfig",
    "FedFisherConfig",
    "FedNGConfig",
    "FedOptConfig",
    "FedProxConfig",
    "ScaffoldConfig",
    "ServerConfig",
    "curvature_mapping",
    "make_configs",
    "parse_curvature",
    "parse_value",
    "setting_names",
]
