"""The pooled curvature's PSD test, by Cholesky factorizations alone.

`fedng.curvature.validation.run_psd_checks` tests every matrix with one ragged native
`damped_cholesky_inverse` call: the right call for many small matrices, but for a large factor
it also forms the inverse (potri, twice the factorization's flops) only to read its status. A
server tests the pooled curvature of every round; here the large matrices are factorized
without inverting them (the same test: `M + shift I` has a Cholesky factor).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedng.curvature import KFAC, CurvatureSet
from fedng.curvature.validation import (
    MAX_ABS,
    PsdCheck,
    check_nonnegative,
    finite_scale,
    run_psd_checks,
)

LARGE = 128
"""Matrices at least this wide are factorized on their own (the others in one native call)."""

PAD_EVERY = 32
PAD = 8
"""A matrix whose width is a multiple of PAD_EVERY (from LARGE up) is factorized inside a
PAD-wider identity-padded copy: torch's CPU Cholesky (MKL) runs 2-4x slower when the leading
dimension is such a multiple (cache-set conflicts; measured 512 wide: 1.6 ms against 0.7, 1024:
18 ms against 4.4), and `chol([[M, 0], [0, I]]) = [[chol(M), 0], [0, I]]`."""


def padded(n: int) -> bool:
    """Whether an n-wide matrix is factorized inside an identity-padded copy (`PAD_EVERY`)."""
    return n >= LARGE and n % PAD_EVERY == 0


def shifted_cholesky(
    m: torch.Tensor, shift: float, overwrite: bool = False
) -> tuple[torch.Tensor, int]:
    """The lower Cholesky factor of `m + shift I` (m square, symmetric) and LAPACK's status
    (0: it factorized), as `torch.linalg.cholesky_ex(m + shift I)` gives them (the same up to
    rounding), padded as `PAD_EVERY` explains where that is faster. `m` is not modified unless
    `overwrite` (then an unpadded `m` gets the shift in place instead of a copy).

    Returns:
        (L [n, n] (a view into the padded factor where padded), info).
    """
    n = m.shape[0]
    if not padded(n) or not math.isfinite(shift):  # a non-finite shift: LAPACK's own verdict
        shifted = m if overwrite else m.clone()
        shifted.diagonal().add_(shift)
        low, info = torch.linalg.cholesky_ex(shifted)
        return low, int(info)
    buf = torch.empty(n + PAD, n + PAD, dtype=m.dtype)  # no zero fill of the n x n part
    buf[:n, :n] = m
    buf[:n, :n].diagonal().add_(shift)
    buf[:n, n:] = 0.0
    buf[n:, :n] = 0.0
    buf[n:, n:] = torch.eye(PAD, dtype=m.dtype)
    low, info = torch.linalg.cholesky_ex(buf)
    return low[:n, :n], int(info)


def psd_tests(checks: Sequence[PsdCheck]) -> None:
    """`run_psd_checks(checks)`, each large matrix by one Cholesky factorization (its matrix,
    a symmetrized copy the check owns, gets its shift added in place, or is copied into a padded
    buffer: `shifted_cholesky`).

    Raises:
        ValueError: naming the first matrix that is not PSD within its shift.
    """
    small = [c for c in checks if c.matrix.shape[0] < LARGE]
    run_psd_checks(small)
    for c in checks:  # the check owns its matrix: shifted in place unless factorized padded
        if c.matrix.shape[0] >= LARGE and shifted_cholesky(c.matrix, c.shift, overwrite=True)[1]:
            raise ValueError(f"{c.label} is not positive semi-definite within tolerance")


def unpacked_checks(pooled: CurvatureSet, tol: float, wire_eps: float) -> list[PsdCheck]:
    """`[c for rep in pooled.reps.values() for c in rep.psd_checks(tol, wire_eps)]` for a set
    decoded from packed triangles (`CurvatureSet.from_arrays`): the same checks, shifts and
    errors, with what symmetry by construction makes moot skipped.

    An unpacked K-FAC factor is exactly symmetric (both triangles are copies of one entry), so
    its asymmetry is 0 and its symmetrized copy is itself: one pass (`max|M|`, NaN-propagating)
    replaces the finiteness, scale and asymmetry passes. The wire-rounding allowance
    `wire_eps ||M||_F` is computed only when it can exceed `tol max|M|` (it is at most
    `wire_eps n max|M|`); anything unusual (NaN, Inf, huge entries) takes the general check,
    which raises its own error.
    """
    checks: list[PsdCheck] = []
    for rep in pooled.reps.values():
        if not isinstance(rep, KFAC):
            checks += rep.psd_checks(tol, wire_eps)
            continue
        for i, spec in enumerate(rep.specs):
            for tag, f in (("A", rep.A[i]), ("G", rep.G[i])):
                label = f"{rep.kind} block '{spec.name}' {tag}"
                if f.dim() == 1:
                    check_nonnegative(label, f, tol, finite_scale(label, f))
                    continue
                big = 0.0
                if f.numel():  # max |M| without an |M| copy (NaN: both NaN, the first wins)
                    lo, hi = torch.aminmax(f)
                    big = max(float(hi), -float(lo))
                if not big <= MAX_ABS:
                    finite_scale(label, f)  # raises: NaN/Inf or overflowing entries
                allowed = tol * big
                if wire_eps * f.shape[0] * big * (1 + 1e-6) > allowed:
                    allowed = max(allowed, wire_eps * float(torch.linalg.matrix_norm(f.float())))
                checks.append(PsdCheck(label, f.float().clone(), allowed + 1e-30))
    return checks
