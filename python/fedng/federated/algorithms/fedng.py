"""FedNG: federated natural gradient (DESIGN §4), every variant a configuration.

Round t:
1. The server broadcasts theta_t and, per `ServerConfig.broadcast`, the damped inverses of its
   global curvature ("inverse"), the curvature itself ("factors"), or nothing.
2. Each client runs `local_steps` natural-gradient steps (`fedng.federated.ng_client`) with the
   preconditioner `ClientConfig.precond` and accumulates its own curvature on the way.
3. It uploads delta_k and, every `upload_every` rounds, its curvature (K-FAC factors, diagonal or
   a shared-seed sketch; per layer) as packed payloads in `payload_dtype`.
4. The server aggregates the deltas (`aggregation`: weighted mean, or Fisher-weighted
   `(sum p_k F_k + lambda I)^-1 sum p_k F_k delta_k`, see `fedng.federated.fisher_merge`),
   applies `server_lr` and `server_momentum`, folds `sum p_k F_k` into the global curvature
   (EMA `curvature_ema` across rounds) and inverts it with the native kernels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedng.federated.algorithms.base import Algorithm, apply_server_step, mean_delta
from fedng.federated.config import ClientConfig
from fedng.federated.curvature_set import CurvatureSet
from fedng.federated.fisher_merge import merge_diag, merge_kfac, merge_lowrank
from fedng.federated.layout import BlockLayout, check_layouts, to_matrix, write_matrix
from fedng.federated.local import set_params
from fedng.federated.ng_client import natural_gradient_local
from fedng.federated.protocol import Arrays, ClientUpdate, ServerMessage, ServerState, weights_of
from fedng.federated.serialize import wire_dtype
from fedng.federated.tasks.base import ClientData

_CACHE_ATTR = "_fedng_curvature"


def decoded_curvature(update: ClientUpdate) -> CurvatureSet | None:
    """The update's curvature as a `CurvatureSet` (decoded once, cached on the update)."""
    if not update.curvature:
        return None
    cached = getattr(update, _CACHE_ATTR, None)
    if cached is None:
        cached = CurvatureSet.from_arrays(
            {k: v.float() for k, v in update.curvature.items()}, update.meta["curv"]
        )
        setattr(update, _CACHE_ATTR, cached)
    return cached


def attach_curvature(update: ClientUpdate, cs: CurvatureSet, dtype: str) -> None:
    """Puts a curvature set into an update as its payload (in wire dtype `dtype`)."""
    arrays, meta = cs.to_arrays(wire_dtype(dtype, "payload_dtype"))
    update.curvature = arrays
    update.meta["curv"] = meta


def relative_damping(cs: CurvatureSet, rel: float) -> dict[str, list[float]]:
    """Per kind, per block: `rel` x the mean eigenvalue of the block's curvature (0 if none)."""
    out: dict[str, list[float]] = {}
    for kind, rep in cs.reps.items():
        lams = []
        for j, i in enumerate(cs.groups[kind]):
            lay = cs.layouts[i]
            d = lay.m * lay.n
            if kind == "kfac":
                a, g = rep.A[j], rep.G[j]  # type: ignore[attr-defined]
                ta = float(a.sum()) if a.dim() == 1 else float(a.diagonal().sum())
                tr = ta * float(g.diagonal().sum())
            elif kind == "diag":
                tr = float(rep.diag[j].sum())  # type: ignore[attr-defined]
            else:
                y, om = rep.Y[j], rep.omega[j]  # type: ignore[attr-defined]
                tr = float((y * om).sum()) / max(1, y.shape[1])
            lams.append(rel * max(tr, 0.0) / d)
        out[kind] = lams
    return out


def _or_zero(u: torch.Tensor | None, d: int) -> torch.Tensor:
    """U of a block a client has no curvature for (F_k = 0): one zero column."""
    return torch.zeros(d, 1) if u is None else u


def fisher_weighted_step(
    updates: list[ClientUpdate],
    sets: list[CurvatureSet],
    rel: float,
    cg_iters: int,
    cg_tol: float,
    center: str = "zero",
) -> tuple[Arrays, dict[str, Any]]:
    """`(sum p_k F_k + lambda I)^-1 sum p_k F_k delta_k` on every block; the weighted mean on
    parameters no block covers and on blocks without curvature.

    Args:
        updates: the accepted updates, all carrying curvature.
        sets: their decoded curvature.
        rel: lambda relative to each block's mean eigenvalue of `sum p_k F_k`.
        cg_iters: CG iterations (K-FAC).
        cg_tol: CG relative residual.
        center: the damping's prior center: "zero" (the plain formula) or "mean" (the weighted
            mean delta; see `fedng.federated.fisher_merge`).

    Returns:
        (the aggregated step as named arrays, a log).
    """
    ws = weights_of(updates)
    step = mean_delta(updates)
    pooled = CurvatureSet.combine(sets, ws)
    lams = relative_damping(pooled, rel)
    deltas = [{k: v.float() for k, v in u.delta.items()} for u in updates]
    log: dict[str, Any] = {}
    layouts = sets[0].layouts
    for kind, idx in sets[0].groups.items():
        live = [j for j, lam in enumerate(lams[kind]) if lam > 0]
        if not live:
            continue
        lays: list[BlockLayout] = [layouts[idx[j]] for j in live]
        mats = [[to_matrix(d, lay) for lay in lays] for d in deltas]
        prior = [to_matrix(step, lay) for lay in lays] if center == "mean" else None
        reps = [s.reps[kind] for s in sets]
        damp = [lams[kind][j] for j in live]
        if kind == "diag":
            merged = merge_diag(
                [[r.diag[j] for j in live] for r in reps],  # type: ignore[attr-defined]
                mats,
                ws,
                damp,
                prior,
            )
        elif kind == "kfac":
            merged, info = merge_kfac(
                [[r.A[j] for j in live] for r in reps],  # type: ignore[attr-defined]
                [[r.G[j] for j in live] for r in reps],  # type: ignore[attr-defined]
                mats,
                ws,
                damp,
                iters=cg_iters,
                tol=cg_tol,
                prior=prior,
            )
            log.update(info)
        else:
            us, ss = [], []
            for r in reps:
                r.inverse(1.0)  # the damping is unused here: only U, S are read
                us.append(
                    [
                        _or_zero(r.U[j], lays[n].m * lays[n].n)  # type: ignore[attr-defined]
                        for n, j in enumerate(live)
                    ]
                )
                ss.append(
                    [
                        torch.zeros(1) if r.S[j] is None else r.S[j]  # type: ignore[attr-defined]
                        for j in live
                    ]
                )
            flat = merge_lowrank(
                us,
                ss,
                [[m.reshape(-1) for m in ms] for ms in mats],
                ws,
                damp,
                None if prior is None else [p.reshape(-1) for p in prior],
            )
            merged = [f.view(lay.m, lay.n) for f, lay in zip(flat, lays, strict=True)]
        for lay, m in zip(lays, merged, strict=True):
            write_matrix(step, lay, m.float())
    return step, log


class FedNG(Algorithm):
    """Federated natural gradient; see the module docstring.

    Server buffers: `curv/<kind>` (the global curvature payloads, fp32) with
    `meta["curv"]` (their layout). Broadcast extras: `inv/<kind>/<block>/...` or `curv/<kind>`.
    """

    name = "fedng"

    def global_set(self, state: ServerState) -> CurvatureSet | None:
        """The server's global curvature, or None before the first upload."""
        fac = {k[5:]: v for k, v in state.buffers.items() if k.startswith("curv/")}
        if not fac:
            return None
        return CurvatureSet.from_arrays(fac, state.meta["curv"])

    def broadcast(self, state: ServerState) -> ServerMessage:
        """theta_t plus the global preconditioner (inverses or factors) per config."""
        cfg = state.config
        msg = ServerMessage(state.round, self.name, state.params, dtype=cfg.broadcast_dtype)
        glob = self.global_set(state) if cfg.broadcast != "none" else None
        if glob is None:
            return msg
        if cfg.broadcast == "factors":
            arrays, meta = glob.to_arrays(torch.float32)
            msg.extras = {f"curv/{k}": v for k, v in arrays.items()}
            msg.meta["curv"] = meta
            return msg
        failed = glob.inverse(cfg.damping)
        arrays, sym = glob.inverse_arrays()
        msg.extras = {f"inv/{k}": v for k, v in arrays.items()}
        msg.symmetric = frozenset(f"inv/{s}" for s in sym)
        msg.meta["damping"] = cfg.damping
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
        set_params(model, message.params)
        res = natural_gradient_local(model, data, message, config)
        upd = self.make_update(model, data, message, config, res.metrics, client_state)
        if message.round % config.upload_every == 0:
            attach_curvature(upd, res.curvature, config.payload_dtype)
        return upd

    def check_curvature(self, state: ServerState, update: ClientUpdate) -> str | None:
        """Decodes and checks a curvature payload: layout vs the model, finite/symmetric/PSD."""
        if not update.curvature:
            return None
        for k, v in update.curvature.items():
            if v.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                return f"curvature: {k!r} has dtype {v.dtype}, expected fp32/bf16/fp16"
        if "curv" not in update.meta:
            return "curvature payload without its layout metadata"
        cs = decoded_curvature(update)
        if cs is None:
            raise RuntimeError("fedng internal invariant broken: cs is not None")
        reason = check_layouts(cs.layouts, {k: tuple(v.shape) for k, v in state.params.items()})
        if reason:
            return f"curvature: {reason}"
        if "curv" in state.meta and state.meta["curv"]["layouts"] != update.meta["curv"]["layouts"]:
            return "curvature: block layout differs from the server's"
        if "curv" in state.meta and state.meta["curv"]["kinds"] != update.meta["curv"]["kinds"]:
            return "curvature: curvature kinds differ from the server's"
        eps = max(torch.finfo(v.dtype).eps for v in update.curvature.values())
        cs.validate(state.config.psd_tol, eps)
        return None

    def curvature_scale(self, state: ServerState, update: ClientUpdate) -> float | None:
        """tr(F_k), for the round-median sanity check."""
        cs = decoded_curvature(update)
        return None if cs is None else cs.trace()

    def aggregate(self, state: ServerState, updates: list[ClientUpdate]) -> ServerState:
        """Aggregates deltas (mean or Fisher-weighted), server step, global curvature EMA."""
        cfg = state.config
        with_curv = [u for u in updates if u.curvature]
        sets = [decoded_curvature(u) for u in with_curv]
        if cfg.aggregation == "fisher" and with_curv and len(with_curv) == len(updates):
            step, log = fisher_weighted_step(
                updates,
                sets,
                cfg.fisher_damping,  # type: ignore[arg-type]
                cfg.cg_iters,
                cfg.cg_tol,
                cfg.fisher_center,
            )
            state.log.update(log)
            state.log["aggregation"] = "fisher"
        else:
            step = mean_delta(updates)
            state.log["aggregation"] = "mean"
        apply_server_step(state, step)
        if sets:
            fresh = CurvatureSet.combine(sets, weights_of(with_curv))  # type: ignore[arg-type]
            prev = self.global_set(state)
            beta = cfg.curvature_ema
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
