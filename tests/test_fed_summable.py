"""The summable Fisher-weighted aggregation: client contributions, Fisher mat-vecs, the pooled
direction and its exact line search, the fast one-pass curvature checks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _fed import fed_round
from _tols import assert_close
from fedng.curvature import KFAC, CurvatureSet, to_matrix
from fedng.federated.aggregation.fisher_weighted import fisher_weighted_step
from fedng.federated.aggregation.matvec import block_vectors, fisher_matvecs
from fedng.federated.aggregation.mean import weights_of
from fedng.federated.aggregation.summable import CONTRIB_PREFIX
from fedng.federated.algorithms.curvature_payload import (
    attach_curvature,
    curvature_scales,
    decoded_all,
    decoded_curvature,
    fast_scales,
    payload_floats,
)
from fedng.federated.config.curvature import FedNGConfig
from fedng.federated.messages import ClientUpdate, ServerState
from fedng.federated.round import server_step


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _round(
    extra: dict[str, Any], n: int = 4, rounds: int = 0
) -> tuple[ServerState[Any], list[ClientUpdate]]:
    """FedNG's state after `rounds` rounds and the next round's updates (4 clients)."""
    return fed_round("fedng", extra, n, rounds)


def _dense(cs: CurvatureSet, i: int) -> torch.Tensor:
    """Block i's Fisher as a dense float64 matrix over vec(X) (row-major, X [m, n])."""
    rep, j = cs.block_rep(i)
    if isinstance(rep, KFAC):
        a, g = rep.A[j].double(), rep.G[j].double()
        a = torch.diag(a) if a.dim() == 1 else a
        return torch.kron(g, a)  # vec_row(G X A) = (G ⊗ A^T) vec_row(X), A symmetric
    d = rep.block_diagonal(j)
    assert d is not None
    return torch.diag(d.double().reshape(-1))


@pytest.mark.parametrize("curvature", ["kfac", "diag", "lowrank"])
def test_fisher_matvecs_match_dense(curvature: str) -> None:
    """F_i v_i of every block equals the dense Fisher times vec(v_i) (float64 reference)."""
    _, ups = _round({"curvature": curvature, "aggregation": "summable", "rank": 4})
    cs = decoded_curvature(ups[0])
    assert cs is not None
    vs = block_vectors(cs, ups[1].delta)
    got = fisher_matvecs(cs, vs)
    for i, (v, fv) in enumerate(zip(vs, got, strict=True)):
        assert fv is not None
        if curvature == "lowrank":
            u, s = cs.reps["lowrank"].eigendecompositions()[i]  # type: ignore[attr-defined, misc]
            f = (u.double() * s.double()) @ u.double().T
        else:
            f = _dense(cs, i)
        want = (f @ v.double().reshape(-1)).view(v.shape)
        assert_close(fv.float(), want, torch.float32, "default", scale=float(want.abs().max()))


def test_contribution_is_f_times_delta() -> None:
    """A summable client uploads c_k = F_k delta_k per parameter, zero nowhere it matters."""
    _, ups = _round({"aggregation": "summable", "contrib_dtype": "fp32"})
    u = ups[2]
    cs = decoded_curvature(u)
    assert cs is not None
    c = {k[len(CONTRIB_PREFIX) :]: v for k, v in u.extras.items()}
    assert sorted(c) == sorted(u.delta)
    for i, lay in enumerate(cs.layouts):
        want = (_dense(cs, i) @ to_matrix(u.delta, lay).double().reshape(-1)).view(lay.m, lay.n)
        got = to_matrix(c, lay)
        assert_close(got, want, torch.float32, "default", scale=float(want.abs().max()))


def test_summable_equals_exact_merge_for_diagonal_fisher() -> None:
    """With a diagonal Fisher the pooled solve is the exact merge: no line search needed."""
    state, ups = _round(
        {
            "curvature": "diag",
            "aggregation": "summable",
            "contrib_dtype": "fp32",
            "compression": "none",
        }
    )
    new, _ = server_step(state, ups)
    assert new.log["aggregation"] == "summable" and "alpha_min" not in new.log
    opts = state.config.options
    step, _ = fisher_weighted_step(
        ups,
        decoded_all(ups),
        opts.fisher_damping,
        100,
        1e-8,
        opts.fisher_center,  # type: ignore[attr-defined]
    )
    for k, v in state.params.items():
        want = v.double() + state.config.server_lr * step[k].double()
        assert_close(new.params[k], want, torch.float32, "default", scale=float(want.abs().max()))


def _objective(
    x: list[torch.Tensor],
    mats: list[torch.Tensor],
    s: list[torch.Tensor],
    c: list[torch.Tensor],
    lams: list[float],
) -> float:
    """sum_i 1/2 x_i^T (F_i + lam_i) x_i - x_i^T (S_i + lam_i c_i), float64."""
    tot = 0.0
    for xi, f, si, ci, lam in zip(x, mats, s, c, lams, strict=True):
        v = xi.double().reshape(-1)
        tot += float(0.5 * v @ (f @ v) + 0.5 * lam * v @ v - v @ (si + lam * ci))
    return tot


def test_kfac_line_search_is_exact() -> None:
    """For K-FAC, the summable step M + alpha d minimizes the exact merge objective along d
    (alpha from the clients' two scalars per block), and is no worse than the mean M."""
    state, ups = _round(
        {"aggregation": "summable", "contrib_dtype": "fp32", "probe_dtype": "fp32"}, rounds=1
    )
    new, _ = server_step(state, ups)
    assert new.log["aggregation"] == "summable" and new.log["probe_answered"] == 4
    sets = decoded_all(ups)
    ws = weights_of(ups)
    pooled = CurvatureSet.combine(sets, ws)
    rel = FedNGConfig().fisher_damping  # the round ran with the default
    lams = [lam for kind in pooled.groups for lam in pooled.relative_damping(rel)[kind]]
    lays = pooled.layouts
    mats = [
        sum(w * _dense(cs, i) for w, cs in zip(ws, sets, strict=True)) for i in range(len(lays))
    ]
    mean = {
        k: sum(w * u.delta[k].double() for w, u in zip(ws, ups, strict=True)) for k in ups[0].delta
    }
    s = [
        sum(  # S = sum_k p_k F_k delta_k, exact
            w * (_dense(cs, i) @ to_matrix(u.delta, lays[i]).double().reshape(-1))
            for w, cs, u in zip(ws, sets, ups, strict=True)
        )
        for i in range(len(lays))
    ]
    m = [to_matrix({k: v.float() for k, v in mean.items()}, lay).double() for lay in lays]
    step = {
        k: (new.params[k].double() - state.params[k].double()) / state.config.server_lr
        for k in mean
    }
    x = [to_matrix({k: v.float() for k, v in step.items()}, lay).double() for lay in lays]
    c = [mi.reshape(-1) for mi in m]
    phi_x = _objective(x, mats, s, c, lams)
    phi_m = _objective(m, mats, s, c, lams)
    assert phi_x <= phi_m + 1e-9 * abs(phi_m)
    for i in range(len(lays)):  # directional derivative along d_i vanishes at the step
        d = (x[i] - m[i]).reshape(-1)
        if float(d.norm()) == 0:
            continue
        grad = mats[i] @ x[i].reshape(-1) + lams[i] * x[i].reshape(-1) - (s[i] + lams[i] * c[i])
        assert abs(float(grad @ d)) <= 1e-3 * float(d.norm()) * float(grad.norm() + s[i].norm())


def _payload_with(u: ClientUpdate, fn: Any) -> ClientUpdate:
    cs = decoded_curvature(u)
    assert cs is not None
    rep = cs.reps["kfac"]
    assert isinstance(rep, KFAC)
    rep.G[0] = fn(rep.G[0])
    attach_curvature(u, cs, "fp32")
    delattr(u, "_fedng_curvature")
    return u


def test_fast_scales_equal_decoded_scales() -> None:
    """The one-pass scales of a K-FAC payload equal those of the decoded curvature."""
    _, ups = _round({"aggregation": "summable"})
    u = ups[0]
    got = fast_scales(u.meta["curv"], payload_floats(u), 1e-3)  # int8 kinds dequantized
    cs = decoded_curvature(u)
    assert cs is not None
    want = curvature_scales(cs)
    assert sorted(got) == sorted(want)
    for k in want:
        assert abs(got[k] - want[k]) <= 1e-5 * abs(want[k]) + 1e-12, k


def _offdiag(g: torch.Tensor) -> torch.Tensor:
    e = torch.zeros_like(g)
    e[1, 0] = e[0, 1] = 10 * float(g.abs().max())
    return g + e


@pytest.mark.parametrize(
    "fn,word",
    [
        (lambda g: -g, "negative diagonal"),
        (_offdiag, "positive semi-definite"),
        (lambda g: g * float("inf"), "NaN/Inf"),
        (lambda g: g * 1e25, "overflow"),
        (lambda g: g * 1e6, "reference"),
    ],
)
def test_fast_check_rejects_bad_curvature(fn: Any, word: str) -> None:
    """The summable server's one-pass checks reject what the full checks reject."""
    state, ups = _round({"aggregation": "summable"}, n=5)
    _payload_with(ups[2], fn)
    new, _ = server_step(state, ups)
    assert list(new.log["rejected"]) == [2], new.log
    assert word in " ".join(new.log["rejected"][2])
    assert new.log["aggregation"] == "summable"
    assert all(torch.isfinite(v).all() for v in {**new.params, **new.buffers}.values())


def test_indefinite_pool_drops_the_rounds_curvature() -> None:
    """Factors that pass the one-pass checks but pool to an indefinite matrix: the round keeps
    the mean step and the previous global curvature, with the reason logged."""
    state, ups = _round({"aggregation": "summable"})

    def indefinite(g: torch.Tensor) -> torch.Tensor:
        m = g.shape[0]  # 1 on the diagonal, -0.6 off it: ||M||_F < tr M, one eigenvalue < 0
        return (torch.full((m, m), -0.6) + 1.6 * torch.eye(m)) * float(g.diagonal().mean())

    for u in ups:
        _payload_with(u, indefinite)
    new, _ = server_step(state, ups)
    assert new.log["rejected"] == {}
    assert "pooled curvature rejected" in new.log["curvature_dropped"]
    assert new.log["aggregation"] == "mean"
    assert not any(k.startswith("curv/") for k in new.buffers)
