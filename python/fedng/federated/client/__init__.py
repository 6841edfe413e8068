"""Clients' local training: parameters as named arrays, the shared local SGD loop, FedNG's
natural-gradient loop, the Fisher at a point (one-shot Fisher merging) and the warning about layers
without curvature."""

from fedng.federated.client.fisher import fisher_at
from fedng.federated.client.layers import warn_unsupported_layers
from fedng.federated.client.natural_gradient import LocalResult, natural_gradient_local
from fedng.federated.client.params import get_params, set_params, sub
from fedng.federated.client.sgd import GradHook, batch_indices, local_sgd, round_seed

__all__ = [
    "GradHook",
    "LocalResult",
    "batch_indices",
    "fisher_at",
    "get_params",
    "local_sgd",
    "natural_gradient_local",
    "round_seed",
    "set_params",
    "sub",
    "warn_unsupported_layers",
]
