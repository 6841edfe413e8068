"""DP clipping and noise in a public curvature metric (`aggregation.dp_metric`), the "input"
curvature release, and the per-round budget split between delta and curvature."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from _fed import blobs_task
from fedng.curvature import KFAC, CurvatureSet
from fedng.curvature.layout import BlockLayout, to_matrix
from fedng.federated.aggregation import dp, dp_metric, stage
from fedng.federated.client import get_params
from fedng.federated.client.privacy import privatize_update
from fedng.federated.config import ServerConfig, make_configs
from fedng.federated.messages import ClientUpdate
from fedng.federated.round import client_step, server_init, server_step
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("dp_accounting")

LAYOUTS = [
    BlockLayout("0", "kron", 3, 5, "0.weight", "0.bias", None, None, False),
    BlockLayout("1", "kron", 2, 4, "1.weight", "1.bias", None, None, False),
]
"""Two dense layers: 4 -> 3 (block [3, 5], bias folded in) and 3 -> 2 (block [2, 4])."""


def _psd(n: int, gen: torch.Generator, spread: float = 1.0) -> torch.Tensor:
    x = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return x @ x.T * spread + 1e-3 * torch.eye(n, dtype=torch.float64)


def _kfac_set(seed: int, identity: bool = False) -> CurvatureSet:
    """A K-FAC curvature set over `LAYOUTS` (random PSD factors, or identities), float64."""
    gen = torch.Generator().manual_seed(seed)
    cs = CurvatureSet.empty(LAYOUTS, ["kfac", "kfac"], dtype=torch.float64)
    rep = cs.reps["kfac"]
    assert isinstance(rep, KFAC)
    for i, lay in enumerate(LAYOUTS):
        eye_a, eye_g = (torch.eye(k, dtype=torch.float64) for k in (lay.n, lay.m))
        rep.A[i] = eye_a.clone() if identity else _psd(lay.n, gen, 10.0)
        rep.G[i] = eye_g.clone() if identity else _psd(lay.m, gen, 0.01)
    return cs


def _delta(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"0.weight": (3, 4), "0.bias": (3,), "1.weight": (2, 3), "1.bias": (2,)}
    return {
        k: scale * torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()
    }


def _damped(x: torch.Tensor, rho: float) -> torch.Tensor:
    """The reference damped, normalized factor: `(X + sqrt(rho) m I) / ((1 + sqrt(rho)) m)`."""
    m = float(x.diagonal().mean())
    eye = torch.eye(x.shape[0], dtype=torch.float64)
    return (x + math.sqrt(rho) * m * eye) / ((1 + math.sqrt(rho)) * m)


def _metric_norm2(cs: CurvatureSet, x: dict[str, torch.Tensor], rho: float) -> float:
    """`delta^T M delta = sum_i <G_d V_i A_d, V_i>` computed directly (float64)."""
    rep = cs.reps["kfac"]
    assert isinstance(rep, KFAC)
    total = 0.0
    for i, lay in enumerate(LAYOUTS):
        v = to_matrix(x, lay, torch.float64)
        a, g = _damped(rep.A[i], rho), _damped(rep.G[i], rho)
        total += float((g @ v @ a * v).sum())
    return total


def _norm(x: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in x.values()))


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 2**16), st.floats(1e-2, 1e2), st.floats(1e-2, 30.0), st.floats(0.01, 10))
def test_metric_clip_bounds_the_metric_norm_exactly(
    seed: int, scale: float, bound: float, rho: float
) -> None:
    cs = _kfac_set(seed)
    w = dp_metric.whitener(cs, rho)
    x = _delta(seed + 1, scale)
    u = w.white(x)
    assert _norm(u) ** 2 == pytest.approx(_metric_norm2(cs, x, rho), rel=1e-10)
    back = w.unwhite(dp.clip_l2(u, bound)[0])
    got = math.sqrt(_metric_norm2(cs, back, rho))
    assert got <= bound * (1 + 1e-10)
    f = min(1.0, bound / _norm(u))  # a positive scaling of the delta itself
    for k in x:
        torch.testing.assert_close(back[k], f * x[k], rtol=1e-10, atol=1e-12 * scale)
    # the client's Euclidean pre-clip never binds where the metric clip keeps the delta
    assert _norm(back) <= dp_metric.euclidean_bound(bound, rho) * (1 + 1e-10)


def test_noise_mapped_back_has_the_inverse_metric_as_covariance() -> None:
    """`unwhite` is linear: iid noise n in whitened coordinates becomes `J n` with `J J^T` =
    `M^-1` (here on every entry of the two blocks, float64, exactly)."""
    rho = 0.5
    cs = _kfac_set(7)
    w = dp_metric.whitener(cs, rho)
    template = _delta(0)
    names = list(template)
    sizes = [template[k].numel() for k in names]
    d = sum(sizes)

    def unflat(vec: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(vec, sizes)
        return {k: p.reshape(template[k].shape) for k, p in zip(names, parts, strict=True)}

    def flat(x: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([x[k].reshape(-1) for k in names])

    eye = torch.eye(d, dtype=torch.float64)
    jac = torch.stack([flat(w.unwhite(unflat(eye[j]))) for j in range(d)], 1)  # Δ = J u
    metric = torch.stack(  # M_jk = <G_d E_j A_d, E_k>, by polarization of the quadratic
        [
            torch.tensor(
                [
                    0.25
                    * (
                        _metric_norm2(cs, unflat(eye[j] + eye[k]), rho)
                        - _metric_norm2(cs, unflat(eye[j] - eye[k]), rho)
                    )
                    for k in range(d)
                ],
                dtype=torch.float64,
            )
            for j in range(d)
        ]
    )
    torch.testing.assert_close(jac @ jac.T, torch.linalg.inv(metric), rtol=1e-9, atol=1e-9)


def test_identity_metric_gives_the_plain_mechanism_bit_for_bit() -> None:
    """With a flat curvature (A = I, G = I) the whitener is the identity: the stage's private
    update equals the Euclidean one, noise included (same seed)."""
    w = dp_metric.whitener(_kfac_set(0, identity=True), 2.0)
    for lg, la in zip(w.left, w.right, strict=True):
        assert lg is not None
        assert torch.equal(lg, torch.eye(lg.shape[0], dtype=torch.float64))
        assert torch.equal(la, torch.eye(la.shape[0], dtype=torch.float64))
    cfg = ServerConfig(dp_clip=0.3, dp_noise_multiplier=2.0, dp_clients=3, dp_seed=11)
    ups = [
        ClientUpdate(str(i), 0, {k: v.float() for k, v in _delta(i).items()}, 1) for i in range(3)
    ]
    plain = stage._private(cfg, 0, ups)
    shaped = stage._private(cfg, 0, ups, w)
    for p, s in zip(plain, shaped, strict=True):
        for k in p.delta:
            torch.testing.assert_close(s.delta[k], p.delta[k], rtol=0, atol=1e-7)


def test_budget_split_keeps_one_gaussian_mechanism_per_round() -> None:
    z, c, cf = 2.0, 0.7, 3.0
    for share in (0.1, 0.5, 0.9):
        f_d, f_c = dp.budget_fractions(True, share)
        s_d, s_c = dp.noise_std(z, c, f_d), dp.noise_std(z, cf, f_c)
        # sensitivity of (delta / s_d, curvature / s_c) is sqrt(C^2/s_d^2 + C_F^2/s_c^2) = 1/z
        assert (c / s_d) ** 2 + (cf / s_c) ** 2 == pytest.approx(1 / z**2, rel=1e-12)
    assert dp.budget_fractions(False, 0.3) == (1.0, 0.0)
    assert dp.noise_std(z, c, *dp.budget_fractions(False, 0.3)[:1]) == pytest.approx(z * c)


def test_input_release_is_unit_trace_shapes_and_the_server_makes_them_public() -> None:
    cs = _kfac_set(3)
    released = _kfac_set(3)
    dp_metric.input_shapes(released)
    rep, orig = released.reps["kfac"], cs.reps["kfac"]
    assert isinstance(rep, KFAC) and isinstance(orig, KFAC)
    for a, g, a0 in zip(rep.A, rep.G, orig.A, strict=True):
        assert float(a.diagonal().sum()) == pytest.approx(1.0, rel=1e-12)
        torch.testing.assert_close(a, a0 / a0.diagonal().sum(), rtol=1e-12, atol=0)
        assert float(g.abs().max()) == 0.0
    arrays, _ = released.to_arrays(torch.float64)
    assert _norm(arrays) <= math.sqrt(len(LAYOUTS)) * (1 + 1e-12)
    dp_metric.public_input_curvature(released, rank=1)
    for a, g in zip(rep.A, rep.G, strict=True):
        n = a.shape[0]
        assert float(a.diagonal().mean()) == pytest.approx(1.0, rel=1e-10)
        w = torch.linalg.eigvalsh(a.double())
        assert torch.allclose(w[:-1], w[0].expand(n - 1), rtol=1e-8)  # rank 1 + isotropic
        assert torch.equal(g, torch.eye(g.shape[0], dtype=g.dtype))


def _fedng_metric_round(seed: int) -> tuple[Any, Any]:
    from fedng.cli import DP_METRIC_FEDNG

    task = blobs_task(num_clients=4, n=30)
    knobs = {
        **DP_METRIC_FEDNG,
        "local_steps": 3,
        "dp_clip": 0.5,
        "dp_curvature_clip": 1.5,
        "dp_noise_multiplier": 0.3,
        "dp_clients": 4,
        "dp_seed": seed,
        "compression": "none",
    }
    cc, sc = make_configs("fedng", knobs)
    model = task.model_fn(0)
    state, msg = server_init(get_params(model), sc)
    for _ in range(2):
        ups = [client_step(model, c, msg, cc) for c in task.clients]
        state, msg = server_step(state, ups)
    return state, msg


def test_fedng_metric_rounds_run_and_the_metric_is_the_public_global_curvature() -> None:
    state, _ = _fedng_metric_round(1)
    assert state.log["rejected"] == {}
    assert all(bool(torch.isfinite(v).all()) for v in state.params.values())
    w = stage.dp_metric(state)  # built from the server's buffers only
    assert w is not None and len(w.layouts) >= 1
    glob = {k[5:]: v for k, v in state.buffers.items() if k.startswith("curv/")}
    cs = CurvatureSet.from_arrays(glob, state.meta["curv"])
    rep = cs.reps["kfac"]
    assert isinstance(rep, KFAC)
    for g in rep.G:  # nothing of the output factors was released
        assert torch.equal(g, torch.eye(g.shape[0], dtype=g.dtype))


@pytest.mark.parametrize(
    ("knobs", "match"),
    [
        ({"dp_metric": "fisher"}, "dp_metric"),
        ({"dp_metric": "curvature", "dp_mode": "distributed"}, "'none' under distributed DP"),
        ({"dp_metric_damping": 0.0}, "dp_metric_damping"),
        ({"dp_curvature_share": 1.0}, "dp_curvature_share"),
        ({"dp_curvature_release": "output"}, "dp_curvature_release"),
        ({"dp_curvature_rank": -1}, "dp_curvature_rank"),
    ],
)
def test_configs_reject_bad_metric_knobs(knobs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ServerConfig(**knobs)
    with pytest.raises(ValueError, match=match):
        make_configs("fedng", knobs)


def test_the_noise_split_follows_the_public_schedule_not_the_payloads() -> None:
    # Whether a round releases curvature decides the delta's share of the budget: it must come
    # from public settings, or one client's missing curvature would change the round's noise.
    assert dp.curvature_round(1.0, 1, 0) and dp.curvature_round(1.0, 2, 4)
    assert not dp.curvature_round(1.0, 2, 3) and not dp.curvature_round(0.0, 1, 0)
    z, c, n = 3.0, 0.05, 4
    knobs = {
        "dp_clip": c,
        "dp_noise_multiplier": z,
        "dp_mode": "distributed",
        "dp_curvature_clip": 1.0,
        "dp_curvature_share": 0.5,
        "dp_clients": n,
        "dp_seed": 5,
    }
    cc, _ = make_configs("fedng", {"local_steps": 2, **knobs})
    upd = ClientUpdate(
        client_id=0, round=0, num_examples=10, delta={"w": torch.zeros(20000)}, curvature={}
    )
    privatize_update(upd, cc)  # no curvature of its own, in a round that releases curvature
    std = float(upd.delta["w"].std())
    assert std == pytest.approx(dp.noise_std(z, c, 0.5, n), rel=0.05)
