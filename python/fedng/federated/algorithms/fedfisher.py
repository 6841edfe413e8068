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

from fedng._typing import Arrays
from fedng.federated.aggregation.fisher_weighted import fisher_weighted_step
from fedng.federated.aggregation.mean import apply_server_step, mean_delta
from fedng.federated.algorithms.base import Algorithm, State
from fedng.federated.algorithms.curvature_payload import (
    attach_curvature,
    check_curvature_payload,
    curvature_trace,
    decoded_all,
)
from fedng.federated.client.fisher import fisher_at
from fedng.federated.client.layers import warn_unsupported_layers
from fedng.federated.client.params import set_params
from fedng.federated.client.sgd import local_sgd
from fedng.federated.config.common import ClientConfig
from fedng.federated.config.curvature import FedFisherConfig
from fedng.federated.messages import ClientUpdate, ServerMessage
from fedng.federated.tasks.base import ClientData


class FedFisher(Algorithm[FedFisherConfig]):
    """One-shot Fisher merging (one round of communication; the broadcast is theta only)."""

    config_type = FedFisherConfig
    max_rounds = 1

    def check_model(self, model: nn.Module) -> None:
        """Warns once about layers that get no curvature (they are merged by the plain mean)."""
        warn_unsupported_layers(model)

    def client_step(
        self,
        model: nn.Module,
        data: ClientData,
        message: ServerMessage,
        config: ClientConfig,
        client_state: Arrays,
    ) -> ClientUpdate:
        """Local SGD for `local_epochs` epochs (or `local_steps`), then the Fisher there."""
        opts = self.options(config)
        set_params(model, message.params)
        steps = (
            math.ceil(opts.local_epochs * data.num_examples / config.batch_size)
            if opts.local_epochs > 0
            else config.local_steps
        )
        metrics = local_sgd(model, data, config, message.round, steps=steps)
        cs = fisher_at(model, data, config, opts)
        upd = self.make_update(model, data, message, config, metrics, client_state)
        attach_curvature(upd, cs, opts.payload_dtype)
        return upd

    def check_curvature(self, state: State, update: ClientUpdate) -> str | None:
        """Decodes and checks a curvature payload: layout vs the model, finite/symmetric/PSD."""
        return check_curvature_payload(state, update)

    def curvature_scale(self, state: State, update: ClientUpdate) -> float | None:
        """tr(F_k), for the round-median sanity check."""
        return curvature_trace(update)

    def aggregate(self, state: State, updates: list[ClientUpdate]) -> State:
        """Fisher merge of the deltas; the weighted mean if an update came without curvature."""
        if any(not u.curvature for u in updates):
            apply_server_step(state, mean_delta(updates))
            state.log["aggregation"] = "mean"
            return state
        opts = self.options(state.config)
        step, log = fisher_weighted_step(
            updates,
            decoded_all(updates),
            opts.fisher_damping,
            opts.cg_iters,
            opts.cg_tol,
            opts.fisher_center,
        )
        state.log.update(log)
        apply_server_step(state, step)
        return state
