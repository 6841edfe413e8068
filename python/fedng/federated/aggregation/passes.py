"""One-pass statistics of received arrays: validation at memory speed.

A server checks every received array for finiteness and measures its norm; both come from one
read of its memory (a BLAS dot product), instead of one pass for `isfinite`, one for a cast and
one for the squares.
"""

from __future__ import annotations

import math

import torch


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
    """`sq_norm` of many arrays with one `_foreach_norm` dispatch (small models are
    dispatch-bound); an entry whose fp32 norm is not finite is redone by `sq_norm` (exact)."""
    if not ts:
        return []
    flat = [t if t.dtype == torch.float32 else t.float() for t in ts]
    norms = torch.stack(torch._foreach_norm(flat)).tolist()
    return [n * n if math.isfinite(n) else sq_norm(t) for n, t in zip(norms, flat, strict=True)]
