"""The curvature payload of a client update (FedNG, FedFisher): attach, decode, check."""

from __future__ import annotations

import torch

from fedng.curvature import CurvatureSet, check_layouts
from fedng.federated.algorithms.base import State
from fedng.federated.messages import ClientUpdate
from fedng.federated.wire import FLOAT_DTYPES, wire_dtype

_CACHE_ATTR = "_fedng_curvature"


def attach_curvature(update: ClientUpdate, cs: CurvatureSet, dtype: str) -> None:
    """Puts a curvature set into an update as its payload (in wire dtype `dtype`)."""
    arrays, meta = cs.to_arrays(wire_dtype(dtype, "payload_dtype"))
    update.curvature = arrays
    update.meta["curv"] = meta


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


def decoded_all(updates: list[ClientUpdate]) -> list[CurvatureSet]:
    """The decoded curvature of updates that all carry some."""
    sets = [decoded_curvature(u) for u in updates]
    return [cs for cs in sets if cs is not None]


def check_curvature_payload(state: State, update: ClientUpdate) -> str | None:
    """Why a curvature payload is unacceptable (None when fine or absent): dtypes, layout vs the
    model and the server's, then finite / symmetric / PSD within `psd_tol`.

    Raises:
        ValueError: a numerical check failed (the caller turns it into a rejection).
    """
    if not update.curvature:
        return None
    for k, v in update.curvature.items():
        if v.dtype not in FLOAT_DTYPES:
            return f"curvature: {k!r} has dtype {v.dtype}, expected fp32/bf16/fp16"
    if "curv" not in update.meta:
        return "curvature payload without its layout metadata"
    cs = decoded_curvature(update)
    if cs is None:
        return None
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


def curvature_trace(update: ClientUpdate) -> float | None:
    """tr(F_k) of the update's curvature (None without any), for the round-median check."""
    cs = decoded_curvature(update)
    return None if cs is None else cs.trace()
