"""The config of FIPA (Fisher-informed parameterwise aggregation) and its summable variant."""

from __future__ import annotations

from dataclasses import dataclass

from fedng.federated.config.base import AlgorithmConfig, check, check_choice
from fedng.federated.wire import FLOAT_WIRE

FIPA_FISHERS: tuple[str, ...] = ("true", "empirical")
""""true": the model's expected Fisher (for MSE the Gauss-Newton matrix J^T J, for cross-entropy
J^T (diag p - p p^T) J); "empirical": outer products of the per-sample loss gradients."""
FIPA_EIGS: tuple[str, ...] = ("exact", "sketch")
"""How a FIPA client finds its top eigenpairs: "exact" (eigh of the per-sample Gram matrix) or
"sketch" (randomized Nystrom: `sketch_accumulate` + `nystrom`, rank + oversample columns)."""
FIPA_NULL_SPACES: tuple[str, ...] = ("mean", "drop")
"""Where no client's Fisher has curvature: the weighted mean delta ("mean") or nothing ("drop",
the formula as published)."""


@dataclass(frozen=True)
class FIPAConfig(AlgorithmConfig):
    """FIPA: clients send delta and a low-rank Fisher of the trainable parameters; the server
    steps by `H^+ sum_m p_m H_m delta_m`, `H = sum_m p_m H_m` (see
    `fedng.federated.aggregation.lowrank_fisher`).

    The same config serves "fipa" (each client sends its top-`rank` eigenpairs) and
    "fipa_sketch" (fedng's summable variant: each client sends the shared-seed sketch
    `H_m Omega` with `rank` columns and `H_m delta_m`).

    Attributes:
        rank: eigenpairs per client (fipa) or sketch columns (fipa_sketch).
        fisher_type: "true" or "empirical" (see `FIPA_FISHERS`).
        eig: "exact" or "sketch" (fipa's client eigenpairs; see `FIPA_EIGS`).
        oversample: extra sketch columns of eig="sketch" (the top `rank` are kept).
        sketch_seed: shared seed of the Gaussian test matrices.
        fisher_samples: at most this many of the client's examples enter its Fisher (0 = all).
        cutoff: the pseudo-inverse cutoff, relative to the largest eigenvalue of H. 1e-2 by
            measurement: on the PINN task 1e-6 and 1e-3 let near-parallel client Fishers
            produce steps 10-100x the deltas (H's small eigenvalues invert misaligned
            curvature), 1e-1 keeps only the top direction.
        null_space: "mean" or "drop" (see `FIPA_NULL_SPACES`).
        warmup_rounds: rounds of FedAvg before FIPA starts (no Fisher is computed or sent then).
        payload_dtype: wire dtype of the Fisher payload ("fp32", "bf16", "fp16").
    """

    rank: int = 8
    fisher_type: str = "true"
    eig: str = "sketch"
    oversample: int = 8
    sketch_seed: int = 1234
    fisher_samples: int = 0
    cutoff: float = 1e-2
    null_space: str = "mean"
    warmup_rounds: int = 0
    payload_dtype: str = "fp32"

    def __post_init__(self) -> None:
        c = "FIPAConfig"
        check(self.rank >= 1, c, "rank", ">= 1", self.rank)
        check_choice(c, "fisher_type", self.fisher_type, FIPA_FISHERS)
        check_choice(c, "eig", self.eig, FIPA_EIGS)
        check(self.oversample >= 0, c, "oversample", ">= 0", self.oversample)
        check(self.sketch_seed >= 0, c, "sketch_seed", ">= 0", self.sketch_seed)
        check(self.fisher_samples >= 0, c, "fisher_samples", ">= 0", self.fisher_samples)
        check(0 <= self.cutoff < 1, c, "cutoff", "in [0, 1)", self.cutoff)
        check_choice(c, "null_space", self.null_space, FIPA_NULL_SPACES)
        check(self.warmup_rounds >= 0, c, "warmup_rounds", ">= 0", self.warmup_rounds)
        check_choice(c, "payload_dtype", self.payload_dtype, FLOAT_WIRE)
