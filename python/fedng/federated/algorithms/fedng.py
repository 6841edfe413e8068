"""FedNG: federated natural gradient (docs/architecture.md), every variant a configuration.

Round t:
1. The server broadcasts theta_t and, per `FedNGConfig.broadcast`, the damped inverses of its
   global curvature ("inverse"), the curvature itself ("factors"), or nothing.
2. Each client runs `local_steps` natural-gradient steps (`fedng.federated.client`) with
   the preconditioner `FedNGConfig.precond` and accumulates its own curvature on the way.
3. It uploads delta_k and, every `upload_every` rounds, its curvature (K-FAC factors, diagonal or
   a shared-seed sketch; per layer) as packed payloads in `payload_dtype`.
4. The server aggregates the deltas (`aggregation`: weighted mean; "summable" Fisher-weighted,
   for which each client also uploads `c_k = F_k delta_k` and the server only sums, solves once
   with the pooled curvature and takes an exact line search from a second summable phase; or
   the exact Fisher-weighted merge `(sum p_k F_k + lambda I)^-1 sum p_k F_k delta_k`, see
   `fedng.federated.aggregation`), applies `server_lr` and `server_momentum`, folds
   `sum p_k F_k` into the global curvature (EMA `curvature_ema` across rounds) and inverts it
   with the native kernels. "mean" and "summable" stream (`fedng_server.CurvatureSums`): the
   server holds running sums only.
"""

from __future__ import annotations

from torch import nn

from fedng._typing import Arrays
from fedng.curvature import CurvatureSet
from fedng.federated.aggregation.fisher_weighted import fisher_weighted_step
from fedng.federated.aggregation.mean import apply_server_step, mean_delta, weights_of
from fedng.federated.aggregation.summable import CONTRIB_PREFIX, REPLY_KEY, answer_probe
from fedng.federated.algorithms.base import Accumulator, Algorithm, Collect, State, run_batch
from fedng.federated.algorithms.curvature_payload import (
    attach_contribution,
    attach_curvature,
    check_curvature_payload,
    curvature_trace,
    decoded_all,
    decoded_curvature,
)
from fedng.federated.algorithms.fedng_server import (
    PROBE_PHASE,
    CurvatureSums,
    broadcast_factors,
    fold_global,
    global_scales,
    global_set,
    scheduled_step,
)
from fedng.federated.client.layers import warn_unsupported_layers
from fedng.federated.client.natural_gradient import (
    TRUST_KEY,
    client_damping,
    natural_gradient_local,
)
from fedng.federated.client.params import set_params
from fedng.federated.config.common import ClientConfig
from fedng.federated.config.curvature import FedNGConfig
from fedng.federated.messages import ClientUpdate, ServerMessage
from fedng.federated.tasks.base import ClientData

__all__ = ["FedNG", "global_set"]


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
        if mode == "factors":  # from the stored payloads: nothing decoded, nothing repacked
            packed = broadcast_factors(state, opts.compression)
            if packed is not None:
                msg.extras = {f"curv/{k}": v for k, v in packed[0].items()}
                msg.meta["curv"] = packed[1]
            return msg
        glob = global_set(state) if mode != "none" else None
        if glob is None:
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
        carry = client_state.get(TRUST_KEY)
        res = natural_gradient_local(model, data, message, config, opts, trust=carry)
        kept = client_state if res.trust is None else {**client_state, TRUST_KEY: res.trust}
        upd = self.make_update(model, data, message, config, res.metrics, kept)
        if message.round % opts.upload_every == 0:
            attach_curvature(upd, res.curvature, opts.payload_dtype, opts.compression)
            sent = decoded_curvature(upd)  # c_k from the curvature as sent (int8 included),
            if opts.aggregation == "summable" and sent is not None:  # what the server sums
                # fp32 under DP: the joint L2 clip must hold after rounding
                wire = "fp32" if config.dp_clip > 0 else opts.contrib_dtype
                attach_contribution(upd, sent, CONTRIB_PREFIX, wire)
        return upd

    def expected_extras(self, state: State) -> dict[str, tuple[int, ...]]:
        """The summable aggregation's `fd/<param>` (c_k = F_k delta_k) in curvature rounds."""
        opts = self.options(state.config)
        if opts.aggregation != "summable" or state.round % opts.upload_every != 0:
            return {}
        if state.config.dp_clip > 0 and state.config.dp_curvature_clip == 0:
            return {}  # DP without a curvature release: c_k stays on the client
        return {f"{CONTRIB_PREFIX}{k}": tuple(v.shape) for k, v in state.params.items()}

    def check_curvature(self, state: State, update: ClientUpdate) -> str | None:
        """Decodes and checks a curvature payload: layout vs the model, finite/symmetric/PSD."""
        return check_curvature_payload(state, update, self.options(state.config).fast_check())

    def curvature_scale(self, state: State, update: ClientUpdate) -> float | None:
        """tr(F_k), for the round-median sanity check."""
        return curvature_trace(update)

    def reference_curvature(self, state: State) -> CurvatureSet | None:
        """The global curvature (None before the first upload)."""
        return global_set(state)

    def reference_scales(self, state: State) -> dict[str, float] | None:
        """The global curvature's scales, read from its payloads when they allow it."""
        fast = global_scales(state)
        return fast if fast is not None else super().reference_scales(state)

    def begin(self, state: State) -> Accumulator:
        """Running sums for "mean" and "summable"; the exact merge holds the round's updates."""
        opts = self.options(state.config)
        if opts.aggregation == "fisher":
            return Collect(self)
        return CurvatureSums(self.name, opts, state.config.psd_tol)

    def answer_probe(self, update: ClientUpdate, probe: ServerMessage) -> ClientUpdate:
        """The client's line-search scalars `[<M, F_k d>, <d, F_k d>]` per block, from the
        curvature it uploaded in `update` (summable aggregation's second phase).

        Raises:
            ValueError: the update has no curvature, or the message is no line-search probe.
        """
        cs = decoded_curvature(update)
        if cs is None or probe.meta.get("phase") != PROBE_PHASE:
            raise ValueError("answer_probe: needs the update's curvature and a line-search probe")
        return ClientUpdate(
            update.client_id,
            probe.round,
            {},
            update.num_examples,
            extras={REPLY_KEY: answer_probe(cs, probe.extras)},
            meta={"phase": PROBE_PHASE},
        ).seal()

    def aggregate(self, state: State, updates: list[ClientUpdate]) -> State:
        """The exact Fisher-weighted merge ("fisher"); the other aggregations run their
        streaming accumulator over `updates`, answering the line search from the updates'
        own curvature (what each client would answer)."""
        opts = self.options(state.config)
        if opts.aggregation != "fisher":
            return run_batch(self, state, updates)
        return self._exact(state, updates)

    def _exact(self, state: State, updates: list[ClientUpdate]) -> State:
        """Aggregates deltas (Fisher-weighted or mean), server step, global curvature EMA."""
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
        apply_server_step(state, scheduled_step(state, step, opts.server_decay))
        if sets:
            fold_global(
                state, CurvatureSet.combine(sets, weights_of(with_curv)), opts.curvature_ema
            )
        return state
