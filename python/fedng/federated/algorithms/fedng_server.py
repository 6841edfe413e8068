"""FedNG's server side at scale: the streaming accumulator of the "mean" and "summable"
aggregations, and the global curvature the server keeps.

Both aggregations keep only running sums (`WeightedSum`): the deltas, the curvature payloads
(every representation's payload is linear in its curvature — packed K-FAC triangles, diagonals,
shared-seed sketches — so the sum of the payloads is the payload of the pooled curvature) and,
for "summable", the clients' contributions `c_k = F_k delta_k` (extras `fd/<param>`). The
summable step is `fedng.federated.aggregation.summable`: one pooled solve, then a line search
whose two scalars per block come from a second, summable phase (`probe` / `fold_reply`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fedng._typing import Arrays
from fedng.curvature import CurvatureSet
from fedng.curvature.quantize import (
    META_KEY,
    SCALE_SUFFIX,
    Segment,
    payload_segments,
    quantize_arrays,
)
from fedng.federated.aggregation.mean import apply_server_step
from fedng.federated.aggregation.psd import psd_tests, unpacked_checks
from fedng.federated.aggregation.summable import (
    CONTRIB_PREFIX,
    PROBE_INT8,
    REPLY_KEY,
    PooledDirection,
    line_search_step,
    pooled_direction,
)
from fedng.federated.aggregation.sums import WeightedSum, fold_all
from fedng.federated.algorithms.base import State
from fedng.federated.algorithms.curvature_payload import (
    FAST_KINDS,
    fast_scales,
    pooled_meta,
    signature,
    wants_int8_payload,
)
from fedng.federated.algorithms.sample_noise import PARTICIPATION_KEY, SampleSpread
from fedng.federated.algorithms.step_schedule import NUM_ROUNDS_KEY, decay_factor
from fedng.federated.config.curvature import FedNGConfig
from fedng.federated.messages import ClientUpdate, ServerMessage

PROBE_PHASE = "line_search"
"""`meta["phase"]` of the summable aggregation's second-phase message and of its replies."""


GLOBAL_PREFIX = "curv/"
"""`state.buffers` prefix of the global curvature's payloads."""


def global_set(state: State) -> CurvatureSet | None:
    """The server's global curvature, or None before the first upload."""
    fac = global_arrays(state)
    if not fac:
        return None
    return CurvatureSet.from_arrays(fac, state.meta["curv"])


def fold_global(state: State, fresh: CurvatureSet, beta: float) -> None:
    """Folds the round's pooled curvature into the global one (EMA with decay `beta`) and stores
    it in `state.buffers["curv/<kind>"]` / `state.meta["curv"]`."""
    prev = global_set(state)
    glob = (
        fresh
        if prev is None or beta == 0
        else CurvatureSet.combine([prev, fresh], [beta, 1.0 - beta])
    )
    _store_global(state, *glob.to_arrays(torch.float32))


def _store_global(state: State, arrays: Arrays, meta: dict[str, Any]) -> None:
    for k in [k for k in state.buffers if k.startswith("curv/")]:
        del state.buffers[k]
    state.buffers.update({f"{GLOBAL_PREFIX}{k}": v for k, v in arrays.items()})
    state.meta["curv"] = meta


def global_arrays(state: State) -> Arrays:
    """The global curvature's payloads as stored (kind -> packed float32), empty before any."""
    return {
        k[len(GLOBAL_PREFIX) :]: v for k, v in state.buffers.items() if k.startswith(GLOBAL_PREFIX)
    }


def fold_global_packed(state: State, fresh: Arrays, meta: dict[str, Any], beta: float) -> None:
    """`fold_global` on the payloads themselves (every payload is linear in its curvature, and
    the EMA is entrywise): the same values, with no matrix unpacked or packed again.

    Args:
        state: the state to update (the caller's copy).
        fresh: the round's pooled payloads (kind -> float32 packed), same layout as the global.
        meta: their curvature metadata (without the int8 marker).
        beta: the EMA decay.
    """
    prev = global_arrays(state)
    same = state.meta.get("curv") == meta and set(prev) == set(fresh)
    if not prev or beta == 0 or not same:
        out = {k: v.float().clone() for k, v in fresh.items()}
    else:  # KFAC/DiagonalFisher.aggregate's arithmetic: 0 + beta prev, then + (1 - beta) fresh
        out = {}
        for k, v in fresh.items():
            acc = torch.zeros_like(v, dtype=torch.float32)
            acc.add_(prev[k], alpha=beta)
            out[k] = acc.add_(v, alpha=1.0 - beta)
    _store_global(state, out, meta)


def global_scales(state: State) -> dict[str, float] | None:
    """`curvature_scales` of the global curvature read from its packed payloads (no matrix
    unpacked) when every kind has a fast plan; None otherwise (or before any)."""
    arrays, meta = global_arrays(state), state.meta.get("curv")
    if not arrays or not isinstance(meta, dict) or not set(arrays) <= FAST_KINDS:
        return None
    try:
        return fast_scales(meta, arrays, state.config.psd_tol)
    except (ValueError, KeyError):
        return None


def broadcast_factors(state: State, compression: str) -> tuple[Arrays, dict[str, Any]] | None:
    """The global curvature as broadcast factors (`curvature_arrays(global_set(state), "fp32",
    compression)`), built from the stored payloads without decoding them (None before any)."""
    arrays, meta = global_arrays(state), state.meta.get("curv")
    if not arrays or not isinstance(meta, dict):
        return None
    if not wants_int8_payload(arrays, meta, compression):
        return dict(arrays), dict(meta)
    return quantize_arrays(arrays, meta)


def scheduled_step(state: State, step: Arrays, fraction: float) -> Arrays:
    """FedNG's server step times the decay factor of round `state.round` in the planned run
    (`step_schedule`, logged as `step_decay`); the step itself (the same tensors) before the
    decay, with `fraction` 0, or when the server was given no number of rounds."""
    planned = state.meta.get(NUM_ROUNDS_KEY)
    if planned is None or fraction <= 0:
        return step
    f = decay_factor(state.round, int(planned), fraction)
    if f >= 1.0:
        return step
    state.log["step_decay"] = f
    return {k: v * f for k, v in step.items()}


class CurvatureSums:
    """FedNG's streaming accumulator ("mean" and "summable" aggregations).

    Holds three running sums (deltas, curvature payloads, contributions), the curvature
    metadata of the first update, and after `probe` the pooled direction: memory O(model +
    curvature), independent of the number of clients.
    """

    def __init__(self, name: str, opts: FedNGConfig, psd_tol: float) -> None:
        self.name = name
        self.opts = opts
        self.psd_tol = psd_tol
        self.bad: str | None = None
        self.wire_eps = 0.0
        # exact for "mean": with the preconditioner off it is FedAvg bit for bit; in place (one
        # fused fold with the other sums) for "summable"
        self.deltas = WeightedSum(exact=opts.aggregation == "mean")
        self.curv = WeightedSum(exact=False)
        self.contrib = WeightedSum(exact=False)
        self.meta: dict[str, Any] | None = None
        self.without_curvature = 0
        self.spread = SampleSpread() if opts.sample_shrink else None
        self.direction: PooledDirection | None = None
        self.pooled: CurvatureSet | None = None
        self.pooled_arrays: Arrays | None = None
        self.replies: torch.Tensor | None = None
        self.answered = 0.0
        self.probed = False
        self._segs: dict[str, dict[str, list[Segment]]] = {}
        self._reply_sums: list[list[float]] = []

    @property
    def summable(self) -> bool:
        """Whether this round can take the summable step (every update had curvature and c_k)."""
        return (
            self.opts.aggregation == "summable"
            and self.without_curvature == 0
            and self.curv.count > 0
            and self.contrib.count == self.curv.count
        )

    def fold(self, update: ClientUpdate, weight: float) -> None:
        """Adds delta_k, the curvature payload and c_k (when present), each times `weight`
        (one in-place `_foreach_add_` for all three once the sums are started), and
        `weight * ||delta_k||^2` for the participation-aware step (`sample_noise`)."""
        if self.spread is not None:
            self.spread.fold(update.delta, weight)
        if not update.curvature:
            self.without_curvature += 1
            self.deltas.fold(update.delta, weight)
            return
        meta = update.meta["curv"]
        if self.meta is None:
            self.meta = pooled_meta(meta)
        int8 = meta.get(META_KEY, [])
        curv = update.curvature
        if int8:  # int8 kinds are summed dequantized (in one native pass each, below)
            curv = {k: v for k, v in curv.items() if k not in int8 and not k.endswith(SCALE_SUFFIX)}
        parts = [(self.deltas, update.delta)]
        if curv:
            parts.append((self.curv, curv))
        fd = {
            k[len(CONTRIB_PREFIX) :]: v
            for k, v in update.extras.items()
            if k.startswith(CONTRIB_PREFIX)
        }
        if fd:
            parts.append((self.contrib, fd))
        if int8:  # folded with the rest, in one native call once the sums are started
            segs = self._segments(update)
            got = update.curvature
            payloads = {k: (got[k], got[k + SCALE_SUFFIX], segs[k]) for k in int8}
            fold_all(parts, weight, self.curv, payloads)
            self.wire_eps = max(self.wire_eps, torch.finfo(torch.float32).eps)
        else:
            fold_all(parts, weight)
        for v in curv.values():
            self.wire_eps = max(self.wire_eps, torch.finfo(v.dtype).eps)

    def _segments(self, update: ClientUpdate) -> dict[str, list[Segment]]:
        """The int8 segments of an update's payload (parsed once per round and signature)."""
        key = signature(update) or ""
        segs = self._segs.get(key)
        if segs is None:
            segs = self._segs[key] = payload_segments(update.meta["curv"])
        return segs

    def _pooled(self, scale: float) -> CurvatureSet | None:
        """The pooled curvature (decoded once), None if it fails the full PSD test: the fast
        per-client checks leave that test to the sum (the round then keeps the mean step and
        the previous global curvature)."""
        if self.pooled is None and self.meta is not None and self.curv.count and not self.bad:
            self.pooled_arrays = self.curv.scaled(scale)
            pooled = CurvatureSet.from_arrays(self.pooled_arrays, self.meta)
            try:  # `pooled.validate`, large factors without forming their inverses
                psd_tests(unpacked_checks(pooled, self.psd_tol, self.wire_eps))
            except ValueError as err:
                self.bad = f"pooled curvature rejected ({str(err)[:120]})"
                return None
            self.pooled = pooled
        return self.pooled

    def _direction(self, scale: float) -> PooledDirection | None:
        if self.direction is None and self.summable:
            pooled = self._pooled(scale)
            if pooled is not None:
                self.direction = pooled_direction(
                    pooled,
                    self.deltas.scaled(scale),
                    self.contrib.scaled(scale),
                    self.opts.fisher_damping,
                    self.opts.fisher_center,
                    self.opts.probe_dtype,
                )
        return self.direction

    def probe(self, state: State, scale: float) -> ServerMessage | None:
        """The line-search message (M and d), or None when the round needs none."""
        direction = self._direction(scale)
        if direction is None or not direction.probed or self.pooled is None:
            return None
        self.probed = True
        self.replies = torch.zeros(len(direction.blocks), 2, dtype=torch.float64)
        self._reply_sums = [[0.0, 0.0] for _ in direction.blocks]
        return ServerMessage(
            state.round,
            self.name,
            {},
            direction.probe,
            meta={"phase": PROBE_PHASE, "blocks": len(direction.blocks)},
            # int8 values travel as they are; their scales (and M, d otherwise) in this dtype
            dtype="fp32" if self.opts.probe_dtype == PROBE_INT8 else self.opts.probe_dtype,
        )

    def fold_reply(self, reply: ClientUpdate, weight: float) -> str | None:
        """Adds `weight * [<M, F_k d>, <d, F_k d>]` per block; the reason a reply is unusable."""
        if self.replies is None:
            return "no second phase was asked for this round"
        got = reply.extras.get(REPLY_KEY) if isinstance(reply.extras, dict) else None
        if set(reply.extras) != {REPLY_KEY} or not isinstance(got, torch.Tensor):
            return f"line-search reply: expected exactly the extra {REPLY_KEY!r}"
        if tuple(got.shape) != tuple(self.replies.shape):
            return (
                f"line-search reply: shape {list(got.shape)}, expected {list(self.replies.shape)}"
            )
        rows = got.tolist()  # a few floats per block: Python beats a torch dispatch per op
        if not all(math.isfinite(a) and math.isfinite(b) and b >= 0 for a, b in rows):
            return "line-search reply: non-finite or negative curvature <d, F d>"
        for acc, (a, b) in zip(self._reply_sums, rows, strict=True):  # float64, as before
            acc[0] += weight * a
            acc[1] += weight * b
        self.answered += weight
        return None

    def finish(self, state: State, scale: float) -> State:
        """Server step with the mean or the summable step; pooled curvature into the EMA."""
        direction = self._direction(scale)
        pooled = self._pooled(scale) if self.without_curvature == 0 else None
        if direction is not None and pooled is not None:
            replies = None
            if self.replies is not None and self.answered > 0:
                self.replies = torch.tensor(self._reply_sums, dtype=torch.float64)
                replies = self.replies / self.answered
            step, log = line_search_step(direction, pooled, replies)
            state.log.update(log)
            state.log["aggregation"] = "summable"
            if direction.probed:
                state.log["line_search"] = (
                    "answered" if replies is not None else "unanswered: mean on probed blocks"
                )
        else:
            step = self.deltas.scaled(scale)
            state.log["aggregation"] = "mean"
        step = self._participation_step(state, step, scale)
        step = scheduled_step(state, step, self.opts.server_decay)
        apply_server_step(state, step)
        if pooled is not None and self.pooled_arrays is not None:
            fold_global_packed(state, self.pooled_arrays, self.meta or {}, self.opts.curvature_ema)
        elif self.curv.count and not self.bad:  # some updates without curvature: pool the others
            p = CurvatureSet.from_arrays(
                self.curv.scaled(1.0 / self.curv.total_weight), self.meta or {}
            )
            p.validate(self.psd_tol, self.wire_eps)
            fold_global(state, p, self.opts.curvature_ema)
        if self.bad:
            state.log["curvature_dropped"] = self.bad
        return state

    def _participation_step(self, state: State, step: Arrays, scale: float) -> Arrays:
        """The step times the sampled mean's signal-to-noise factor under partial participation
        (`sample_noise`); the step itself (the same tensors) when the factor is 1."""
        part = float(state.meta.get(PARTICIPATION_KEY, 1.0))
        if self.spread is None or part >= 1.0 or state.config.dp_clip > 0:
            return step
        shrink = self.spread.shrink(self.deltas.scaled(scale), part)
        state.log["sample_shrink"] = shrink
        if shrink >= 1.0:
            return step
        return {k: v * shrink for k, v in step.items()}

    @property
    def nbytes(self) -> int:
        """The sums' bytes (one model, one curvature payload, one model of contributions)."""
        return self.deltas.nbytes + self.curv.nbytes + self.contrib.nbytes
