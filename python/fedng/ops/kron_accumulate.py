"""`kron_accumulate`: the K-FAC factor update `F_i <- decay*F_i + scale_i * X_i^T X_i`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedng import _backend
from fedng.ops import _validate as v

OP = "kron_accumulate"


def kron_accumulate(
    factors: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    decay: float = 1.0,
    scale: float | Sequence[float] = 1.0,
) -> list[torch.Tensor]:
    """Accumulates Kronecker factors in place, one SYRK per matrix, all matrices in one call.

    `F_i <- decay * F_i + scale_i * X_i^T X_i` with the exponential moving average fused. Only half
    the product is computed (SYRK) and mirrored, so the result is exactly symmetric.

    Args:
        factors: N symmetric tensors, `factors[i]` of shape [n_i, n_i]; updated in place.
        inputs: N tensors, `inputs[i]` of shape [k_i, n_i] (rows are samples; k_i may be 0).
        decay: multiplies the old factor (1.0 = plain sum, 0.0 = overwrite).
        scale: a float, or one float per matrix (e.g. 1 / k_i for a mean).

    Returns:
        `factors`, updated in place.
    """
    fs = v.tensor_list(OP, "factors", factors)
    xs = v.tensor_list(OP, "inputs", inputs, length=len(fs))
    decay = v.finite_scalar(OP, "decay", decay)
    scales = v.per_item(OP, "scale", scale, len(fs))
    if not fs:
        return fs
    code = v.dtype_code(OP, {"factors": fs, "inputs": xs})
    ns = v.square_sizes(OP, "factors", fs)
    xshapes = [x.shape for x in xs]
    if not all(len(s) == 2 and s[1] == n for s, n in zip(xshapes, ns, strict=True)):
        for i, x in enumerate(xs):
            v.shape(OP, "inputs", i, x, (None, ns[i]))
    v.no_alias(OP, "factors", fs, "inputs", xs)
    run(fs, xs, decay, scales, code)
    return fs


def run(
    factors: list[torch.Tensor],
    inputs: list[torch.Tensor],
    decay: float,
    scale: list[float],
    code: int | None = None,
) -> None:
    """The native call without any check (see `fedng.ops.trusted`): the arguments must already
    satisfy everything `kron_accumulate` validates; `scale` has one float per factor."""
    if not factors:
        return
    _backend.native.kron_accumulate(
        dtype=v.FLOAT_DTYPES[factors[0].dtype] if code is None else code,
        inputs=[x.data_ptr() for x in inputs],
        factors=[f.data_ptr() for f in factors],
        n=[f.shape[0] for f in factors],
        k=[x.shape[0] for x in inputs],
        decay=decay,
        scale=scale,
        nthreads=_backend.num_threads(),
    )
