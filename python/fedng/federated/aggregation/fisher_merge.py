"""Fisher-weighted aggregation: `(sum_k p_k F_k + lambda I)^-1 sum_k p_k F_k delta_k`, per block.

The minimizer of `sum_k p_k (x - delta_k)^T F_k (x - delta_k) + lambda ||x - c||^2` (FIPA-style
preconditioned mixing; Fisher merging of the clients' deltas) with the prior center c = 0 (the
formula above), or, with `prior` given, c = the plain weighted mean of the deltas: then
`x = (sum p_k F_k + lambda I)^-1 (sum p_k F_k delta_k + lambda c)`, which falls back to FedAvg
in directions no client's curvature sees (a low-rank Fisher leaves most of them unseen) and as
lambda grows. Per representation:

- diagonal: elementwise, exact;
- low-rank (F_k = U_k S_k U_k^T): the sum of the clients' low-rank terms is re-diagonalized
  exactly (QR of the stacked `U_k sqrt(p_k S_k)`, then a small eigh), and the solve is Woodbury
  (`fedng.ops.lowrank_precondition`), exact; a block with `K r >= d` is solved densely
  (`fedng.ops.damped_cholesky_inverse`);
- K-FAC (F_k = A_k ⊗ G_k): a sum of Kronecker products has no Kronecker inverse, so the system
  is solved by preconditioned conjugate gradients whose mat-vec `sum_k p_k G_k X A_k` is one
  ragged `fedng.ops.kron_precondition` call over every (client, block) pair, preconditioned by
  the Kronecker inverse of the averaged factors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from fedng import ops

Mats = list[torch.Tensor]


def _total(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """The sum of tensors, accumulated from 0 in order, as the builtin `sum` does."""
    total = torch.zeros(())
    for t in terms:
        total = total + t
    return total


def merge_diag(
    diags: Sequence[Mats],
    deltas: Sequence[Mats],
    weights: Sequence[float],
    damping: Sequence[float],
    prior: Mats | None = None,
) -> Mats:
    """Diagonal Fisher merge.

    Args:
        diags: per client, per block: Fisher diagonals (any shape, like the deltas).
        deltas: per client, per block: deltas.
        weights: p_k per client.
        damping: lambda per block.
        prior: per block, the prior center c (None: zero).

    Returns:
        Per block: `(sum p_k d_k * delta_k + lambda c) / (sum p_k d_k + lambda)`.
    """
    out = []
    for i in range(len(damping)):
        num = _total(w * d[i] * x[i] for w, d, x in zip(weights, diags, deltas, strict=True))
        if prior is not None:
            num = num + damping[i] * prior[i]
        den = _total(w * d[i] for w, d in zip(weights, diags, strict=True)) + damping[i]
        out.append(num / den)
    return out


def merge_lowrank(
    Us: Sequence[Mats],
    Ss: Sequence[Mats],
    deltas: Sequence[Mats],
    weights: Sequence[float],
    damping: Sequence[float],
    prior: Mats | None = None,
) -> Mats:
    """Low-rank Fisher merge, exact for `F_k = U_k diag(S_k) U_k^T`.

    Args:
        Us: per client, per block: U [d_i, r] (orthonormal columns).
        Ss: per client, per block: S [r] (>= 0).
        deltas: per client, per block: delta [d_i].
        weights: p_k per client.
        damping: lambda per block (> 0).
        prior: per block, the prior center c [d_i] (None: zero).

    Returns:
        Per block: the merged delta [d_i].
    """
    nb = len(damping)
    rhs = []
    for i in range(nb):
        b = _total(
            w * (u[i] @ (s[i] * (u[i].T @ x[i])))
            for w, u, s, x in zip(weights, Us, Ss, deltas, strict=True)
        )
        b = torch.as_tensor(b, dtype=torch.float32).reshape(-1)
        rhs.append(b if prior is None else b + damping[i] * prior[i].reshape(-1))
    out: list[torch.Tensor | None] = [None] * nb
    wood: list[int] = []
    dense: list[int] = []
    for i in range(nb):
        d = rhs[i].numel()
        total_rank = sum(u[i].shape[1] for u in Us)
        (dense if total_rank >= d else wood).append(i)
    if wood:
        u_all, s_all = [], []
        for i in wood:
            stacked = torch.cat(
                [
                    u[i] * torch.sqrt(w * s[i].clamp_min(0))
                    for w, u, s in zip(weights, Us, Ss, strict=True)
                ],
                1,
            )
            q, r = torch.linalg.qr(stacked.double())
            evals, evecs = torch.linalg.eigh(r @ r.T)
            u_all.append((q @ evecs).float().contiguous())
            s_all.append(evals.clamp_min(0).float().contiguous())
        res = ops.lowrank_precondition(
            u_all, s_all, [damping[i] for i in wood], [rhs[i].contiguous() for i in wood]
        )
        for i, sol in zip(wood, res, strict=True):
            out[i] = sol
    if dense:
        mats = []
        for i in dense:
            f = _total(w * (u[i] * s[i]) @ u[i].T for w, u, s in zip(weights, Us, Ss, strict=True))
            mats.append(((f + f.T) / 2).float().contiguous())
        inv = ops.damped_cholesky_inverse(mats, [damping[i] for i in dense], errors="raise")
        for i, m in zip(dense, inv.inverses, strict=True):
            out[i] = m @ rhs[i]
    return [x for x in out if x is not None]


def _kron_matvec(
    As: Sequence[Mats], Gs: Sequence[Mats], weights: Sequence[float], xs: dict[int, torch.Tensor]
) -> dict[int, torch.Tensor]:
    """`sum_k p_k G_ki X_i A_ki` for the blocks in `xs`: one ragged native call (dense A)."""
    keys = list(xs)
    dense = [(k, i) for k in range(len(weights)) for i in keys if As[k][i].dim() == 2]
    out = {i: torch.zeros_like(xs[i]) for i in keys}
    if dense:
        res = ops.kron_precondition(
            [xs[i] for _, i in dense], [As[k][i] for k, i in dense], [Gs[k][i] for k, i in dense]
        )
        for (k, i), y in zip(dense, res, strict=True):
            out[i].add_(y, alpha=weights[k])
    for k in range(len(weights)):
        for i in keys:
            if As[k][i].dim() == 1:  # embedding: diagonal A
                out[i].add_(Gs[k][i] @ (xs[i] * As[k][i]), alpha=weights[k])
    return out


def merge_kfac(
    As: Sequence[Mats],
    Gs: Sequence[Mats],
    deltas: Sequence[Mats],
    weights: Sequence[float],
    damping: Sequence[float],
    *,
    iters: int = 100,
    tol: float = 1e-6,
    prior: Mats | None = None,
) -> tuple[Mats, dict[str, float]]:
    """K-FAC Fisher merge by preconditioned CG on `(sum p_k A_k ⊗ G_k + lambda I) x = b`.

    In matrix form the operator is `X -> sum_k p_k G_k X A_k + lambda X` on each block [m, n].

    Args:
        As: per client, per block: A [n, n] (or [n] for a diagonal A).
        Gs: per client, per block: G [m, m].
        deltas: per client, per block: delta [m, n].
        weights: p_k.
        damping: lambda per block (> 0).
        iters: max CG iterations.
        tol: stop a block when ||r|| <= tol ||b||.
        prior: per block, the prior center c [m, n] (None: zero).

    Returns:
        (per block the merged delta [m, n], {"cg_iters": iterations, "cg_rel_residual": worst}).
    """
    nb = len(damping)
    bs: dict[int, torch.Tensor] = {}
    for k, w in enumerate(weights):
        part = _kron_matvec(
            [As[k]], [Gs[k]], [w], {i: deltas[k][i].float().contiguous() for i in range(nb)}
        )
        for i, v in part.items():
            bs[i] = bs[i] + v if i in bs else v
    if prior is not None:
        for i in range(nb):
            bs[i] = bs[i] + damping[i] * prior[i].float()
    # Preconditioner: Kronecker inverse of the averaged factors, damped by sqrt(lambda) each.
    a_bar = [_total(w * a[i] for w, a in zip(weights, As, strict=True)) for i in range(nb)]
    g_bar = [_total(w * g[i] for w, g in zip(weights, Gs, strict=True)) for i in range(nb)]
    roots = [math.sqrt(d) for d in damping]
    dense = [i for i in range(nb) if a_bar[i].dim() == 2]
    inv = ops.damped_cholesky_inverse(
        [a_bar[i].contiguous() for i in dense] + [g.contiguous() for g in g_bar],
        [roots[i] for i in dense] + roots,
    )
    a_inv: dict[int, torch.Tensor] = dict(zip(dense, inv.inverses[: len(dense)], strict=True))
    g_inv = inv.inverses[len(dense) :]
    for i in range(nb):
        if i not in a_inv:
            a_inv[i] = 1.0 / (a_bar[i] + roots[i])

    def precond(rs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        keys = [i for i in rs if i in dense]
        out = {}
        if keys:
            res = ops.kron_precondition(
                [rs[i] for i in keys], [a_inv[i] for i in keys], [g_inv[i] for i in keys]
            )
            out = dict(zip(keys, res, strict=True))
        for i in rs:
            if i not in out:
                out[i] = g_inv[i] @ (rs[i] * a_inv[i])
        return out

    def op(ps: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        y = _kron_matvec(As, Gs, weights, ps)
        return {i: y[i] + damping[i] * ps[i] for i in ps}

    bnorm = {i: float(torch.linalg.vector_norm(bs[i])) for i in range(nb)}
    xs = {i: torch.zeros_like(bs[i]) for i in range(nb)}
    rs = {i: bs[i].clone() for i in range(nb)}
    active = [i for i in range(nb) if bnorm[i] > 0]
    zs = precond({i: rs[i] for i in active})
    ps = {i: zs[i].clone() for i in active}
    rz = {i: float((rs[i] * zs[i]).sum()) for i in active}
    it = 0
    while active and it < iters:
        it += 1
        aps = op({i: ps[i] for i in active})
        stalled = set()
        for i in active:
            curv = float((ps[i] * aps[i]).sum())
            if not curv > 0 or not rz[i] > 0:  # indefinite (e.g. rounded payloads): stop here
                stalled.add(i)
                continue
            alpha = rz[i] / curv
            xs[i].add_(ps[i], alpha=alpha)
            rs[i].sub_(aps[i], alpha=alpha)
        active = [
            i
            for i in active
            if i not in stalled and float(torch.linalg.vector_norm(rs[i])) > tol * bnorm[i]
        ]
        if not active:
            break
        zs = precond({i: rs[i] for i in active})
        for i in active:
            rz_new = float((rs[i] * zs[i]).sum())
            ps[i] = zs[i] + (rz_new / rz[i]) * ps[i]
            rz[i] = rz_new
    worst = max(
        (float(torch.linalg.vector_norm(rs[i])) / bnorm[i] for i in range(nb) if bnorm[i] > 0),
        default=0.0,
    )
    return [xs[i] for i in range(nb)], {"cg_iters": float(it), "cg_rel_residual": worst}
