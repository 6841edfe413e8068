"""Trusted entry points into `fedng._C` for fedng's own layers (curvature, optim, federated).

The public `fedng.ops.<op>` validate every argument (types, dtypes, devices, layouts, shapes,
aliasing, finite scalars) before taking a pointer: on small layers those Python checks cost more
than the kernels. Internal callers build their arguments themselves, always the same way, so they
call these instead: the same kernels and bits, no per-call checks.

The contract (unchecked here, so a violation can corrupt memory): every tensor is a contiguous
CPU float32/float64 tensor, all of one dtype, with the shapes the public op documents; written
buffers overlap nothing else; per-matrix scalars are lists with one finite float per matrix.

`CHECK = True` (or the environment variable `FEDNG_CHECK_INTERNAL=1` at import) routes every
call through the public, validating op instead: the test suite does so to prove that the internal
callers keep the contract (`tests/test_trusted_ops.py`).
"""

from __future__ import annotations

import os

import torch

from fedng.ops.damped_cholesky_inverse import DampedInverse
from fedng.ops.damped_cholesky_inverse import damped_cholesky_inverse as _dci
from fedng.ops.damped_cholesky_inverse import run as _dci_run
from fedng.ops.kron_accumulate import kron_accumulate as _ka
from fedng.ops.kron_accumulate import run as _ka_run
from fedng.ops.kron_precondition import kron_precondition as _kp
from fedng.ops.kron_precondition import run as _kp_run

CHECK = os.environ.get("FEDNG_CHECK_INTERNAL", "") == "1"
"""Validate every trusted call as the public op would (for tests and debugging)."""


def kron_accumulate(
    factors: list[torch.Tensor], inputs: list[torch.Tensor], decay: float, scale: list[float]
) -> None:
    """`F_i <- decay F_i + scale_i X_i^T X_i` in place (see `fedng.ops.kron_accumulate`)."""
    if CHECK:
        _ka(factors, inputs, decay, scale)
    else:
        _ka_run(factors, inputs, decay, scale)


def kron_precondition(
    grads: list[torch.Tensor] | None,
    a_inv: list[torch.Tensor],
    g_inv: list[torch.Tensor],
    inputs: list[torch.Tensor] | None = None,
    output_grads: list[torch.Tensor] | None = None,
    outs: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """`G_i^-1 grad_i A_i^-1` (see `fedng.ops.kron_precondition`), written into `outs` if given
    (N contiguous [m_i, n_i] tensors overlapping no input)."""
    if CHECK:
        res = _kp(grads, a_inv, g_inv, inputs=inputs, output_grads=output_grads)
        if outs is None:
            return res
        for o, r in zip(outs, res, strict=True):
            o.copy_(r)
        return outs
    return _kp_run(grads, a_inv, g_inv, inputs, output_grads, outs)


def damped_cholesky_inverse(
    mats: list[torch.Tensor],
    damping: list[float],
    *,
    max_tries: int = 6,
    jitter_factor: float = 10.0,
) -> DampedInverse:
    """`(M_i + lambda_i I)^-1` with status (see `fedng.ops.damped_cholesky_inverse`)."""
    if CHECK:
        return _dci(mats, damping, max_tries=max_tries, jitter_factor=jitter_factor)
    return _dci_run(mats, damping, max_tries, jitter_factor)
