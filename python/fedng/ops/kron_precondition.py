"""`kron_precondition`: the K-FAC natural-gradient step `G_i^-1 dW_i A_i^-1` for every layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedng import _backend
from fedng.ops import _validate as v

OP = "kron_precondition"


def kron_precondition(
    grads: Sequence[torch.Tensor] | None,
    a_inv: Sequence[torch.Tensor],
    g_inv: Sequence[torch.Tensor],
    *,
    inputs: Sequence[torch.Tensor] | None = None,
    output_grads: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Preconditions weight gradients with inverted Kronecker factors.

    Dense form: `out_i = g_inv_i @ grads_i @ a_inv_i`, costing 2 m n (m + n) flops.
    Batch form (when the batch is smaller than the layer): with the batch's inputs `Ab` [B, n] and
    output gradients `Gb` [B, m], so that `grads_i = Gb^T Ab`, the same result is
    `(Gb g_inv)^T (Ab a_inv)`, costing 2 B (m^2 + n^2 + m n). When both are given the cheaper form
    is chosen per layer. A bias is folded in by the caller as an extra column of `grads`/`inputs`.

    Args:
        grads: N tensors [m_i, n_i], or None when `inputs`/`output_grads` are given.
        a_inv: N symmetric tensors [n_i, n_i].
        g_inv: N symmetric tensors [m_i, m_i].
        inputs: optional N tensors [B_i, n_i] (the layer inputs of the batch).
        output_grads: optional N tensors [B_i, m_i] (the gradients w.r.t. the layer outputs).

    Returns:
        N new tensors [m_i, n_i].
    """
    ais = v.tensor_list(OP, "a_inv", a_inv)
    n = len(ais)
    gis = v.tensor_list(OP, "g_inv", g_inv, length=n)
    gs = v.tensor_list(OP, "grads", grads, length=n) if grads is not None else None
    if (inputs is None) != (output_grads is None):
        raise ValueError(f"{OP}: 'inputs' and 'output_grads' must be given together")
    abs_ = v.tensor_list(OP, "inputs", inputs, length=n) if inputs is not None else None
    gbs = (
        v.tensor_list(OP, "output_grads", output_grads, length=n)
        if output_grads is not None
        else None
    )
    if gs is None and abs_ is None:
        raise ValueError(f"{OP}: give 'grads', or 'inputs' and 'output_grads'")
    if n == 0:
        return []
    groups = {"a_inv": ais, "g_inv": gis}
    if gs is not None:
        groups["grads"] = gs
    if abs_ is not None and gbs is not None:
        groups["inputs"], groups["output_grads"] = abs_, gbs
    code = v.dtype_code(OP, groups)
    for i in range(n):
        v.shape(OP, "a_inv", i, ais[i], (None, None))
        v.shape(OP, "a_inv", i, ais[i], (ais[i].shape[0], ais[i].shape[0]))
        v.shape(OP, "g_inv", i, gis[i], (None, None))
        v.shape(OP, "g_inv", i, gis[i], (gis[i].shape[0], gis[i].shape[0]))
    ms = [g.shape[0] for g in gis]
    ns = [a.shape[0] for a in ais]
    for i in range(n):
        if gs is not None:
            v.shape(OP, "grads", i, gs[i], (ms[i], ns[i]))
        if abs_ is not None and gbs is not None:
            v.shape(OP, "inputs", i, abs_[i], (None, ns[i]))
            v.shape(OP, "output_grads", i, gbs[i], (abs_[i].shape[0], ms[i]))
    return run(gs, ais, gis, abs_, gbs, code=code)


def run(
    grads: list[torch.Tensor] | None,
    a_inv: list[torch.Tensor],
    g_inv: list[torch.Tensor],
    inputs: list[torch.Tensor] | None = None,
    output_grads: list[torch.Tensor] | None = None,
    outs: list[torch.Tensor] | None = None,
    code: int | None = None,
) -> list[torch.Tensor]:
    """The native call without any check (see `fedng.ops.trusted`): the arguments must already
    satisfy everything `kron_precondition` validates; `outs` (allocated when None) are N
    contiguous [m_i, n_i] tensors of the same dtype that overlap no input."""
    n = len(a_inv)
    if n == 0:
        return []
    ms = [g.shape[0] for g in g_inv]
    ns = [a.shape[0] for a in a_inv]
    dtype = a_inv[0].dtype
    if outs is None:
        outs = [torch.empty((m, k), dtype=dtype) for m, k in zip(ms, ns, strict=True)]
    zeros = [0] * n
    _backend.native.kron_precondition(
        dtype=v.FLOAT_DTYPES[dtype] if code is None else code,
        grads=[t.data_ptr() for t in grads] if grads is not None else zeros,
        a_inv=[t.data_ptr() for t in a_inv],
        g_inv=[t.data_ptr() for t in g_inv],
        inputs=[t.data_ptr() for t in inputs] if inputs is not None else zeros,
        output_grads=[t.data_ptr() for t in output_grads] if output_grads is not None else zeros,
        outs=[t.data_ptr() for t in outs],
        m=ms,
        n=ns,
        batch=[t.shape[0] for t in inputs] if inputs is not None else [-1] * n,
        nthreads=_backend.num_threads(),
    )
    return outs
