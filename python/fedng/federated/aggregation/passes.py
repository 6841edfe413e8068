"""One-pass statistics of received arrays: validation at memory speed.

A server checks every received array for finiteness and measures its norm; both come from one
read of its memory (a BLAS dot product), instead of one pass for `isfinite`, one for a cast and
one for the squares.
"""

from __future__ import annotations

import math

import torch

from fedng.curvature.packed_fold import sum_squares


def sq_norm(t: torch.Tensor) -> float:
    """`sum(t**2)` in one pass over memory, which is also the finiteness test: the result is
    NaN/Inf iff an entry is, except when the squares overflow float32 — then (and only then) an
    exact float64 recheck runs.

    Args:
        t: any float tensor (bf16/fp16 are widened to fp32 first).

    Returns:
        The sum of squares (NaN/Inf iff `t` holds a NaN/Inf).
    """
    flat = t.reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.float()
    s = float(torch.dot(flat, flat))
    if not math.isfinite(s) and bool(torch.isfinite(flat).all()):
        wide = flat.double()
        s = float(torch.dot(wide, wide))
    return s


def sq_norms(ts: list[torch.Tensor]) -> list[float]:
    """`sum(t**2)` of many arrays in one native call (small models are dispatch-bound),
    accumulated in float64: NaN/Inf iff an entry is, and bf16 arrays read without a float32
    copy (`fedng.curvature.packed_fold.sum_squares`)."""
    if not ts:
        return []
    return sum_squares(ts)
