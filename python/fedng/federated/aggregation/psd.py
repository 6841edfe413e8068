"""The pooled curvature's PSD test, by Cholesky factorizations alone.

`fedng.curvature.validation.run_psd_checks` tests every matrix with one ragged native
`damped_cholesky_inverse` call: the right call for many small matrices, but for a large factor
it also forms the inverse (potri, twice the factorization's flops) only to read its status. A
server tests the pooled curvature of every round; here the large matrices are factorized
without inverting them (the same test: `M + shift I` has a Cholesky factor).
"""

from __future__ import annotations

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


def psd_tests(checks: Sequence[PsdCheck]) -> None:
    """`run_psd_checks(checks)`, each large matrix by one Cholesky factorization (its matrix,
    a symmetrized copy the check owns, gets its shift added in place).

    Raises:
        ValueError: naming the first matrix that is not PSD within its shift.
    """
    small = [c for c in checks if c.matrix.shape[0] < LARGE]
    run_psd_checks(small)
    for c in checks:
        if c.matrix.shape[0] >= LARGE:
            c.matrix.diagonal().add_(c.shift)
            if int(torch.linalg.cholesky_ex(c.matrix).info) != 0:
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
