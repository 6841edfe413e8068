"""FIPA's aggregation from low-rank client Fishers, without a dense d x d matrix.

With client weights `p_m` (summing to 1), client deltas `delta_m` and client Fishers
`H_m ~ U_m diag(S_m) U_m^T`, FIPA (Chang, He and Hao 2026) moves the global model by

    step = H^+ sum_m p_m H_m delta_m,     H = sum_m p_m H_m,

the minimizer of `sum_m p_m ||theta - theta_m||^2_{H_m}` (FedFisher's objective) of least norm.
`H^+` is the pseudo-inverse with a relative cutoff: eigenvalues of H at or below
`cutoff * lambda_max(H)` count as zero. Directions no client's Fisher sees (the null space of H)
get nothing from this formula; `null_space="mean"` gives them the weighted mean delta there
instead (so one client reproduces its own update exactly), `"drop"` leaves them alone as the
paper's formula does.

Two ways to get H:
- `eigenpair_step`: every client's top-r eigenpairs. H = W W^T with W = [U_m sqrt(p_m S_m)]
  [d, R], R = sum_m r_m; then `H^+ W z = W K^+ z` with the small Gram matrix K = W^T W [R, R]
  (the eigen-problem is R x R, the cost O(d R^2)).
- `sketch_step`: fedng's summable variant. Clients send the shared-seed sketch Y_m = H_m Omega
  [d, s] and c_m = H_m delta_m; the server sums them (`sum p_m Y_m` is exactly the sketch of H),
  takes the Nystrom eigendecomposition H ~ U diag(S) U^T (`fedng.ops.nystrom`), and applies its
  pseudo-inverse to `sum p_m c_m`. It is exact when rank(H) <= s; otherwise its H is the Nystrom
  approximation, whose expected nuclear-norm error is at most (1 + k / (s - k - 1)) times that
  of the best rank-k approximation, for any k <= s - 2 (Tropp et al. 2017).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from fedng import ops
from fedng._typing import Arrays
from fedng.federated.config.fipa import FIPA_NULL_SPACES


def flatten(arrays: Arrays, names: list[str]) -> torch.Tensor:
    """The arrays `names` concatenated into one flat float64 vector [d]."""
    return torch.cat([arrays[k].double().reshape(-1) for k in names])


def unflatten(flat: torch.Tensor, like: Arrays, names: list[str]) -> Arrays:
    """A flat vector cut back into fp32 arrays shaped like `like[name]` for each of `names`."""
    out, lo = {}, 0
    for k in names:
        n = like[k].numel()
        out[k] = flat[lo : lo + n].reshape(like[k].shape).float()
        lo += n
    return out


def _checked(
    where: str, null_space: str, weights: Sequence[float], *per_client: Sequence[object]
) -> list[float]:
    """The normalized weights, after checking `null_space` and one entry per client."""
    if null_space not in FIPA_NULL_SPACES:
        raise ValueError(f"{where}: 'null_space' must be one of {list(FIPA_NULL_SPACES)}")
    n = len(per_client[0])
    if any(len(x) != n for x in per_client):
        raise ValueError(f"{where}: every per-client argument must have one entry per client")
    if len(weights) != n or n == 0:
        raise ValueError(f"{where}: need one weight per client (>= 1 client), got {len(weights)}")
    total = float(sum(weights))
    if not total > 0 or any(w < 0 for w in weights):
        raise ValueError(f"{where}: 'weights' must be >= 0 with a positive sum, got {weights}")
    return [float(w) / total for w in weights]


def _with_null_space(
    step: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    p: Sequence[float],
    project: Callable[[torch.Tensor], torch.Tensor],
    null_space: str,
) -> torch.Tensor:
    """`step + (I - P) mean` for null_space "mean" (P = `project`, onto the kept range of H)."""
    if null_space == "drop":
        return step
    mean = torch.zeros_like(deltas[0], dtype=torch.float64)
    for d, w in zip(deltas, p, strict=True):
        mean.add_(d.double(), alpha=w)
    return step + mean - project(mean)


def _kept(lam: torch.Tensor, cutoff: float) -> torch.Tensor:
    """The eigenvalues above `cutoff * max(lam)` (none when every one is <= 0)."""
    top = float(lam.max()) if lam.numel() else 0.0
    return lam > cutoff * top if top > 0 else torch.zeros_like(lam, dtype=torch.bool)


def eigenpair_step(
    deltas: Sequence[torch.Tensor],
    eigvecs: Sequence[torch.Tensor],
    eigvals: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    cutoff: float = 1e-2,
    null_space: str = "mean",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """FIPA's step `H^+ sum_m p_m H_m delta_m` from the clients' top eigenpairs (float64).

    Args:
        deltas: M flat client deltas [d].
        eigvecs: M matrices U_m [d, r_m] (orthonormal columns).
        eigvals: M vectors S_m [r_m] (>= 0; zeros are padding).
        weights: M client weights (normalized here).
        cutoff: relative pseudo-inverse cutoff (eigenvalues <= cutoff * lambda_max are zero).
        null_space: "mean" (the mean delta outside range(H)) or "drop".

    Returns:
        (step [d] float64, log with the rank of H that was kept).
    """
    p = _checked("eigenpair_step", null_space, weights, deltas, eigvecs, eigvals)
    cols, zs = [], []
    for d, u, s, w in zip(deltas, eigvecs, eigvals, p, strict=True):
        scale = (w * s.double().clamp_min(0)).sqrt()
        u64 = u.double()
        cols.append(u64 * scale)
        zs.append(scale * (u64.T @ d.double()))
    big_w = torch.cat(cols, 1)  # [d, R]
    z = torch.cat(zs)
    lam, vec = torch.linalg.eigh(big_w.T @ big_w)  # the R x R problem: eig(K) = eig(H) \ {0}
    keep = _kept(lam, cutoff)
    v, lam = vec[:, keep], lam[keep]
    step = big_w @ (v @ ((v.T @ z) / lam))  # H^+ W z = W K^+ z
    # P = W K^+ W^T is the projector onto the kept range of H
    step = _with_null_space(
        step, deltas, p, lambda x: big_w @ (v @ ((v.T @ (big_w.T @ x)) / lam)), null_space
    )
    return step, {"fipa_rank": int(keep.sum()), "fipa_cols": int(big_w.shape[1])}


def sketch_step(
    deltas: Sequence[torch.Tensor],
    sketches: Sequence[torch.Tensor],
    products: Sequence[torch.Tensor],
    omega: torch.Tensor,
    weights: Sequence[float],
    *,
    cutoff: float = 1e-2,
    null_space: str = "mean",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The summable variant: `Nystrom(sum p_m Y_m)^+ sum p_m c_m` (float64).

    Args:
        deltas: M flat client deltas [d].
        sketches: M sketches Y_m = H_m Omega [d, s].
        products: M vectors c_m = H_m delta_m [d].
        omega: the shared test matrix Omega [d, s].
        weights: M client weights (normalized here).
        cutoff: relative pseudo-inverse cutoff.
        null_space: "mean" or "drop".

    Returns:
        (step [d] float64, log with the kept rank).
    """
    p = _checked("sketch_step", null_space, weights, deltas, sketches, products)
    y = torch.zeros_like(omega, dtype=torch.float64)
    c = torch.zeros_like(deltas[0], dtype=torch.float64)
    for ym, cm, w in zip(sketches, products, p, strict=True):
        y.add_(ym.double(), alpha=w)
        c.add_(cm.double(), alpha=w)
    om = omega.double().contiguous()
    norm = float(torch.linalg.matrix_norm(y))
    if norm > 0:
        shift = max(y.shape[0] ** 0.5 * torch.finfo(torch.float64).eps * norm, 1e-300)
        res = ops.nystrom([y.contiguous()], [om], [shift])
        u, s = res.U[0], res.S[0]
    else:  # no client has curvature: nothing to invert
        u, s = om[:, :0], om.new_zeros(0)
    keep = _kept(s, cutoff)
    uk = u[:, keep]
    step = _with_null_space(
        uk @ ((uk.T @ c) / s[keep]), deltas, p, lambda x: uk @ (uk.T @ x), null_space
    )
    return step, {"fipa_rank": int(keep.sum()), "fipa_cols": int(om.shape[1])}
