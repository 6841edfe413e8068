"""Federated algorithms on one protocol: FedAvg(M), FedProx, SCAFFOLD, FedAdam / FedYogi /
FedAdagrad, FedNG and one-shot Fisher merging (FedFisher)."""

from fedng.federated.algorithms.base import Algorithm
from fedng.federated.algorithms.registry import REGISTRY, get_algorithm

__all__ = ["REGISTRY", "Algorithm", "get_algorithm"]
