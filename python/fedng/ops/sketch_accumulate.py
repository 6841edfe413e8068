"""`sketch_accumulate`: a streaming linear sketch `Y <- decay*Y + scale * J^T (J Omega)`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedng import _backend
from fedng.ops import _validate as v

OP = "sketch_accumulate"


def sketch_accumulate(
    sketches: Sequence[torch.Tensor],
    jacobians: Sequence[torch.Tensor],
    omegas: Sequence[torch.Tensor],
    decay: float = 1.0,
    scale: float | Sequence[float] = 1.0,
) -> list[torch.Tensor]:
    """Adds a batch of per-sample gradients to a sketch of the empirical Fisher, in place.

    `Y_i <- decay * Y_i + scale_i * J_i^T (J_i Omega_i)` sketches `F = J^T J` without forming it.
    The sketch is linear in F, so sketches made with the same `Omega` (same seed) add up across
    batches and across clients.

    Args:
        sketches: N tensors `Y_i` [d_i, r_i]; updated in place.
        jacobians: N tensors `J_i` [B_i, d_i] (rows are per-sample gradients; B_i may be 0).
        omegas: N test matrices `Omega_i` [d_i, r_i] (see `gaussian_sketch_matrix`).
        decay: multiplies the old sketch.
        scale: a float, or one per matrix.

    Returns:
        `sketches`, updated in place.
    """
    ys = v.tensor_list(OP, "sketches", sketches)
    js = v.tensor_list(OP, "jacobians", jacobians, length=len(ys))
    oms = v.tensor_list(OP, "omegas", omegas, length=len(ys))
    decay = v.finite_scalar(OP, "decay", decay)
    scales = v.per_item(OP, "scale", scale, len(ys))
    if not ys:
        return ys
    code = v.dtype_code(OP, {"sketches": ys, "jacobians": js, "omegas": oms})
    for i, (y, j, om) in enumerate(zip(ys, js, oms, strict=True)):
        v.shape(OP, "sketches", i, y, (None, None))
        v.shape(OP, "omegas", i, om, tuple(y.shape))
        v.shape(OP, "jacobians", i, j, (None, y.shape[0]))
    v.no_alias(OP, "sketches", ys, "jacobians", js)
    v.no_alias(OP, "sketches", ys, "omegas", oms)
    _backend.native.sketch_accumulate(
        dtype=code,
        jacobians=v.ptrs(js),
        omegas=v.ptrs(oms),
        sketches=v.ptrs(ys),
        d=[y.shape[0] for y in ys],
        r=[y.shape[1] for y in ys],
        b=[j.shape[0] for j in js],
        decay=decay,
        scale=scales,
        nthreads=_backend.num_threads(),
    )
    return ys
