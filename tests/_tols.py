"""The one tolerance table of the suite and the comparison every numerical test goes through.

Tolerances are normwise: an entry may differ from the float64 reference by
`atol + rtol * scale`, where `scale` is the largest |entry| of the reference (or a scale the
test passes, e.g. |V| / lambda for a Woodbury solve). That is how BLAS/LAPACK errors behave:
they are bounded relative to the size of the operands, not to each (possibly tiny) entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)
"""The dtypes every op is tested in."""


@dataclass(frozen=True)
class Tol:
    """Allowed error: `atol + rtol * scale`."""

    rtol: float
    atol: float


_F32, _F64 = torch.float32, torch.float64

TOLERANCES: dict[str, dict[torch.dtype, Tol]] = {
    # Products and sums of well-scaled data (SYRK, GEMM, the Woodbury update).
    "default": {_F32: Tol(2e-5, 1e-6), _F64: Tol(1e-13, 1e-15)},
    "kron_accumulate": {_F32: Tol(2e-5, 1e-6), _F64: Tol(1e-13, 1e-15)},
    "kron_precondition": {_F32: Tol(2e-5, 1e-6), _F64: Tol(1e-13, 1e-15)},
    "sketch_accumulate": {_F32: Tol(2e-5, 1e-6), _F64: Tol(1e-13, 1e-15)},
    "lowrank_precondition": {_F32: Tol(2e-5, 1e-6), _F64: Tol(1e-13, 1e-15)},
    # Inverses of SPD matrices with condition number <= ~100 (what the tests generate).
    "damped_cholesky_inverse": {_F32: Tol(1e-4, 1e-6), _F64: Tol(1e-12, 1e-15)},
    # Inverses with condition number up to 1e8 (float64) or ~1e10 solved by the float64 retry and
    # rounded to float32: a Cholesky-based inverse errs by about cond * n * eps64 <= 1e-6.
    "damped_cholesky_inverse[ill]": {_F32: Tol(1e-5, 0.0), _F64: Tol(1e-6, 0.0)},
    # Low-rank reconstructions U S U^T from a sketch: the shift and an SVD add a little error.
    "nystrom": {_F32: Tol(1e-4, 1e-6), _F64: Tol(1e-10, 1e-13)},
    # Recovering an exact low-rank F from a float32 sketch: the automatic shift sqrt(d) eps ||Y||
    # and the rounding of Y itself bound the recovery (the same error appears when the float32
    # sketch is decomposed in float64), about 1e-2 of ||F||_max for d = 500, r = 32.
    "nystrom[recovery]": {_F32: Tol(3e-2, 0.0), _F64: Tol(1e-8, 0.0)},
    # One server step computed by fedng (theta + sum p_k delta_k) and by Flower's built-in strategy
    # (sum p_k theta_k, then its optimizer) in float32: the same sums in two reduction orders,
    # relative to the parameters' scale; FedOpt divides by sqrt(v) + tau, which amplifies the
    # rounding of small deltas by up to |theta| / |delta| ~ 100.
    "flower_peer": {_F32: Tol(5e-6, 1e-6), _F64: Tol(1e-13, 1e-15)},
    # Server folds of received payloads into float32 sums (int8 dequantized in registers, bf16
    # widened): a few float32 roundings per entry, relative to the sum's scale.
    "packed_fold": {_F32: Tol(1e-6, 1e-7), _F64: Tol(1e-13, 1e-15)},
    # K-FAC's damped solve G~^-1 R A~^-1 in float32 by Cholesky solves (relative damping 0.1 of
    # the mean eigenvalue bounds the condition numbers), relative to the result's scale.
    "kron_solve": {_F32: Tol(1e-4, 1e-6), _F64: Tol(1e-10, 1e-13)},
    # Sums of squares of float32 entries, float32 within blocks of 1024 (relative to the sum).
    "sum_squares": {_F32: Tol(1e-5, 0.0), _F64: Tol(1e-13, 0.0)},
    # Parameters and factors after a few K-FAC training steps computed along two rounding orders
    # (torch's GEMM against the native one): each step's rounding is amplified by the damped
    # inverse (condition number up to ~1/damping) and carried into the next step; on a wide MLP
    # at batch 6 the gap grows ~10x per step for both fused paths (1e-15 after one step, ~3e-12
    # after four).
    "kfac_trajectory": {_F32: Tol(1e-4, 1e-6), _F64: Tol(1e-10, 1e-12)},
    # One K-FAC step with the batch-form products g G^-1 and P^T Q in bf16 (float32
    # accumulation, `NaturalGradient(bf16="all")`) against the same step in float32, relative to
    # the largest entry: each product errs by <= 2u |a||b| (u = 2^-8), and |a||b| exceeds |ab|
    # where G^-1 or the batch sum cancel; measured <= 4e-3 on the bench MLP.
    "kfac_bf16[all]": {_F32: Tol(2e-2, 1e-6)},
    # Orthonormality / reconstruction identities checked in the op's own precision.
    "orthonormal": {_F32: Tol(1e-5, 1e-5), _F64: Tol(1e-13, 1e-13)},
}


def tol(dtype: torch.dtype, op: str) -> Tol:
    """The tolerance for `op` in `dtype` (the default row where the op has none of its own)."""
    return TOLERANCES.get(op, TOLERANCES["default"])[dtype]


def assert_close(
    out: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype,
    op: str,
    *,
    scale: float | None = None,
) -> None:
    """Asserts that an op's output matches the float64 reference within the table's tolerance.

    Also checks that `out` has the op's dtype and the reference's shape, and that it is finite
    wherever the reference is.

    Args:
        out: the op's output (float32 or float64).
        expected: the float64 reference.
        dtype: the dtype the op ran in (selects the row of the table).
        op: the op name (selects the column of the table).
        scale: the magnitude errors are relative to; the largest |expected| by default.
    """
    assert out.dtype == dtype, f"{op}: output dtype {out.dtype}, expected {dtype}"
    assert tuple(out.shape) == tuple(expected.shape), (
        f"{op}: output shape {tuple(out.shape)}, expected {tuple(expected.shape)}"
    )
    if expected.numel() == 0:
        return
    exp = expected.to(torch.float64)
    got = out.detach().to(torch.float64)
    assert torch.isfinite(exp).all(), f"{op}: the reference itself is not finite"
    assert torch.isfinite(got).all(), f"{op}: output has NaN/Inf where the reference is finite"
    t = tol(dtype, op)
    mag = float(exp.abs().max()) if scale is None else float(scale)
    bound = t.atol + t.rtol * mag
    err = (got - exp).abs()
    worst = float(err.max())
    if worst > bound:
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{op} ({dtype}): max |out - expected| = {worst:.3e} at {idx} exceeds "
            f"{bound:.3e} (rtol {t.rtol:g} x scale {mag:.3e} + atol {t.atol:g}); "
            f"out = {float(got[idx]):.17g}, expected = {float(exp[idx]):.17g}"
        )
