"""The configs of the first-order algorithms: FedAvg(M), FedProx, SCAFFOLD, FedOpt."""

from __future__ import annotations

from dataclasses import dataclass

from fedng.federated.config.base import AlgorithmConfig, check


@dataclass(frozen=True)
class FedAvgConfig(AlgorithmConfig):
    """FedAvg and FedAvgM (FedAvg with `ServerConfig.server_momentum`): no knobs of their own."""


@dataclass(frozen=True)
class ScaffoldConfig(AlgorithmConfig):
    """SCAFFOLD: no knobs of its own (it reads `ServerConfig.num_clients`)."""


@dataclass(frozen=True)
class FedProxConfig(AlgorithmConfig):
    """FedProx.

    The preset mu = 0.1 was measured against FedAvg (3 seeds, 20 rounds, participation 0.5,
    10 local steps of batch 32; digits alpha=0.1 at lr 0.05 and 0.1, Synthetic(1,1) at lr 0.05):
    mu = 0.01 gives FedAvg's curve (mean |accuracy difference| over rounds 0.0005-0.0015), mu = 0.1
    is the largest mu that differs without costing accuracy (0.003-0.009; final within 0.006 of
    FedAvg's), and mu = 1 differs clearly but loses 2-5 points of final accuracy.

    Attributes:
        prox_mu: the proximal coefficient mu of `f_k(w) + mu/2 ||w - w_t||^2` (default 0.1).
    """

    prox_mu: float = 0.1

    def __post_init__(self) -> None:
        check(self.prox_mu >= 0, "FedProxConfig", "prox_mu", ">= 0", self.prox_mu)


@dataclass(frozen=True)
class FedOptConfig(AlgorithmConfig):
    """FedAdam, FedYogi, FedAdagrad (the step size is `ServerConfig.server_lr`).

    Attributes:
        beta1: first-moment decay.
        beta2: second-moment decay (Adam, Yogi).
        tau: adaptivity epsilon (and sqrt of the second moment's initial value).
    """

    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        c = "FedOptConfig"
        check(0 <= self.beta1 < 1, c, "beta1", "in [0, 1)", self.beta1)
        check(0 <= self.beta2 < 1, c, "beta2", "in [0, 1)", self.beta2)
        check(self.tau > 0, c, "tau", "> 0", self.tau)
