"""A client's Fisher on its trainable parameters as low-rank pieces, for FIPA.

The Fisher is `F = R^T R` with one row of R [N, d] per sample (empirical) or per sample and
output (true Fisher), d = the trainable parameters flattened in sorted-name order; R comes from
per-sample gradients (`torch.func.vmap` over `torch.func.grad` / `jacrev` of the model called
functionally), so frozen parameters (a LoRA base) never enter it. F is never formed: its top
eigenpairs come from the N x N (or d x d, whichever is smaller) Gram matrix, or from fedng's
shared-seed sketch (`sketch_accumulate`, `nystrom`).
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from fedng import ops
from fedng.curvature.fisher import LossType
from fedng.federated.losses import loss_fn

FIPA_STREAM = zlib.crc32(b"fipa")
"""The sketch stream of FIPA's test matrices (the same on every client and the server)."""

Params = dict[str, torch.Tensor]

_CHUNK = 64
"""Samples per vectorized per-sample-gradient call (bounds memory at CHUNK x outputs x d)."""


def trainable_names(model: nn.Module) -> list[str]:
    """The names of the model's trainable parameters, sorted (the flattening order)."""
    return sorted(k for k, p in model.named_parameters() if p.requires_grad)


def fisher_rows(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: LossType, fisher_type: str
) -> torch.Tensor:
    """R [N, d] (float64) with `R^T R` the mean Fisher of the batch on the trainable parameters.

    Args:
        model: the model (its trainable parameters are the variables; it is put in eval mode
            for the computation and its mode restored).
        x: inputs [n, ...].
        y: targets [n] (class indices) or [n, k].
        loss: "cross_entropy" or "mse" (the mean-reduced loss of local training).
        fisher_type: "empirical" (N = n rows: per-sample loss gradients) or "true" (N = n k
            rows: mse `sqrt(2/k) J_i`, cross-entropy `sqrt(p_c) grad log p_c`).

    Returns:
        R, scaled by 1/sqrt(n).
    """
    names = trainable_names(model)
    fixed = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
    fixed.update({k: v.detach() for k, v in model.named_buffers()})
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    crit = loss_fn(loss)

    def out(pv: Params, xi: torch.Tensor) -> torch.Tensor:
        o: torch.Tensor = functional_call(model, {**fixed, **pv}, (xi.unsqueeze(0),))
        return o.squeeze(0)

    def out_aux(pv: Params, xi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o = out(pv, xi)
        return o, o

    def sample_loss(pv: Params, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return crit(out(pv, xi).unsqueeze(0), yi.unsqueeze(0))

    def flat(g: dict[str, torch.Tensor], lead: int) -> torch.Tensor:
        return torch.cat([g[k].reshape(*g[k].shape[:lead], -1) for k in names], lead)

    was_training = model.training
    model.eval()
    rows = []
    try:
        for lo in range(0, x.shape[0], _CHUNK):
            xb, yb = x[lo : lo + _CHUNK], y[lo : lo + _CHUNK]
            if fisher_type == "empirical":
                g = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, xb, yb)
                rows.append(flat(g, 1).double())
                continue
            jac_d, o = vmap(jacrev(out_aux, has_aux=True), in_dims=(None, 0))(params, xb)
            jac = flat(jac_d, 2).double()  # [b, k, d]
            if loss == "mse":
                rows.append((jac * math.sqrt(2.0 / jac.shape[1])).reshape(-1, jac.shape[2]))
            else:
                p = torch.softmax(o.detach().double(), -1)
                glog = jac - torch.einsum("bk,bkd->bd", p, jac).unsqueeze(1)  # grad log p_c
                rows.append((glog * p.sqrt().unsqueeze(2)).reshape(-1, jac.shape[2]))
    finally:
        model.train(was_training)
    return torch.cat(rows) / math.sqrt(x.shape[0])


def top_eigenpairs(
    rows: torch.Tensor, rank: int, *, eig: str = "exact", oversample: int = 8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top `rank` eigenpairs of `F = R^T R`, padded with zero eigenvalues to `rank`.

    Args:
        rows: R [N, d].
        rank: eigenpairs wanted.
        eig: "exact" (eigh of the smaller Gram matrix, R R^T or R^T R) or "sketch" (Nystrom from
            `rank + oversample` shared-seed columns; the top `rank` are kept).
        oversample: extra sketch columns for eig="sketch".
        seed: the sketch seed.

    Returns:
        (U [d, rank] with orthonormal columns where S > 0, S [rank] descending, >= 0), float64.
    """
    n, d = rows.shape
    r64 = rows.double()
    if eig == "exact":
        if n <= d:
            lam, v = torch.linalg.eigh(r64 @ r64.T)
            lam = lam.clamp_min(0)
            u = (r64.T @ v) / lam.sqrt().clamp_min(torch.finfo(torch.float64).tiny)
        else:
            lam, u = torch.linalg.eigh(r64.T @ r64)
            lam = lam.clamp_min(0)
    else:
        omega = fipa_omega(d, rank + oversample, seed)
        y = torch.zeros_like(omega)
        ops.sketch_accumulate([y], [r64.contiguous()], [omega])
        shift = max(math.sqrt(d) * torch.finfo(torch.float64).eps * float(y.norm()), 1e-300)
        res = ops.nystrom([y], [omega], [shift])
        u, lam = res.U[0], res.S[0].clamp_min(0)
    order = torch.argsort(lam, descending=True)[:rank]
    lam, u = lam[order], u[:, order]
    keep = lam > lam.max().clamp_min(0) * 1e-12 if lam.numel() else lam.bool()
    lam, u = torch.where(keep, lam, 0.0), u * keep
    pad = rank - lam.numel()
    if pad > 0:
        lam = torch.cat([lam, lam.new_zeros(pad)])
        u = torch.cat([u, u.new_zeros(d, pad)], 1)
    return u, lam


def sketch_and_product(
    rows: torch.Tensor, delta: torch.Tensor, size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The summable payload: `(F Omega [d, size], F delta [d])`, float64, F = R^T R, with the
    shared test matrix `fipa_omega(d, size, seed)`."""
    r64 = rows.double().contiguous()
    omega = fipa_omega(rows.shape[1], size, seed)
    y = torch.zeros_like(omega)
    ops.sketch_accumulate([y], [r64], [omega])
    return y, r64.T @ (r64 @ delta.double())


def fipa_omega(d: int, size: int, seed: int) -> torch.Tensor:
    """The shared Gaussian test matrix [d, min(size, d)] (float64) of the summable variant."""
    return ops.gaussian_sketch_matrix(d, min(size, d), seed, FIPA_STREAM, dtype=torch.float64)
