"""Adaptive server optimizers (Reddi et al. 2021): FedAdam, FedYogi, FedAdagrad."""

from __future__ import annotations

from typing import Literal

import torch

from fedng.federated.aggregation.mean import mean_delta
from fedng.federated.algorithms.base import Algorithm, State
from fedng.federated.config.first_order import FedOptConfig
from fedng.federated.messages import ClientUpdate

Rule = Literal["adam", "yogi", "adagrad"]


class FedOpt(Algorithm[FedOptConfig]):
    """Treats the mean delta as a pseudo-gradient: `m = b1 m + (1-b1) d`, a second moment `v`
    (Adam / Yogi / Adagrad rule), `theta += server_lr * m / (sqrt(v) + tau)`; v starts at tau^2.
    """

    config_type = FedOptConfig

    def __init__(self, name: str, rule: Rule) -> None:
        super().__init__(name)
        self.rule = rule

    def init_state(self, state: State) -> State:
        """m = 0, v = tau^2."""
        tau2 = self.options(state.config).tau ** 2
        for k, v in state.params.items():
            state.buffers[f"m/{k}"] = torch.zeros_like(v)
            state.buffers[f"v/{k}"] = torch.full_like(v, tau2)
        return state

    def aggregate(self, state: State, updates: list[ClientUpdate]) -> State:
        """One adaptive server step."""
        opt, lr = self.options(state.config), state.config.server_lr
        for k, d in mean_delta(updates).items():
            m = opt.beta1 * state.buffers[f"m/{k}"] + (1 - opt.beta1) * d
            v = state.buffers[f"v/{k}"]
            d2 = d * d
            if self.rule == "adam":
                v = opt.beta2 * v + (1 - opt.beta2) * d2
            elif self.rule == "yogi":
                v = v - (1 - opt.beta2) * d2 * torch.sign(v - d2)
            else:
                v = v + d2
            state.buffers[f"m/{k}"], state.buffers[f"v/{k}"] = m, v
            state.params[k] = state.params[k] + lr * m / (v.sqrt() + opt.tau)
        return state
