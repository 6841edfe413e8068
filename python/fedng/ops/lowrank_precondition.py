"""`lowrank_precondition`: `(U diag(S) U^T + lambda I)^-1 V` by Woodbury, O(d r) per vector."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedng import _backend
from fedng.ops import _validate as v

OP = "lowrank_precondition"


def lowrank_precondition(
    U: Sequence[torch.Tensor],
    S: Sequence[torch.Tensor],
    damping: float | Sequence[float],
    V: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """Applies the inverse of a damped low-rank matrix to a block of vectors.

    With orthonormal U, `(U S U^T + lambda I)^-1 V = (V - U diag(S / (S + lambda)) U^T V) / lambda`.

    Args:
        U: N tensors [d_i, r_i] with orthonormal columns.
        S: N tensors [r_i], eigenvalues >= 0.
        damping: lambda > 0, one float or one per matrix.
        V: N tensors [d_i, c_i] (or [d_i] for one vector).

    Returns:
        N new tensors shaped like `V`.
    """
    us = v.tensor_list(OP, "U", U)
    n = len(us)
    ss = v.tensor_list(OP, "S", S, length=n)
    vs = v.tensor_list(OP, "V", V, length=n)
    lambdas = v.per_item(OP, "damping", damping, n, positive=True)
    if n == 0:
        return []
    code = v.dtype_code(OP, {"U": us, "S": ss, "V": vs})
    cols = []
    for i, (u, s, x) in enumerate(zip(us, ss, vs, strict=True)):
        v.shape(OP, "U", i, u, (None, None))
        v.shape(OP, "S", i, s, (u.shape[1],))
        if x.dim() == 1:
            v.shape(OP, "V", i, x, (u.shape[0],))
            cols.append(1)
        else:
            v.shape(OP, "V", i, x, (u.shape[0], None))
            cols.append(x.shape[1])
    outs = [torch.empty_like(x) for x in vs]
    _backend.native.lowrank_precondition(
        dtype=code,
        U=v.ptrs(us),
        S=v.ptrs(ss),
        V=v.ptrs(vs),
        outs=v.ptrs(outs),
        d=[u.shape[0] for u in us],
        r=[u.shape[1] for u in us],
        c=cols,
        damping=lambdas,
        nthreads=_backend.num_threads(),
    )
    return outs
