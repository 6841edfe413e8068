"""SCAFFOLD (Karimireddy et al. 2020), option II control variates."""

from __future__ import annotations

import torch
from torch import nn

from fedng._typing import Arrays
from fedng.federated.aggregation.mean import apply_server_step, mean_delta
from fedng.federated.algorithms.base import Algorithm, State
from fedng.federated.client.params import get_params, set_params
from fedng.federated.client.sgd import local_sgd
from fedng.federated.config.common import ClientConfig
from fedng.federated.config.first_order import ScaffoldConfig
from fedng.federated.messages import ClientUpdate, ServerMessage
from fedng.federated.tasks.base import ClientData


class Scaffold(Algorithm[ScaffoldConfig]):
    """Local steps `y <- y - lr (g(y) + c - c_k)`; afterwards
    `c_k+ = c_k - c + (x - y) / (K lr)`; uploads `y - x` and `c_k+ - c_k`; the server sets
    `x += server_lr * sum_k p_k (y_k - x)` and `c += (1/N) sum_{k in S} (c_k+ - c_k)`.

    Server buffers: `c/<param>`. Client state: `c/<param>`. Extras sent up: `dc/<param>`;
    broadcast: `c/<param>`.
    """

    config_type = ScaffoldConfig

    def init_state(self, state: State) -> State:
        """c = 0."""
        for k, v in state.params.items():
            state.buffers[f"c/{k}"] = torch.zeros_like(v)
        return state

    def broadcast(self, state: State) -> ServerMessage:
        """theta and the server control variate c."""
        extras = {k: v for k, v in state.buffers.items() if k.startswith("c/")}
        return ServerMessage(state.round, self.name, state.params, extras)

    def expected_extras(self, state: State) -> dict[str, tuple[int, ...]]:
        """One `dc/<param>` per parameter."""
        return {f"d{k}": tuple(v.shape) for k, v in state.buffers.items() if k.startswith("c/")}

    def client_step(
        self,
        model: nn.Module,
        data: ClientData,
        message: ServerMessage,
        config: ClientConfig,
        client_state: Arrays,
    ) -> ClientUpdate:
        """Corrected local SGD and the control-variate update."""
        set_params(model, message.params)
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        c = {k: message.extras[f"c/{k}"].float() for k, _ in named}
        ck = {k: client_state.get(f"c/{k}", torch.zeros_like(c[k])) for k, _ in named}
        corr = {k: c[k] - ck[k] for k, _ in named}

        def correct(_step: int) -> None:
            with torch.no_grad():
                for k, p in named:
                    if p.grad is not None:
                        p.grad.add_(corr[k])

        metrics = local_sgd(model, data, config, message.round, grad_hook=correct)
        y = get_params(model)
        scale = 1.0 / (config.local_steps * config.lr)
        ck_new = {k: ck[k] - c[k] + (message.params[k] - y[k]) * scale for k, _ in named}
        upd = self.make_update(
            model, data, message, config, metrics, {f"c/{k}": v for k, v in ck_new.items()}
        )
        upd.extras = {f"dc/{k}": ck_new[k] - ck[k] for k, _ in named}
        return upd

    def aggregate(self, state: State, updates: list[ClientUpdate]) -> State:
        """x += server_lr * weighted mean delta; c += (|S|/N) * mean dc."""
        apply_server_step(state, mean_delta(updates))
        n = state.config.num_clients
        for u in updates:
            for k, v in u.extras.items():
                key = k[1:]  # "dc/<p>" -> "c/<p>"
                state.buffers[key] = state.buffers[key] + v.float() / n
        return state
