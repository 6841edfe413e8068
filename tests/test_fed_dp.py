"""Client-level differential privacy: clipping, noise, accounting (dp-accounting), and the DP
stage of a round (`aggregation.dp`, `aggregation.stage`, `client.privacy`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from _fed import blobs_task
from fedng.federated.aggregation import dp
from fedng.federated.aggregation.stage import decode
from fedng.federated.aggregation.summable import CONTRIB_PREFIX
from fedng.federated.algorithms.registry import get_algorithm
from fedng.federated.client import get_params
from fedng.federated.config import ServerConfig, make_configs
from fedng.federated.messages import ClientUpdate, ServerState
from fedng.federated.round import client_step, server_init, server_step
from fedng.federated.validate import validate_updates
from hypothesis import given, settings
from hypothesis import strategies as st

dp_accounting = pytest.importorskip("dp_accounting")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@settings(max_examples=10, deadline=None)
@given(st.floats(1e-3, 1e3), st.floats(1e-3, 1e3), st.integers(0, 2**16))
def test_clip_l2_bounds_the_joint_norm_and_keeps_direction(
    scale: float, bound: float, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = {"a": scale * torch.randn(7, generator=gen, dtype=torch.float64), "b": torch.zeros(2, 3)}
    out, f = dp.clip_l2(x, bound)
    norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in out.values()))
    assert norm <= bound * (1 + 1e-12)
    n0 = float(torch.linalg.norm(x["a"]))
    assert f == pytest.approx(min(1.0, bound / n0), rel=1e-12)
    assert torch.allclose(out["a"], f * x["a"], rtol=1e-14, atol=0)
    assert out["b"].dtype == torch.float32


def test_clip_l2_zeroes_a_non_finite_vector_and_rejects_a_bad_bound() -> None:
    out, f = dp.clip_l2({"a": torch.tensor([math.inf, 1.0])}, 1.0)
    assert f == 0.0 and bool((out["a"] == 0).all())
    with pytest.raises(ValueError, match="'bound' must be > 0"):
        dp.clip_l2({"a": torch.ones(2)}, 0.0)


def test_noise_has_the_requested_std_and_is_reproducible_by_seed() -> None:
    x = {"w": torch.zeros(200_000)}
    out = dp.add_noise(x, 0.7, dp.noise_generator(3, 1, 2))["w"]
    assert float(out.std()) == pytest.approx(0.7, rel=0.01)
    again = dp.add_noise(x, 0.7, dp.noise_generator(3, 1, 2))["w"]
    other = dp.add_noise(x, 0.7, dp.noise_generator(3, 1, 3))["w"]
    assert torch.equal(out, again) and not torch.equal(out, other)
    fresh = dp.add_noise(x, 0.7, dp.noise_generator(-1))["w"]
    assert not torch.equal(fresh, dp.add_noise(x, 0.7, dp.noise_generator(-1))["w"])


def test_noise_std_splits_across_clients() -> None:
    z, c = 1.3, 0.5
    central = dp.noise_std(z, c, fraction=0.5)
    share = dp.noise_std(z, c, fraction=0.5, share=16)
    assert central == pytest.approx(z * math.sqrt(2) * c)
    assert 16 * share**2 == pytest.approx(central**2)  # the shares' sum has the central variance


def test_epsilon_matches_dp_accounting_directly() -> None:
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(2.0), 20))
    assert dp.epsilon_spent(2.0, 1e-5, 20) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    acc = dp_accounting.rdp.RdpAccountant()
    ev = dp_accounting.PoissonSampledDpEvent(0.25, dp_accounting.GaussianDpEvent(1.5))
    acc.compose(dp_accounting.SelfComposedDpEvent(ev, 30))
    assert dp.epsilon_spent(1.5, 1e-5, 30, 0.25) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    assert dp.epsilon_spent(0.0, 1e-5, 3) == math.inf


@pytest.mark.parametrize(("eps", "rounds", "q"), [(1.0, 20, 1.0), (8.0, 10, 1.0)])
def test_calibrated_noise_spends_at_most_the_target(eps: float, rounds: int, q: float) -> None:
    z = dp.noise_multiplier_for(eps, 1e-5, rounds, q)
    spent = dp.epsilon_spent(z, 1e-5, rounds, q)
    assert spent <= eps * (1 + 1e-6)
    assert spent > 0.99 * eps  # not needlessly noisy
    assert dp.epsilon_spent(0.98 * z, 1e-5, rounds, q) > eps


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0.0, 1e-5, 10), "'epsilon' must be > 0"),
        ((1.0, 0.0, 10), "'delta' must be in"),
        ((1.0, 1e-5, 0), "'rounds' must be an int >= 1"),
        ((1.0, 1e-5, 10, 1.5), "'sampling_rate' must be in"),
    ],
)
def test_calibration_rejects_bad_input(args: tuple[Any, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dp.noise_multiplier_for(*args)


@pytest.mark.parametrize(
    ("knobs", "match"),
    [
        ({"dp_clip": -1.0}, "'dp_clip' must be >= 0"),
        ({"dp_mode": "local"}, "'dp_mode' must be one of"),
        ({"dp_clients": 0}, "'dp_clients' must be an int >= 1"),
        ({"dp_clip_scope": "rows"}, "'dp_clip_scope' must be one of"),
        ({"dp_clip": 1.0, "robust": "median"}, "'robust' must be 'none' under differential"),
        ({"robust": "mean"}, "'robust' must be one of"),
        ({"robust_trim": 0.5}, "'robust_trim' must be in"),
        ({"dp_clip": 1.0, "dp_metric": "curvature"}, "'dp_metric' must be 'none' without a"),
    ],
)
def test_server_config_rejects_bad_dp_and_robust_knobs(knobs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ServerConfig(**knobs)


# --- a DP round ---------------------------------------------------------------------------------


def dp_round(
    algo: str, knobs: dict[str, Any], n: int = 4
) -> tuple[ServerState[Any], list[ClientUpdate], list[ClientUpdate]]:
    """The initial state, the raw (non-private) updates and the privatized ones of round 0."""
    task = blobs_task(num_clients=n, n=30)
    # FedNG's c_k travels in fp32 under DP (bf16 otherwise): the raw updates match that
    fp32 = {"contrib_dtype": "fp32"} if algo == "fedng" else {}
    plain_cc, _ = make_configs(algo, {"local_steps": 3, **fp32})
    cc, sc = make_configs(algo, {"local_steps": 3, "dp_clients": n, "dp_seed": 5, **knobs})
    model = task.model_fn(0)
    state, msg = server_init(get_params(model), sc)
    raw = [client_step(model, c, msg, plain_cc) for c in task.clients]
    private = [
        ClientUpdate.from_bytes(client_step(model, c, msg, cc).to_bytes()) for c in task.clients
    ]
    return state, raw, private


def norm(x: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in x.values()))


def test_client_clips_its_delta_and_drops_curvature_without_a_curvature_clip() -> None:
    state, raw, private = dp_round("fedng", {"dp_clip": 0.05})
    for r, p in zip(raw, private, strict=True):
        # without a curvature release c_k = F_k delta_k stays home too: the delta gets the clip
        assert any(k.startswith(CONTRIB_PREFIX) for k in r.extras) and not p.extras
        assert norm(p.delta) <= 0.05 * (1 + 1e-5)
        f = min(1.0, 0.05 / norm(r.delta))
        for k in r.delta:
            assert torch.allclose(p.delta[k], f * r.delta[k], atol=1e-7)
        assert r.curvature and not p.curvature and "curv" not in p.meta
    new, _ = server_step(state, private)  # the server expects no c_k then
    assert new.log["rejected"] == {} and new.log["aggregation"] == "mean"


def test_fedng_keeps_c_k_beside_a_released_curvature() -> None:
    _, raw, private = dp_round("fedng", {"dp_clip": 0.05, "dp_curvature_clip": 1.0})
    for r, p in zip(raw, private, strict=True):
        assert set(p.extras) == set(r.extras) and p.curvature
        assert norm({**p.delta, **p.extras}) <= 0.05 * (1 + 1e-5)


@settings(max_examples=10, deadline=None)
@given(st.floats(1e-3, 1e3), st.floats(1e-2, 1e2), st.integers(0, 2**16))
def test_layer_clip_bounds_each_layer_by_its_share(scale: float, bound: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = {
        "0.weight": scale * torch.randn(6, 5, generator=gen, dtype=torch.float64),
        "0.bias": torch.randn(6, generator=gen, dtype=torch.float64),
        "2.weight": 1e-3 * torch.randn(3, 6, generator=gen, dtype=torch.float64),
        "e/c": torch.randn(2, generator=gen, dtype=torch.float64),
    }
    out = dp.clip_update(x, bound, "layer")
    assert norm(out) <= bound * (1 + 1e-12)  # the joint sensitivity is the joint clip's
    total = sum(v.numel() for v in x.values())
    for layer in (["0.weight", "0.bias"], ["2.weight"], ["e/c"]):
        share = bound * math.sqrt(sum(x[k].numel() for k in layer) / total)
        sub = {k: x[k] for k in layer}
        want, _ = dp.clip_l2(sub, share)
        for k in layer:
            assert torch.allclose(out[k], want[k], rtol=1e-14, atol=0)
    assert dp.clip_update(x, bound, "joint")["0.bias"].equal(dp.clip_l2(x, bound)[0]["0.bias"])
    with pytest.raises(ValueError, match="'scope' must be one of"):
        dp.clip_update(x, bound, "rows")


def test_central_layer_clip_round_is_the_layer_clipped_mean() -> None:
    c, n = 0.05, 4
    knobs = {"dp_clip": c, "dp_noise_multiplier": 0.0, "dp_clip_scope": "layer"}
    state, raw, private = dp_round("fedavg", knobs)
    new, _ = server_step(state, private)
    for k, v in state.params.items():
        mean = sum(dp.clip_update(r.delta, c, "layer")[k] for r in raw) / n
        assert torch.allclose(new.params[k], v + mean, atol=1e-6)


def test_central_dp_round_is_the_clipped_mean_plus_calibrated_noise() -> None:
    c, z, n = 0.05, 0.0, 4
    state, raw, private = dp_round("fedavg", {"dp_clip": c, "dp_noise_multiplier": z})
    new, _ = server_step(state, private)
    for k, v in state.params.items():
        mean = sum(dp.clip_l2(r.delta, c)[0][k] for r in raw) / n
        assert torch.allclose(new.params[k], v + mean, atol=1e-6)
    # with noise: the step's deviation from the clipped mean has std z * C / n per coordinate
    z = 3.0
    state, raw, private = dp_round("fedavg", {"dp_clip": c, "dp_noise_multiplier": z})
    new, _ = server_step(state, private)
    dev = torch.cat(
        [
            (new.params[k] - v - sum(dp.clip_l2(r.delta, c)[0][k] for r in raw) / n).reshape(-1)
            for k, v in state.params.items()
        ]
    )
    assert float(dev.std()) == pytest.approx(z * c / n, rel=0.3)  # 59 coordinates


def test_distributed_noise_sums_to_the_central_noise_level() -> None:
    c, z, n = 0.05, 3.0, 4
    knobs = {"dp_clip": c, "dp_noise_multiplier": z, "dp_mode": "distributed"}
    state, raw, private = dp_round("fedavg", knobs)
    for r, p in zip(raw, private, strict=True):
        clipped = dp.clip_l2(r.delta, c)[0]
        dev = torch.cat([(p.delta[k] - clipped[k]).reshape(-1) for k in r.delta])
        assert float(dev.std()) == pytest.approx(z * c / math.sqrt(n), rel=0.3)
    new, _ = server_step(state, private)
    for k, v in state.params.items():
        assert torch.allclose(new.params[k], v + sum(p.delta[k] for p in private) / n, atol=1e-6)


def test_fedng_shares_clipped_noised_psd_curvature_under_dp() -> None:
    knobs = {"dp_clip": 0.05, "dp_curvature_clip": 1.0, "dp_noise_multiplier": 0.5}
    state, _, private = dp_round("fedng", knobs)
    for p in private:
        assert norm(p.curvature) <= 1.0 * (1 + 1e-5)
    new, _ = server_step(state, private)
    assert new.log["rejected"] == {}
    glob = {k[5:]: v for k, v in new.buffers.items() if k.startswith("curv/")}
    assert glob
    from fedng.curvature import KFAC, CurvatureSet

    cs = CurvatureSet.from_arrays(glob, new.meta["curv"])
    rep = cs.reps["kfac"]
    assert isinstance(rep, KFAC)
    for f in [*rep.A, *rep.G]:
        m = f if f.dim() == 2 else torch.diag(f)
        assert float(torch.linalg.eigvalsh(m.double()).min()) >= -1e-5 * float(m.abs().max())
    assert decode(private[0]) is not None


def test_distributed_dp_releases_no_metrics_and_no_dataset_size() -> None:
    knobs = {"dp_clip": 0.05, "dp_noise_multiplier": 1.0, "dp_mode": "distributed"}
    _, raw, private = dp_round("fedavg", knobs)
    assert any(r.metrics for r in raw) and any(r.num_examples > 1 for r in raw)
    assert all(p.metrics == {} and p.num_examples == 1 for p in private)
    _, raw, central = dp_round("fedavg", {**knobs, "dp_mode": "central"})
    assert [c.num_examples for c in central] == [r.num_examples for r in raw]


def test_cli_dp_gives_fedng_absolute_damping_in_sgd_units_unless_the_user_set_damping() -> None:
    from fedng.cli import DP_FEDNG, dp_overrides

    off = {"server_decay": 0.0}  # and no server-step decay under DP unless the user set one
    assert dp_overrides(["fedng", "fedavg"], {}) == {"fedng": {**DP_FEDNG, **off}}
    assert dp_overrides(["fedavg"], {}) == {}
    mine = {"fedng": {"lr": 0.1}}
    assert dp_overrides(["fedng"], mine) == {"fedng": {**DP_FEDNG, **off, "lr": 0.1}}
    assert mine == {"fedng": {"lr": 0.1}}  # not mutated
    relative = {"fedng": {"damping_scale": "relative"}}  # the preset needs absolute damping
    assert dp_overrides(["fedng"], relative) == {"fedng": {**off, "damping_scale": "relative"}}
    lam = {"*": {"damping": 0.5}}  # λ alone: the preset with the user's λ
    rest = {k: v for k, v in DP_FEDNG.items() if k != "damping"}
    assert dp_overrides(["fedng"], lam) == {**lam, "fedng": {**rest, **off}}
    decayed = {"fedng": {"server_decay": 0.3}}
    assert dp_overrides(["fedng"], decayed) == {"fedng": {**DP_FEDNG, "server_decay": 0.3}}
    clipped = {"*": {"kl_clip": 1e-3}}  # a preset key the user set (for every algorithm) wins
    out = dp_overrides(["fedng"], clipped)
    assert out["fedng"] == {**{k: v for k, v in DP_FEDNG.items() if k != "kl_clip"}, **off}
    from fedng.cli import _configs

    got = _configs(["fedng"], {"lr": 0.1}, out)["fedng"][1].options  # the CLI's own merge
    assert (got.kl_clip, got.lr_units, got.damping) == (1e-3, "sgd", 10.0)  # type: ignore[attr-defined]
    _, sc = make_configs("fedng", dp_overrides(["fedng"], {})["fedng"])
    opts = sc.options
    assert (opts.damping_scale, opts.damping) == ("absolute", 10.0)  # type: ignore[attr-defined]
    assert (opts.lr_units, opts.kl_clip) == ("sgd", 0.0)  # type: ignore[attr-defined]
    assert opts.server_decay == 0.0  # type: ignore[attr-defined]


def test_cli_dp_metric_fills_the_rest_of_the_metric_preset() -> None:
    from fedng.cli import DP_METRIC_FEDNG, dp_overrides

    out = dp_overrides(["fedng"], {"fedng": {"dp_metric": "curvature", "lr": 0.1}})
    assert out["fedng"] == {**DP_METRIC_FEDNG, "lr": 0.1}
    out = dp_overrides(["fedng"], {"*": {"dp_metric": "curvature", "damping": 1.0}})
    assert "damping" not in out["fedng"] and out["fedng"]["dp_curvature_release"] == "input"
    cc, sc = make_configs("fedng", out["fedng"] | out["*"])
    assert sc.dp_metric == "curvature" and cc.options.damping == 1.0  # type: ignore[attr-defined]


def test_dp_server_clips_an_oversized_update_instead_of_rejecting_it_against_the_round() -> None:
    # A rejection relative to the round's median would depend on the other clients' data (not
    # counted by the accountant): under DP the server's own clip bounds the update instead.
    c, n = 0.05, 4
    state, _, private = dp_round("fedavg", {"dp_clip": c, "dp_noise_multiplier": 0.0})
    big = {k: v * 1e4 for k, v in private[0].delta.items()}
    private[0] = dataclasses.replace(private[0], delta=big)
    accepted, rejected = validate_updates(state, private, get_algorithm("fedavg"))
    assert rejected == {} and len(accepted) == n
    new, _ = server_step(state, private)
    for k, v in state.params.items():
        mean = sum(dp.clip_l2(p.delta, c)[0][k] for p in private) / n
        assert torch.allclose(new.params[k], v + mean, atol=1e-6)
    # without DP the same payload is rejected against the round's median
    plain = dataclasses.replace(state, config=dataclasses.replace(state.config, dp_clip=0.0))
    _, rejected = validate_updates(plain, private, get_algorithm("fedavg"))
    assert list(rejected) == [private[0].client_id]
