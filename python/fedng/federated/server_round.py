"""The streaming server: one round, folded one client reply at a time.

This is what a deployment calls per reply (the Flower strategy does):

    rnd = ServerRound(state)                  # begins the round
    for update in replies_as_they_arrive:
        verdict = rnd.add(update)             # validate, then fold into running sums
    probe = rnd.probe()                       # optional second summable phase (or None)
    if probe is not None:                     # send it to rnd.accepted_ids; each client answers
        for reply in answers:                 #   algorithm.answer_probe(its own update, probe)
            rnd.add_reply(reply)
    state, message = rnd.finish()             # the new state and the next round's broadcast

Memory: summable algorithms (FedAvg and its momentum variant, FedNG with the "mean" or
"summable" aggregation) hold only their running sums — O(model + curvature), flat in the number
of clients — plus a few floats per client (its weight, delta norm and curvature scales).
Algorithms that aggregate a list (SCAFFOLD, FedOpt, FedFisher, FedNG's exact merge) hold the
accepted updates.

Validation differs from the batch `round.server_step` only where streaming forces it:
- the norm and curvature-scale checks compare against the previous round's reference (the
  median delta norm `state.meta["reference"]`, the server's global curvature; each curvature
  scale's reference floored at the run's peak round median as in the batch rule, and the peak
  kept for the next round as `validate.reference_of` keeps it); where none exists
  yet (the first round), the first `warmup` updates that pass the per-update checks are held
  (a bounded buffer) and their median becomes the round's reference;
- a second update under a client id already seen this round is rejected (the first one, already
  folded, stays: the batch rule rejects both);
- updates whose curvature kinds/layouts differ from the round's first one are rejected (the batch
  rule keeps the most common);
- a round whose sums come out non-finite is rolled back whole (no culprit to leave out).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, cast

import torch

from fedng.curvature.packed_fold import sum_squares
from fedng.federated.aggregation.passes import sq_norms
from fedng.federated.algorithms.base import Accumulator, Algorithm, Answer, MeanStep, State
from fedng.federated.algorithms.curvature_payload import (
    signature,
    update_scales,
)
from fedng.federated.algorithms.fedng_server import CurvatureSums
from fedng.federated.algorithms.registry import get_algorithm
from fedng.federated.messages import ClientUpdate, ServerMessage, ServerState
from fedng.federated.summable_check import SummableFast, summable_plan
from fedng.federated.validate import (
    PEAK_KEY,
    REFERENCE_KEY,
    Rejected,
    curvature_floor,
    curvature_ratio,
    delta_norm,
    floored_refs,
    nan_reason,
    plain_arrays,
    plain_plan,
    raised_peak,
    reference_scale,
    safe_check,
    store_sq_norms,
    too_large,
)

ACCEPTED, REJECTED, PENDING = "accepted", "rejected", "pending"


@dataclass(frozen=True)
class Verdict:
    """What happened to one reply.

    Attributes:
        client_id: the reply's client id (None when it has none).
        status: "accepted" (folded in), "rejected" (with `reason`) or "pending" (held in the
            first round's warm-up buffer; its verdict is in `finish()`'s log).
        reason: why it was rejected.
    """

    client_id: int | None
    status: str
    reason: str | None = None


def non_finite(state: State) -> list[str]:
    """Names of the state's float arrays holding NaN or Inf."""
    merged = {**state.params, **state.buffers}
    f32, bf16 = torch.float32, torch.bfloat16
    fast = [v for v in merged.values() if v.dtype is f32 or v.dtype is bf16]
    sqs = sum_squares(fast)
    if len(fast) == len(merged) and all(map(math.isfinite, sqs)):
        return []  # the common case: every array float32 / bf16 and finite
    named = [(k, v) for k, v in merged.items() if v.is_floating_point()]
    keys = [k for k, v in merged.items() if v.dtype is f32 or v.dtype is bf16]
    sq = dict(zip(keys, sqs, strict=True))
    return [  # float32 / bf16 in one native pass (NaN/Inf iff an entry is), others by torch
        k
        for k, v in named
        if not (math.isfinite(sq[k]) if k in sq else bool(torch.isfinite(v).all()))
    ]


class ServerRound:
    """One server round fed reply by reply; see the module docstring.

    Args:
        state: the server state the replies answer (never modified).
        warmup: updates held to form the round's reference when no previous round gives one.
        total_examples: the round's total `num_examples` when known up front (then weights are
            `n_k / total` as in the batch server and no final rescaling happens); None for a
            streaming round (weights `n_k`, scaled by `1 / sum n_k` at the end).

    Raises:
        ValueError: the config asks for robust aggregation or DP (batch `server_step` only).
    """

    def __init__(self, state: State, *, warmup: int = 3, total_examples: int | None = None) -> None:
        if state.config.robust != "none" or state.config.dp_clip > 0:
            raise ValueError(
                "ServerRound: robust aggregation and DP need the whole round; use"
                " fedng.federated.round.server_step for ServerConfig.robust / dp_clip"
            )
        self.t_server = 0.0
        self.cpu_server = 0.0
        t0, c0 = time.perf_counter(), time.thread_time()
        self.state = state
        self.algo: Algorithm[Any] = get_algorithm(state.config.algorithm)
        self.acc: Accumulator = self.algo.begin(state)
        self.warmup = warmup
        self.total = total_examples
        self.weights: dict[int, float] = {}
        self.norms: list[float] = []
        self.rejected: Rejected = {}
        self.seen: set[int] = set()
        self.answered: set[int] = set()
        self.signature: str | None = None
        self.held: list[tuple[ClientUpdate, float, dict[str, float]]] = []
        ref = state.meta.get(REFERENCE_KEY, {}).get("delta_norm")
        self.norm_ref: float | None = ref
        self.scale_ref: dict[str, float] | None = self.algo.reference_scales(state)
        self.floor = curvature_floor(state)  # the run's peak round medians (the batch rule)
        self._refs: tuple[object, dict[str, float]] | None = None
        self.scales: dict[str, list[float]] = {}  # the accepted replies' curvature scales
        self._fast_scales: list[list[float]] = []  # those of the fast path's, per reply
        self.probe_message: ServerMessage | None = None
        # FedAvg-like rounds: a plain update is checked and folded in one native call
        acc = self.acc
        plan = plain_plan(state, self.algo) if type(acc) is MeanStep else None
        self._plain = plan if plan and type(acc) is MeanStep and acc.deltas.exact else None
        self._plain_names = [k for k, _ in plan or []]
        self._plain_sizes = [math.prod(v) for _, v in plan or []]
        # FedNG-summable rounds: the replies that match the first accepted one's plan likewise
        self._summable: SummableFast | None = None
        self._summable_tried = False
        self._clock(t0, c0)

    def _clock(self, t0: float, c0: float) -> None:
        """Adds the wall and this thread's CPU time since (t0, c0) (CPU time is what a loaded
        machine does not inflate by descheduling)."""
        self.t_server += time.perf_counter() - t0
        self.cpu_server += time.thread_time() - c0

    # --- phase 1 ------------------------------------------------------------------------------

    @property
    def accepted_ids(self) -> list[int]:
        """The clients folded in so far (the ones a probe goes to)."""
        return list(self.weights)

    def _reject(self, cid: int, why: str) -> Verdict:
        self.rejected.setdefault(cid, []).append(why)
        return Verdict(cid, REJECTED, why)

    def add(self, update: ClientUpdate) -> Verdict:
        """Validates one reply and folds it into the round's sums.

        Never raises on a malformed reply: whatever it provokes is its rejection.

        Returns:
            The verdict (see `Verdict`).
        """
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return self._add(update)
        finally:
            self._clock(t0, c0)

    def _add(self, update: ClientUpdate) -> Verdict:
        if not isinstance(update, ClientUpdate) or not _is_int(update.client_id):
            return Verdict(None, REJECTED, "not a client update with an integer client id")
        cid = update.client_id
        if cid in self.seen:
            return self._reject(cid, "a second update with this client id this round")
        self.seen.add(cid)
        if self._plain is not None:
            try:
                arrays = plain_arrays(self.state, update, self._plain)
            except Exception:  # whatever a payload provokes: the Python checks give the reason
                arrays = None
            if arrays is not None:
                if self.warmup <= 0 or self.norm_ref is not None:
                    return self._fold_plain(update, arrays)
                return self._hold_plain(update, arrays)
        fast = self._summable
        if fast is not None and (
            self.warmup <= 0 or (self.norm_ref is not None and self.scale_ref is not None)
        ):  # judged on arrival (no warm-up hold): the fast path decides, or the checks below
            try:
                w = self._weight(update)
                got = fast.try_fold(update, w, self.norm_ref, self._scale_refs())
            except Exception:  # whatever a payload provokes: the Python checks give the reason
                got = None
            if got is not None:
                self.weights[cid] = w
                self.norms.append(got[0])
                self._fast_scales.append(got[1])  # in `fast.plan.scale_names` order
                return Verdict(cid, ACCEPTED)
        reason = safe_check(self.state, update, self.algo)
        if reason is not None:
            return self._reject(cid, reason)
        sig = signature(update)
        if sig is not None:
            if self.signature is None:
                self.signature = sig
            elif sig != self.signature:
                return self._reject(cid, "curvature: kinds/layouts differ from this round's")
        try:
            nrm = delta_norm(update)
            scales = update_scales(update)
        except Exception as err:  # whatever a payload provokes is its rejection
            return self._reject(cid, f"scale check failed ({err})"[:200])
        if self._needs_warmup(scales):
            self.held.append((update, nrm, scales))
            if len(self.held) >= self.warmup:
                self._release()
            return Verdict(cid, PENDING)
        return self._judge(update, nrm, scales)

    def _hold_plain(self, update: ClientUpdate, arrays: list[torch.Tensor]) -> Verdict:
        """`check_update`'s finiteness test of a plain update (one native pass) and its place in
        the warm-up buffer: what the Python path does for it before a reference exists."""
        names = self._plain_names
        sqs = sq_norms(arrays)
        store_sq_norms(update, names, sqs)
        why = nan_reason("delta", names, sqs)
        if why is not None:
            return self._reject(update.client_id, why)
        self.held.append((update, math.sqrt(math.fsum(sqs)), {}))
        if len(self.held) >= self.warmup:
            self._release()
        return Verdict(update.client_id, PENDING)

    def _fold_plain(self, update: ClientUpdate, arrays: list[torch.Tensor]) -> Verdict:
        """`check_update`'s finiteness test, `_judge`'s norm check and the fold of a plain update
        (see `plain_arrays`) in one native call: the same verdicts, reasons and sums."""
        cid = update.client_id
        ref, ratio = self.norm_ref, self.state.config.max_norm_ratio
        bound = ratio * ref if ref is not None and ref > 0 else math.inf
        w = self._weight(update)
        names = self._plain_names
        acc = cast(MeanStep, self.acc)  # the fast path is on only for a MeanStep (__init__)
        folded, sqs = acc.deltas.fold_plain(names, arrays, self._plain_sizes, w, bound)
        store_sq_norms(update, names, sqs)
        why = nan_reason("delta", names, sqs)
        if why is not None:
            return self._reject(cid, why)
        nrm = math.sqrt(math.fsum(sqs))
        if not folded:
            return self._reject(
                cid, f"delta norm {nrm:.3g} exceeds {ratio:g} x the reference {ref or 0:.3g}"
            )
        self.weights[cid] = w
        self.norms.append(nrm)
        return Verdict(cid, ACCEPTED)

    def _weight(self, update: ClientUpdate) -> float:
        """The reply's fold weight: `n_k`, or `n_k / total` when the total is known."""
        n = update.num_examples
        return float(n) if self.total is None else n / self.total

    def _needs_warmup(self, scales: dict[str, float]) -> bool:
        """Whether a reference is missing (and the warm-up buffer still open)."""
        if self.warmup <= 0:
            return False
        missing_scale = bool(scales) and self.scale_ref is None
        return self.norm_ref is None or missing_scale

    def _release(self, final: bool = False) -> None:
        """Sets the missing references from the held updates (their median; with fewer than 3
        at the end of the round the batch rules apply) and judges them."""
        held, self.held = self.held, []
        norms = [n for _, n, _ in held]
        if self.norm_ref is None:
            fallback = None
            if len(held) == 1 and final:
                fallback = _param_norm(self.state)
            self.norm_ref = reference_scale(norms, fallback)
        if self.scale_ref is None:
            keys = {k for _, _, s in held for k in s}
            self.scale_ref = {
                k: r
                for k in keys
                if (r := reference_scale([s[k] for _, _, s in held if k in s], None)) is not None
            }
        self.warmup = 0  # references are set: later updates are judged on arrival
        for u, n, s in held:
            self._judge(u, n, s)

    def _judge(self, update: ClientUpdate, nrm: float, scales: dict[str, float]) -> Verdict:
        cid = update.client_id
        ratio = self.state.config.max_norm_ratio
        if too_large(nrm, self.norm_ref, ratio):
            return self._reject(
                cid,
                f"delta norm {nrm:.3g} exceeds {ratio:g} x the reference {self.norm_ref or 0:.3g}",
            )
        refs = self._scale_refs()
        cratio = curvature_ratio(ratio)
        bad = [k for k, v in scales.items() if too_large(v, refs.get(k), cratio)]
        if bad:
            k = min(bad)  # the first in sorted order, as the batch rule reports it
            return self._reject(
                cid,
                f"curvature scale {k} = {scales[k]:.3g} exceeds {cratio:g} x the reference"
                f" {refs.get(k) or 0:.3g}",
            )
        w = self._weight(update)
        arrays = None if self._plain is None else plain_arrays(self.state, update, self._plain)
        folded = False
        if arrays is not None and isinstance(self.acc, MeanStep):  # a held plain update
            folded, _ = self.acc.deltas.fold_checked(self._plain_names, arrays, w, math.inf)
        if not folded and self._summable is not None:  # a held reply after the plan's first
            try:  # the native call checks it again and folds it (nothing written if it declines)
                folded = self._summable.try_fold(update, w, self.norm_ref, refs) is not None
            except Exception:  # whatever a payload provokes: the Python fold below
                folded = False
        if not folded:
            self.acc.fold(update, w)
            if not self._summable_tried:  # the round's first reply folded by the Python path
                self._summable_tried = True
                plan = summable_plan(self.state, self.algo, self.acc, update)
                if plan is not None and isinstance(self.acc, CurvatureSums):
                    self._summable = SummableFast(self.state, plan, self.acc)
        self.weights[cid] = w
        self.norms.append(nrm)
        for k, v in scales.items():
            self.scales.setdefault(k, []).append(v)
        return Verdict(cid, ACCEPTED)

    def _scale_refs(self) -> dict[str, float]:
        """The curvature-scale references the checks use: the round's own (`scale_ref`, from
        the global curvature or the warm-up) floored at the run's peak round medians, as the
        batch rule floors its (`validate.floored_refs`); made again only when `scale_ref` is."""
        if self._refs is None or self._refs[0] is not self.scale_ref:
            self._refs = (self.scale_ref, floored_refs(self.scale_ref, self.floor))
        return self._refs[1]

    def _reference(self) -> dict[str, Any]:
        """The references to keep for the next round (`validate.reference_of`'s rule): with at
        least 3 accepted updates, their median delta norm and the run's peak of each curvature
        scale's round median (`validate.raised_peak`); else the previous ones."""
        out = dict(self.state.meta.get(REFERENCE_KEY, {}))
        if len(self.norms) < 3:
            return out
        out["delta_norm"] = statistics.median(self.norms)
        scales: dict[str, list[float]] = dict(self.scales)
        if self._summable is not None and self._fast_scales:  # one column per scale name
            cols = zip(*self._fast_scales, strict=True)
            for k, col in zip(self._summable.plan.scale_names, cols, strict=True):
                scales[k] = [*scales.get(k, []), *col]
        peak = raised_peak(self.state, scales)
        if peak:
            out[PEAK_KEY] = peak
        return out

    # --- phase 2 (optional) -------------------------------------------------------------------

    def _scale(self) -> float:
        if self.total is not None:
            return 1.0
        tot = sum(self.weights.values())
        return 1.0 / tot if tot > 0 else 1.0

    def probe(self) -> ServerMessage | None:
        """The algorithm's second-phase message for the accepted clients (sealed), or None when
        the round has no second phase; ends phase 1 (call after the last `add`)."""
        t0, c0 = time.perf_counter(), time.thread_time()
        if self.held:
            self._release(final=True)
        if self.probe_message is None and self.weights:
            msg = self.acc.probe(self.state, self._scale())
            self.probe_message = None if msg is None else msg.seal()
        self._clock(t0, c0)
        return self.probe_message

    def add_reply(self, reply: ClientUpdate) -> Verdict:
        """Folds one accepted client's answer to `probe()`; never raises on a malformed one."""
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            if not isinstance(reply, ClientUpdate) or not _is_int(reply.client_id):
                return Verdict(None, REJECTED, "not a reply with an integer client id")
            cid = reply.client_id
            if self.probe_message is None or cid not in self.weights:
                return Verdict(cid, REJECTED, "no probe was sent to this client")
            if cid in self.answered or reply.round != self.state.round:
                return Verdict(cid, REJECTED, "a second reply, or one for another round")
            try:
                why = self.acc.fold_reply(reply, self.weights[cid])
            except Exception as err:  # whatever a reply provokes is its rejection
                why = f"invalid reply ({type(err).__name__}: {str(err)[:120]})"
            if why is not None:
                return Verdict(cid, REJECTED, why)
            self.answered.add(cid)
            return Verdict(cid, ACCEPTED)
        finally:
            self._clock(t0, c0)

    # --- end of the round ---------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Tensor bytes the round holds (running sums, plus any warm-up buffer)."""
        held = sum(
            v.numel() * v.element_size()
            for u, _, _ in self.held
            for part in (u.delta, u.curvature, u.extras)
            for v in part.values()
        )
        return self.acc.nbytes + held

    def finish(self) -> tuple[State, ServerMessage]:
        """Applies the round: (new state, message for the next round). The state's log holds
        the accepted ids, every rejection with its reasons, and `server_time_s` (the time spent
        in this object's calls)."""
        t0, c0 = time.perf_counter(), time.thread_time()
        if self.held:
            self._release(final=True)
        new: State | None = None  # the state itself, copied only when the round changes nothing
        log: dict[str, Any] = {"rejected": self.rejected}
        accepted = list(self.weights)
        if accepted:
            work = _shallow_copy(self.state) if type(self.acc) is MeanStep else self.state.copy()
            work.log = {}
            try:
                res = self.acc.finish(work, self._scale())
                bad = non_finite(res)
                why = f"aggregation produced non-finite {bad[:5]}" if bad else None
            except Exception as err:  # a payload that breaks aggregation rolls the round back
                res, why = work, f"aggregation failed ({type(err).__name__}: {str(err)[:120]})"
            if why is None:
                new = res
                new.meta[REFERENCE_KEY] = self._reference()
            else:
                log["rolled_back"] = why
                accepted = []
        else:
            log["skipped"] = "no valid update this round"
        if new is None:
            new = self.state.copy()
            new.log = {}
        if self.probe_message is not None:
            log["probe_answered"] = len(self.answered)
        new.log = {"accepted": accepted, **log, **new.log}
        new.round = self.state.round + 1
        message = self.algo.broadcast(new).seal()
        self._clock(t0, c0)
        new.log["server_time_s"] = self.t_server
        return new, message


def _shallow_copy(state: State) -> State:
    """A copy sharing the state's tensors: for `MeanStep.finish`, whose server step assigns new
    parameter and momentum tensors (`apply_server_step`) and never writes into the old ones."""
    return ServerState(
        round=state.round,
        params=dict(state.params),
        config=state.config,
        buffers=dict(state.buffers),
        meta=copy.deepcopy(state.meta),
        log={},
    )


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _param_norm(state: State) -> float:
    total = sum(float((v.double() ** 2).sum()) for v in state.params.values())
    return math.sqrt(total)


def stream_step(
    state: State,
    updates: list[ClientUpdate],
    answer: Answer | None = None,
) -> tuple[State, ServerMessage]:
    """A whole round through `ServerRound`, the updates folded in the order given: what a
    streaming deployment computes when its replies arrive in that order (the in-process
    simulator's `simulate(streaming=True)` and the Flower strategy's streaming mode use it).

    Args:
        state: the server state (not modified).
        updates: the round's updates, in arrival order.
        answer: carries a second-phase probe to the accepted clients and returns their replies
            (None: the round finishes without them; probed blocks then keep the mean).

    Returns:
        (new state, message for the next round).
    """
    rnd = ServerRound(state)
    for update in updates:
        rnd.add(update)
    probe = rnd.probe()
    if probe is not None and answer is not None:
        for reply in answer(probe, rnd.accepted_ids):
            rnd.add_reply(reply)
    return rnd.finish()
