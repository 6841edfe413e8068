"""The Fisher-weighted step of decoded client curvature: per block
`(sum p_k F_k + lambda I)^-1 sum p_k F_k delta_k` (`fisher_merge`), lambda relative to the block's
curvature scale (`CurvatureSet.relative_damping`); the weighted mean wherever no curvature applies.

A sum of curvatures of one kind is solved its own way (a sum of diagonals, of low-rank terms, of
Kronecker products), so the merges are found per representation class; the kinds come from the
curvature registry, in its order. A kind without a merge here keeps the weighted mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from fedng._typing import Arrays
from fedng.curvature import (
    KFAC,
    CurvatureSet,
    DiagonalFisher,
    FisherRepresentation,
    LowRankFisher,
    kinds,
    to_matrix,
    write_matrix,
)
from fedng.federated.aggregation.fisher_merge import Mats, merge_diag, merge_kfac, merge_lowrank
from fedng.federated.aggregation.mean import mean_delta, weights_of
from fedng.federated.messages import ClientUpdate

R = TypeVar("R", bound=FisherRepresentation)


@dataclass(frozen=True)
class MergeInputs:
    """One kind's merge problem over its blocks with positive damping (the live blocks).

    Attributes:
        live: indices of the live blocks within the kind's representation.
        deltas: per client, per live block: its delta as the block matrix [m, n].
        weights: p_k per client.
        damping: lambda per live block (> 0).
        prior: per live block, the prior center [m, n] (None: zero).
        cg_iters: max conjugate-gradient iterations (K-FAC).
        cg_tol: relative residual at which CG stops.
    """

    live: list[int]
    deltas: list[Mats]
    weights: list[float]
    damping: list[float]
    prior: Mats | None
    cg_iters: int
    cg_tol: float


MergeResult = tuple[Mats, dict[str, float]]
"""Per live block the merged delta [m, n], and what to log."""


@dataclass(frozen=True)
class Merger(Generic[R]):
    """The merge of one representation class.

    Attributes:
        rep: the representation class (its `kind` is the key).
        merge: (the clients' representations, the problem) -> `MergeResult`.
    """

    rep: type[R]
    merge: Callable[[list[R], MergeInputs], MergeResult]

    def __call__(self, reps: Sequence[FisherRepresentation], inputs: MergeInputs) -> MergeResult:
        """Runs the merge on the clients' representations of this kind.

        Raises:
            TypeError: a representation of another class (a set decoded with another kind).
        """
        typed = [r for r in reps if isinstance(r, self.rep)]
        if len(typed) != len(reps):
            raise TypeError(f"fisher-weighted merge: expected {self.rep.__name__} curvature")
        return self.merge(typed, inputs)


def _diag(reps: list[DiagonalFisher], p: MergeInputs) -> MergeResult:
    diags = [[r.diag[j] for j in p.live] for r in reps]
    return merge_diag(diags, p.deltas, p.weights, p.damping, p.prior), {}


def _kfac(reps: list[KFAC], p: MergeInputs) -> MergeResult:
    return merge_kfac(
        [[r.A[j] for j in p.live] for r in reps],
        [[r.G[j] for j in p.live] for r in reps],
        p.deltas,
        p.weights,
        p.damping,
        iters=p.cg_iters,
        tol=p.cg_tol,
        prior=p.prior,
    )


def _lowrank(reps: list[LowRankFisher], p: MergeInputs) -> MergeResult:
    """Woodbury / dense merge of `U_k diag(S_k) U_k^T`; a block a client has no curvature for
    (F_k = 0) gets one zero column."""
    us: list[Mats] = []
    ss: list[Mats] = []
    for r in reps:
        eig = r.eigendecompositions()
        u_blocks, s_blocks = [], []
        for j in p.live:
            e = eig[j]
            u_blocks.append(torch.zeros(r.specs[j].numel, 1) if e is None else e[0])
            s_blocks.append(torch.zeros(1) if e is None else e[1])
        us.append(u_blocks)
        ss.append(s_blocks)
    flat = merge_lowrank(
        us,
        ss,
        [[m.reshape(-1) for m in ms] for ms in p.deltas],
        p.weights,
        p.damping,
        None if p.prior is None else [x.reshape(-1) for x in p.prior],
    )
    return [f.view(m.shape) for f, m in zip(flat, p.deltas[0], strict=True)], {}


MERGERS: dict[str, Merger[Any]] = {
    m.rep.kind: m
    for m in (Merger(KFAC, _kfac), Merger(DiagonalFisher, _diag), Merger(LowRankFisher, _lowrank))
}
"""The merge of each curvature kind, by its registry name."""


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
    lams = pooled.relative_damping(rel)
    deltas = [{k: v.float() for k, v in u.delta.items()} for u in updates]
    log: dict[str, Any] = {}
    for kind in kinds():
        merger = MERGERS.get(kind)
        if kind not in pooled.groups or merger is None:
            continue
        live = [j for j, lam in enumerate(lams[kind]) if lam > 0]
        if not live:
            continue
        lays = [pooled.layouts[pooled.groups[kind][j]] for j in live]
        inputs = MergeInputs(
            live,
            [[to_matrix(d, lay) for lay in lays] for d in deltas],
            ws,
            [lams[kind][j] for j in live],
            [to_matrix(step, lay) for lay in lays] if center == "mean" else None,
            cg_iters,
            cg_tol,
        )
        merged, info = merger([s.reps[kind] for s in sets], inputs)
        log.update(info)
        for lay, m in zip(lays, merged, strict=True):
            write_matrix(step, lay, m.float())
    return step, log
