"""The curvature payload of a client update (FedNG, FedFisher): attach, decode, check.

The metadata is checked for its structure before anything is decoded (so that a malformed
payload is a rejection with a reason, never an exception), the block layouts against the model's
parameters before any matrix is allocated, and the layout against the server's curvature.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from fedng._typing import Arrays
from fedng.curvature import BlockLayout, CurvatureSet, check_layouts
from fedng.curvature.quantize import (
    COMPRESSIBLE,
    META_KEY,
    SCALE_SUFFIX,
    Segment,
    dequantize_arrays,
    payload_segments,
    payload_sizes,
    quantize_arrays,
    segments,
    side_traces,
)
from fedng.curvature.validation import MAX_ABS
from fedng.federated.aggregation.passes import sq_norm
from fedng.federated.aggregation.summable import contribution
from fedng.federated.algorithms.base import State, curvature_scales
from fedng.federated.config.curvature import CurvatureConfig
from fedng.federated.messages import ClientUpdate
from fedng.federated.wire import FLOAT_DTYPES, wire_dtype

_CACHE_ATTR = "_fedng_curvature"
_SCALES_ATTR = "_fedng_curvature_scales"
_FLOATS_ATTR = "_fedng_curvature_floats"
_SMALL = 1 << 16
"""Payloads up to this many entries get their factor norms from one vector op."""
_KEY_ATTR = "_fedng_meta_key"
_META_CACHE_ATTR = "_fedng_meta_checked"
"""Attribute of a server state caching the verdict on each distinct curvature metadata (a state is
never mutated after a round, and `ServerState.copy` does not carry it)."""
FAST_KINDS = frozenset({"kfac", "diag"})
"""Kinds whose payload the fast check reads in place (packed triangles, diagonals)."""


def wants_int8(cs: CurvatureSet, compression: str, itemsize: int = 4) -> bool:
    """Whether `compression` ("int8", "none", "auto") sends `cs` as int8: "auto" does when that
    makes its K-FAC / diagonal payload smaller than in the float wire dtype of `itemsize` bytes
    (int8 values plus float32 per-row / per-chunk scales: about 4x fewer bytes than fp32 for any
    factor wider than a few rows; the error bound is `fedng.curvature.quantize`'s)."""
    if compression != "auto":
        return compression == "int8"
    sizes = [
        payload_sizes(segments(k, rep.specs)) for k, rep in cs.reps.items() if k in COMPRESSIBLE
    ]
    entries = sum(e for e, _ in sizes)
    return entries > 0 and sum(q for _, q in sizes) < entries * itemsize


def wants_int8_payload(arrays: Arrays, meta: dict[str, Any], compression: str) -> bool:
    """`wants_int8` of a set given as float payloads and metadata (not decoded)."""
    if compression != "auto":
        return compression == "int8"
    entries = sum(v.numel() for k, v in arrays.items() if k in COMPRESSIBLE)
    params = sum(BlockLayout.from_json(x).spec.numel for x in meta["layouts"])
    return entries > params


def curvature_arrays(
    cs: CurvatureSet, dtype: str, compression: str = "none"
) -> tuple[Arrays, dict[str, Any]]:
    """A curvature set as wire arrays and metadata: in wire dtype `dtype`, or (see `wants_int8`)
    its K-FAC / diagonal payloads as int8 with float32 scales (`fedng.curvature.quantize`)."""
    wd = wire_dtype(dtype, "payload_dtype")
    if not wants_int8(cs, compression, torch.finfo(wd).bits // 8):
        return cs.to_arrays(wd)
    arrays, meta = quantize_arrays(*cs.to_arrays(torch.float32))
    return {
        k: v.to(wd) if v.dtype == torch.float32 and k in cs.reps else v for k, v in arrays.items()
    }, meta


def attach_curvature(
    update: ClientUpdate, cs: CurvatureSet, dtype: str, compression: str = "none"
) -> None:
    """Puts a curvature set into an update as its payload (see `curvature_arrays`)."""
    update.curvature, update.meta["curv"] = curvature_arrays(cs, dtype, compression)


def attach_contribution(
    update: ClientUpdate, cs: CurvatureSet, prefix: str, dtype: str = "fp32"
) -> None:
    """Adds the client's contribution `c_k = F_k delta_k` to an update's extras as
    `<prefix><param>` (summable aggregation), in wire dtype `dtype` (bf16 halves its bytes; its
    relative rounding 2^-9 is below the int8 curvature's); zero on parameters no block covers.
    K-FAC blocks cost two GEMMs each (`G_k Delta_k A_k`), in one ragged native call."""
    wd = wire_dtype(dtype, "contrib_dtype")
    out = contribution(cs, update.delta)
    update.extras.update({f"{prefix}{k}": v.to(wd) for k, v in out.items()})


def payload_floats(update: ClientUpdate) -> Arrays:
    """The update's curvature payloads as the server sums them: int8 kinds dequantized to
    float32, the others as sent (computed once, cached on the update).

    Raises:
        ValueError: int8 arrays that do not match their metadata.
    """
    meta = update.meta["curv"]
    if META_KEY not in meta:
        return update.curvature
    cached = getattr(update, _FLOATS_ATTR, None)
    if cached is None:
        cached = dequantize_arrays(update.curvature, meta)
        setattr(update, _FLOATS_ATTR, cached)
    return cached


def pooled_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The curvature metadata of summed (float) payloads: without the int8 marker."""
    return {k: v for k, v in meta.items() if k != META_KEY}


def decoded_curvature(update: ClientUpdate) -> CurvatureSet | None:
    """The update's curvature as a `CurvatureSet` (decoded once, cached on the update)."""
    if not update.curvature:
        return None
    cached = getattr(update, _CACHE_ATTR, None)
    if cached is None:
        floats = {k: v.float() for k, v in payload_floats(update).items()}
        cached = CurvatureSet.from_arrays(floats, update.meta["curv"])
        setattr(update, _CACHE_ATTR, cached)
    return cached


def decoded_all(updates: list[ClientUpdate]) -> list[CurvatureSet]:
    """The decoded curvature of updates that all carry some."""
    sets = [decoded_curvature(u) for u in updates]
    return [cs for cs in sets if cs is not None]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def meta_problem(meta: object) -> str | None:
    """Why curvature metadata is not `{"kinds": [str], "layouts": [list], "rep_meta": {kind:
    {str: int}}}` (None when it is)."""
    if not isinstance(meta, dict):
        return f"curvature metadata must be an object, got {type(meta).__name__}"
    kinds, layouts, rep = meta.get("kinds"), meta.get("layouts"), meta.get("rep_meta", {})
    if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
        return "curvature metadata: 'kinds' must be a list of strings"
    if not isinstance(layouts, list) or not all(isinstance(x, list) for x in layouts):
        return "curvature metadata: 'layouts' must be a list of lists"
    if len(kinds) != len(layouts):
        return f"curvature metadata: {len(kinds)} kinds for {len(layouts)} layouts"
    if not isinstance(rep, dict) or not all(
        isinstance(v, dict) and all(_is_int(x) for x in v.values()) for v in rep.values()
    ):
        return "curvature metadata: 'rep_meta' must map kinds to objects of integers"
    int8 = meta.get(META_KEY, [])
    if not isinstance(int8, list) or not all(k in COMPRESSIBLE and k in kinds for k in int8):
        return f"curvature metadata: '{META_KEY}' must list kinds of {list(COMPRESSIBLE)} present"
    return None


_SORTED_JSON = json.JSONEncoder(sort_keys=True, default=repr)
_JSON = json.JSONEncoder(default=repr)
"""`json.dumps(..., sort_keys=True, default=repr)` (and without sorting) built once: dumps with
options makes an encoder per call, a few microseconds of every received update."""


def signature(update: ClientUpdate) -> str | None:
    """The curvature's kinds, block layouts and representation metadata as one string (None
    without curvature): updates of one round must agree on it to be combined. Computed once
    per update (it also keys the server's cached metadata checks)."""
    if not update.curvature:
        return None
    meta = update.meta.get("curv")
    if not isinstance(meta, dict):
        return None
    cached = getattr(update, _KEY_ATTR, None)
    if isinstance(cached, str):
        return cached
    keys = ("kinds", "layouts", "rep_meta")
    key = _SORTED_JSON.encode({k: meta.get(k) for k in keys})
    setattr(update, _KEY_ATTR, key)
    return key


def _layouts(meta: dict[str, Any]) -> list[BlockLayout] | str:
    """The parsed layouts, or why they do not parse."""
    try:
        return [BlockLayout.from_json(x) for x in meta["layouts"]]
    except (ValueError, TypeError, IndexError, KeyError) as err:
        return f"curvature: bad block layout ({type(err).__name__}: {str(err)[:80]})"


def check_curvature_payload(state: State, update: ClientUpdate, fast: bool = False) -> str | None:
    """Why a curvature payload is unacceptable (None when fine or absent): dtypes, metadata
    structure, layout vs the model and the server's, then finite / symmetric / PSD within
    `psd_tol`; with `fast`, K-FAC and diagonal payloads get the one-pass checks of `fast_scales`
    instead of being decoded and factorized (the scales are kept for the norm checks).

    Raises:
        ValueError: a numerical check failed (the caller turns it into a rejection).
    """
    if not update.curvature:
        return None
    if "curv" not in update.meta:
        return "curvature payload without its layout metadata"
    meta = update.meta["curv"]
    key = _meta_key(update, meta)
    cache: dict[str, str | None] = state.__dict__.setdefault(_META_CACHE_ATTR, {})
    if key not in cache:  # the metadata checks, once per distinct metadata and server state
        cache[key] = _meta_reason(state, meta)
    reason = cache[key]
    if reason is not None:
        return reason
    int8 = set(meta.get(META_KEY, []))
    for k, v in update.curvature.items():
        allowed: tuple[torch.dtype, ...] = FLOAT_DTYPES
        if k in int8:
            allowed = (torch.int8,)
        elif k.endswith(SCALE_SUFFIX):
            allowed = (torch.float32,)
        if v.dtype not in allowed:
            return f"curvature: {k!r} has dtype {v.dtype}, expected one of {list(allowed)}"
    if fast:
        scales = _int8_fast_scales(meta, update.curvature, state.config.psd_tol, key)
        if scales is not None:
            setattr(update, _SCALES_ATTR, scales)
            return None
        # int8 kinds are checked as what the server sums: dequantized float32 payloads
        floats = payload_floats(update)
        if set(floats) <= FAST_KINDS:
            scales = fast_scales(meta, floats, state.config.psd_tol, key)
            setattr(update, _SCALES_ATTR, scales)
            return None
    cs = decoded_curvature(update)
    if cs is None:
        return None
    # int8 kinds arrive dequantized in float32, PSD by construction (`fedng.curvature.quantize`)
    eps = max(
        torch.finfo(v.dtype if v.is_floating_point() else torch.float32).eps
        for v in update.curvature.values()
    )
    cs.validate(state.config.psd_tol, eps)
    return None


def _meta_key(update: ClientUpdate, meta: Any) -> str:
    """A JSON string of the curvature metadata (keys the cached checks): the update's
    `signature` (computed once per update), plus the int8 marker when there is one."""
    sig = signature(update) if isinstance(meta, dict) else None
    extra = set(meta) - {"kinds", "layouts", "rep_meta"} if isinstance(meta, dict) else None
    if sig is None or extra is None or not extra <= {META_KEY}:
        return json.dumps(meta, sort_keys=True, default=repr)
    if not extra:
        return sig
    return f'{sig[:-1]}, "{META_KEY}": {_JSON.encode(meta[META_KEY])}}}'


def _meta_reason(state: State, meta: Any) -> str | None:
    """Why curvature metadata does not fit the model and the server's curvature (or None)."""
    problem = meta_problem(meta)
    if problem:
        return problem
    lays = _layouts(meta)
    if isinstance(lays, str):
        return lays
    reason = check_layouts(lays, {k: tuple(v.shape) for k, v in state.params.items()})
    if reason:
        return f"curvature: {reason}"
    sketch = meta.get("rep_meta", {}).get("lowrank")
    opts = state.config.options
    if sketch is not None and isinstance(opts, CurvatureConfig):
        want = {"rank": opts.rank, "seed": opts.sketch_seed}
        if {k: sketch.get(k) for k in want} != want:
            return f"curvature: low-rank sketch {sketch} differs from the server's {want}"
    if "curv" in state.meta and state.meta["curv"]["layouts"] != meta["layouts"]:
        return "curvature: block layout differs from the server's"
    if "curv" in state.meta and state.meta["curv"]["kinds"] != meta["kinds"]:
        return "curvature: curvature kinds differ from the server's"
    return None


@dataclass(frozen=True)
class _KindPlan:
    """Where each factor of one kind's payload lies, for the vectorized fast check.

    Attributes:
        total: payload entries.
        bounds: per factor segment, [start, stop) in the payload.
        labels: per segment, its name in messages ("kfac block 'fc1' A").
        packed: per segment, whether it is a packed symmetric triangle (else a diagonal).
        didx: payload positions of every segment's diagonal entries, concatenated.
        dstarts: where each segment's diagonal starts in `didx`.
        starts: where each segment starts in the payload.
        scales: (scale name, segment indices, divisor): the scale is the product of the
            segments' traces over the divisor (K-FAC block trace `tr A tr G`, `tr A / n`, ...).
    """

    total: int
    bounds: list[tuple[int, int]]
    labels: list[str]
    packed: np.ndarray[Any, np.dtype[np.bool_]]
    didx: np.ndarray[Any, np.dtype[np.int64]]
    dstarts: np.ndarray[Any, np.dtype[np.int64]]
    starts: np.ndarray[Any, np.dtype[np.int64]]
    scales: list[tuple[str, tuple[int, ...], float]]


class _Segments:
    """Builds the factor segments of a payload, in order."""

    def __init__(self) -> None:
        self.bounds: list[tuple[int, int]] = []
        self.labels: list[str] = []
        self.packed: list[bool] = []
        self.didx: list[np.ndarray[Any, np.dtype[np.int64]]] = []
        self.pos = 0

    def add(self, label: str, n: int, tri: bool) -> int:
        """Appends a factor of size n (a packed triangle, or a diagonal); returns its index."""
        size = n * (n + 1) // 2 if tri else n
        i = np.arange(n, dtype=np.int64)
        self.didx.append(self.pos + (i * (i + 3) // 2 if tri else i))
        self.bounds.append((self.pos, self.pos + size))
        self.labels.append(label)
        self.packed.append(tri)
        self.pos += size
        return len(self.bounds) - 1


@lru_cache(maxsize=16)
def _plan(key: str) -> dict[str, _KindPlan]:
    """The fast-check plan of a payload signature (kinds and layouts as JSON), built once."""
    meta = json.loads(key)
    layouts = [BlockLayout.from_json(x) for x in meta["layouts"]]
    kinds = [str(k) for k in meta["kinds"]]
    plans: dict[str, _KindPlan] = {}
    for kind in ("kfac", "diag"):
        specs = [lay.spec for lay, k in zip(layouts, kinds, strict=True) if k == kind]
        if not specs:
            continue
        b = _Segments()
        scales: list[tuple[str, tuple[int, ...], float]] = []
        seg = b.add
        for s in specs:
            if kind == "diag":
                k = seg(f"diag block '{s.name}'", s.numel, False)
                scales.append((f"diag/{s.name}", (k,), 1.0))
                continue
            a = seg(f"kfac block '{s.name}' A", s.n, s.kind == "kron")
            g = seg(f"kfac block '{s.name}' G", s.m, True)
            scales += [
                (f"kfac/{s.name}", (a, g), 1.0),
                (f"kfac/{s.name}/A", (a,), float(s.n)),
                (f"kfac/{s.name}/G", (g,), float(s.m)),
            ]
        starts = np.cumsum([0] + [len(d) for d in b.didx[:-1]]).astype(np.int64)
        plans[kind] = _KindPlan(
            b.pos,
            b.bounds,
            b.labels,
            np.array(b.packed, dtype=np.bool_),
            np.concatenate(b.didx),
            starts,
            np.array([a for a, _ in b.bounds], dtype=np.int64),
            scales,
        )
    return plans


def _check_kind(plan: _KindPlan, flat: torch.Tensor, tol: float) -> list[float]:
    """Every factor of one kind's payload in a few vectorized passes; returns their traces.

    Per factor: finite and below `MAX_ABS`, a non-negative diagonal, and the PSD necessary
    condition `||M||_F <= tr(M)` (within `tol` and the wire's rounding) — the full PSD test is
    left to the pooled sum, which the server factorizes once per round.

    Raises:
        ValueError: naming the first bad factor.
    """
    if flat.numel() != plan.total:
        raise ValueError(f"payload has {flat.numel()} entries, expected {plan.total}")
    # numpy: a handful of calls whatever the number of factors, each cheap on small payloads
    x = (flat if flat.dtype == torch.float32 else flat.float()).numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        if plan.total <= _SMALL:  # one vector op beats a Python loop of dots
            sq = np.add.reduceat((x * x).astype(np.float64), plan.starts)
        else:  # one read per factor, no temporary
            sq = np.array([np.dot(x[a:b], x[a:b]) for a, b in plan.bounds], dtype=np.float64)
        d = x[plan.didx].astype(np.float64)
        tr = np.add.reduceat(d, plan.dstarts)
        d2 = np.add.reduceat(d * d, plan.dstarts)
        dmin = np.minimum.reduceat(d, plan.dstarts)
        dbig = np.maximum.reduceat(np.abs(d), plan.dstarts)
        fro = np.sqrt(np.where(plan.packed, np.maximum(2 * sq - d2, 0.0), sq))
        eps = torch.finfo(flat.dtype).eps
        checks = (
            ~np.isfinite(sq),
            fro > MAX_ABS,
            dmin < -tol * dbig,
            plan.packed & (fro > tr * (1.0 + tol) + eps * fro + 1e-30),
        )
        bad = checks[0] | checks[1] | checks[2] | checks[3]
    nseg = len(plan.bounds)
    segs = [flat[a:b] for a, b in plan.bounds]
    if bool(bad.any()):  # the slow path only for a bad payload: name the first offender
        masks = np.stack(checks)
        whys = (
            "has NaN/Inf entries",
            "has entries whose products overflow float32",
            "has a negative diagonal entry: not positive semi-definite",
            "is not positive semi-definite (||M||_F > tr M)",
        )
        for k in range(nseg):
            for row, why in enumerate(whys):
                if bool(masks[row, k]):
                    if row == 0 and math.isfinite(sq_norm(segs[k])):
                        continue  # float32 norm overflow of finite entries: not a NaN/Inf
                    raise ValueError(f"{plan.labels[k]} {why}")
    return [float(t) for t in tr.tolist()]


@lru_cache(maxsize=16)
def _int8_segments(key: str) -> dict[str, list[Segment]]:
    """`payload_segments` of a payload signature (JSON holding "kinds" and "layouts")."""
    return payload_segments(json.loads(key))


def _int8_fast_scales(
    meta: dict[str, Any], arrays: Arrays, tol: float, key: str
) -> dict[str, float] | None:
    """`fast_scales` of a payload whose int8 kinds are read from their scales alone
    (`quantize.side_traces`: no entry is dequantized, the checks hold by construction); None
    when some int8 kind needs its entries read (then the caller dequantizes), or the payload
    has no int8 kind or a kind the fast check does not cover."""
    int8 = meta.get(META_KEY)
    if not int8 or not set(arrays) <= FAST_KINDS | {k + SCALE_SUFFIX for k in int8}:
        return None
    plans = _plan(key)
    segs = _int8_segments(key)
    traces: dict[str, list[float]] = {}
    for kind, plan in plans.items():
        if kind not in arrays or (kind in int8 and kind + SCALE_SUFFIX not in arrays):
            return None
        if kind in int8:
            got = side_traces(arrays[kind], arrays[kind + SCALE_SUFFIX], segs[kind], MAX_ABS)
            if got is None or len(got) != len(plan.bounds):
                return None
            traces[kind] = got
        else:
            traces[kind] = _check_kind(plan, arrays[kind].reshape(-1), tol)
    return _scales_of(plans, traces)


def int8_scale_plan(
    update: ClientUpdate,
) -> tuple[str, list[Segment], list[tuple[str, tuple[int, ...], float]]] | None:
    """What `check_curvature_payload(fast=True)` reads of an update whose whole curvature is
    one int8 K-FAC payload with its scales: (the kind, its segments, the scale measures as
    (name, segment indices, divisor)), the scales being the product of the segments' traces
    (`quantize.side_traces`) over the divisor; None for any other payload.

    Raises:
        ValueError, KeyError, TypeError: metadata that does not parse (checked ones do).
    """
    meta = update.meta["curv"]
    kinds = meta.get(META_KEY)
    if not isinstance(kinds, list) or kinds != ["kfac"]:
        return None
    kind = "kfac"
    if set(update.curvature) != {kind, kind + SCALE_SUFFIX}:
        return None
    key = _meta_key(update, meta)
    plans = _plan(key)
    segs = _int8_segments(key).get(kind)
    if set(plans) != {kind} or segs is None or len(segs) != len(plans[kind].bounds):
        return None
    scales = plans[kind].scales
    if any(not 1 <= len(idx) <= 2 for _, idx, _ in scales):
        return None
    return kind, segs, scales


def _scales_of(plans: dict[str, _KindPlan], traces: dict[str, list[float]]) -> dict[str, float]:
    """The scale measures from every factor's trace (per kind, in plan order)."""
    out: dict[str, float] = {}
    for kind, plan in plans.items():
        for name, idx, div in plan.scales:
            val = 1.0
            for k in idx:
                val *= traces[kind][k]
            out[name] = val / div
    return out


def fast_scales(
    cs_meta: dict[str, Any], arrays: dict[str, torch.Tensor], tol: float, key: str | None = None
) -> dict[str, float]:
    """`curvature_scales` of a K-FAC / diagonal payload read in place, with the fast checks.

    A few vectorized passes over the whole payload (norms of every factor in one call, their
    diagonals gathered once for the traces); no matrix is unpacked and no Cholesky runs. Used by
    a server that pools the curvature before solving (the "mean" and "summable" aggregations),
    which tests the pooled sum for PSD once per round.

    Args:
        cs_meta: the payload's curvature metadata (structure already checked).
        arrays: kind -> flat payload.
        tol: relative tolerance (`ServerConfig.psd_tol`).
        key: a JSON string of the metadata (holding "kinds" and "layouts") that keys the cached
            plan (None: made here).

    Returns:
        The scale measures (see `curvature_scales`).

    Raises:
        ValueError: a bad factor, or a payload of the wrong size.
    """
    if key is None:
        key = json.dumps({"kinds": cs_meta["kinds"], "layouts": cs_meta["layouts"]}, sort_keys=True)
    plans = _plan(key)
    return _scales_of(
        plans,
        {kind: _check_kind(plan, arrays[kind].reshape(-1), tol) for kind, plan in plans.items()},
    )


def update_scales(update: ClientUpdate) -> dict[str, float]:
    """The update's curvature scale measures: those the fast check stored, else from the decoded
    curvature (empty without curvature)."""
    cached = getattr(update, _SCALES_ATTR, None)
    if isinstance(cached, dict):
        return cached
    cs = decoded_curvature(update)
    return {} if cs is None else curvature_scales(cs)


def curvature_trace(update: ClientUpdate) -> float | None:
    """tr(F_k) of the update's curvature (None without any), for the round-median check."""
    cs = decoded_curvature(update)
    return None if cs is None else cs.trace()
