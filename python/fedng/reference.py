"""Pure-torch float64 references of every op in `fedng.ops`: the ground truth tests compare to.

They favour clarity over speed: explicit formulas, dense matrices, `torch.linalg`. Each returns
float64 tensors whatever the input dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

Tensors = Sequence[torch.Tensor]


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _scales(value: float | Sequence[float], n: int) -> list[float]:
    return [float(value)] * n if isinstance(value, (int, float)) else [float(v) for v in value]


def symmetric_from_lower(m: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose lower triangle is that of `m` [n, n]."""
    low = torch.tril(_f64(m))
    return low + torch.tril(low, -1).T


def kron_accumulate_ref(
    factors: Tensors, inputs: Tensors, decay: float = 1.0, scale: float | Sequence[float] = 1.0
) -> list[torch.Tensor]:
    """`decay * F_i + scale_i * X_i^T X_i` for F_i [n, n], X_i [k, n]."""
    s = _scales(scale, len(factors))
    return [
        decay * _f64(f) + s[i] * _f64(x).T @ _f64(x)
        for i, (f, x) in enumerate(zip(factors, inputs, strict=True))
    ]


def damped_cholesky_inverse_ref(
    mats: Tensors, damping: float | Sequence[float]
) -> list[torch.Tensor]:
    """`(M_i + lambda_i I)^-1` for the symmetric M_i [n, n] read from its lower triangle."""
    lam = _scales(damping, len(mats))
    out = []
    for m, lam_i in zip(mats, lam, strict=True):
        a = symmetric_from_lower(m)
        out.append(torch.linalg.inv(a + lam_i * torch.eye(a.shape[0], dtype=torch.float64)))
    return out


def kron_precondition_ref(
    grads: Tensors | None,
    a_inv: Tensors,
    g_inv: Tensors,
    *,
    inputs: Tensors | None = None,
    output_grads: Tensors | None = None,
) -> list[torch.Tensor]:
    """`g_inv_i @ grads_i @ a_inv_i`, where `grads_i = output_grads_i^T inputs_i` if not given."""
    out = []
    for i, (a, g) in enumerate(zip(a_inv, g_inv, strict=True)):
        if grads is not None:
            w = _f64(grads[i])
        elif inputs is not None and output_grads is not None:
            w = _f64(output_grads[i]).T @ _f64(inputs[i])
        else:
            raise ValueError("kron_precondition_ref: give grads, or inputs and output_grads")
        out.append(_f64(g) @ w @ _f64(a))
    return out


def kfac_step_ref(
    inputs: Tensors,
    output_grads: Tensors,
    bias: Sequence[bool],
    a_factors: Tensors,
    g_factors: Tensors,
    decay: float | Sequence[float],
    a_scale: float | Sequence[float],
    g_scale: float | Sequence[float],
    grads: Tensors | None = None,
    a_inv: Tensors | None = None,
    g_inv: Tensors | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None]:
    """The updated factors `decay_i F + scale_i R^T R` (A's rows `R = [x 1]` with a bias) and,
    given inverses, `g_inv_i grads_i a_inv_i`: (A list, G list, outputs or None)."""
    count = len(inputs)
    d, sa, sg = _scales(decay, count), _scales(a_scale, count), _scales(g_scale, count)
    a_new, g_new = [], []
    for i in range(count):
        x = _f64(inputs[i])
        if bias[i]:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
        g = _f64(output_grads[i])
        a_new.append(d[i] * _f64(a_factors[i]) + sa[i] * x.T @ x)
        g_new.append(d[i] * _f64(g_factors[i]) + sg[i] * g.T @ g)
    if grads is None or a_inv is None or g_inv is None:
        return a_new, g_new, None
    return a_new, g_new, kron_precondition_ref(grads, a_inv, g_inv)


def sketch_accumulate_ref(
    sketches: Tensors,
    jacobians: Tensors,
    omegas: Tensors,
    decay: float = 1.0,
    scale: float | Sequence[float] = 1.0,
) -> list[torch.Tensor]:
    """`decay * Y_i + scale_i * (J_i^T J_i) Omega_i`, forming the Fisher explicitly.

    For finite Y_i only: the kernel's decay 0 also overwrites NaN/Inf, which `0 * Y_i` keeps.
    """
    s = _scales(scale, len(sketches))
    return [
        decay * _f64(y) + s[i] * (_f64(j).T @ _f64(j)) @ _f64(om)
        for i, (y, j, om) in enumerate(zip(sketches, jacobians, omegas, strict=True))
    ]


def nystrom_ref(
    sketches: Tensors, omegas: Tensors, shift: float | Sequence[float] = 0.0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Stable Nystrom in float64: returns (U [d, r], S [r]) per matrix, S decreasing.

    With shift 0 this is `Y (Omega^T Y)^-1 Y^T`, the Nystrom approximation of F.
    """
    nus = _scales(shift, len(sketches))
    out = []
    for y, om, nu in zip(sketches, omegas, nus, strict=True):
        y_nu = _f64(y) + nu * _f64(om)
        small = _f64(om).T @ y_nu
        c = torch.linalg.cholesky((small + small.T) / 2, upper=True)
        b = torch.linalg.solve_triangular(c, y_nu, upper=True, left=False)
        u, sv, _ = torch.linalg.svd(b, full_matrices=False)
        out.append((u, torch.clamp(sv * sv - nu, min=0.0)))
    return out


def lowrank_precondition_ref(
    U: Tensors, S: Tensors, damping: float | Sequence[float], V: Tensors
) -> list[torch.Tensor]:
    """Solves `(U diag(S) U^T + lambda I) X = V` densely."""
    lam = _scales(damping, len(U))
    out = []
    for u, s, x, lam_i in zip(U, S, V, lam, strict=True):
        u64 = _f64(u)
        dense = u64 @ torch.diag(_f64(s)) @ u64.T + lam_i * torch.eye(
            u.shape[0], dtype=torch.float64
        )
        out.append(torch.linalg.solve(dense, _f64(x)))
    return out


# --- gaussian_sketch_matrix: Philox-4x32-10 + Wichura's AS241, operation for operation -------
_MASK = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    prod = b * a  # wraps in int64 with the same bits as the unsigned 64-bit product
    return (prod >> 32) & _MASK, prod & _MASK


def philox4x32_ref(c: list[torch.Tensor], key: tuple[int, int]) -> list[torch.Tensor]:
    """Ten rounds of Philox-4x32 on int64 tensors holding 32-bit words."""
    k0, k1 = key
    for rnd in range(10):
        if rnd:
            k0, k1 = (k0 + _PHILOX_W[0]) & _MASK, (k1 + _PHILOX_W[1]) & _MASK
        hi0, lo0 = _mulhilo(_PHILOX_M[0], c[0])
        hi1, lo1 = _mulhilo(_PHILOX_M[1], c[2])
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
    return c


def _poly(coeffs: Sequence[float], x: torch.Tensor) -> torch.Tensor:
    acc = torch.full_like(x, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = acc * x + c
    return acc


_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_SQRT_HALF = 0.70710678118654752440


def det_log_ref(x: torch.Tensor) -> torch.Tensor:
    """Natural log by exact range reduction and an atanh series (only +, -, *, /)."""
    m, e = torch.frexp(x)  # x = m 2^e, m in [0.5, 1)
    small = m < _SQRT_HALF
    m = torch.where(small, m * 2.0, m)
    e = torch.where(small, e - 1, e).to(torch.float64)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    series = _poly([1.0 / (2 * k + 1) for k in range(12)], s2)
    return e * _LN2_HI + (e * _LN2_LO + 2.0 * s * series)


_A = (
    3.3871328727963666080e0,
    1.3314166789178437745e2,
    1.9715909503065514427e3,
    1.3731693765509461125e4,
    4.5921953931549871457e4,
    6.7265770927008700853e4,
    3.3430575583588128105e4,
    2.5090809287301226727e3,
)
_B = (
    1.0,
    4.2313330701600911252e1,
    6.8718700749205790830e2,
    5.3941960214247511077e3,
    2.1213794301586595867e4,
    3.9307895800092710610e4,
    2.8729085735721942674e4,
    5.2264952788528545610e3,
)
_C = (
    1.42343711074968357734e0,
    4.63033784615654529590e0,
    5.76949722146069140550e0,
    3.64784832476320460504e0,
    1.27045825245236838258e0,
    2.41780725177450611770e-1,
    2.27238449892691845833e-2,
    7.74545014278341407640e-4,
)
_D = (
    1.0,
    2.05319162663775882187e0,
    1.67638483018380384940e0,
    6.89767334985100004550e-1,
    1.48103976427480074590e-1,
    1.51986665636164571966e-2,
    5.47593808499534494600e-4,
    1.05075007164441684324e-9,
)
_E = (
    6.65790464350110377720e0,
    5.46378491116411436990e0,
    1.78482653991729133580e0,
    2.96560571828504891230e-1,
    2.65321895265761230930e-2,
    1.24266094738807843860e-3,
    2.71155556874348757815e-5,
    2.01033439929228813265e-7,
)
_F = (
    1.0,
    5.99832206555887937690e-1,
    1.36929880922735805310e-1,
    1.48753612908506148525e-2,
    7.86869131145613259100e-4,
    1.84631831751005468180e-5,
    1.42151175831644588870e-7,
    2.04426310338993978564e-15,
)


def ndtri_ref(p: torch.Tensor) -> torch.Tensor:
    """Inverse standard normal CDF for p in (0, 1): Wichura's AS241 (PPND16), float64."""
    q = p - 0.5
    r_c = 0.180625 - q * q
    central = q * _poly(_A, r_c) / _poly(_B, r_c)
    # numpy's sqrt is the correctly rounded hardware instruction; torch's vectorized sqrt is not
    # always (it may differ in the last bit), and this reference must match the kernel bit for bit.
    r = torch.from_numpy(np.sqrt(-det_log_ref(torch.where(q < 0, p, 1.0 - p)).numpy()))
    near = _poly(_C, r - 1.6) / _poly(_D, r - 1.6)
    far = _poly(_E, r - 5.0) / _poly(_F, r - 5.0)
    tail = torch.where(r <= 5.0, near, far)
    tail = torch.where(q < 0, -tail, tail)
    return torch.where(q.abs() <= 0.425, central, tail)


def gaussian_sketch_matrix_ref(d: int, r: int, seed: int, stream_id: int = 0) -> torch.Tensor:
    """The exact float64 values of `fedng.ops.gaussian_sketch_matrix` (cast for float32)."""
    i = torch.arange(d, dtype=torch.int64).repeat_interleave(r)
    j = torch.arange(r, dtype=torch.int64).repeat(d)
    # One Philox block per column pair: counter (i, j // 2, stream); words (w0, w1) go to the
    # even column, (w2, w3) to the odd one.
    c = [
        i & _MASK,
        (j >> 1) & _MASK,
        torch.full_like(i, stream_id & _MASK),
        torch.full_like(i, (stream_id >> 32) & _MASK),
    ]
    w = philox4x32_ref(c, (seed & _MASK, (seed >> 32) & _MASK))
    odd = (j & 1).bool()
    lo, hi = torch.where(odd, w[2], w[0]), torch.where(odd, w[3], w[1])
    bits52 = ((hi << 32) | lo) >> 12 & ((1 << 52) - 1)
    u = (bits52.to(torch.float64) + 0.5) * 2.0**-52
    return ndtri_ref(u).reshape(d, r)
