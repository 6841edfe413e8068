"""Adaptive server optimizers (Reddi et al. 2021): FedAdam, FedYogi, FedAdagrad."""

from __future__ import annotations

import torch

from fedng.federated.algorithms.base import Algorithm, mean_delta
from fedng.federated.protocol import ClientUpdate, ServerState


class FedOpt(Algorithm):
    """Treats the mean delta as a pseudo-gradient: `m = b1 m + (1-b1) d`, a second moment `v`
    (Adam / Yogi / Adagrad rule), `theta += server_lr * m / (sqrt(v) + tau)`; v starts at tau^2.
    """

    name = "fedopt"
    rule = "adam"

    def init_state(self, state: ServerState) -> ServerState:
        """m = 0, v = tau^2."""
        tau2 = state.config.tau**2
        for k, v in state.params.items():
            state.buffers[f"m/{k}"] = torch.zeros_like(v)
            state.buffers[f"v/{k}"] = torch.full_like(v, tau2)
        return state

    def aggregate(self, state: ServerState, updates: list[ClientUpdate]) -> ServerState:
        """One adaptive server step."""
        cfg = state.config
        for k, d in mean_delta(updates).items():
            m = cfg.beta1 * state.buffers[f"m/{k}"] + (1 - cfg.beta1) * d
            v = state.buffers[f"v/{k}"]
            d2 = d * d
            if self.rule == "adam":
                v = cfg.beta2 * v + (1 - cfg.beta2) * d2
            elif self.rule == "yogi":
                v = v - (1 - cfg.beta2) * d2 * torch.sign(v - d2)
            else:
                v = v + d2
            state.buffers[f"m/{k}"], state.buffers[f"v/{k}"] = m, v
            state.params[k] = state.params[k] + cfg.server_lr * m / (v.sqrt() + cfg.tau)
        return state


class FedAdam(FedOpt):
    """FedAdam."""

    name = "fedadam"
    rule = "adam"


class FedYogi(FedOpt):
    """FedYogi."""

    name = "fedyogi"
    rule = "yogi"


class FedAdagrad(FedOpt):
    """FedAdagrad."""

    name = "fedadagrad"
    rule = "adagrad"
