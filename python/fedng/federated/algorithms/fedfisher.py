"""One-shot Fisher merging (FedFisher-style; Jhunjhunwala et al. 2024), no server-held data.

One round: every client trains from theta_0 to (near) its local optimum, computes the Fisher of
its data at that point (diagonal, K-FAC or low-rank, per layer), and uploads delta_k and F_k;
the server merges `theta = theta_0 + (sum p_k F_k + lambda I)^-1 sum p_k F_k delta_k`, the
minimizer of the Laplace-approximated global posterior `sum_k p_k ||theta - theta_k||^2_{F_k}`
(damped toward theta_0).
"""

from __future__ import annotations

import math

from torch import nn

from fedng.federated.algorithms.base import apply_server_step
from fedng.federated.algorithms.fedng import FedNG, attach_curvature, fisher_weighted_step
from fedng.federated.config import ClientConfig
from fedng.federated.local import local_sgd, set_params
from fedng.federated.ng_client import fisher_at
from fedng.federated.protocol import Arrays, ClientUpdate, ServerMessage, ServerState
from fedng.federated.tasks.base import ClientData


class FedFisher(FedNG):
    """One-shot Fisher merging on the FedNG machinery (one round of communication)."""

    name = "fedfisher"
    max_rounds = 1

    def client_step(
        self,
        model: nn.Module,
        data: ClientData,
        message: ServerMessage,
        config: ClientConfig,
        client_state: Arrays,
    ) -> ClientUpdate:
        """Local SGD for `local_epochs` epochs (or `local_steps`), then the Fisher there."""
        set_params(model, message.params)
        steps = (
            math.ceil(config.local_epochs * data.num_examples / config.batch_size)
            if config.local_epochs > 0
            else config.local_steps
        )
        metrics = local_sgd(model, data, config, message.round, steps=steps)
        cs = fisher_at(model, data, config)
        upd = self.make_update(model, data, message, config, metrics, client_state)
        attach_curvature(upd, cs, config.payload_dtype)
        return upd

    def broadcast(self, state: ServerState) -> ServerMessage:
        """theta only."""
        return ServerMessage(state.round, self.name, state.params)

    def aggregate(self, state: ServerState, updates: list[ClientUpdate]) -> ServerState:
        """Fisher merge of the deltas (always Fisher-weighted)."""
        from fedng.federated.algorithms.fedng import decoded_curvature

        if any(not u.curvature for u in updates):
            return super().aggregate(state, updates)
        sets = [decoded_curvature(u) for u in updates]
        step, log = fisher_weighted_step(
            updates,
            sets,
            state.config.fisher_damping,  # type: ignore[arg-type]
            state.config.cg_iters,
            state.config.cg_tol,
            state.config.fisher_center,
        )
        state.log.update(log)
        apply_server_step(state, step)
        return state
