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

from fedng.curvature.validation import PsdCheck, run_psd_checks

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
