"""Validation of every client payload on arrival: a bad one is rejected with a reason.

Checks, in order:

1. Client ids: every update of an id sent more than once in a round is rejected (an impersonator
   cannot block the real client silently, and neither is chosen over the other).
2. Each update on its own: the round it answers, `num_examples` (an int in
   [1, `max_num_examples`]), the delta's names / shapes / dtypes and finiteness, the algorithm's
   extras, the curvature payload (metadata structure, layouts against the model and the server's,
   finite / symmetric / PSD within tolerance). Any exception a check raises on a malformed
   payload is a rejection with its reason, never an error of the round.
3. Consistency: the round's curvature payloads must share kinds, block layouts and
   representation metadata (they are summed); the most common signature (the first on a tie)
   wins, the others are rejected.
4. Scale against the round: a delta norm above `max_norm_ratio` times its reference, or a
   curvature scale (per block, and per K-FAC factor `tr(A)/n`, `tr(G)/m` unless
   `ServerConfig.robust` makes the split canonical) above `max_norm_ratio**2` times its
   reference, is rejected. The reference is the round's median with at least 3 values;
   otherwise the previous round's median delta norm (`state.meta["reference"]`) or the server's
   own curvature, else the smaller of two values, else for a lone delta the norm of the model
   itself. (Two updates with no other reference that disagree beyond the ratio cannot be told
   apart: the larger one on each measure is rejected, which may be both; the round is then
   skipped rather than steered.) A curvature scale's reference is never below the run's peak
   round median of that scale (`curvature_floor`): late in training most non-IID clients fit
   their data and their gradient-based scales fall by 1e4-1e5 while the few that still have a
   loss keep early-training magnitudes, so the round's median alone rejected honest clients.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from fedng.federated.aggregation.passes import sq_norm, sq_norms
from fedng.federated.algorithms.base import Algorithm, State
from fedng.federated.algorithms.curvature_payload import (
    signature,
    update_scales,
)
from fedng.federated.messages import ClientUpdate
from fedng.federated.wire import FLOAT_DTYPES

_MIN_FOR_MEDIAN = 3
REFERENCE_KEY = "reference"
"""`state.meta` key of the previous rounds' reference scales (`{"delta_norm": float,
PEAK_KEY: {scale name: float}}`)."""
PEAK_KEY = "curvature_peak"
"""Key, in `state.meta[REFERENCE_KEY]`, of the run's peak round-median curvature scales."""

Rejected = dict[int, list[str]]
"""Client id -> every reason its updates were rejected for, in order."""


def _is_a(x: object, kind: type[object]) -> bool:
    """isinstance, for values whose declared type a malformed payload may not honour."""
    return isinstance(x, kind)


_SQNORM_ATTR = "_fedng_sq_norms"


Group = tuple[str, Mapping[str, object], dict[str, tuple[int, ...]]]
"""(what, the named arrays received, the expected names and shapes)."""


def _structure(
    what: str, got: Mapping[str, object], expected: dict[str, tuple[int, ...]]
) -> str | None:
    """Why named arrays do not have `expected`'s names / shapes / float dtypes (or None)."""
    if not _is_a(got, Mapping):
        return f"{what}: expected named arrays, got {type(got).__name__}"
    if not expected and not got:
        return None
    if got.keys() != expected.keys():
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        return f"{what}: missing {missing[:5]}, unexpected {extra[:5]}"
    for k, shape in expected.items():
        t = got[k]
        if not isinstance(t, torch.Tensor):
            return f"{what}: {k!r} is a {type(t).__name__}, not a tensor"
        if t.shape != shape:  # torch.Size is a tuple
            return f"{what}: {k!r} has shape {list(t.shape)}, expected {list(shape)}"
        if t.dtype not in FLOAT_DTYPES:
            return f"{what}: {k!r} has dtype {t.dtype}, expected fp32/bf16/fp16"
    return None


def check_groups(groups: list[Group], norms: dict[str, float] | None = None) -> str | None:
    """`check_arrays` of several groups, the finiteness of all their arrays from one batched
    norm call; with `norms` given, the first group's squared norms are stored there."""
    for what, got, expected in groups:
        reason = _structure(what, got, expected)
        if reason is not None:
            return reason
    named = [(what, k) for what, _, expected in groups for k in expected]
    sqs = sq_norms([got[k] for _, got, expected in groups for k in expected])  # type: ignore[misc]
    if not math.isfinite(sum(sqs)):  # one test for the common case: all finite
        for (what, k), sq in zip(named, sqs, strict=True):
            if not math.isfinite(sq):
                return f"{what}: {k!r} has NaN/Inf"
    if norms is not None and groups:
        first = groups[0][0]
        norms.update((k, sq) for (what, k), sq in zip(named, sqs, strict=True) if what == first)
    return None


def check_arrays(
    what: str,
    got: Mapping[str, object],
    expected: dict[str, tuple[int, ...]],
    norms: dict[str, float] | None = None,
) -> str | None:
    """Why named arrays do not match `expected` names/shapes or are not finite floats, or None.

    One pass over each array's memory (`sq_norms`); with `norms` given, each array's squared
    norm is stored there (the delta's, for the norm check, without a second pass)."""
    return check_groups([(what, got, expected)], norms)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_EXPECTED_ATTR = "_fedng_expected_shapes"
"""Attribute of a server state caching, per algorithm, the expected delta and extras shapes (a
state is never mutated after a round, and `ServerState.copy` does not carry it)."""


def _expected(
    state: State, algo: Algorithm[Any]
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """The delta's and the extras' expected names and shapes (computed once per state)."""
    cache: dict[tuple[str, int], Any] = state.__dict__.setdefault(_EXPECTED_ATTR, {})
    key = (algo.name, state.round)
    got = cache.get(key)
    if got is None:
        shapes = {k: tuple(v.shape) for k, v in state.params.items()}
        got = cache[key] = (shapes, algo.expected_extras(state))
    return got


def check_update(state: State, update: ClientUpdate, algo: Algorithm[Any]) -> str | None:
    """The reason to reject one update on its own (None if it passes)."""
    if not _is_int(update.round) or update.round != state.round:
        return f"answers round {update.round!r}, the server is at round {state.round}"
    cap = state.config.max_num_examples
    if not _is_int(update.num_examples) or not 1 <= update.num_examples <= cap:
        return f"num_examples must be an int in [1, {cap}], got {update.num_examples!r:.40}"
    if not _is_a(update.meta, dict):
        return f"meta must be an object, got {type(update.meta).__name__}"
    shapes, extras = _expected(state, algo)
    norms: dict[str, float] = {}
    reason = check_groups(
        [("delta", update.delta, shapes), ("extras", update.extras, extras)], norms
    )
    if reason is None:
        setattr(update, _SQNORM_ATTR, norms)
    if reason is None and not _is_a(update.curvature, Mapping):
        reason = f"curvature: expected named arrays, got {type(update.curvature).__name__}"
    if reason is None:
        reason = algo.check_curvature(state, update)
    return reason


PlainPlan = list[tuple[str, tuple[int, ...]]]
"""The delta's names and shapes of an algorithm whose updates carry nothing else (`plain_plan`)."""

_PLAIN_DTYPES = (torch.float32, torch.bfloat16)


def expected_shapes(
    state: State, algo: Algorithm[Any]
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """The delta's and the extras' names and shapes `check_update` expects (its order)."""
    return _expected(state, algo)


def floored_refs(refs: Mapping[str, float] | None, floor: Mapping[str, float]) -> dict[str, float]:
    """Every curvature-scale reference floored at the run's peak round median (`_floored` per
    key, over the keys of either; `curvature_floor`): the batch rule's references, for a
    streaming round whose own references come from the global curvature or its warm-up."""
    got = refs or {}
    out: dict[str, float] = {}
    for k in {*got, *floor}:
        r = _floored(got.get(k), floor.get(k))
        if r is not None:
            out[k] = r
    return out


def plain_plan(state: State, algo: Algorithm[Any]) -> PlainPlan | None:
    """The delta's names and shapes when the algorithm's updates are plain (no extras, and the
    base rule for curvature: none): such an update is fully checked by `plain_arrays` plus the
    norm checks of one native call (`WeightedSum.fold_checked`); None for any other algorithm."""
    shapes, extras = _expected(state, algo)
    if extras or type(algo).check_curvature is not Algorithm.check_curvature:
        return None
    return list(shapes.items())


def plain_fields(state: State, update: ClientUpdate) -> bool:
    """Whether the update's round, `num_examples` and meta pass `check_update` as plain types
    (exact ints, a dict): the common case, which a fast path may take without the checks."""
    n = update.num_examples
    return (
        type(update.round) is int
        and update.round == state.round
        and type(n) is int
        and 1 <= n <= state.config.max_num_examples
        and type(update.meta) is dict
    )


def plain_arrays(state: State, update: ClientUpdate, plan: PlainPlan) -> list[torch.Tensor] | None:
    """The delta's arrays in `plan`'s order when the update passes every check of
    `check_update` but finiteness (plain int fields, a dict meta, no extras, no curvature, the
    plan's names and shapes, contiguous float32 / bfloat16 CPU arrays); None when anything
    differs (`check_update` then gives the reason, or accepts a less common form)."""
    if (
        not plain_fields(state, update)
        or type(update.extras) is not dict
        or update.extras
        or type(update.curvature) is not dict
        or update.curvature
    ):
        return None
    delta = update.delta
    if type(delta) is not dict or len(delta) != len(plan):
        return None
    out = []
    tensor, dtypes, strided = torch.Tensor, _PLAIN_DTYPES, torch.strided
    for k, shape in plan:
        t = delta.get(k)
        if (
            type(t) is not tensor
            or t.layout is not strided  # sparse / mkldnn: is_contiguous or data_ptr raise
            or t.shape != shape
            or t.dtype not in dtypes
            or not t.is_contiguous()
            or not t.is_cpu
            or t.is_neg()  # a lazy negation the native fold would not apply
        ):
            return None
        out.append(t)
    return out


def nan_reason(what: str, names: list[str], sqs: list[float]) -> str | None:
    """`check_groups`' reason for the first array whose squared norm is not finite (or None)."""
    for k, sq in zip(names, sqs, strict=True):
        if not math.isfinite(sq):
            return f"{what}: {k!r} has NaN/Inf"
    return None


def store_sq_norms(update: ClientUpdate, names: list[str], sqs: list[float]) -> None:
    """Keeps the delta's squared norms on the update (`delta_norm` reads them)."""
    setattr(update, _SQNORM_ATTR, dict(zip(names, sqs, strict=True)))


def safe_check(state: State, update: ClientUpdate, algo: Algorithm[Any]) -> str | None:
    """`check_update`, with any exception a malformed payload provokes turned into its reason."""
    try:
        return check_update(state, update, algo)
    except Exception as err:  # whatever a payload provokes is its rejection
        return f"invalid payload ({type(err).__name__}: {str(err)[:160]})"


def delta_norm(update: ClientUpdate) -> float:
    """||delta||_2 over all parameters (the per-array squares summed in float64), from the
    squared norms `check_update` measured when they match the delta, else in one pass now."""
    cached = getattr(update, _SQNORM_ATTR, None)
    if not isinstance(cached, dict) or cached.keys() != update.delta.keys():
        cached = {k: sq_norm(v) for k, v in update.delta.items()}
        setattr(update, _SQNORM_ATTR, cached)
    return math.sqrt(math.fsum(cached.values()))


def reference_scale(values: list[float], fallback: float | None) -> float | None:
    """The round's median (>= 3 values), else `fallback`, else the smaller of two values."""
    if len(values) >= _MIN_FOR_MEDIAN:
        return statistics.median(values)
    if fallback is not None:
        return fallback
    return min(values) if len(values) == 2 else None


def curvature_floor(state: State) -> dict[str, float]:
    """The run's peak round-median curvature scales so far (`reference_of`; empty before any),
    the floor of every curvature scale's reference.

    Why a floor: every gradient-based scale (a block's trace, `tr(G)/m`) of a client that fits
    its data vanishes. On digits-cnn (Dirichlet 0.1, 20 clients) the round's median `kfac/0`
    falls from ~0.9 (round 0) to ~5e-6 (round 29) while the clients that still have a loss keep
    early-training scales: 2e4-5e4 x the round's median (27 honest updates rejected over 5 seeds
    by `max_norm_ratio**2` = 1e4), yet at most 15x the peak median. The peak is a median of
    accepted updates (never the global curvature an accepted outlier would inflate), and
    `raised_peak` lets a round raise it only with a quorum and by a bounded factor: a coalition
    that is the majority of one small sample cannot lift the floor for the rest of the run.
    """
    peak = state.meta.get(REFERENCE_KEY, {}).get(PEAK_KEY)
    return peak if isinstance(peak, dict) else {}


PEAK_QUORUM = 5
"""Accepted updates with a scale a round needs for its median to raise that scale's peak."""
PEAK_GROWTH = 10.0
"""The most one round raises a scale's peak by (a factor); honest curvature rises over rounds,
an attack that wins one round's median must win it again and again to climb."""


def raised_peak(state: State, scales: Mapping[str, Iterable[float]]) -> dict[str, float]:
    """The run's peak round-median curvature scales after a round whose accepted updates had
    `scales` (scale name -> values; non-finite values ignored): a scale with at least
    `PEAK_QUORUM` values raises its peak to the round's median, by at most `PEAK_GROWTH` x (a
    first or zero peak takes the median as it is)."""
    peak = dict(curvature_floor(state))
    for key, vals in scales.items():
        live = [v for v in vals if math.isfinite(v)]
        if len(live) < PEAK_QUORUM:
            continue
        med = statistics.median(live)
        prev = peak.get(key)
        peak[key] = med if prev is None or prev <= 0 else max(prev, min(med, PEAK_GROWTH * prev))
    return peak


def _floored(ref: float | None, floor: float | None) -> float | None:
    """The larger of a reference and its floor (either may be missing)."""
    if floor is None:
        return ref
    return floor if ref is None else max(ref, floor)


def too_large(value: float, ref: float | None, ratio: float) -> bool:
    """Whether `value` is not finite or exceeds `ratio` times a positive reference."""
    return not math.isfinite(value) or (ref is not None and ref > 0 and value > ratio * ref)


def curvature_ratio(ratio: float) -> float:
    """The bound on a curvature scale for a delta-norm bound `ratio`: every curvature scale
    (a trace of a Fisher block or factor, `E ||g||^2`-like) is quadratic in gradient magnitude
    while a delta norm is linear, so the same tolerance in gradient units is `ratio**2`. (With
    `ratio` itself, honest non-IID clients were rejected: on digits with Dirichlet 0.1, clients
    whose classes the model fits worst have K-FAC block traces 100-500x the round's median.)"""
    return ratio * ratio


def _param_norm(state: State) -> float:
    total = sum(float((v.double() ** 2).sum()) for v in state.params.values())
    return math.sqrt(total)


def _consistent(ok: list[ClientUpdate], rejected: Rejected) -> list[ClientUpdate]:
    """Keeps the updates whose curvature signature is the round's most common one."""
    sigs = [signature(u) for u in ok]
    counts = Counter(s for s in sigs if s is not None)
    if len(counts) <= 1:
        return ok
    winner, n = counts.most_common(1)[0]
    keep = []
    for u, s in zip(ok, sigs, strict=True):
        if s is None or s == winner:
            keep.append(u)
        else:
            rejected.setdefault(u.client_id, []).append(
                f"curvature: kinds/layouts differ from {n} other update(s) of this round"
            )
    return keep


def _measure(
    ok: list[ClientUpdate], rejected: Rejected
) -> tuple[list[ClientUpdate], list[float], list[dict[str, float]]]:
    """Each update's delta norm and curvature scales (an update they fail on is rejected)."""
    kept, norms, scales = [], [], []
    for u in ok:
        try:
            nrm = delta_norm(u)
            sc = update_scales(u)
        except Exception as err:  # whatever a payload provokes is its rejection
            rejected.setdefault(u.client_id, []).append(f"scale check failed ({err})"[:200])
            continue
        kept.append(u)
        norms.append(nrm)
        scales.append(sc)
    return kept, norms, scales


def _sane(
    state: State, ok: list[ClientUpdate], algo: Algorithm[Any], rejected: Rejected
) -> list[ClientUpdate]:
    """Keeps the updates whose delta norm and curvature scales are within `max_norm_ratio` of
    their reference."""
    ratio = state.config.max_norm_ratio
    ok, norms, scales = _measure(ok, rejected)
    if state.config.dp_clip > 0:
        # Under DP the server clips every update itself; a check against the round's median
        # would make one client's acceptance depend on the others' data, which the accountant
        # does not count (client-level sensitivity would exceed the clip).
        return ok
    if state.config.robust != "none":
        # The robust stage clips each block's invariant scale and takes the factor split from
        # the round's medians: per-factor scales (which honest non-IID clients spread over
        # more than 100x) are then not what the aggregate sums.
        scales = [{k: v for k, v in s.items() if not k.endswith(("/A", "/G"))} for s in scales]
    prev = state.meta.get(REFERENCE_KEY, {}).get("delta_norm")
    fallback = prev if prev is not None or len(ok) != 1 else _param_norm(state)
    nref = reference_scale(norms, fallback)
    gscales = algo.reference_scales(state) or {}
    floor = curvature_floor(state)
    refs = {
        key: _floored(
            reference_scale([s[key] for s in scales if key in s], gscales.get(key)),
            floor.get(key),
        )
        for key in {k for s in scales for k in s}
    }
    cratio = curvature_ratio(ratio)
    keep = []
    for u, nrm, sc in zip(ok, norms, scales, strict=True):
        bad = [k for k in sorted(sc) if too_large(sc[k], refs[k], cratio)]
        if too_large(nrm, nref, ratio):
            rejected.setdefault(u.client_id, []).append(
                f"delta norm {nrm:.3g} exceeds {ratio:g} x the reference {nref or 0:.3g}"
            )
        elif bad:
            k = bad[0]
            rejected.setdefault(u.client_id, []).append(
                f"curvature scale {k} = {sc[k]:.3g} exceeds {cratio:g} x the reference"
                f" {refs[k] or 0:.3g}"
            )
        else:
            keep.append(u)
    return keep


def validate_updates(
    state: State, updates: list[ClientUpdate], algo: Algorithm[Any]
) -> tuple[list[ClientUpdate], Rejected]:
    """Splits a round's updates into accepted ones and rejected ones (client id -> reasons).

    Never raises on a malformed update: whatever it provokes is its rejection. An entry that is
    not a `ClientUpdate` with an integer `client_id` has no id to be rejected under and is
    dropped.

    Args:
        state: the server state the updates answer.
        updates: the decoded updates.
        algo: the algorithm (its extras and curvature checks).

    Returns:
        (accepted, {client_id: [reasons]}).
    """
    rejected: Rejected = {}
    valid = [u for u in updates if _is_a(u, ClientUpdate) and _is_int(u.client_id)]
    counts = Counter(u.client_id for u in valid)
    ok: list[ClientUpdate] = []
    for u in valid:  # the others have no id to be rejected under: not an update of any client
        cid = u.client_id
        if counts[cid] > 1:
            why = f"{counts[cid]} updates with this client id this round; all are rejected"
            if why not in rejected.get(cid, []):
                rejected.setdefault(cid, []).append(why)
        reason = safe_check(state, u, algo)
        if reason is not None:
            rejected.setdefault(cid, []).append(reason)
        elif counts[cid] == 1:
            ok.append(u)
    ok = _sane(state, _consistent(ok, rejected), algo, rejected)
    return ok, rejected


def reference_of(state: State, accepted: list[ClientUpdate]) -> dict[str, Any]:
    """The reference scales to keep for the next round: the accepted updates' median delta norm
    when there are at least 3 of them, else the previous one; and `PEAK_KEY`, the run's peak of
    each curvature scale's round median (`raised_peak`; absent while no round had curvature)."""
    out = dict(state.meta.get(REFERENCE_KEY, {}))
    if len(accepted) < _MIN_FOR_MEDIAN:
        return out
    out["delta_norm"] = statistics.median(delta_norm(u) for u in accepted)
    columns: dict[str, list[float]] = {}
    for u in accepted:
        for k, v in update_scales(u).items():
            columns.setdefault(k, []).append(v)
    peak = raised_peak(state, columns)
    if peak:
        out[PEAK_KEY] = peak
    return out
