"""Server-side aggregation: the weighted mean of the clients' deltas with the server step, and the
Fisher-weighted merge `(sum p_k F_k + lambda I)^-1 sum p_k F_k delta_k`."""

from fedng.federated.aggregation.fisher_merge import merge_diag, merge_kfac, merge_lowrank
from fedng.federated.aggregation.fisher_weighted import fisher_weighted_step
from fedng.federated.aggregation.mean import apply_server_step, mean_delta, weights_of

__all__ = [
    "apply_server_step",
    "fisher_weighted_step",
    "mean_delta",
    "merge_diag",
    "merge_kfac",
    "merge_lowrank",
    "weights_of",
]
