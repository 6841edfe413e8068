"""Robust combiners (`aggregation.robust`) against float64 numpy references, and the robust stage
of a server round (`aggregation.stage`, `ServerConfig.robust`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from _fed import blobs_task
from _tols import assert_close
from fedng.curvature import KFAC
from fedng.federated.aggregation import robust
from fedng.federated.aggregation.stage import decode, defend
from fedng.federated.algorithms.fedng import global_set
from fedng.federated.client import get_params
from fedng.federated.config import make_configs
from fedng.federated.messages import ClientUpdate, ServerState
from fedng.federated.round import client_step, server_init, server_step
from hypothesis import given, settings
from hypothesis import strategies as st

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def clients(k: int, shapes: dict[str, tuple[int, ...]], seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {n: torch.randn(s, generator=gen, dtype=F64) for n, s in shapes.items()} for _ in range(k)
    ]


ragged = st.builds(
    lambda k, dims, seed: (k, {f"p{i}": tuple(d) for i, d in enumerate(dims)}, seed),
    st.integers(1, 9),
    st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=3), min_size=1, max_size=3),
    st.integers(0, 2**16),
)


@settings(max_examples=15, deadline=None)
@given(ragged, st.floats(0.0, 0.49))
def test_trimmed_mean_matches_numpy(case: tuple[int, dict[str, Any], int], trim: float) -> None:
    k, shapes, seed = case
    xs = clients(k, shapes, seed)
    out = robust.trimmed_mean(xs, trim)
    b = min(math.floor(trim * k), (k - 1) // 2)
    for n in shapes:
        s = np.sort(np.stack([x[n].numpy() for x in xs]), axis=0)
        ref = torch.from_numpy(s[b : k - b].mean(axis=0))
        assert out[n].dtype == F64
        assert_close(out[n], ref, F64, "default")


@settings(max_examples=15, deadline=None)
@given(ragged)
def test_coordinate_median_matches_numpy(case: tuple[int, dict[str, Any], int]) -> None:
    k, shapes, seed = case
    xs = clients(k, shapes, seed)
    out = robust.coordinate_median(xs)
    for n in shapes:
        ref = torch.from_numpy(np.median(np.stack([x[n].numpy() for x in xs]), axis=0))
        assert_close(out[n], ref, F64, "default")


@settings(max_examples=15, deadline=None)
@given(ragged, st.floats(0.0, 0.49))
def test_winsorize_clamps_into_the_trimmed_range(
    case: tuple[int, dict[str, Any], int], trim: float
) -> None:
    k, shapes, seed = case
    xs = clients(k, shapes, seed)
    out = robust.winsorize(xs, trim)
    b = min(math.floor(trim * k), (k - 1) // 2)
    for n in shapes:
        s = np.sort(np.stack([x[n].numpy() for x in xs]), axis=0)
        ref = np.clip(np.stack([x[n].numpy() for x in xs]), s[b], s[k - 1 - b])
        got = torch.stack([o[n] for o in out]) if out[0][n].numel() else torch.from_numpy(ref)
        assert_close(got, torch.from_numpy(ref), F64, "default")


def test_median_winsorization_of_odd_k_is_the_median() -> None:
    xs = clients(5, {"w": (3, 4)}, 0)
    med = robust.coordinate_median(xs)["w"]
    for o in robust.winsorize(xs, 0.4999):
        assert torch.equal(o["w"], med)


def test_norm_clip_bounds_every_client_by_the_median() -> None:
    xs = clients(5, {"a": (6,), "b": (2, 3)}, 1)
    xs[3] = {k: 1e3 * v for k, v in xs[3].items()}
    norms = [robust.l2_norm(x) for x in xs]
    out, factors = robust.norm_clip(xs, ratio=1.5)
    bound = 1.5 * float(np.median(norms))
    for x, o, f, n in zip(xs, out, factors, norms, strict=True):
        assert robust.l2_norm(o) <= bound * (1 + 1e-12)
        assert f == pytest.approx(min(1.0, bound / n), rel=1e-12)
        for k in x:
            assert_close(o[k], f * x[k], F64, "default")


def test_trimmed_mean_ignores_a_minority_of_huge_values() -> None:
    xs = clients(10, {"w": (50,)}, 2)
    honest = robust.trimmed_mean(xs, 0.2)["w"]
    xs[0] = {"w": -1e6 * xs[0]["w"]}
    xs[1] = {"w": 1e6 * torch.ones(50, dtype=F64)}
    attacked = robust.trimmed_mean(xs, 0.2)["w"]
    honest_range = torch.stack([x["w"] for x in xs[2:]])
    assert bool((attacked <= honest_range.max(0).values).all())
    assert bool((attacked >= honest_range.min(0).values).all())
    assert float((attacked - honest).abs().max()) < 1.0


@pytest.mark.parametrize(
    "bad",
    [
        lambda: robust.trimmed_mean([], 0.1),
        lambda: robust.trimmed_mean([{"a": torch.zeros(2)}, {"a": torch.zeros(3)}], 0.1),
        lambda: robust.trimmed_mean([{"a": torch.zeros(2)}, {"b": torch.zeros(2)}], 0.1),
        lambda: robust.trimmed_mean([{"a": torch.zeros(2)}], 0.5),
        lambda: robust.norm_clip([{"a": torch.zeros(2)}], 0.0),
        lambda: robust.combine_factors([[torch.eye(2)]], "mean", 0.1),
        lambda: robust.combine_factors([[torch.eye(2)], [torch.eye(3)]], "median", 0.1),
        lambda: robust.clip_factor_scales([], 1.0),
    ],
)
def test_bad_input_raises_one_line_value_error(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"^\w+.*") as err:
        bad()
    assert "\n" not in str(err.value)


# --- curvature --------------------------------------------------------------------------------


def spd(n: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, 2 * n, generator=gen, dtype=F64)
    return x @ x.T / (2 * n) + 0.1 * torch.eye(n, dtype=F64)


def kron_clients(k: int, seed: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[spd(4, gen), spd(3, gen)] for _ in range(k)]


def kron(f: list[torch.Tensor]) -> torch.Tensor:
    return torch.kron(f[0], f[1])


@pytest.mark.parametrize("mode", ["trimmed-mean", "median"])
@settings(max_examples=12, deadline=None)
@given(st.integers(1, 8), st.floats(1e-6, 1e6), st.integers(0, 2**16))
def test_combined_curvature_cannot_be_gamed_by_rescaling_a_against_g(
    mode: str, k: int, c: float, seed: int
) -> None:
    """A * c with G / c leaves the combined A (x) G and both factors' scales unchanged."""
    cl = kron_clients(k, seed)
    ref = robust.combine_factors(cl, mode, 0.2)
    gamed = [list(f) for f in cl]
    gamed[0] = [gamed[0][0] * c, gamed[0][1] / c]
    out = robust.combine_factors(gamed, mode, 0.2)
    assert_close(kron(out), kron(ref), F64, op="orthonormal")
    scale_a = [float(torch.linalg.norm(f[0])) for f in cl]
    # The A scale is the round's median: rescaling one client moves it at most to a neighbour.
    assert (
        min(scale_a) * (1 - 1e-9) <= float(torch.linalg.norm(out[0])) <= max(scale_a) * (1 + 1e-9)
        or k <= 2
    )


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 8), st.floats(1e-6, 1e6), st.integers(0, 2**16))
def test_clipped_curvature_is_invariant_to_rescaling_a_against_g(
    k: int, c: float, seed: int
) -> None:
    cl = kron_clients(k, seed)
    gamed = [list(f) for f in cl]
    gamed[-1] = [gamed[-1][0] * c, gamed[-1][1] / c]
    ref = robust.clip_factor_scales(cl, 2.0)
    out = robust.clip_factor_scales(gamed, 2.0)
    for r, o in zip(ref, out, strict=True):
        assert_close(kron(o), kron(r), F64, op="orthonormal")
        # the split is canonical: every client's A has the round's median scale
        assert float(torch.linalg.norm(o[0])) == pytest.approx(
            float(np.median([float(torch.linalg.norm(f[0])) for f in gamed])), rel=1e-9
        )


def test_clipped_curvature_scale_is_bounded_by_the_median() -> None:
    cl = kron_clients(5, 3)
    cl[2] = [cl[2][0] * 1e4, cl[2][1] * 1e4]
    prods = [float(torch.linalg.norm(f[0]) * torch.linalg.norm(f[1])) for f in cl]
    out = robust.clip_factor_scales(cl, 1.0)
    for o, p in zip(out, prods, strict=True):
        got = float(torch.linalg.norm(o[0]) * torch.linalg.norm(o[1]))
        assert got == pytest.approx(min(p, float(np.median(prods))), rel=1e-9)


def test_combined_curvature_is_psd_and_ignores_an_outlier_direction() -> None:
    cl = kron_clients(7, 4)
    ref = robust.combine_factors(cl, "trimmed-mean", 0.2)
    bad = torch.zeros(4, 4, dtype=F64)
    bad[0, 0] = 1.0  # rank one: far from the others' directions
    cl[0] = [bad * 1e3, cl[0][1]]
    out = robust.combine_factors(cl, "trimmed-mean", 0.2)
    for f in out:
        assert float(torch.linalg.eigvalsh(f).min()) >= -1e-12
    rel = float(torch.linalg.norm(kron(out) - kron(ref)) / torch.linalg.norm(kron(ref)))
    assert rel < 0.3


# --- the stage in a server round ---------------------------------------------------------------


def make_round(
    algo: str, extra: dict[str, Any], n: int = 5
) -> tuple[ServerState[Any], list[ClientUpdate]]:
    task = blobs_task(num_clients=n, n=30)
    cc, sc = make_configs(algo, {"local_steps": 3, **extra})
    model = task.model_fn(0)
    state, msg = server_init(get_params(model), sc)
    ups = [ClientUpdate.from_bytes(client_step(model, c, msg, cc).to_bytes()) for c in task.clients]
    return state, ups


def test_stage_is_the_identity_without_robust_or_dp() -> None:
    state, ups = make_round("fedng", {})
    assert defend(state, ups) is ups


@pytest.mark.parametrize("mode", ["trimmed-mean", "median"])
def test_fedavg_with_a_robust_mode_steps_by_the_robust_delta(mode: str) -> None:
    state, ups = make_round("fedavg", {"robust": mode})
    new, _ = server_step(state, ups)
    clipped = robust.norm_clip([u.delta for u in ups], 1.0)[0]  # first bounded by the median
    want = robust.winsorize(clipped, 0.2 if mode == "trimmed-mean" else 0.4999)
    weights = [u.num_examples for u in ups]
    for k, v in state.params.items():
        mean = sum(w * d[k] for w, d in zip(weights, want, strict=True)) / sum(weights)
        assert torch.allclose(new.params[k], v + mean, atol=1e-6)


def test_median_mode_resists_a_sign_flipping_minority() -> None:
    state, ups = make_round("fedavg", {"robust": "median"})
    plain_state, _ = make_round("fedavg", {})
    clean, _ = server_step(plain_state, ups)
    for u in ups[:2]:
        u.delta = {k: -10 * v for k, v in u.delta.items()}
    plain, _ = server_step(plain_state, ups)
    robust_new, _ = server_step(state, ups)

    def dist(a: ServerState[Any]) -> float:
        return sum(float((a.params[k] - clean.params[k]).norm()) for k in a.params)

    assert dist(robust_new) < 0.5 * dist(plain)


def global_a_norm(state: ServerState[Any]) -> float:
    glob = global_set(state)
    assert glob is not None
    rep = glob.reps["kfac"]
    assert isinstance(rep, KFAC)
    return sum(float(torch.linalg.norm(a)) for a in rep.A)


@pytest.mark.parametrize("c", [30.0, 300.0, 3e4])
@pytest.mark.parametrize("mode", ["none", "norm-clip", "trimmed-mean", "median"])
def test_fedng_global_factors_are_not_moved_by_kron_rescaling(mode: str, c: float) -> None:
    """A x c, G / c: under validation's per-factor check (`max_norm_ratio**2` = 1e4 for these
    quadratic scales) it steers the plain sum (c = 30, 300); above it (c = 3e4) the plain server
    rejects it. The robust modes accept all (their check is scale-invariant: honest non-IID
    clients differ by over 100x in one factor) and keep the global A where the honest clients
    put it."""
    state, honest = make_round("fedng", {"robust": mode})
    ups = [ClientUpdate.from_bytes(u.to_bytes()) for u in honest]  # fresh: nothing cached
    ref, _ = server_step(state, honest)
    cs = decode(ups[0])
    assert cs is not None
    rep = cs.reps["kfac"]
    assert isinstance(rep, KFAC)
    rep.A = [a * c for a in rep.A]
    rep.G = [g / c for g in rep.G]
    ups[0].curvature, ups[0].meta["curv"] = cs.to_arrays(torch.float32)
    new, _ = server_step(state, ups)
    moved = global_a_norm(new) / global_a_norm(ref)
    if mode == "none" and c > 1e4:
        assert "/A = " in new.log["rejected"][ups[0].client_id][0]
        return
    assert new.log["rejected"] == {}
    if mode == "none":
        assert moved > 3
    else:
        assert 0.5 < moved < 1.5


def test_robust_fedng_recomputes_c_k_from_the_bounded_delta_and_curvature() -> None:
    from fedng.federated.aggregation.summable import CONTRIB_PREFIX, contribution

    state, ups = make_round("fedng", {"robust": "trimmed-mean", "robust_trim": 0.0})
    ups[0].extras = {k: 1e3 * v for k, v in ups[0].extras.items()}  # c_k unlike F_k delta_k
    out = defend(state, ups)
    for u in out:
        cs = decode(u)
        assert cs is not None
        want = contribution(cs, u.delta)
        got = {k[len(CONTRIB_PREFIX) :]: v for k, v in u.extras.items()}
        assert set(got) == set(want)
        for k in want:
            assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["trimmed-mean", "median"])
def test_robust_fedng_answers_the_line_search_itself(mode: str) -> None:
    state, ups = make_round("fedng", {"robust": mode}, n=5)
    ups[1].delta = {k: -10 * v for k, v in ups[1].delta.items()}
    new, _ = server_step(state, ups)
    assert new.log["distrusted"] == [1]  # the flipper is left out by reputation (screen)
    assert new.log["aggregation"] == "summable" and new.log["probe_answered"] == 4

    def garbage(probe: Any, ids: list[int]) -> list[ClientUpdate]:
        raise AssertionError("robust modes must not ask the clients")

    again, _ = server_step(state, ups, garbage)
    for k in new.params:
        assert torch.equal(again.params[k], new.params[k])
