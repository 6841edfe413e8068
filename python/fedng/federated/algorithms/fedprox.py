"""FedProx (Li et al. 2020): local objective + mu/2 ||w - w_t||^2."""

from __future__ import annotations

import torch
from torch import nn

from fedng._typing import Arrays
from fedng.federated.algorithms.base import Algorithm
from fedng.federated.client.params import set_params
from fedng.federated.client.sgd import local_sgd
from fedng.federated.config.common import ClientConfig
from fedng.federated.config.first_order import FedProxConfig
from fedng.federated.messages import ClientUpdate, ServerMessage
from fedng.federated.tasks.base import ClientData


class FedProx(Algorithm[FedProxConfig]):
    """FedAvg whose local gradients get the proximal term `mu (w - w_t)` added."""

    config_type = FedProxConfig

    def client_step(
        self,
        model: nn.Module,
        data: ClientData,
        message: ServerMessage,
        config: ClientConfig,
        client_state: Arrays,
    ) -> ClientUpdate:
        """Local SGD on `f_k(w) + mu/2 ||w - w_t||^2`."""
        set_params(model, message.params)
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        anchor = {k: message.params[k] for k, _ in named}
        mu = self.options(config).prox_mu

        def prox(_step: int) -> None:
            if mu == 0:
                return
            with torch.no_grad():
                for k, p in named:
                    if p.grad is not None:
                        p.grad.add_(p - anchor[k], alpha=mu)

        metrics = local_sgd(model, data, config, message.round, grad_hook=prox)
        return self.make_update(model, data, message, config, metrics, client_state)
