"""Validation of every client payload on arrival: a bad one is rejected with a reason.

Checks, in order: the round it answers, `num_examples`, the delta's names / shapes / dtypes and
finiteness, the algorithm's extras, the curvature payload (the algorithm's own structural and
numerical checks: shapes, symmetry, PSD within tolerance, finiteness), and finally sanity
against the round: a delta norm or curvature trace more than `max_norm_ratio` times the round's
median is rejected (with at least 3 updates, so that a median means something).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

import torch

from fedng.federated.algorithms.base import Algorithm, State
from fedng.federated.messages import ClientUpdate
from fedng.federated.wire import FLOAT_DTYPES

_MIN_FOR_MEDIAN = 3


def check_arrays(
    what: str, got: Mapping[str, object], expected: dict[str, tuple[int, ...]]
) -> str | None:
    """Why named arrays do not match `expected` names/shapes or are not finite floats, or None."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        return f"{what}: missing {missing[:5]}, unexpected {extra[:5]}"
    for k, shape in expected.items():
        t = got[k]
        if not isinstance(t, torch.Tensor):
            return f"{what}: {k!r} is a {type(t).__name__}, not a tensor"
        if tuple(t.shape) != tuple(shape):
            return f"{what}: {k!r} has shape {list(t.shape)}, expected {list(shape)}"
        if t.dtype not in FLOAT_DTYPES:
            return f"{what}: {k!r} has dtype {t.dtype}, expected fp32/bf16/fp16"
        if not bool(torch.isfinite(t).all()):
            return f"{what}: {k!r} has NaN/Inf"
    return None


def check_update(state: State, update: ClientUpdate, algo: Algorithm[Any]) -> str | None:
    """The reason to reject one update on its own (None if it passes)."""
    if update.round != state.round:
        return f"answers round {update.round}, the server is at round {state.round}"
    if (
        isinstance(update.num_examples, bool)
        or not isinstance(update.num_examples, int)
        or update.num_examples < 1
    ):
        return f"num_examples must be an int >= 1, got {update.num_examples!r}"
    shapes = {k: tuple(v.shape) for k, v in state.params.items()}
    reason = check_arrays("delta", update.delta, shapes)
    if reason is None:
        reason = check_arrays("extras", update.extras, algo.expected_extras(state))
    if reason is None:
        try:
            reason = algo.check_curvature(state, update)
        except (ValueError, TypeError, RuntimeError) as err:
            reason = f"curvature: {err}"
    return reason


def delta_norm(update: ClientUpdate) -> float:
    """||delta||_2 over all parameters."""
    total = torch.zeros(())
    for v in update.delta.values():
        total = total + (v.float() ** 2).sum()
    return float(torch.sqrt(total))


def validate_updates(
    state: State, updates: list[ClientUpdate], algo: Algorithm[Any]
) -> tuple[list[ClientUpdate], dict[int, str]]:
    """Splits a round's updates into accepted ones and rejected ones (client id -> reason).

    Args:
        state: the server state the updates answer.
        updates: the decoded updates.
        algo: the algorithm (its extras and curvature checks).

    Returns:
        (accepted, {client_id: reason}).
    """
    rejected: dict[int, str] = {}
    ok: list[ClientUpdate] = []
    seen: set[int] = set()
    for u in updates:
        if u.client_id in seen:
            rejected[u.client_id] = "duplicate update from the same client this round"
            continue
        seen.add(u.client_id)
        reason = check_update(state, u, algo)
        if reason is None:
            ok.append(u)
        else:
            rejected[u.client_id] = reason
    ratio = state.config.max_norm_ratio
    if len(ok) >= _MIN_FOR_MEDIAN:
        norms = [delta_norm(u) for u in ok]
        med = statistics.median(norms)
        scales = [algo.curvature_scale(state, u) for u in ok]
        known = [s for s in scales if s is not None]
        smed = statistics.median(known) if len(known) >= _MIN_FOR_MEDIAN else None
        keep = []
        for u, nrm, sc in zip(ok, norms, scales, strict=True):
            if med > 0 and nrm > ratio * med:
                rejected[u.client_id] = (
                    f"delta norm {nrm:.3g} exceeds {ratio:g} x the round median {med:.3g}"
                )
            elif smed is not None and sc is not None and smed > 0 and sc > ratio * smed:
                rejected[u.client_id] = (
                    f"curvature trace {sc:.3g} exceeds {ratio:g} x the round median {smed:.3g}"
                )
            else:
                keep.append(u)
        ok = keep
    return ok, rejected
