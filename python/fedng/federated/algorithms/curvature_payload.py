"""The curvature payload of a client update (FedNG, FedFisher): attach, decode, check.

The metadata is checked for its structure before anything is decoded (so that a malformed
payload is a rejection with a reason, never an exception), the block layouts against the model's
parameters before any matrix is allocated, and the layout against the server's curvature.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from fedng._typing import Arrays
from fedng.curvature import KFAC, BlockLayout, CurvatureSet, check_layouts
from fedng.curvature.quantize import (
    COMPRESSIBLE,
    META_KEY,
    SCALE_SUFFIX,
    dequantize_arrays,
    quantize_arrays,
)
from fedng.federated.algorithms.base import State
from fedng.federated.config.curvature import CurvatureConfig
from fedng.federated.messages import ClientUpdate
from fedng.federated.wire import FLOAT_DTYPES, wire_dtype

_CACHE_ATTR = "_fedng_curvature"


def wants_int8(cs: CurvatureSet, compression: str) -> bool:
    """Whether `compression` ("int8", "none", "auto") sends `cs` as int8: "auto" does when its
    K-FAC / diagonal payload (fp32) outweighs the parameters of the blocks it covers (dense
    K-FAC factors of wide layers, e.g. a 61 -> 10 softmax head: 3x its parameters)."""
    if compression != "auto":
        return compression == "int8"
    entries = sum(rep.nbytes // 4 for k, rep in cs.reps.items() if k in COMPRESSIBLE)
    params = sum(spec.numel for rep in cs.reps.values() for spec in rep.specs)
    return entries > params


def curvature_arrays(
    cs: CurvatureSet, dtype: str, compression: str = "none"
) -> tuple[Arrays, dict[str, Any]]:
    """A curvature set as wire arrays and metadata: in wire dtype `dtype`, or (see `wants_int8`)
    its K-FAC / diagonal payloads as int8 with float32 scales (`fedng.curvature.quantize`)."""
    wd = wire_dtype(dtype, "payload_dtype")
    if not wants_int8(cs, compression):
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


def float_arrays(arrays: Arrays, meta: dict[str, Any]) -> Arrays:
    """Received curvature arrays as float32 payloads (int8 kinds dequantized).

    Raises:
        ValueError: int8 arrays that do not match their metadata.
    """
    if META_KEY in meta:
        arrays = dequantize_arrays(arrays, meta)
    return {k: v.float() for k, v in arrays.items()}


def decoded_curvature(update: ClientUpdate) -> CurvatureSet | None:
    """The update's curvature as a `CurvatureSet` (decoded once, cached on the update)."""
    if not update.curvature:
        return None
    cached = getattr(update, _CACHE_ATTR, None)
    if cached is None:
        meta = update.meta["curv"]
        cached = CurvatureSet.from_arrays(float_arrays(update.curvature, meta), meta)
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


def signature(update: ClientUpdate) -> str | None:
    """The curvature's kinds, block layouts and representation metadata as one string (None
    without curvature): updates of one round must agree on it to be combined."""
    if not update.curvature:
        return None
    meta = update.meta.get("curv")
    if not isinstance(meta, dict):
        return None
    keys = ("kinds", "layouts", "rep_meta")
    return json.dumps({k: meta.get(k) for k in keys}, sort_keys=True)


def _layouts(meta: dict[str, Any]) -> list[BlockLayout] | str:
    """The parsed layouts, or why they do not parse."""
    try:
        return [BlockLayout.from_json(x) for x in meta["layouts"]]
    except (ValueError, TypeError, IndexError, KeyError) as err:
        return f"curvature: bad block layout ({type(err).__name__}: {str(err)[:80]})"


def check_curvature_payload(state: State, update: ClientUpdate) -> str | None:
    """Why a curvature payload is unacceptable (None when fine or absent): dtypes, metadata
    structure, layout vs the model and the server's, then finite / symmetric / PSD within
    `psd_tol`.

    Raises:
        ValueError: a numerical check failed (the caller turns it into a rejection).
    """
    if not update.curvature:
        return None
    if "curv" not in update.meta:
        return "curvature payload without its layout metadata"
    meta = update.meta["curv"]
    problem = meta_problem(meta)
    if problem:
        return problem
    int8 = set(meta.get(META_KEY, []))
    for k, v in update.curvature.items():
        allowed: tuple[torch.dtype, ...] = FLOAT_DTYPES
        if k in int8:
            allowed = (torch.int8,)
        elif k.endswith(SCALE_SUFFIX):
            allowed = (torch.float32,)
        if v.dtype not in allowed:
            return f"curvature: {k!r} has dtype {v.dtype}, expected one of {list(allowed)}"
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


def curvature_trace(update: ClientUpdate) -> float | None:
    """tr(F_k) of the update's curvature (None without any), for the round-median check."""
    cs = decoded_curvature(update)
    return None if cs is None else cs.trace()


def curvature_scales(cs: CurvatureSet) -> dict[str, float]:
    """Named scale measures of a curvature set, each checked against the round's median.

    Per block: `tr(F_i)`; for K-FAC blocks also each factor on its own, `tr(A_i) / n` and
    `tr(G_i) / m`. The factors are summed separately across clients (`CurvatureSet.combine`), so
    a product check `tr(A) tr(G)` alone would pass `A * c` with `G / c`; bounding each factor
    bounds what any one client can add to each factor of the global curvature.
    """
    out: dict[str, float] = {}
    for kind, rep in cs.reps.items():
        for spec, tr in zip(rep.specs, rep.block_traces(), strict=True):
            out[f"{kind}/{spec.name}"] = float(tr)
        if isinstance(rep, KFAC):
            for spec, a, g in zip(rep.specs, rep.A, rep.G, strict=True):
                ta = a.double().sum() if a.dim() == 1 else a.double().diagonal().sum()
                out[f"{kind}/{spec.name}/A"] = float(ta) / spec.n
                out[f"{kind}/{spec.name}/G"] = float(g.double().diagonal().sum()) / spec.m
    return out
