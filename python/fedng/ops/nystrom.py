"""`nystrom`: a stable low-rank eigendecomposition `F ~ U diag(S) U^T` from a sketch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from fedng import _backend
from fedng.ops import _validate as v
from fedng.ops.damped_cholesky_inverse import CholeskyStatus

OP = "nystrom"


class NystromApprox(NamedTuple):
    """Result of `nystrom`.

    Attributes:
        U: N tensors [d_i, r_i] with orthonormal columns (eigenvectors, by decreasing eigenvalue).
        S: N tensors [r_i], eigenvalues >= 0 in decreasing order.
        shift: float64 tensor [N], the stabilizing shift actually used.
    """

    U: list[torch.Tensor]
    S: list[torch.Tensor]
    shift: torch.Tensor


def nystrom(
    sketches: Sequence[torch.Tensor],
    omegas: Sequence[torch.Tensor],
    shift: float | Sequence[float] | None = None,
) -> NystromApprox:
    """Turns sketches `Y_i = F_i Omega_i` of PSD matrices into low-rank eigendecompositions.

    Stable Nystrom (Tropp, Yurtsever, Udell, Cevher 2017): `Y_nu = Y + nu Omega`,
    `C = chol(Omega^T Y_nu)`, `B = Y_nu C^-1`, `U S' V^T = svd(B)`, `S = max(S'^2 - nu, 0)`.
    The shift `nu` defaults to `sqrt(d) * eps(float64) * ||Y||_F` whatever the dtype (a
    float32-epsilon shift would swamp the smaller eigenvalues); if the small Cholesky fails (float32
    rounding), `nu` is multiplied by 10 while it stays below `1e-5 * sqrt(d) * ||Y||_F`.

    Args:
        sketches: N tensors `Y_i` [d_i, r_i] with r_i <= d_i.
        omegas: N tensors `Omega_i` [d_i, r_i], the test matrices the sketches were made with.
        shift: None (automatic), a float >= 0, or one per matrix.

    Returns:
        `NystromApprox(U, S, shift)`.
    """
    ys = v.tensor_list(OP, "sketches", sketches)
    oms = v.tensor_list(OP, "omegas", omegas, length=len(ys))
    shifts = (
        [-1.0] * len(ys)
        if shift is None
        else v.per_item(OP, "shift", shift, len(ys), nonnegative=True)
    )
    used = torch.zeros(len(ys), dtype=torch.float64)
    if not ys:
        return NystromApprox([], [], used)
    code = v.dtype_code(OP, {"sketches": ys, "omegas": oms})
    for i, (y, om) in enumerate(zip(ys, oms, strict=True)):
        v.shape(OP, "sketches", i, y, (None, None))
        v.shape(OP, "omegas", i, om, tuple(y.shape))
        if y.shape[1] > y.shape[0]:
            raise ValueError(
                f"{OP}: 'sketches[{i}]' must have rank r <= d, got shape {list(y.shape)}"
            )
    us = [torch.empty_like(y) for y in ys]
    ss = [torch.empty(y.shape[1], dtype=y.dtype) for y in ys]
    status = torch.full((len(ys),), CholeskyStatus.OK, dtype=torch.int8)
    _backend.native.nystrom(
        dtype=code,
        sketches=v.ptrs(ys),
        omegas=v.ptrs(oms),
        U=v.ptrs(us),
        S=v.ptrs(ss),
        d=[y.shape[0] for y in ys],
        r=[y.shape[1] for y in ys],
        shift=shifts,
        status=status.data_ptr(),
        shift_used=used.data_ptr(),
        nthreads=_backend.num_threads(),
    )
    bad = (status == CholeskyStatus.FAILED).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"{OP}: sketches {bad[:10]} are not finite or not sketches of a PSD matrix"
            " (Omega^T Y is not positive definite even after shifting)"
        )
    return NystromApprox(us, ss, used)
