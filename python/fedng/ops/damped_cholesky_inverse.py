"""`damped_cholesky_inverse`: `(M_i + lambda_i I)^-1` for a ragged list, with per-matrix status."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch

from fedng import _backend
from fedng.errors import NumericalError
from fedng.ops import _validate as v

OP = "damped_cholesky_inverse"


class CholeskyStatus(enum.IntEnum):
    """Outcome of one matrix's inversion."""

    OK = 0
    """Inverted with the requested damping."""
    JITTER = 1
    """Not positive definite at the requested damping; inverted after escalating it."""
    FAILED = 2
    """NaN/Inf input, or not positive definite even after every escalation: output is NaN."""


class DampedInverse(NamedTuple):
    """Result of `damped_cholesky_inverse`.

    Attributes:
        inverses: N tensors, `inverses[i]` of shape [n_i, n_i], exactly symmetric.
        status: int8 tensor [N] of `CholeskyStatus` codes.
        damping: float64 tensor [N], the damping actually used (NaN where status is FAILED).
    """

    inverses: list[torch.Tensor]
    status: torch.Tensor
    damping: torch.Tensor


def damped_cholesky_inverse(
    mats: Sequence[torch.Tensor],
    damping: float | Sequence[float],
    *,
    max_tries: int = 6,
    jitter_factor: float = 10.0,
    errors: Literal["status", "raise"] = "status",
    out: Sequence[torch.Tensor] | None = None,
) -> DampedInverse:
    """Inverts damped symmetric positive-definite matrices via Cholesky.

    For each matrix, `(M_i + lambda_i I)` is factorized; if it is not positive definite (or float32
    loses it), the float32 attempt is retried in float64, then the damping is multiplied by
    `jitter_factor` up to `max_tries - 1` times. Inputs with NaN/Inf are reported as FAILED and
    their outputs filled with NaN: a NaN in the output always comes with status FAILED.

    Only the lower triangle of each input is read (the matrix is taken as symmetric).

    Args:
        mats: N tensors, `mats[i]` of shape [n_i, n_i]; not modified.
        damping: lambda >= 0, one float or one per matrix. With lambda = 0 the first escalation
            starts at 1e-6 x mean(diag).
        max_tries: total damping levels tried per matrix (>= 1).
        jitter_factor: growth of lambda between tries (> 1).
        errors: "status" reports failures in `status`; "raise" raises `NumericalError` if any
            matrix failed.
        out: optional N tensors [n_i, n_i] to write the inverses into (e.g. reused every K-FAC
            inverse update); must not share memory with `mats`.

    Returns:
        `DampedInverse(inverses, status, damping)`.
    """
    ms = v.tensor_list(OP, "mats", mats)
    lambdas = v.per_item(OP, "damping", damping, len(ms), nonnegative=True)
    if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
        raise ValueError(f"{OP}: 'max_tries' must be an int >= 1, got {max_tries!r}")
    jitter_factor = v.finite_scalar(OP, "jitter_factor", jitter_factor)
    if jitter_factor <= 1.0:
        raise ValueError(f"{OP}: 'jitter_factor' must be > 1, got {jitter_factor}")
    if errors not in ("status", "raise"):
        raise ValueError(f"{OP}: 'errors' must be 'status' or 'raise', got {errors!r}")
    if not ms:
        return run([], [], max_tries, jitter_factor)
    code = v.dtype_code(OP, {"mats": ms})
    sizes = v.square_sizes(OP, "mats", ms)
    outs = None if out is None else v.out_list(OP, out, ms, "mats")
    res = run(ms, lambdas, max_tries, jitter_factor, outs, code, sizes)
    if errors == "raise":
        failed = (res.status == CholeskyStatus.FAILED).nonzero().flatten().tolist()
        if failed:
            raise NumericalError(
                f"{OP}: {len(failed)} of {len(ms)} matrices are not positive definite or not finite"
                f" (indices {failed[:10]}{'...' if len(failed) > 10 else ''})"
            )
    return res


def alloc_like(mats: list[torch.Tensor], sizes: list[int] | None = None) -> list[torch.Tensor]:
    """Uninitialized [n_i, n_i] outputs: one allocation per distinct size, cut into views.

    Thousands of tiny matrices would otherwise cost one allocator call each (more than their
    inversion); every view is contiguous and no two overlap. `sizes` (the n_i, if known) saves
    reading the shapes again.
    """
    if len(mats) < 8:
        return [torch.empty_like(m, memory_format=torch.contiguous_format) for m in mats]
    dtype = mats[0].dtype
    ns = [m.shape[0] for m in mats] if sizes is None else sizes
    # Stable sort by size; each size's block is unbound in C++ (one call per size, not per view).
    order = sorted(range(len(ns)), key=ns.__getitem__)
    views: list[torch.Tensor] = []
    start = 0
    # Views made without autograd's view bookkeeping (a quarter cheaper; the blocks never
    # require grad, and the views are ordinary tensors afterwards).
    with torch.no_grad():
        while start < len(order):
            n = ns[order[start]]
            stop = start + 1
            while stop < len(order) and ns[order[stop]] == n:
                stop += 1
            views.extend(torch.empty((stop - start, n, n), dtype=dtype).unbind(0))
            start = stop
    outs: list[torch.Tensor] = views[:]  # every entry is replaced below
    for i, t in zip(order, views, strict=True):
        outs[i] = t
    return outs


def run(
    mats: list[torch.Tensor],
    damping: list[float],
    max_tries: int = 6,
    jitter_factor: float = 10.0,
    outs: list[torch.Tensor] | None = None,
    code: int | None = None,
    sizes: list[int] | None = None,
) -> DampedInverse:
    """The native call without any check (see `fedng.ops.trusted`): the arguments must already
    satisfy everything `damped_cholesky_inverse` validates (`damping` one float >= 0 per
    matrix); `outs` (allocated when None) overlap no input; `sizes`, if given, are the n_i."""
    status = torch.zeros(len(mats), dtype=torch.int8)  # CholeskyStatus.OK
    used = torch.zeros(len(mats), dtype=torch.float64)
    if not mats:
        return DampedInverse([], status, used)
    ns = [m.shape[0] for m in mats] if sizes is None else sizes
    if outs is None:
        outs = alloc_like(mats, ns)
    _backend.native.damped_cholesky_inverse(
        dtype=v.FLOAT_DTYPES[mats[0].dtype] if code is None else code,
        mats=[m.data_ptr() for m in mats],
        outs=[o.data_ptr() for o in outs],
        n=ns,
        damping=damping,
        max_tries=max_tries,
        jitter_factor=jitter_factor,
        status=status.data_ptr(),
        damping_used=used.data_ptr(),
        nthreads=_backend.num_threads(),
    )
    return DampedInverse(outs, status, used)
