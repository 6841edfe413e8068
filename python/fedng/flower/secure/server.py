"""FedNG's summable rounds under Flower's SecAgg+: the server sees only weighted sums.

One round is up to three secure passes (`secure_sum.secure_mean`), each a full SecAgg+ run:

1. range: the clients train on the broadcast and send per-segment exponent histograms; the
   server picks one power-of-two scale per segment that no client's entries exceed
   (`vector`), so SecAgg+ never clips silently;
2. main: the clients send their update scaled by those scales; the server reads
   `M = sum p_k delta_k`, `S = sum p_k F_k delta_k`, the pooled curvature payload and the
   weighted fraction of entries clipped (0 unless a client's value exceeds 2**E_MAX);
3. probe (FedNG's summable K-FAC / low-rank line search): the server broadcasts M and d, the
   clients answer `[<M, F_k d>, <d, F_k d>]` per block; their weighted mean is again a secure
   sum. Its scale needs no range pass: with p_k F_k <= sum_j p_j F_j = P for PSD K-FAC factors,
   `|<u, F_k v>| <= sqrt(<u, P u> <v, P v>) / p_min**2`, computed from the pooled curvature.

The pooled quantities go through the algorithm's own accumulator (`Algorithm.begin` → `fold`
→ `probe` → `fold_reply` → `finish`) as one update of weight 1, so the server step is exactly the
plaintext one applied to the secure sums. What the server can still check, it does: the pooled
curvature's full PSD test (a failure keeps the mean step and the previous curvature, as in
plaintext), finiteness of the result (a non-finite model rolls the round back), every client's
plaintext `num_examples` against `max_num_examples`, and that every client sent the same
template. Per-client validation (norm outliers, per-client PSD, duplicate payloads) is
impossible: no individual payload reaches the server.

Under distributed DP (`dp_mode="distributed"`), clients clip and add their noise share before
masking and report weight 1; the server rescales the uniform mean to the sum over `dp_clients`,
projects the pooled curvature to PSD (post-processing), and answers the line search itself from
the pooled curvature (as the plaintext batch server does when it answers from the updates it
holds, which the DP stage replaced by the one private update), so no statistic of a client's own
curvature leaves it beyond its noised share.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run

from fedng.curvature import CurvatureSet, to_matrix
from fedng.federated.aggregation.matvec import block_dots, fisher_matvecs
from fedng.federated.aggregation.stage import psd_project
from fedng.federated.aggregation.summable import REPLY_KEY, decode_probe
from fedng.federated.algorithms.base import Algorithm, MeanStep, State
from fedng.federated.algorithms.curvature_payload import decoded_curvature
from fedng.federated.algorithms.fedng_server import PROBE_PHASE, CurvatureSums
from fedng.federated.algorithms.registry import get_algorithm
from fedng.federated.config.common import ClientConfig, ServerConfig
from fedng.federated.config.curvature import FedNGConfig
from fedng.federated.messages import ClientUpdate, ServerMessage
from fedng.federated.report.history import RoundRecord, fill_round
from fedng.federated.server_round import non_finite
from fedng.federated.tasks.base import FederatedTask
from fedng.flower.client_app import TaskFn, default_task
from fedng.flower.persist import ServerCheckpoint
from fedng.flower.runconfig import RunSpec
from fedng.flower.secure.client import (
    MAIN,
    PHASE,
    PROBE,
    PROBE_RANGE,
    RANGE,
    SCALES,
    TEMPLATE,
    UNIT_WEIGHT,
)
from fedng.flower.secure.client import WIRE as WIRE_KEY
from fedng.flower.secure.secure_sum import SecureMean, secure_mean
from fedng.flower.secure.vector import (
    ANSWER,
    CONTRIB,
    CURV,
    DELTA,
    E_MIN,
    METRIC,
    Template,
    answer_template,
    error_bound,
    scales_from_histogram,
    secagg_weights,
    unpack_mean,
)
from fedng.flower.server_app import build_strategy, run_server
from fedng.flower.strategy import FedNGStrategy, RoundHook

logger = logging.getLogger("fedng.flower")

BOUNDED_KINDS = frozenset({"kfac", "diag"})
"""Curvature kinds whose line-search answers the PSD bound covers (`probe_scale`)."""
PROBE_HEADROOM = 2.0
"""Factor on the line-search bound (the pooled curvature is itself quantized)."""


def check_secure(client: ClientConfig, server: ServerConfig) -> None:
    """Refuses, with one line, a configuration that cannot run under secure aggregation.

    Raises:
        ValueError: robust aggregation, the exact Fisher merge, per-client full curvature checks,
            central DP, or an algorithm that aggregates a list of updates.
    """
    why = None
    algo = get_algorithm(server.algorithm)
    if server.robust != "none":
        why = f"robust aggregation (robust={server.robust!r}) needs each client's update"
    elif server.dp_clip > 0 and server.dp_mode != "distributed":
        why = "central DP clips each update on the server; use dp_mode='distributed'"
    elif client.dp_clip > 0 and client.dp_mode != server.dp_mode:
        why = "client and server dp_mode differ"
    elif server.algorithm == "fedng":
        opts = server.options_as(FedNGConfig)
        if opts.aggregation == "fisher":
            why = "the exact Fisher merge (aggregation='fisher') needs each client's curvature"
        elif opts.curvature_check == "full":
            why = "curvature_check='full' validates each client's curvature; use 'auto'"
    elif type(algo).aggregate is not Algorithm.aggregate:
        why = f"{server.algorithm} aggregates a list of updates, not a weighted sum"
    if why is not None:
        raise ValueError(f"secure aggregation: {why} (the server sees only the sum)")


@dataclass
class SecureRound:
    """What a secure round revealed and cost (`state.log["secagg"]`).

    Attributes:
        passes: secure passes run.
        scales: per segment the scale of the main pass.
        bound: per part name, per entry, the bound on its quantization error (original units).
        clipped: weighted mean fraction of clipped entries (main pass; 0 when none was).
        probe_clipped: the same for the line-search answers.
        levels: quantization levels Q of the main pass.
        sums: the secure sums (`d/`, `fd/`, `c/` parts; `ls` the line-search mean).
        probe: the line-search message the clients answered (None without a probe pass).
        metrics: the weighted means of the clients' `SECURE_METRICS` (none under DP).
        answered: clients whose line-search answers were summed.
    """

    passes: int = 0
    scales: list[float] = field(default_factory=list)
    bound: dict[str, torch.Tensor] = field(default_factory=dict)
    clipped: float = 0.0
    probe_clipped: float = 0.0
    levels: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    probe: ServerMessage | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    answered: int = 0

    def log(self) -> dict[str, Any]:
        """The JSON-able summary kept in the round's server log."""
        return {
            "passes": self.passes,
            "levels": self.levels,
            "clipped_fraction": self.clipped,
            "probe_clipped_fraction": self.probe_clipped,
            "max_bound": max((float(v.max()) for v in self.bound.values()), default=0.0),
        }


class CountingGrid(Grid):
    """A Grid that forwards to another and counts the serialized bytes of every message content
    it pushes (`down`) and pulls (`up`)."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner
        self.up = 0
        self.down = 0

    @staticmethod
    def size(content: RecordDict) -> int:
        """The serialized size of a message's content (Flower's protobuf)."""
        return int(recorddict_to_proto(content).ByteSize())

    def set_run(self, run: Run) -> None:
        """Sets the run."""
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        """The run."""
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """As the inner grid."""
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """As the inner grid."""
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Counts, then pushes."""
        msgs = list(messages)
        self.down += sum(self.size(m.content) for m in msgs)
        return self.inner.push_messages(msgs)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pulls, then counts."""
        got = list(self.inner.pull_messages(message_ids))
        self.up += sum(self.size(m.content) for m in got if m.has_content())
        return got

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Counts both ways around the inner grid's."""
        msgs = list(messages)
        self.down += sum(self.size(m.content) for m in msgs)
        got = list(self.inner.send_and_receive(msgs, timeout=timeout))
        self.up += sum(self.size(m.content) for m in got if m.has_content())
        return got


def _scale_bytes(scales: list[float]) -> bytes:
    return np.asarray(scales, dtype=np.float64).tobytes()


def _pooled_update(
    state: State, template: Template, parts: dict[str, torch.Tensor]
) -> ClientUpdate:
    """The secure sums as one update (client id -1) the accumulator folds with weight 1."""
    upd = ClientUpdate(
        -1,
        state.round,
        {k[len(DELTA) :]: v for k, v in parts.items() if k.startswith(DELTA)},
        1,
        extras={k: v for k, v in parts.items() if k.startswith(CONTRIB)},
    )
    curv = {k[len(CURV) :]: v for k, v in parts.items() if k.startswith(CURV)}
    if curv and template.curv_meta is not None:
        upd.curvature = curv
        upd.meta["curv"] = template.curv_meta
    return upd


def _dp_rescale(cfg: ServerConfig, upd: ClientUpdate, present: int) -> None:
    """Distributed DP: the uniform mean over `present` clients -> their sum / dp_clients, the
    pooled curvature projected to PSD (as the plaintext DP stage does)."""
    f = present / float(cfg.dp_clients)
    upd.delta = {k: v * f for k, v in upd.delta.items()}
    upd.extras = {k: v * f for k, v in upd.extras.items()}
    if upd.curvature:
        cs = CurvatureSet.from_arrays(
            {k: v * f for k, v in upd.curvature.items()}, upd.meta["curv"]
        )
        psd_project(cs)
        upd.curvature, upd.meta["curv"] = cs.to_arrays(torch.float32)


def probe_scale(probe: ServerMessage, pooled: ClientUpdate, p_min: float) -> float:
    """A power-of-two bound on every client's line-search answer (module docstring)."""
    cs = decoded_curvature(pooled)
    if cs is None:
        return 2.0**E_MIN
    m, d = decode_probe(probe.extras)
    # the probe carries only the probed (non-diagonal) blocks' parameters
    mb = [to_matrix(m, lay) if lay.weight in m else None for lay in cs.layouts]
    db = [to_matrix(d, lay) if lay.weight in d else None for lay in cs.layouts]
    mpm = block_dots(mb, fisher_matvecs(cs, mb))
    dpd = block_dots(db, fisher_matvecs(cs, db))
    top = max([max(math.sqrt(abs(a * b)), abs(b)) for a, b in zip(mpm, dpd, strict=True)] or [0])
    bound = PROBE_HEADROOM * top / max(p_min, 1e-12) ** 2
    if not bound > 0 or not math.isfinite(bound):
        return 2.0**E_MIN
    return 2.0 ** max(E_MIN, math.ceil(math.log2(bound)))


@dataclass
class RoundInputs:
    """A secure round's fixed inputs.

    Attributes:
        grid: the grid (a `CountingGrid` to count bytes).
        targets: node id -> client id, the sampled clients' nodes.
        server_round: Flower's round number (group ids).
        num_shares: SecAgg+'s shares (int > 2 or a fraction of the nodes).
        threshold: SecAgg+'s reconstruction threshold (int or a fraction of the shares).
        timeout: seconds each SecAgg+ stage waits.
    """

    grid: Grid
    targets: dict[int, int]
    server_round: int
    num_shares: int | float = 1.0
    threshold: int | float = 0.5
    timeout: float | None = None


def _pass(inp: RoundInputs, nodes: list[int], config: dict[str, Any], weight: float) -> SecureMean:
    """One secure pass; an exception inside SecAgg+ (e.g. a node sending a vector of another
    length, which no server can attribute) fails the pass instead of the server."""
    try:
        return secure_mean(
            inp.grid,
            {n: config for n in nodes},
            server_round=inp.server_round,
            max_weight=weight,
            num_shares=inp.num_shares,
            threshold=inp.threshold,
            timeout=inp.timeout,
        )
    except Exception as err:  # SecAgg+ raises on malformed masked vectors
        return SecureMean(None, failures=[f"SecAgg+ failed ({type(err).__name__}: {err})"[:200]])


def _line_search(
    inp: RoundInputs,
    nodes: list[int],
    rep: SecureRound,
    acc: CurvatureSums | MeanStep,
    main: SecureMean,
    weight: float,
    pooled: ClientUpdate,
) -> str | None:
    """The line-search pass(es): scales from the PSD bound (K-FAC, diagonal) or, for other
    kinds, from a range pass of the answers; then their secure mean into `acc`. Returns why the
    answers are unusable (None when they were folded in)."""
    if rep.probe is None:
        return "no line-search probe this round"
    wire = rep.probe.to_bytes()
    blocks = int(rep.probe.meta.get("blocks", 0))
    tpl = answer_template(blocks)
    cs = decoded_curvature(pooled)
    if cs is not None and set(cs.reps) <= BOUNDED_KINDS:
        ws = secagg_weights([main.num_examples[n] for n in nodes], main.levels, weight)
        scales = [probe_scale(rep.probe, pooled, min(ws) / sum(ws))] * tpl.segments
    else:
        ask = {PHASE: PROBE_RANGE, WIRE_KEY: wire}
        hist = _pass(inp, nodes, ask, weight)
        rep.passes += 1
        if hist.mean is None:
            return "line-search range pass failed"
        thr = 2 * error_bound(len(hist.num_examples), hist.levels, hist.total_weight)
        scales = scales_from_histogram(hist.mean, tpl.segments, thr)
        nodes = sorted(hist.num_examples)
    third = _pass(inp, nodes, {PHASE: PROBE, WIRE_KEY: wire, SCALES: _scale_bytes(scales)}, weight)
    rep.passes += 1
    if third.mean is None:
        return "line-search pass failed"
    parts, rep.probe_clipped = unpack_mean(tpl, third.mean, scales)
    vals = parts[ANSWER].double()
    vals[:, 1] = vals[:, 1].clamp_min(0.0)  # quantization noise around 0
    rep.sums[ANSWER] = vals.clone()
    beta = error_bound(len(third.num_examples), third.levels, third.total_weight)
    rep.bound[ANSWER] = beta * torch.tensor(scales, dtype=torch.float64).reshape(-1, 2)
    rep.answered = len(third.num_examples)
    reply = ClientUpdate(
        -1, rep.probe.round, {}, 1, extras={REPLY_KEY: vals.float()}, meta={"phase": PROBE_PHASE}
    )
    return acc.fold_reply(reply, 1.0)


def secure_round(
    state: State, message: ServerMessage, inp: RoundInputs
) -> tuple[State, ServerMessage, SecureRound]:
    """One FedNG (or FedAvg) round over SecAgg+; see the module docstring.

    Args:
        state: the server state (not modified).
        message: its broadcast.
        inp: the grid, the sampled nodes and SecAgg+'s parameters.

    Returns:
        (new state, next broadcast, what the round revealed). A round whose secure passes fail
        leaves the model as it was (`log["skipped"]` says why).
    """
    t0 = time.perf_counter()
    cfg = state.config
    algo = get_algorithm(cfg.algorithm)
    dp = cfg.dp_clip > 0
    work = state.copy()
    work.log = {}
    rep = SecureRound()
    rejected: dict[int, list[str]] = {}
    nodes = sorted(inp.targets)

    def done(why: str | None, accepted: list[int]) -> tuple[State, ServerMessage, SecureRound]:
        new = work if why is None else state.copy()
        if why is not None:
            new.log = {"skipped": why}
        new.log = {"accepted": accepted, "rejected": rejected, **new.log, "secagg": rep.log()}
        new.round = state.round + 1
        nxt = algo.broadcast(new).seal()
        new.log["server_time_s"] = time.perf_counter() - t0
        return new, nxt, rep

    base = {UNIT_WEIGHT: dp}
    first = _pass(
        inp, nodes, {**base, PHASE: RANGE, WIRE_KEY: message.to_bytes()},
        1.0 if dp else float(cfg.max_num_examples),
    )  # fmt: skip
    rep.passes += 1
    if first.mean is None:
        return done(f"range pass: {'; '.join(first.failures)}", [])
    counts = Counter(str(first.metrics[n].get(TEMPLATE, "")) for n in first.metrics)
    text = counts.most_common(1)[0][0]
    keep = []
    for n in sorted(first.metrics):
        k = first.num_examples[n]
        if str(first.metrics[n].get(TEMPLATE, "")) != text:
            rejected[inp.targets[n]] = ["secure template differs from the round's"]
        elif not dp and not 1 <= k <= cfg.max_num_examples:
            rejected[inp.targets[n]] = [f"num_examples {k} outside [1, {cfg.max_num_examples}]"]
        else:
            keep.append(n)
    try:
        template = Template.from_json(text)
    except ValueError as err:
        return done(str(err), [])
    thr = 2 * error_bound(len(first.num_examples), first.levels, first.total_weight)
    scales = scales_from_histogram(first.mean, template.segments, thr)
    weight = 1.0 if dp else float(max(first.num_examples[n] for n in keep)) if keep else 1.0
    main = _pass(inp, keep, {**base, PHASE: MAIN, SCALES: _scale_bytes(scales)}, weight)
    rep.passes += 1
    if main.mean is None:
        return done(f"main pass: {'; '.join(main.failures)}", [])
    present = sorted(main.num_examples)
    parts, rep.clipped = unpack_mean(template, main.mean, scales)
    rep.scales, rep.levels = scales, main.levels
    beta = error_bound(len(present), main.levels, main.total_weight)
    per_entry, _ = unpack_mean(template, np.ones(template.size), scales)
    rep.bound = {k: beta * v.double() for k, v in per_entry.items()}
    rep.sums = dict(parts)
    rep.metrics = {k[len(METRIC) :]: float(v) for k, v in parts.items() if k.startswith(METRIC)}
    parts = {k: v for k, v in parts.items() if not k.startswith(METRIC)}
    if not all(bool(torch.isfinite(v).all()) for v in parts.values()):
        return done("secure sums are not finite", [])
    pooled = _pooled_update(work, template, parts)
    if dp:
        _dp_rescale(cfg, pooled, len(present))
    acc = algo.begin(work)
    if not isinstance(acc, (MeanStep, CurvatureSums)):
        return done(f"{cfg.algorithm} cannot aggregate secure sums", [])
    acc.fold(pooled, 1.0)
    probe = acc.probe(work, 1.0)
    if probe is not None:
        if dp:  # the pooled private curvature answers (no client statistic leaves un-noised)
            why = acc.fold_reply(algo.answer_probe(pooled, probe), 1.0)
        else:
            rep.probe = probe.seal()
            why = _line_search(inp, present, rep, acc, main, weight, pooled)
            work.log["probe_answered"] = rep.answered
        if why is not None:
            work.log["line_search_failed"] = why
    work = acc.finish(work, 1.0)
    if non_finite(work):
        return done(f"aggregation produced non-finite {non_finite(work)[:5]}", [])
    if rep.clipped > 0:
        logger.warning("secure round: %.3g of the entries were clipped (weighted)", rep.clipped)
    return done(None, [inp.targets[n] for n in present])


class SecureFedNGStrategy(FedNGStrategy):
    """`FedNGStrategy` whose rounds run over SecAgg+ (`secure_round`): the same sampling,
    history, evaluation and checkpoints; the server never sees one client's payload.

    Args:
        client_config: the clients' config (checked with the server's by `check_secure`).
        num_shares, threshold, stage_timeout: SecAgg+'s parameters (see `secure_sum`).
        *args, **kwargs: as `FedNGStrategy`.
    """

    def __init__(
        self,
        *args: Any,
        client_config: ClientConfig,
        num_shares: int | float = 1.0,
        threshold: int | float = 0.5,
        stage_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        check_secure(client_config, self.server_config)
        self.num_shares = num_shares
        self.threshold = threshold
        self.stage_timeout = stage_timeout
        self.reports: list[SecureRound] = []

    def _run_round(self, grid: Grid, server_round: int, timeout: float) -> RoundRecord:
        if self.state is None or self.message is None:
            raise RuntimeError("SecureFedNGStrategy: call start() (it initializes the state)")
        failed: dict[int, str] = {}
        ids = self._sample(server_round)
        targets = {n: c for n, c in self._targets(grid, ids, failed).items()}
        counting = CountingGrid(grid)
        inp = RoundInputs(
            counting, targets, server_round, self.num_shares, self.threshold,
            self.stage_timeout if self.stage_timeout is not None else timeout,
        )  # fmt: skip
        self.state, self.message, rep = secure_round(self.state, self.message, inp)
        self.reports.append(rep)
        rec = RoundRecord(server_round, math.nan, math.nan, math.nan, math.nan)
        rec.bytes_up, rec.bytes_down = counting.up, counting.down
        prev = self.history.rounds[-1].cum_bytes if self.history.rounds else 0
        rec.cum_bytes = prev + rec.bytes_up + rec.bytes_down
        rec = fill_round(rec, self.state.log, failed, {}, ids)
        rec.train_loss = rep.metrics.get("train_loss", math.nan)  # weighted by n_k
        return rec


def build_secure_strategy(
    spec: RunSpec,
    task: FederatedTask,
    on_round: RoundHook | None = None,
    checkpoint: ServerCheckpoint | None = None,
) -> tuple[SecureFedNGStrategy, ArrayRecord]:
    """`build_strategy`'s strategy as a `SecureFedNGStrategy` (same seed, initial model,
    history, checkpoints).

    Raises:
        ValueError: a configuration `check_secure` refuses.
    """
    plain, initial = build_strategy(spec, task, on_round, checkpoint)
    strategy = SecureFedNGStrategy(
        plain.server_config,
        client_config=spec.client_config(task),
        participation=plain.participation,
        seed=plain.seed,
        evaluator=plain.evaluator,
        history=plain.history,
        on_round=on_round,
        checkpoint=checkpoint,
        resume=spec.resume,
    )
    return strategy, initial


def run_secure(
    grid: Grid, spec: RunSpec, task: FederatedTask, on_round: RoundHook | None = None
) -> SecureFedNGStrategy:
    """`run_server` under SecAgg+ (`build_secure_strategy`): checkpoints, resume and the final
    model as there.

    Returns:
        The strategy after the run (`.state`, `.history`, `.reports`).
    """
    strategy = run_server(grid, spec, task, on_round, build=build_secure_strategy)
    if not isinstance(strategy, SecureFedNGStrategy):  # what build_secure_strategy builds
        raise TypeError(f"run_secure: got a {type(strategy).__name__}, not a SecureFedNGStrategy")
    return strategy


def make_secure_server_app(task_fn: TaskFn = default_task) -> ServerApp:
    """A ServerApp running the run config's algorithm under SecAgg+ (pair it with
    `make_secure_client_app`).

    Returns:
        The ServerApp (assign it at module level for a FAB).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        spec = RunSpec.from_run_config(context.run_config)
        run_secure(grid, spec, task_fn(spec))

    return app
