"""Robust combiners of a round's client updates: pure functions, named arrays in, arrays out.

Deltas (any named arrays, e.g. `update.delta` or SCAFFOLD's `extras`):

- `norm_clip`: each client's vector is scaled down to at most `ratio` times the round's median
  norm (a per-client map: the algorithm's own weighted mean or Fisher-weighted merge follows).
- `trimmed_mean`: per coordinate, the `floor(trim * K)` largest and smallest values are dropped
  and the rest averaged (unweighted: a claimed `num_examples` buys no influence).
- `coordinate_median`: per coordinate, the median (the mean of the two middle values for even K).

Reputation across rounds: `alignment` (each client's cosine with the round's trimmed mean of
the norm-clipped deltas), `update_reputation` (an EMA per client id) and `distrusted` (the ids
below a fraction of the median reputation, capped).

Curvature, per block, as a tuple of factors (K-FAC `(A, G)`, a diagonal `(D,)`, a low-rank
sketch `(Y,)`): the factors of a Kronecker block are summed separately across clients, so a
client may rescale `A * c` against `G / c` without changing its own `A (x) G` and yet move the
global `A` by `c`. Every combiner here works on trace-free quantities: each factor `X_i` is split
into its scale `s_i = ||X_i||_F` and its direction `X_i / s_i`; only the product `P = prod_i s_i`
(the scale of `A (x) G`, invariant under any rescaling between factors) is a client's own, and
each factor's scale in the result is the round's median (so no client chooses the split).

- `clip_factor_scales`: per client, the directions kept, `P` clipped to `ratio` times the round's
  median `P`, the split taken from the round's medians (a per-client map, like `norm_clip`).
- `combine_factors`: one block for the round: the mean of the directions of the clients nearest
  (in Frobenius distance) to the coordinate-wise median direction -- `K - 2 floor(trim K)` of
  them ("trimmed-mean"), or the middle one or two ("median") -- times the median scales. A mean
  of PSD directions is PSD, which a coordinate-wise trimmed mean of matrices need not be.

These need all updates of a round at once (the round's median, sorted coordinates): a server
using them holds the round's updates in memory.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import torch

from fedng._typing import Arrays

Named = Mapping[str, torch.Tensor]
Factors = Sequence[torch.Tensor]


def _check(xs: Sequence[Named], where: str) -> list[str]:
    """The common names of `xs` (non-empty, same names and shapes)."""
    if not xs:
        raise ValueError(f"{where}: needs at least one client's arrays, got none")
    names = sorted(xs[0])
    for x in xs[1:]:
        if sorted(x) != names or any(x[k].shape != xs[0][k].shape for k in names):
            raise ValueError(f"{where}: clients' arrays differ in names or shapes")
    return names


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def l2_norm(x: Named) -> float:
    """||x||_2 over all arrays, accumulated in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for v in x.values():
        total = total + (v.double() ** 2).sum()
    return float(torch.sqrt(total))


def median_bound(values: Sequence[float], ratio: float) -> float:
    """`ratio` times the median of the finite values (inf when there are none)."""
    finite = [v for v in values if math.isfinite(v)]
    return ratio * statistics.median(finite) if finite else math.inf


def _zero_or(v: torch.Tensor, f: float) -> torch.Tensor:
    """`v * f`; zero for f == 0 even where v is not finite."""
    return torch.zeros_like(v) if f == 0 else v * f


def norm_clip(xs: Sequence[Named], ratio: float = 1.0) -> tuple[list[Arrays], list[float]]:
    """Scales each client's arrays down to norm <= `ratio` * the round's median norm.

    Args:
        xs: per client, named arrays (same names and shapes).
        ratio: the bound as a multiple of the median norm (> 0).

    Returns:
        (the clipped arrays per client, the factor each was multiplied by, in (0, 1]).

    Raises:
        ValueError: no clients, differing names/shapes, or `ratio` <= 0.
    """
    _check(xs, "norm_clip")
    if not ratio > 0:
        raise ValueError(f"norm_clip: 'ratio' must be > 0, got {ratio}")
    norms = [l2_norm(x) for x in xs]
    bound = median_bound(norms, ratio)
    out, factors = [], []
    for x, n in zip(xs, norms, strict=True):
        f = 1.0 if n <= bound else (bound / n if math.isfinite(n) else 0.0)
        out.append({k: v.clone() if f == 1.0 else _zero_or(v, f) for k, v in x.items()})
        factors.append(f)
    return out, factors


def trims(k: int, trim: float) -> int:
    """Values dropped at each end of K sorted values: floor(trim * K), at most (K - 1) // 2."""
    if not 0 <= trim < 0.5:
        raise ValueError(f"trimmed mean: 'trim' must be in [0, 0.5), got {trim}")
    return min(math.floor(trim * k), (k - 1) // 2)


def _stacked(xs: Sequence[Named], name: str) -> torch.Tensor:
    dt = _work_dtype(xs[0][name])
    return torch.stack([x[name].to(dt) for x in xs])


def trimmed_mean(xs: Sequence[Named], trim: float) -> Arrays:
    """Coordinate-wise trimmed mean: per coordinate, drop the `trims(K, trim)` largest and
    smallest of the K values and average the rest.

    Args:
        xs: per client, named arrays (same names and shapes; any float dtype).
        trim: fraction dropped at each end, in [0, 0.5).

    Returns:
        Named arrays of the same shapes (float64 if the inputs are, else float32).

    Raises:
        ValueError: no clients, differing names/shapes, or `trim` outside [0, 0.5).
    """
    names = _check(xs, "trimmed_mean")
    b = trims(len(xs), trim)
    out: Arrays = {}
    for k in names:
        s = _stacked(xs, k).sort(dim=0).values
        out[k] = s[b : len(xs) - b].mean(dim=0)
    return out


def coordinate_median(xs: Sequence[Named]) -> Arrays:
    """Coordinate-wise median (the mean of the two middle values when K is even).

    Args:
        xs: per client, named arrays (same names and shapes).

    Returns:
        Named arrays of the same shapes (float64 if the inputs are, else float32).

    Raises:
        ValueError: no clients, or differing names/shapes.
    """
    names = _check(xs, "coordinate_median")
    k = len(xs)
    out: Arrays = {}
    for name in names:
        s = _stacked(xs, name).sort(dim=0).values
        out[name] = s[(k - 1) // 2 : k // 2 + 1].mean(dim=0)
    return out


def winsorize(xs: Sequence[Named], trim: float) -> list[Arrays]:
    """Per client, its arrays with every coordinate clamped into the round's central range
    `[x_(b+1), x_(K-b)]` of that coordinate's sorted values, `b = trims(K, trim)`.

    With `trim` near 0.5 (`b = (K - 1) // 2`) every coordinate is clamped to the median (to the
    two middle values for even K). Unlike `trimmed_mean`, each client keeps its own values
    inside the range, so a weighting that follows (FedNG's Fisher-weighted merge) still sees
    the clients apart.

    Args:
        xs: per client, named arrays (same names and shapes).
        trim: fraction of extreme values at each end clamped, in [0, 0.5).

    Returns:
        Per client, the clamped arrays (float64 if the inputs are, else float32).

    Raises:
        ValueError: no clients, differing names/shapes, or `trim` outside [0, 0.5).
    """
    names = _check(xs, "winsorize")
    k = len(xs)
    b = trims(k, trim)
    out: list[Arrays] = [{} for _ in xs]
    for name in names:
        st = _stacked(xs, name)
        s = st.sort(dim=0).values
        clamped = torch.minimum(torch.maximum(st, s[b]), s[k - 1 - b])
        for j in range(k):
            out[j][name] = clamped[j]
    return out


def combine_deltas(xs: Sequence[Named], mode: str, trim: float) -> Arrays:
    """The round's robust delta for `mode` "trimmed-mean" or "median"."""
    if mode == "trimmed-mean":
        return trimmed_mean(xs, trim)
    if mode == "median":
        return coordinate_median(xs)
    raise ValueError(f"combine_deltas: mode must be 'trimmed-mean' or 'median', got {mode!r}")


def alignment(xs: Sequence[Named], trim: float) -> list[float]:
    """Per client, the cosine between its norm-clipped arrays and the round's coordinate-wise
    trimmed mean of them (the reference a minority cannot move; 0 for a zero vector).

    A sign-flipper's update points away from what the honest majority agrees on; an honest
    non-IID client's update is still positively aligned with it on average (shared features).

    Args:
        xs: per client, named arrays (same names and shapes).
        trim: the trimmed mean's fraction at each end, in [0, 0.5).

    Returns:
        Per client, a cosine in [-1, 1].

    Raises:
        ValueError: no clients, differing names/shapes, or `trim` outside [0, 0.5).
    """
    clipped = norm_clip(xs)[0]
    center = trimmed_mean(clipped, trim)
    cn = l2_norm(center)
    out = []
    for x in clipped:
        dot = sum(float((x[k].double() * center[k].double()).sum()) for k in center)
        n = l2_norm(x) * cn
        out.append(dot / n if n > 0 and math.isfinite(n) else 0.0)
    return out


def update_reputation(
    previous: Mapping[int, float], scores: Mapping[int, float], memory: float
) -> dict[int, float]:
    """Per client id, the exponential moving average of its alignment scores.

    `r <- memory * r + (1 - memory) * score` for a client seen before, `r <- score` for a new
    one; clients absent this round keep their value.

    Raises:
        ValueError: `memory` outside [0, 1).
    """
    if not 0 <= memory < 1:
        raise ValueError(f"update_reputation: 'memory' must be in [0, 1), got {memory}")
    out = dict(previous)
    for cid, s in scores.items():
        out[cid] = memory * out[cid] + (1 - memory) * s if cid in out else s
    return out


def distrusted(
    reputation: Mapping[int, float], ids: Sequence[int], trust: float, most: int
) -> list[int]:
    """The ids (of `ids`) whose reputation is below `trust` times the median over `ids`, at most
    `most` of them (lowest first), sorted. None when the median is not positive (no reference).

    Raises:
        ValueError: `trust` outside [0, 1) or `most` < 0.
    """
    if not 0 <= trust < 1:
        raise ValueError(f"distrusted: 'trust' must be in [0, 1), got {trust}")
    if most < 0:
        raise ValueError(f"distrusted: 'most' must be >= 0, got {most}")
    if not ids or trust == 0:
        return []
    med = statistics.median(reputation[i] for i in ids)
    if not med > 0:
        return []
    low = sorted((reputation[i], i) for i in ids if reputation[i] < trust * med)
    return sorted(i for _, i in low[:most])


# --- curvature ------------------------------------------------------------------------------


def _check_factors(clients: Sequence[Factors], where: str) -> None:
    if not clients:
        raise ValueError(f"{where}: needs at least one client's factors, got none")
    shapes = [tuple(f.shape) for f in clients[0]]
    if not shapes:
        raise ValueError(f"{where}: a block needs at least one factor")
    for c in clients[1:]:
        if [tuple(f.shape) for f in c] != shapes:
            raise ValueError(f"{where}: clients' factors differ in number or shapes")


def split_scales(factors: Factors) -> tuple[list[torch.Tensor], list[float]]:
    """Each factor as (direction X / ||X||_F, scale ||X||_F); a zero or non-finite factor has a
    zero direction and scale 0."""
    dirs, scales = [], []
    for f in factors:
        w = f.to(_work_dtype(f))
        s = float(torch.linalg.vector_norm(w.double()))
        ok = math.isfinite(s) and s > 0
        dirs.append(w / s if ok else torch.zeros_like(w))
        scales.append(s if ok else 0.0)
    return dirs, scales


def _median_split(scales: Sequence[Sequence[float]]) -> list[float]:
    """Per factor but the last, the round's median scale (the split no client chooses)."""
    nf = len(scales[0])
    return [statistics.median(s[i] for s in scales) for i in range(nf - 1)]


def _rescaled(
    dirs: Sequence[torch.Tensor], split: Sequence[float], product: float
) -> list[torch.Tensor]:
    """Directions times the split scales; the last factor takes what is left of `product`."""
    lead = math.prod(split)
    last = product / lead if lead > 0 else 0.0
    return [d * s for d, s in zip(dirs, [*split, last], strict=True)]


def clip_factor_scales(clients: Sequence[Factors], ratio: float = 1.0) -> list[list[torch.Tensor]]:
    """Per client, one block's factors with the scale product clipped and the split canonical.

    Each client keeps its factor directions; its product of scales `P_k` becomes
    `min(P_k, ratio * median P)`; factor i < last gets the round's median scale of factor i and
    the last factor the rest of the product. So `A * c, G / c` gives the same result as `A, G`.

    Args:
        clients: per client, the block's factors (same count and shapes).
        ratio: the bound on `P` as a multiple of the round's median (> 0).

    Returns:
        Per client, the factors (float64 if the inputs are, else float32).

    Raises:
        ValueError: no clients, differing factors, or `ratio` <= 0.
    """
    _check_factors(clients, "clip_factor_scales")
    if not ratio > 0:
        raise ValueError(f"clip_factor_scales: 'ratio' must be > 0, got {ratio}")
    split = [split_scales(c) for c in clients]
    products = [math.prod(s) for _, s in split]
    bound = median_bound(products, ratio)
    med = _median_split([s for _, s in split])
    return [_rescaled(d, med, min(p, bound)) for (d, _), p in zip(split, products, strict=True)]


def keep_count(k: int, mode: str, trim: float) -> int:
    """How many clients' directions a robust curvature combine averages."""
    if mode == "median":
        return 2 - k % 2 if k > 1 else 1
    if mode == "trimmed-mean":
        return k - 2 * trims(k, trim)
    raise ValueError(f"combine_factors: mode must be 'trimmed-mean' or 'median', got {mode!r}")


def combine_factors(clients: Sequence[Factors], mode: str, trim: float) -> list[torch.Tensor]:
    """One block's robust combined factors for the round (see the module docstring).

    Args:
        clients: per client, the block's factors (same count and shapes).
        mode: "trimmed-mean" (keep `K - 2 floor(trim K)` clients) or "median" (keep the middle
            one, or two for even K).
        trim: fraction trimmed at each end, in [0, 0.5).

    Returns:
        The block's factors (float64 if the inputs are, else float32): directions averaged over
        the clients nearest the coordinate-wise median direction, the scale product the round's
        median, each leading factor's scale its median.

    Raises:
        ValueError: no clients, differing factors, a bad mode or `trim`.
    """
    _check_factors(clients, "combine_factors")
    keep = keep_count(len(clients), mode, trim)
    split = [split_scales(c) for c in clients]
    nf = len(clients[0])
    centers = [coordinate_median([{"x": d[i]} for d, _ in split])["x"] for i in range(nf)]
    dist = [
        sum(float(((d[i] - centers[i]).double() ** 2).sum()) for i in range(nf)) for d, _ in split
    ]
    chosen = sorted(range(len(clients)), key=lambda j: (dist[j], j))[:keep]
    dirs = [torch.stack([split[j][0][i] for j in chosen]).mean(dim=0) for i in range(nf)]
    product = statistics.median(math.prod(s) for _, s in split)
    # The mean of unit directions is shorter than 1 when they disagree: renormalize so that the
    # result's scales are exactly the medians.
    unit, _ = split_scales(dirs)
    return _rescaled(unit, _median_split([s for _, s in split]), product)
