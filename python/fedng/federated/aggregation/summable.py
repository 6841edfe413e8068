"""Summable Fisher-weighted aggregation: the server only sums, then solves once.

Client k uploads `delta_k`, its curvature `F_k` and its contribution `c_k = F_k delta_k` (K-FAC:
`G_k Delta_k A_k`, two GEMMs per layer; see `matvec.fisher_matvecs`). The server folds
`M = sum p_k delta_k`, `S = sum p_k c_k` and the pooled curvature `P = sum p_k F_k` (for K-FAC
the factors `(sum p_k A_k) ⊗ (sum p_k G_k)`, a diagonal sum, or a sketch sum) as the replies
arrive: memory flat in K, and every sum works under secure aggregation.

The exact merge minimizes, per block, `phi(x) = 1/2 x^T (F + lambda I) x - x^T (S + lambda c)` with
`F = sum p_k F_k` and the prior center c (the mean delta M, or 0). The pooled curvature gives the
direction: `X = M + (P + lambda I)^-1 (S + lambda c - (P + lambda I) M)` (with P's own damped
inverse, factored for K-FAC), `d = X - M`. For a diagonal Fisher P = F and X is the exact merge.
For K-FAC, `P ≠ F` (a client's own blocks get weight p_k^2 instead of p_k: the plain pooled step
overshoots, up to 1/p_k in client-specific directions, and diverged in a prototype), so the step
length comes from an exact line search of phi along d:

    alpha = max(0, (<S + lambda c, d> - <F M, d> - lambda <M, d>) / (<d, F d> + lambda ||d||^2))

where `<F M, d> = sum p_k <M, F_k d>` and `<d, F d> = sum p_k <d, F_k d>` are two scalars per
block that each client computes with its own curvature after the server broadcasts (M, d): a
second, summable phase (`probe_message` / `answer_probe` / `line_search_step`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedng._typing import Arrays
from fedng.curvature import KFAC, CurvatureSet, DiagonalFisher, to_matrix, write_matrix
from fedng.curvature.layout import BlockLayout
from fedng.curvature.packed_fold import sum_squares
from fedng.curvature.quantize import SCALE_SUFFIX, dequantize_vector, quantize_vector
from fedng.federated.aggregation.matvec import block_dots, block_vectors, fisher_matvecs
from fedng.federated.aggregation.psd import shifted_cholesky
from fedng.federated.wire import wire_dtype

CONTRIB_PREFIX = "fd/"
"""Extras prefix of a client's contribution `c_k = F_k delta_k` (`fd/<param>`)."""
PROBE_M = "M/"
"""Prefix of the mean delta in the probe message's extras."""
PROBE_D = "d/"
"""Prefix of the pooled direction in the probe message's extras."""
REPLY_KEY = "line_search"
"""The reply's extra: per probed block `[<M, F_k d>, <d, F_k d>]`, shape [blocks, 2]."""
PROBE_INT8 = "int8"
"""`probe_dtype` that sends M and d as int8 (`quantize_vector`: one float32 scale per 64
entries, `<name>/scale`): half of bf16's bytes. They only decide one step length per block."""


@dataclass
class PooledDirection:
    """The pooled solve of one round, and what the line search still needs.

    Attributes:
        mean: M, the weighted mean delta (named arrays, fp32).
        blocks: per block of the pooled set, d_i [m, n] (None: no curvature there; M is kept).
        lams: per block, lambda_i (0 where the block has no curvature).
        probed: indices of the blocks whose step length the clients' scalars decide (not
            diagonal ones, whose pooled solve is already exact).
        server_num: per block, `<S + lambda c, d> - lambda <M, d>` (the server's part).
        dd: per block, `||d||^2`.
        probe: the second phase's broadcast as it travels (`encode_probe`; empty when no block
            is probed).
    """

    mean: Arrays
    blocks: list[torch.Tensor | None]
    lams: list[float]
    probed: list[int]
    server_num: list[float]
    dd: list[float]
    probe: Arrays


def _flat_lams(pooled: CurvatureSet, rel: float) -> list[float]:
    """lambda per block (in layouts order), relative to each block's mean eigenvalue."""
    per_kind = pooled.relative_damping(rel)
    out = [0.0] * len(pooled.layouts)
    for kind, idx in pooled.groups.items():
        for i, lam in zip(idx, per_kind[kind], strict=True):
            out[i] = lam
    return out


def pooled_direction(
    pooled: CurvatureSet,
    mean: Arrays,
    contrib: Arrays,
    rel: float,
    center: str = "mean",
    probe_dtype: str = "fp32",
) -> PooledDirection:
    """The pooled solve's direction d per block.

    Args:
        pooled: `sum_k p_k F_k` (decoded from the summed payloads).
        mean: M = `sum_k p_k delta_k` (named arrays).
        contrib: S = `sum_k p_k F_k delta_k` (named arrays, the same names).
        rel: lambda relative to each block's mean eigenvalue of the pooled curvature.
        center: the damping's prior center, "mean" (c = M) or "zero" (c = 0).
        probe_dtype: the probe's wire dtype ("fp32", "bf16", "fp16" or "int8"): d is rounded
            as the clients decode it, so that the line search is exact along the d they use.

    Returns:
        The direction and the server's parts of the line search.
    """
    lams = _flat_lams(pooled, rel)
    live = [i for i, lam in enumerate(lams) if lam > 0]
    m_blocks = block_vectors(pooled, mean)
    s_blocks = block_vectors(pooled, contrib)
    # S + lambda (c - M): the residual at M of the pooled system is this minus P M; with c = M
    # it is S itself (S + lambda 0 but for the sign of a zero; a non-finite M gives a
    # non-finite d either way, through R0 - P M)
    r0: list[torch.Tensor | None] = [None] * len(lams)
    for i in live:
        r0[i] = s_blocks[i] if center == "mean" else s_blocks[i] - lams[i] * m_blocks[i]
    d = _kron_direction(pooled, lams, m_blocks, r0)
    if d is None:  # other kinds, or a factor that needs the inverse's damping escalation
        pm = fisher_matvecs(pooled, [m_blocks[i] if i in live else None for i in range(len(lams))])
        rhs: list[torch.Tensor | None] = [None] * len(lams)
        for i in live:
            pmi, r0i = pm[i], r0[i]
            if pmi is not None and r0i is not None:
                rhs[i] = r0i - pmi
        damp = {kind: [max(lams[i], 1e-30) for i in idx] for kind, idx in pooled.groups.items()}
        inv = pooled.inverse(damp, factored=True)
        del inv  # a failed factor leaves its block without an inverse: precondition gives None
        d = pooled.precondition(rhs)
    blocks = [d[i] if i in live and d[i] is not None else None for i in range(len(lams))]
    sq = sum_squares([b for b in blocks if b is not None])  # one pass: NaN/Inf iff an entry is
    finite = iter([math.isfinite(x) for x in sq])
    blocks = [b if b is None or next(finite) else None for b in blocks]
    exact = set()
    if "diag" in pooled.groups and isinstance(pooled.reps["diag"], DiagonalFisher):
        exact = set(pooled.groups["diag"])
    probed = [i for i, b in enumerate(blocks) if b is not None and i not in exact]
    probe = encode_probe(pooled, mean, blocks, probed, probe_dtype)
    _, seen = decode_probe({k: v for k, v in probe.items() if k.startswith(PROBE_D)})  # d only
    for i in probed:  # as the clients decode it
        blocks[i] = to_matrix(seen, pooled.layouts[i])
    # <S + lambda c, d> - lambda <M, d> from float64 dots (no S + lambda c formed): c = M
    # cancels to <S, d>, c = 0 leaves <S, d> - lambda <M, d>
    sd = block_dots(s_blocks, blocks)
    if center == "mean":
        num = sd
    else:
        num = [
            a - lam * b for a, b, lam in zip(sd, block_dots(m_blocks, blocks), lams, strict=True)
        ]
    return PooledDirection(mean, blocks, lams, probed, num, block_dots(blocks, blocks), probe)


def _kron_direction(
    pooled: CurvatureSet,
    lams: list[float],
    m_blocks: list[torch.Tensor],
    r0: list[torch.Tensor | None],
) -> list[torch.Tensor | None] | None:
    """Per block `d = G~^-1 (R0 - G M A) A~^-1`, the pooled solve of the residual at M
    (`pooled.inverse(lams, factored=True)` then `pooled.precondition`; K-FAC's factored damping
    `A~ = A + b I`, `G~ = G + a I`, `b = pi sqrt(lambda)`, `a = sqrt(lambda) / pi`), by Cholesky
    solves and without the product `G (M A)`: with `G M A = G~ M A - a M A` and
    `A A~^-1 = I - b A~^-1`,

        d = [G~^-1 (R0 + a M A) + b M] A~^-1 - M,

    one GEMM and two pairs of triangular solves per block instead of two GEMMs and the solves
    (no inverse is formed either). The rounding is of the same order: both forms subtract
    quantities of M's size (`P M` from `S` there, `M` here) in float32.

    Returns:
        Per block d (None where R0 or the block's curvature is missing); None when the set is
        not all dense K-FAC blocks or a factor does not factorize at its damping (the inverse's
        escalation then decides, as before).
    """
    rep = pooled.reps.get("kfac")
    if set(pooled.reps) != {"kfac"} or not isinstance(rep, KFAC):
        return None
    if any(s.kind != "kron" for s in rep.specs):
        return None
    out: list[torch.Tensor | None] = [None] * len(lams)
    for j, i in enumerate(pooled.groups["kfac"]):
        r = r0[i]
        if r is None or rep.counts[j] == 0:
            continue
        p, root = rep.pi(j), math.sqrt(max(lams[i], 1e-30))
        b, a = p * root, root / p
        factors = []
        for f, damp in ((rep.A[j], b), (rep.G[j], a)):
            low, info = shifted_cholesky(f, damp)
            if info != 0:
                return None
            factors.append(low)
        la, lg = factors
        m = m_blocks[i].to(rep.dtype)
        t = torch.addmm(r.to(rep.dtype), m, rep.A[j], alpha=a)  # R0 + a M A, [m, n]
        v = torch.cholesky_solve(t, lg).add_(m, alpha=b)  # G~^-1 (...) + b M
        out[i] = torch.cholesky_solve(v.T, la).T.sub_(m)  # (...) A~^-1 - M
    return out


def encode_probe(
    pooled: CurvatureSet,
    mean: Arrays,
    blocks: list[torch.Tensor | None],
    probed: list[int],
    probe_dtype: str,
) -> Arrays:
    """The second phase's broadcast: M and d on the parameters of the probed blocks only
    (diagonal blocks need no line search), rounded to `probe_dtype` (int8: values and
    `<name>/scale`). They only decide a step length per block, so they may travel coarse."""
    names: set[str] = set()
    for i in probed:
        lay = pooled.layouts[i]
        names.update(n for n in (lay.weight, lay.bias) if n is not None)
    d_arrays = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in mean.items() if k in names}
    for i in probed:
        blk = blocks[i]
        if blk is not None:
            write_matrix(d_arrays, pooled.layouts[i], blk)
    plain = {
        **{PROBE_M + k: v.float() for k, v in mean.items() if k in names},
        **{PROBE_D + k: v for k, v in d_arrays.items()},
    }
    if probe_dtype != PROBE_INT8:
        wd = wire_dtype(probe_dtype, "probe_dtype")
        return {k: v.to(wd) for k, v in plain.items()}
    out: Arrays = {}
    for k, v in plain.items():
        out[k], out[k + SCALE_SUFFIX] = quantize_vector(v)
    return out


def decode_probe(probe: Arrays) -> tuple[Arrays, Arrays]:
    """(M, d) as float32 named arrays from the probe's extras (`encode_probe`, any dtype).

    Raises:
        ValueError: an int8 array without its scales, or scales that do not fit it.
    """
    out: tuple[Arrays, Arrays] = ({}, {})
    for k, v in probe.items():
        if k.endswith(SCALE_SUFFIX):
            continue
        for part, prefix in zip(out, (PROBE_M, PROBE_D), strict=True):
            if not k.startswith(prefix):
                continue
            if v.dtype == torch.int8:
                scale = probe.get(k + SCALE_SUFFIX)
                if scale is None:
                    raise ValueError(f"line-search probe: int8 {k!r} without {k + SCALE_SUFFIX!r}")
                part[k[len(prefix) :]] = dequantize_vector(v, scale.float())
            else:
                part[k[len(prefix) :]] = v.float()
    return out


def answer_probe(cs: CurvatureSet, probe: Arrays) -> torch.Tensor:
    """A client's line-search scalars: per block `[<M, F_k d>, <d, F_k d>]`, shape [blocks, 2].

    Args:
        cs: the client's own curvature (what it uploaded this round).
        probe: the probe message's extras (`PooledDirection.probe`).

    Returns:
        float32 [len(cs.layouts), 2] (zeros for blocks whose d is zero).
    """
    mean, d = decode_probe(probe)
    probed = [lay.weight in d and lay.weight in mean for lay in cs.layouts]
    live = [to_matrix(d, lay) if p else None for lay, p in zip(cs.layouts, probed, strict=True)]
    live = [b if b is not None and bool(b.any()) else None for b in live]
    fd = fisher_matvecs(cs, live)
    m_blocks = [
        to_matrix(mean, lay) if p else None for lay, p in zip(cs.layouts, probed, strict=True)
    ]
    return torch.tensor(
        [list(p) for p in zip(block_dots(m_blocks, fd), block_dots(live, fd), strict=True)],
        dtype=torch.float32,
    ).reshape(len(cs.layouts), 2)


def line_search_step(
    direction: PooledDirection, pooled: CurvatureSet, replies: torch.Tensor | None
) -> tuple[Arrays, dict[str, float]]:
    """The aggregated step `M + alpha_i d_i` per block.

    Args:
        direction: the round's pooled direction.
        pooled: the pooled curvature (its layouts place the blocks).
        replies: `sum_k p_k [<M, F_k d>, <d, F_k d>]` per block [blocks, 2] (float64), or None
            when no client answered: then probed blocks keep M (alpha = 0).

    Returns:
        (the step as named arrays, a log with the smallest / largest alpha).
    """
    step = {k: v.clone() for k, v in direction.mean.items()}
    alphas = []
    for i, blk in enumerate(direction.blocks):
        if blk is None:
            continue
        if i in direction.probed:
            if replies is None:
                alpha = 0.0
            else:
                fm, fd = float(replies[i, 0]), float(replies[i, 1])
                den = fd + direction.lams[i] * direction.dd[i]
                alpha = (direction.server_num[i] - fm) / den if den > 0 else 0.0
                alpha = max(0.0, alpha) if math.isfinite(alpha) else 0.0
            alphas.append(alpha)
        else:
            alpha = 1.0
        _add_block(step, pooled.layouts[i], alpha * blk)
    log = {"alpha_min": min(alphas), "alpha_max": max(alphas)} if alphas else {}
    return step, log


def _add_block(arrays: Arrays, lay: BlockLayout, mat: torch.Tensor) -> None:
    """`write_matrix(arrays, lay, to_matrix(arrays, lay) + mat)` for float32 arrays: the same
    sums, added in place where the block is a weight [m, n - 1] and a bias [m] (no block copy
    of the arrays is gathered and scattered back)."""
    w = arrays[lay.weight]
    b = arrays[lay.bias] if lay.bias is not None else None
    plain = lay.kind != "elementwise" and not lay.transpose and lay.w_rows is None
    if not plain or b is None or lay.b_rows is not None or w.dtype != torch.float32:
        write_matrix(arrays, lay, to_matrix(arrays, lay) + mat)
        return
    if b.dtype != torch.float32 or w.numel() != lay.m * (lay.n - 1) or b.numel() != lay.m:
        write_matrix(arrays, lay, to_matrix(arrays, lay) + mat)
        return
    w.add_(mat[:, :-1].reshape(w.shape))
    b.add_(mat[:, -1].reshape(b.shape))


def contribution(cs: CurvatureSet, delta: Arrays) -> Arrays:
    """`c = F delta` per parameter (float32; zero on parameters no block covers): what a client
    uploads as `CONTRIB_PREFIX + <param>` for the summable aggregation. K-FAC blocks cost two
    GEMMs each (`G Delta A`), in one ragged native call."""
    fd = fisher_matvecs(cs, block_vectors(cs, delta))
    out = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in delta.items()}
    for lay, blk in zip(cs.layouts, fd, strict=True):
        if blk is not None:
            write_matrix(out, lay, blk)
    return out
