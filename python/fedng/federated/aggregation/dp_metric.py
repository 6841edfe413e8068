"""Clipping and Gaussian noise in a public curvature metric (`ServerConfig.dp_metric`).

With a public metric `M` (positive definite, per curvature block), the private mean of a round
is computed in whitened coordinates `u = M^{1/2} delta`: each client's `u_k` is clipped to L2
norm C, the sum gets `N(0, s^2 I)`, and the result is mapped back with `M^{-1/2}`. In `u` the
mechanism is the plain Gaussian mechanism (sensitivity C, same noise, same accounting); the map
back is linear and public, so it is post-processing. In delta's coordinates the clip bounds
`||delta||_M = sqrt(delta^T M delta)` and the noise is `N(0, s^2 M^{-1})`: small along
high-curvature directions (where the loss is sensitive to it), large along flat ones.

For a K-FAC block (`M = A (x) G` on the block matrix `V` [m, n], `<G V A, V>` its quadratic),
with lower Cholesky factors `A_d = L_A L_A^T`, `G_d = L_G L_G^T` of the damped factors, the
whitened block is `U = L_G^T V L_A` (`||U||_F^2 = <G_d V A_d, V>`) and the map back `V = L_G^-T
U L_A^-1`, so the noise `L_G^-T Z L_A^-1` (Z iid) has covariance `A_d^-1 (x) G_d^-1 = M^-1`. A
diagonal block whitens entrywise (`sqrt(D + damping)`). Parameters outside every block (and
low-rank sketch blocks) keep the identity metric.

Damping: each factor `X` ([k, k]) becomes `(X + sqrt(rho) mean_eig(X) I) / ((1 + sqrt(rho))
mean_eig(X))`: relative damping `rho` (`dp_metric_damping`) split evenly between the factors,
and the damped factor scaled to mean eigenvalue 1, so a block with a flat spectrum gets the
identity metric and the clip C keeps the scale of a Euclidean clip. A factor with no curvature
(mean eigenvalue 0 or not finite) gets the identity.

The metric must be public: the server's global curvature is, when it is built only from the
private (clipped, noised) curvature releases of earlier rounds (`dp_curvature_clip` > 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedng._typing import Arrays
from fedng.curvature import KFAC, CurvatureSet, DiagonalFisher, LowRankFisher
from fedng.curvature.layout import BlockLayout, to_matrix, write_matrix


def _damped_root(x: torch.Tensor, rho: float) -> torch.Tensor:
    """The lower Cholesky factor of the damped, unit-mean-eigenvalue factor (float64); a 1-D
    factor (an embedding's diagonal A) gives its entrywise square root."""
    x = x.double()
    diag = x if x.dim() == 1 else x.diagonal()
    mean = float(diag.mean()) if diag.numel() else 0.0
    if not (math.isfinite(mean) and mean > 0):
        return torch.ones_like(diag) if x.dim() == 1 else torch.eye(x.shape[0], dtype=x.dtype)
    lam = math.sqrt(rho) * mean
    scale = mean + lam
    if x.dim() == 1:
        return torch.sqrt((x.clamp(min=0) + lam) / scale)
    sym = 0.5 * (x + x.T) + lam * torch.eye(x.shape[0], dtype=x.dtype)
    root: torch.Tensor = torch.linalg.cholesky(sym / scale)
    return root


@dataclass(frozen=True)
class Whitener:
    """The public metric as per-block roots: `white` maps named arrays to `M^{1/2} x`,
    `unwhite` maps back with `M^{-1/2}` (the same arrays, names and dtypes).

    Attributes:
        layouts: the blocks the metric covers.
        left: per block, the root applied on the block matrix's left (`L_G`, [m, m]; a
            diagonal block: None).
        right: per block, the root on the right (`L_A`, [n, n] or [n] for an embedding; a
            diagonal block: the entrywise root [m, n]).
    """

    layouts: tuple[BlockLayout, ...]
    left: tuple[torch.Tensor | None, ...]
    right: tuple[torch.Tensor, ...]

    def _apply(self, x: Arrays, inverse: bool) -> Arrays:
        out = {k: v.clone() for k, v in x.items()}
        for lay, lg, la in zip(self.layouts, self.left, self.right, strict=True):
            if lay.weight not in x:
                continue
            v = to_matrix(x, lay, torch.float64)
            if lg is None:  # diagonal: entrywise
                w = v / la if inverse else v * la
            elif not inverse:  # U = L_G^T V L_A
                w = lg.T @ (v * la if la.dim() == 1 else v @ la)
            else:  # V = L_G^-T U L_A^-1
                w = torch.linalg.solve_triangular(lg.T, v, upper=True)
                if la.dim() == 1:
                    w = w / la
                else:
                    w = torch.linalg.solve_triangular(la, w, upper=False, left=False)
            write_matrix(out, lay, w.to(out[lay.weight].dtype))
        return out

    def white(self, x: Arrays) -> Arrays:
        """`M^{1/2} x` (per block `L_G^T V L_A`)."""
        return self._apply(x, inverse=False)

    def unwhite(self, u: Arrays) -> Arrays:
        """`M^{-1/2} u` (per block `L_G^-T U L_A^-1`): the inverse of `white`."""
        return self._apply(u, inverse=True)


def whitener(cs: CurvatureSet, rho: float) -> Whitener:
    """The `Whitener` of a (public) curvature set with relative damping `rho` (see the module
    docstring); K-FAC and diagonal blocks, the identity elsewhere.

    Raises:
        ValueError: `rho` is not > 0.
    """
    if not rho > 0:
        raise ValueError(f"dp metric: damping must be > 0, got {rho}")
    lays: list[BlockLayout] = []
    left: list[torch.Tensor | None] = []
    right: list[torch.Tensor] = []
    for kind, rep in cs.reps.items():
        for j, i in enumerate(cs.groups[kind]):
            if isinstance(rep, KFAC):
                lays.append(cs.layouts[i])
                left.append(_damped_root(rep.G[j], rho))
                right.append(_damped_root(rep.A[j], rho))
            elif isinstance(rep, DiagonalFisher):
                lays.append(cs.layouts[i])
                left.append(None)
                d = rep.diag[j].double().clamp(min=0)
                right.append(_damped_root(d.reshape(-1), rho).reshape(d.shape))
    return Whitener(tuple(lays), tuple(left), tuple(right))


def euclidean_bound(clip: float, rho: float) -> float:
    """A Euclidean norm every delta whose metric norm is <= `clip` stays within, for any metric
    `whitener(cs, rho)` builds: each damped, normalized factor has eigenvalues >= `sqrt(rho) /
    (1 + sqrt(rho))`, a K-FAC block's metric (two factors) >= its square, so `||x|| <= clip (1 +
    sqrt(rho)) / sqrt(rho)`. A client clipping to this bound first changes nothing the server's
    metric clip keeps (both clips are positive scalings: the last one active decides)."""
    r = math.sqrt(rho)
    return clip * (1.0 + r) / r


# --- the "input" curvature release (`dp_curvature_release`) ----------------------------------


def input_shapes(cs: CurvatureSet) -> None:
    """What a client releases under `dp_curvature_release="input"`, in place: each K-FAC
    block's input factor as its shape `A / tr(A)` (unit trace: PSD, so Frobenius norm <= 1)
    and its output factor zeroed; every other kind zeroed (not released).

    The input factors carry what the DP metric needs (the output factors are damped to nearly
    isotropic anyway, and at 20 clients their noised release is all noise); the shapes need no
    tuned clip: the payload's norm is at most sqrt(number of K-FAC blocks).
    """
    for rep in cs.reps.values():
        if isinstance(rep, KFAC):
            for i, a in enumerate(rep.A):
                tr = float(a.sum() if a.dim() == 1 else a.diagonal().sum())
                ok = math.isfinite(tr) and tr > 0
                rep.A[i] = a / tr if ok else torch.zeros_like(a)
                rep.G[i] = torch.zeros_like(rep.G[i])
        elif isinstance(rep, DiagonalFisher):
            rep.diag = [torch.zeros_like(d) for d in rep.diag]
        elif isinstance(rep, LowRankFisher):
            rep.Y = [torch.zeros_like(y) for y in rep.Y]


def top_rank(a: torch.Tensor, rank: int) -> torch.Tensor:
    """A symmetric PSD matrix denoised to its top `rank` eigen-directions, the rest isotropic
    with the remaining trace (the trace is kept); `rank` 0 or >= n: unchanged."""
    n = a.shape[0]
    if rank <= 0 or rank >= n:
        return a
    w, v = torch.linalg.eigh(0.5 * (a + a.T).double())
    top = v[:, -rank:]
    rest = float(w[:-rank].clamp(min=0).sum()) / (n - rank)
    eye = torch.eye(n, dtype=torch.float64)
    out: torch.Tensor = (top * w[-rank:]) @ top.T + rest * (eye - top @ top.T)
    return out.to(a.dtype)


def public_input_curvature(cs: CurvatureSet, rank: int = 0) -> None:
    """The server's post-processing of a noised, PSD-projected "input" release, in place: each
    K-FAC block becomes `(A n / tr(A)) (x) I` (input shape at mean eigenvalue 1, identity
    output factor; the identity where the noised shape has no positive trace), with `A` first
    denoised to its top `rank` directions (`top_rank`; 0: all); every other diagonal becomes
    the identity (1), a sketch zero. Post-processing: no privacy cost."""
    for rep in cs.reps.values():
        if isinstance(rep, KFAC):
            for i, a in enumerate(rep.A):
                two_d = a.dim() == 2
                if two_d:
                    a = top_rank(a, rank)
                tr = float(a.diagonal().sum() if two_d else a.sum())
                n = a.shape[0]
                if math.isfinite(tr) and tr > 0:
                    rep.A[i] = a * (n / tr)
                else:
                    rep.A[i] = torch.eye(n, dtype=a.dtype) if two_d else torch.ones_like(a)
                rep.G[i] = torch.eye(rep.G[i].shape[0], dtype=rep.G[i].dtype)
        elif isinstance(rep, DiagonalFisher):
            rep.diag = [torch.ones_like(d) for d in rep.diag]
        elif isinstance(rep, LowRankFisher):  # a sketch: no curvature released
            rep.Y = [torch.zeros_like(y) for y in rep.Y]
