"""Checks that curvature is a Fisher: finite, bounded, symmetric, positive semi-definite.

The tolerance is relative to each matrix's scale, `max(tol, n * wire_eps) * max|M|` for an n x n
matrix, not a few ulps: a bf16/fp16 payload is rounded to 8 or 11 bits, which moves eigenvalues by
up to `n * eps * max|M|`, so a PSD factor with small eigenvalues can arrive slightly indefinite,
and that is not an attack. The PSD tests of all matrices are one ragged `damped_cholesky_inverse`
call (that shift, no escalation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedng import ops

MAX_ABS = 1e18
"""Largest entry accepted: beyond it, products of entries overflow float32."""


@dataclass(frozen=True)
class PsdCheck:
    """One symmetric matrix to test for positive semi-definiteness.

    Attributes:
        label: names the block and matrix in the error (e.g. `kfac block 'fc1' A`).
        matrix: [n, n] float32, symmetrized.
        shift: the tolerance added to the diagonal before the Cholesky test.
    """

    label: str
    matrix: torch.Tensor
    shift: float


def finite_scale(label: str, t: torch.Tensor) -> float:
    """`max|t|` (0 for an empty tensor).

    Raises:
        ValueError: NaN/Inf entries, or entries beyond `MAX_ABS`.
    """
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{label} has NaN/Inf entries")
    big = float(t.abs().max()) if t.numel() else 0.0
    if big > MAX_ABS:
        raise ValueError(
            f"{label} has entries of size {big:.3g} (> {MAX_ABS:g}: its products overflow float32)"
        )
    return big


def check_nonnegative(label: str, t: torch.Tensor, tol: float, big: float) -> None:
    """A diagonal: no entry below `-tol * big` (ValueError otherwise)."""
    if t.numel() and float(t.min()) < -tol * big:
        raise ValueError(f"{label} has a negative entry {float(t.min()):.3e}")


def symmetric_check(
    label: str, t: torch.Tensor, tol: float, wire_eps: float, *, rounded_entries: bool = True
) -> PsdCheck:
    """The PSD test of a square matrix `t` [n, n], after checking its symmetry.

    The shift that the PSD test allows is `max(tol * max|t|, e)`, where `e` bounds how far the
    wire's rounding can have moved the eigenvalues of a PSD matrix:
    - `rounded_entries` (the matrix itself travelled, e.g. a K-FAC factor): each entry is rounded
      to `wire_eps` relative precision, so the error matrix has Frobenius norm at most
      `wire_eps * ||t||_F`, which bounds every eigenvalue's move (Weyl). A client cannot pass
      `-I` off as rounding: the bound is a fraction of `||t||_F`, not of `n * max|t|`.
    - otherwise (a matrix derived from a rounded one, e.g. a sketch's `Omega^T Y`): the looser
      `n * wire_eps * max|t|`.

    Raises:
        ValueError: `max|t - t^T|` exceeds the tolerance.
    """
    big = float(t.abs().max()) if t.numel() else 0.0
    if rounded_entries:
        err = wire_eps * float(torch.linalg.matrix_norm(t.float())) if t.numel() else 0.0
    else:
        err = t.shape[0] * wire_eps * big
    allowed = max(tol * big, err)
    asym = float((t - t.T).abs().max()) if t.numel() else 0.0
    if asym > allowed:
        raise ValueError(f"{label} is not symmetric (max |M - M^T| = {asym:.3e})")
    return PsdCheck(label, ((t + t.T) / 2).float().contiguous(), allowed + 1e-30)


def run_psd_checks(checks: Sequence[PsdCheck]) -> None:
    """All PSD tests in one native call.

    Raises:
        ValueError: naming the first matrix that is not PSD within its shift.
    """
    if not checks:
        return
    res = ops.damped_cholesky_inverse(
        [c.matrix for c in checks], [c.shift for c in checks], max_tries=1
    )
    for c, st in zip(checks, res.status.tolist(), strict=True):
        if st != ops.CholeskyStatus.OK:
            raise ValueError(f"{c.label} is not positive semi-definite within tolerance")
