"""FedNG: federated natural gradient (docs/architecture.md), every variant a configuration.

Round t:
1. The server broadcasts theta_t and, per `FedNGConfig.broadcast`, the damped inverses of its
   global curvature ("inverse"), the curvature itself ("factors"), or nothing.
2. Each client runs `local_steps` natural-gradient steps (`fedng.federated.client`) with
   the preconditioner `FedNGConfig.precond` and accumulates its own curvature on the way.
3. It uploads delta_k and, every `upload_every` rounds, its curvature (K-FAC factors, diagonal or
   a shared-seed sketch; per layer) as packed payloads in `payload_dtype`.
4. The server aggregates the deltas (`aggregation`: weighted mean, or Fisher-weighted
   `(sum p_k F_k + lambda I)^-1 sum p_k F_k delta_k`, see `fedng.federated.aggregation`),
   applies `server_lr` and `server_momentum`, folds `sum p_k F_k` into the global curvature
   (EMA `curvature_ema` across rounds) and inverts it with the native kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from fedng._typing import Arrays
from fedng.curvature import CurvatureSet
from fedng.federated.aggregation.fisher_weighted import fisher_weighted_step
from fedng.federated.aggregation.mean import apply_server_step, mean_delta, weights_of
from fedng.federated.algorithms.base import Algorithm, State
from fedng.federated.algorithms.curvature_payload import (
    attach_curvature,
    check_curvature_payload,
    curvature_arrays,
    curvature_trace,
    decoded_all,
)
from fedng.federated.client.layers import warn_unsupported_layers
from fedng.federated.client.natural_gradient import client_damping, natural_gradient_local
from fedng.federated.client.params import set_params
from fedng.federated.config.common import ClientConfig
from fedng.federated.config.curvature import FedNGConfig
from fedng.federated.messages import ClientUpdate, ServerMessage
from fedng.federated.tasks.base import ClientData


def global_set(state: State) -> CurvatureSet | None:
    """The server's global curvature, or None before the first upload."""
    fac = {k[5:]: v for k, v in state.buffers.items() if k.startswith("curv/")}
    if not fac:
        return None
    return CurvatureSet.from_arrays(fac, state.meta["curv"])


class FedNG(Algorithm[FedNGConfig]):
    """Federated natural gradient; see the module docstring.

    Server buffers: `curv/<kind>` (the global curvature payloads, fp32) with
    `meta["curv"]` (their layout). Broadcast extras: `inv/<kind>/<block>/...` or `curv/<kind>`.
    """

    config_type = FedNGConfig

    def check_model(self, model: nn.Module) -> None:
        """Warns once about layers that get no curvature (they are updated first-order)."""
        warn_unsupported_layers(model)

    def broadcast(self, state: State) -> ServerMessage:
        """theta_t plus the global preconditioner (inverses or factors) per config."""
        opts = self.options(state.config)
        mode = opts.broadcast_mode()
        msg = ServerMessage(state.round, self.name, state.params, dtype=opts.broadcast_dtype)
        glob = global_set(state) if mode != "none" else None
        if glob is None:
            return msg
        if mode == "factors":
            arrays, meta = curvature_arrays(glob, "fp32", opts.compression)
            msg.extras = {f"curv/{k}": v for k, v in arrays.items()}
            msg.meta["curv"] = meta
            return msg
        failed = glob.inverse(client_damping(glob, opts)).failed
        arrays, sym = glob.inverse_arrays()
        msg.extras = {f"inv/{k}": v for k, v in arrays.items()}
        msg.symmetric = frozenset(f"inv/{s}" for s in sym)
        msg.meta["damping"] = opts.damping
        msg.meta["damping_scale"] = opts.damping_scale
        if failed:
            msg.meta["inverse_failed"] = failed
        return msg

    def client_step(
        self,
        model: nn.Module,
        data: ClientData,
        message: ServerMessage,
        config: ClientConfig,
        client_state: Arrays,
    ) -> ClientUpdate:
        """Local natural-gradient steps; uploads delta (+ curvature every `upload_every`)."""
        opts = self.options(config)
        set_params(model, message.params)
        res = natural_gradient_local(model, data, message, config, opts)
        upd = self.make_update(model, data, message, config, res.metrics, client_state)
        if message.round % opts.upload_every == 0:
            attach_curvature(upd, res.curvature, opts.payload_dtype, opts.compression)
        return upd

    def check_curvature(self, state: State, update: ClientUpdate) -> str | None:
        """Decodes and checks a curvature payload: layout vs the model, finite/symmetric/PSD."""
        return check_curvature_payload(state, update)

    def curvature_scale(self, state: State, update: ClientUpdate) -> float | None:
        """tr(F_k), for the round-median sanity check."""
        return curvature_trace(update)

    def reference_curvature(self, state: State) -> CurvatureSet | None:
        """The global curvature (None before the first upload)."""
        return global_set(state)

    def aggregate(self, state: State, updates: list[ClientUpdate]) -> State:
        """Aggregates deltas (mean or Fisher-weighted), server step, global curvature EMA."""
        opts = self.options(state.config)
        with_curv = [u for u in updates if u.curvature]
        sets = decoded_all(with_curv)
        if opts.aggregation == "fisher" and with_curv and len(with_curv) == len(updates):
            step, log = fisher_weighted_step(
                updates, sets, opts.fisher_damping, opts.cg_iters, opts.cg_tol, opts.fisher_center
            )
            state.log.update(log)
            state.log["aggregation"] = "fisher"
        else:
            step = mean_delta(updates)
            state.log["aggregation"] = "mean"
        apply_server_step(state, step)
        if sets:
            fresh = CurvatureSet.combine(sets, weights_of(with_curv))
            prev = global_set(state)
            beta = opts.curvature_ema
            glob = (
                fresh
                if prev is None or beta == 0
                else CurvatureSet.combine([prev, fresh], [beta, 1.0 - beta])
            )
            arrays, meta = glob.to_arrays(torch.float32)
            for k in [k for k in state.buffers if k.startswith("curv/")]:
                del state.buffers[k]
            state.buffers.update({f"curv/{k}": v for k, v in arrays.items()})
            state.meta["curv"] = meta
        return state
