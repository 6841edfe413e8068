"""The Fisher-weighted step of decoded client curvature: per block
`(sum p_k F_k + lambda I)^-1 sum p_k F_k delta_k` (`fisher_merge`), lambda relative to the block's
curvature scale; the weighted mean wherever no curvature applies."""

from __future__ import annotations

from typing import Any, TypeVar

import torch

from fedng._typing import Arrays
from fedng.curvature import KFAC, DiagonalFisher, LowRankFisher
from fedng.federated.aggregation.fisher_merge import merge_diag, merge_kfac, merge_lowrank
from fedng.federated.aggregation.mean import mean_delta, weights_of
from fedng.federated.curvature_set import CurvatureSet
from fedng.federated.layout import BlockLayout, to_matrix, write_matrix
from fedng.federated.messages import ClientUpdate

_R = TypeVar("_R", KFAC, DiagonalFisher, LowRankFisher)


def _rep(cs: CurvatureSet, kind: str, cls: type[_R]) -> _R:
    """The representation of `kind` in `cs`, typed."""
    rep = cs.reps[kind]
    if not isinstance(rep, cls):
        raise TypeError(f"curvature kind {kind!r} holds a {type(rep).__name__}, not {cls.__name__}")
    return rep


def _block_trace(cs: CurvatureSet, kind: str, j: int) -> float:
    """tr(F) of block j of `kind` (a Hutchinson estimate for sketches)."""
    if kind == "kfac":
        k = _rep(cs, kind, KFAC)
        a, g = k.A[j], k.G[j]
        ta = float(a.sum()) if a.dim() == 1 else float(a.diagonal().sum())
        return ta * float(g.diagonal().sum())
    if kind == "diag":
        return float(_rep(cs, kind, DiagonalFisher).diag[j].sum())
    lr = _rep(cs, kind, LowRankFisher)
    y, om = lr.Y[j], lr.omega[j]
    return float((y * om).sum()) / max(1, y.shape[1])


def relative_damping(cs: CurvatureSet, rel: float) -> dict[str, list[float]]:
    """Per kind, per block: `rel` x the mean eigenvalue of the block's curvature (0 if none)."""
    out: dict[str, list[float]] = {}
    for kind in cs.reps:
        lams = []
        for j, i in enumerate(cs.groups[kind]):
            lay = cs.layouts[i]
            lams.append(rel * max(_block_trace(cs, kind, j), 0.0) / (lay.m * lay.n))
        out[kind] = lams
    return out


def _lowrank_factors(
    sets: list[CurvatureSet], live: list[int], lays: list[BlockLayout]
) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Per client, per live block: U [d, r] and S [r] of its low-rank Fisher; a block a client
    has no curvature for (F_k = 0) gets one zero column."""
    us, ss = [], []
    for cs in sets:
        r = _rep(cs, "lowrank", LowRankFisher)
        r.inverse(1.0)  # the damping is unused here: only U, S are read
        u_blocks, s_blocks = [], []
        for n, j in enumerate(live):
            u, s = r.U[j], r.S[j]
            u_blocks.append(torch.zeros(lays[n].m * lays[n].n, 1) if u is None else u)
            s_blocks.append(torch.zeros(1) if s is None else s)
        us.append(u_blocks)
        ss.append(s_blocks)
    return us, ss


def fisher_weighted_step(
    updates: list[ClientUpdate],
    sets: list[CurvatureSet],
    rel: float,
    cg_iters: int,
    cg_tol: float,
    center: str = "zero",
) -> tuple[Arrays, dict[str, Any]]:
    """`(sum p_k F_k + lambda I)^-1 sum p_k F_k delta_k` on every block; the weighted mean on
    parameters no block covers and on blocks without curvature.

    Args:
        updates: the accepted updates, all carrying curvature.
        sets: their decoded curvature.
        rel: lambda relative to each block's mean eigenvalue of `sum p_k F_k`.
        cg_iters: CG iterations (K-FAC).
        cg_tol: CG relative residual.
        center: the damping's prior center: "zero" (the plain formula) or "mean" (the weighted
            mean delta; see `fedng.federated.aggregation.fisher_merge`).

    Returns:
        (the aggregated step as named arrays, a log).
    """
    ws = weights_of(updates)
    step = mean_delta(updates)
    pooled = CurvatureSet.combine(sets, ws)
    lams = relative_damping(pooled, rel)
    deltas = [{k: v.float() for k, v in u.delta.items()} for u in updates]
    log: dict[str, Any] = {}
    layouts = sets[0].layouts
    for kind, idx in sets[0].groups.items():
        live = [j for j, lam in enumerate(lams[kind]) if lam > 0]
        if not live:
            continue
        lays: list[BlockLayout] = [layouts[idx[j]] for j in live]
        mats = [[to_matrix(d, lay) for lay in lays] for d in deltas]
        prior = [to_matrix(step, lay) for lay in lays] if center == "mean" else None
        damp = [lams[kind][j] for j in live]
        if kind == "diag":
            diags = [_rep(s, kind, DiagonalFisher).diag for s in sets]
            merged = merge_diag([[d[j] for j in live] for d in diags], mats, ws, damp, prior)
        elif kind == "kfac":
            kfacs = [_rep(s, kind, KFAC) for s in sets]
            merged, info = merge_kfac(
                [[r.A[j] for j in live] for r in kfacs],
                [[r.G[j] for j in live] for r in kfacs],
                mats,
                ws,
                damp,
                iters=cg_iters,
                tol=cg_tol,
                prior=prior,
            )
            log.update(info)
        else:
            us, ss = _lowrank_factors(sets, live, lays)
            flat = merge_lowrank(
                us,
                ss,
                [[m.reshape(-1) for m in ms] for ms in mats],
                ws,
                damp,
                None if prior is None else [p.reshape(-1) for p in prior],
            )
            merged = [f.view(lay.m, lay.n) for f, lay in zip(flat, lays, strict=True)]
        for lay, m in zip(lays, merged, strict=True):
            write_matrix(step, lay, m.float())
    return step, log
