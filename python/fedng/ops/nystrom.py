"""`nystrom`: a stable low-rank eigendecomposition `F ~ U diag(S) U^T` from a sketch."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from fedng import _backend
from fedng.ops import _validate as v
from fedng.ops.damped_cholesky_inverse import CholeskyStatus

OP = "nystrom"

TORCH_MIN_DRR = 1 << 17
"""Matrices with `d * r * r` at least this go through the same algorithm in torch ops instead of
the kernel. Measured (1 thread, CPU time, `bench_nystrom`'s torch way against the kernel; the
kernel's thin SVD is OpenBLAS's LAPACK, torch's is its own): d=256: r=8 1.45x (kernel faster),
r=32 0.92x; d=1024: r=8 2.30x, r=32 0.54x; d=4096: r=8 0.43x, r=32 0.42x; d=16384: 0.43x,
0.32x; d=65536: 0.38x, 0.57x. The crossover lies between d r^2 = 65,536 (kernel 2.3x faster)
and 262,144 (torch 1.1-2.3x faster)."""

_EPS64 = 2.220446049250313e-16
_SHIFT_TRIES = 16
_MAX_REL_SHIFT = 1e-5


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
    big = [i for i, y in enumerate(ys) if y.shape[0] * y.shape[1] ** 2 >= TORCH_MIN_DRR]
    small = [i for i in range(len(ys)) if i not in set(big)]
    for i in big:
        one = _torch_one(ys[i], oms[i], shifts[i])
        if one is None:
            status[i] = CholeskyStatus.FAILED
        else:
            us[i], ss[i], used[i] = one
    if small:
        st = torch.zeros(len(small), dtype=torch.int8)
        sh = torch.zeros(len(small), dtype=torch.float64)
        _backend.native.nystrom(
            dtype=code,
            sketches=v.ptrs([ys[i] for i in small]),
            omegas=v.ptrs([oms[i] for i in small]),
            U=v.ptrs([us[i] for i in small]),
            S=v.ptrs([ss[i] for i in small]),
            d=[ys[i].shape[0] for i in small],
            r=[ys[i].shape[1] for i in small],
            shift=[shifts[i] for i in small],
            status=st.data_ptr(),
            shift_used=sh.data_ptr(),
            nthreads=_backend.num_threads(),
        )
        status[small], used[small] = st, sh
    bad = (status == CholeskyStatus.FAILED).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"{OP}: sketches {bad[:10]} are not finite or not sketches of a PSD matrix"
            " (Omega^T Y is not positive definite even after shifting)"
        )
    return NystromApprox(us, ss, used)


def _torch_one(
    y: torch.Tensor, om: torch.Tensor, shift: float
) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """The kernel's algorithm (shift, escalation, thin SVD) in torch ops, for large matrices
    (see `TORCH_MIN_DRR`); None where the kernel would report FAILED."""
    if not (bool(torch.isfinite(y).all()) and bool(torch.isfinite(om).all())):
        return None
    d = y.shape[0]
    norm = float(torch.linalg.vector_norm(y, dtype=torch.float64))
    nu = shift if shift >= 0 else math.sqrt(d) * _EPS64 * norm
    if nu == 0.0 and norm == 0.0:
        nu = _EPS64  # a zero sketch: the shift alone keeps C invertible
    max_nu = max(nu, _MAX_REL_SHIFT * math.sqrt(d) * norm)
    for t in range(_SHIFT_TRIES):
        y_nu = y + nu * om
        c = om.T @ y_nu
        low, info = torch.linalg.cholesky_ex((c + c.T) / 2)
        if int(info) == 0:
            break
        nu = nu * 10.0 if nu > 0 else _EPS64
        if t == _SHIFT_TRIES - 1 or nu > max_nu:
            return None
    b = torch.linalg.solve_triangular(low.T, y_nu, upper=True, left=False)  # Y_nu L^-T
    u, sv, _ = torch.linalg.svd(b, full_matrices=False)
    s = (sv.double().square() - nu).clamp_(min=0.0).to(y.dtype)
    return u.contiguous(), s, nu
