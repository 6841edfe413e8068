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
"""Matrices with `d * r * r` at least this go through the same stable Nystrom in torch ops instead
of the kernel (`_torch_one`: torch's GEMMs and the Gram-matrix SVD; the kernel's thin SVD is
OpenBLAS's LAPACK). Measured (1 thread, CPU time per matrix, kernel / torch path): d r^2 = 16,384
(d=64, r=16; d=256, r=8) 0.30-0.40; 65,536 (d=256, r=16; d=1024, r=8) 0.58-0.83; 262,144 (d=256,
r=32; d=1024, r=16; d=4096, r=8) 1.04-2.02. The crossover lies between 65,536 and 262,144."""

_EPS64 = 2.220446049250313e-16
_SHIFT_TRIES = 16
_MAX_REL_SHIFT = 1e-5
_GRAM_MIN_RATIO = {torch.float32: 1e-6, torch.float64: 1e-12}
"""`_gram_svd` takes the SVD instead when sigma_min^2 / sigma_max^2 falls below this: the Gram
matrix's rounding (eps x sigma_max^2) would then be a large part of sigma_min^2."""


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
    """The kernel's algorithm (shift, escalation, SVD of B) in torch ops, for large matrices
    (see `TORCH_MIN_DRR`); None where the kernel would report FAILED. B's SVD comes from its
    Gram matrix where B is well conditioned (`_gram_svd`), else from the thin SVD.

    No separate finiteness passes (`isfinite(...).all()` on a [d, r] input cost a quarter of the
    SVD): Y is finite exactly when its norm is (squares of float32 values cannot overflow
    float64; a float32 norm that overflows is redone in float64), and a non-finite Omega makes
    `Omega^T Y_nu` non-finite (an Inf or NaN entry of Omega column j meets its own or Y's row in
    the diagonal term (j, j)), which is checked on that r x r matrix.
    """
    d = y.shape[0]
    norm = float(torch.linalg.vector_norm(y))
    if not math.isfinite(norm) and y.dtype != torch.float64:
        norm = float(torch.linalg.vector_norm(y, dtype=torch.float64))
    if not math.isfinite(norm):
        return None
    nu = shift if shift >= 0 else math.sqrt(d) * _EPS64 * norm
    if nu == 0.0 and norm == 0.0:
        nu = _EPS64  # a zero sketch: the shift alone keeps C invertible
    max_nu = max(nu, _MAX_REL_SHIFT * math.sqrt(d) * norm)
    for t in range(_SHIFT_TRIES):
        y_nu = torch.add(y, om, alpha=nu)  # one pass, no temporary nu * Omega
        c = om.T @ y_nu
        if t == 0 and not bool(torch.isfinite(c).all()):
            return None  # Omega is not finite
        low, info = torch.linalg.cholesky_ex((c + c.T) / 2)
        if int(info) == 0:
            break
        nu = nu * 10.0 if nu > 0 else _EPS64
        if t == _SHIFT_TRIES - 1 or nu > max_nu:
            return None
    # B = Y_nu L^-T by a GEMM with L^-1 (r x r, inverted in float64): a [d, r] triangular solve
    # runs at a fraction of GEMM speed.
    low64 = low.double()
    eye = torch.eye(low.shape[0], dtype=torch.float64)
    b = y_nu @ torch.linalg.solve_triangular(low64, eye, upper=False).T.to(y.dtype)
    fast = _gram_svd(b)
    if fast is not None:
        u, sv2 = fast
    else:
        u, sv, _ = torch.linalg.svd(b, full_matrices=False)
        u, sv2 = u.contiguous(), sv.double().square()
    s = (sv2 - nu).clamp_(min=0.0).to(y.dtype)
    return u, s, nu


def _gram_svd(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Left singular vectors and squared singular values of a tall B [d, r] from its Gram matrix.

    `B^T B = V diag(sigma^2) V^T` (an r x r eigenproblem in float64), `U1 = B V sigma^-1`, then one
    CholeskyQR pass `U = U1 R^-1` with `U1^T U1 = R^T R` restores orthonormality lost to rounding.
    Five [d, r] GEMMs instead of a thin SVD (several times slower at r = 32). None when B is too
    ill-conditioned for the Gram matrix (the caller then takes the SVD): sigma_min^2 below
    `_GRAM_MIN_RATIO` of sigma_max^2 in the dtype's precision, or U1 far from orthonormal.

    Returns:
        (U [d, r] contiguous, sigma^2 [r] float64), both by decreasing sigma.
    """
    r = b.shape[1]
    g = (b.T @ b).double()
    lam, v = torch.linalg.eigh((g + g.T) / 2)  # ascending
    lam, v = lam.flip(0), v.flip(1)
    if not bool(lam[-1] > _GRAM_MIN_RATIO[b.dtype] * lam[0]):
        return None
    u1 = b @ (v / lam.sqrt()).to(b.dtype)
    g2 = (u1.T @ u1).double()
    eye = torch.eye(r, dtype=torch.float64)
    if not bool((g2 - eye).abs().max() < 0.5):
        return None
    rt, info = torch.linalg.cholesky_ex((g2 + g2.T) / 2)  # g2 = rt rt^T, rt lower
    if int(info) != 0:
        return None
    # U = U1 R^-1 with R = rt^T: U1 @ (rt^-1)^T.
    u = u1 @ torch.linalg.solve_triangular(rt, eye, upper=False).T.to(b.dtype)
    return u, lam
