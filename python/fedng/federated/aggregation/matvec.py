"""Fisher mat-vecs of a decoded `CurvatureSet` on its blocks: `F_i v_i` for every block.

What a client computes for the summable aggregation (its contribution `c_k = F_k delta_k`, and
the two line-search scalars `<u, F_k d>` per block), and what a server computes when it holds the
clients' curvature itself. One ragged native call per kind where one exists:

- K-FAC: `G_i V_i A_i` (`fedng.ops.kron_precondition` with the factors in place of inverses;
  `G_i (V_i * a_i)` for an embedding's diagonal A);
- diagonal: `d_i * v_i`;
- low-rank: `U_i diag(S_i) U_i^T v_i` from the Nyström decomposition of the sketch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedng import ops
from fedng._typing import Arrays
from fedng.curvature import KFAC, CurvatureSet, DiagonalFisher, LowRankFisher, to_matrix
from fedng.curvature.packed_fold import dots

Vectors = list[torch.Tensor | None]
"""Per block (in `CurvatureSet.layouts` order) a block matrix [m, n], or None (skipped)."""


def _kfac(rep: KFAC, vs: Sequence[torch.Tensor | None]) -> Vectors:
    out: Vectors = [None] * len(vs)
    dense = [(i, v) for i, v in enumerate(vs) if v is not None and rep.specs[i].kind == "kron"]
    if dense:
        res = ops.kron_precondition(
            [v.float().contiguous() for _, v in dense],
            [rep.A[i] for i, _ in dense],
            [rep.G[i] for i, _ in dense],
        )
        for (i, _), r in zip(dense, res, strict=True):
            out[i] = r
    for i, v in enumerate(vs):
        if v is not None and out[i] is None:  # embedding: diagonal A
            out[i] = rep.G[i] @ (v.float() * rep.A[i])
    return out


def _diag(rep: DiagonalFisher, vs: Sequence[torch.Tensor | None]) -> Vectors:
    return [None if v is None else rep.diag[i] * v.float() for i, v in enumerate(vs)]


def _lowrank(rep: LowRankFisher, vs: Sequence[torch.Tensor | None]) -> Vectors:
    eig = rep.eigendecompositions()
    out: Vectors = []
    for v, e in zip(vs, eig, strict=True):
        if v is None:
            out.append(None)
        elif e is None:  # no curvature: F = 0
            out.append(torch.zeros_like(v, dtype=torch.float32))
        else:
            u, s = e
            flat = v.float().reshape(-1)
            out.append((u @ (s * (u.T @ flat))).view(v.shape))
    return out


def fisher_matvecs(cs: CurvatureSet, vectors: Sequence[torch.Tensor | None]) -> Vectors:
    """`F_i v_i` for every block of `cs` (undamped).

    Args:
        cs: the curvature (K-FAC, diagonal and low-rank kinds).
        vectors: per block, its vector as the block matrix [m, n] (None: skipped).

    Returns:
        Per block `F_i v_i` [m, n] in fp32 (None where the input was None).

    Raises:
        ValueError: a kind without a mat-vec here (a newly registered kind).
    """
    out: Vectors = [None] * len(cs.layouts)
    for kind, rep in cs.reps.items():
        vs = [vectors[i] for i in cs.groups[kind]]
        if isinstance(rep, KFAC):
            res = _kfac(rep, vs)
        elif isinstance(rep, DiagonalFisher):
            res = _diag(rep, vs)
        elif isinstance(rep, LowRankFisher):
            res = _lowrank(rep, vs)
        else:
            raise ValueError(f"fisher_matvecs: no mat-vec for curvature kind {kind!r}")
        for i, r in zip(cs.groups[kind], res, strict=True):
            out[i] = r
    return out


def block_vectors(cs: CurvatureSet, arrays: Arrays) -> list[torch.Tensor]:
    """Named arrays (a delta) as the block matrices of `cs`'s blocks, in fp32."""
    return [to_matrix(arrays, lay) for lay in cs.layouts]


def block_dots(us: Sequence[torch.Tensor | None], vs: Sequence[torch.Tensor | None]) -> list[float]:
    """Per block `<u_i, v_i>` in float64 (0 where either is None), all in one native call."""
    pairs = [(i, u, v) for i, (u, v) in enumerate(zip(us, vs, strict=True)) if u is not None]
    live = [(i, u, v) for i, u, v in pairs if v is not None]
    out = [0.0] * len(us)
    got = dots([u for _, u, _ in live], [v for _, _, v in live]) if live else []
    for (i, _, _), d in zip(live, got, strict=True):
        out[i] = d
    return out
