"""The server's running mean of the noised "input" curvature releases
(`ServerConfig.dp_curvature_pool="mean"`, `aggregation.stage.pooled_release`): post-processing
only, so the deltas, their noise and the accounting are those of the per-round release."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fedng.curvature import KFAC, CurvatureSet
from fedng.curvature.layout import BlockLayout
from fedng.federated.aggregation import dp_metric, stage
from fedng.federated.config import ServerConfig, make_configs
from fedng.federated.messages import ClientUpdate
from fedng.federated.round import server_init

pytest.importorskip("dp_accounting")

LAYOUTS = [
    BlockLayout("0", "kron", 3, 5, "0.weight", "0.bias", None, None, False),
    BlockLayout("1", "kron", 2, 4, "1.weight", "1.bias", None, None, False),
]
"""Two dense layers: 4 -> 3 (block [3, 5], bias folded in) and 3 -> 2 (block [2, 4])."""
SHAPES = {"0.weight": (3, 4), "0.bias": (3,), "1.weight": (2, 3), "1.bias": (2,)}


def _state(**knobs: Any) -> Any:
    params = {k: torch.zeros(s) for k, s in SHAPES.items()}
    return server_init(params, ServerConfig(**knobs))[0]


def _release(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A client's "input" release over `LAYOUTS` (float32 payload and its layout)."""
    gen = torch.Generator().manual_seed(seed)
    cs = CurvatureSet.empty(LAYOUTS, ["kfac", "kfac"], dtype=torch.float64)
    rep = cs.reps["kfac"]
    assert isinstance(rep, KFAC)
    for i, lay in enumerate(LAYOUTS):
        xa = torch.randn(lay.n, lay.n, generator=gen, dtype=torch.float64)
        rep.A[i] = xa @ xa.T + 0.1 * torch.eye(lay.n, dtype=torch.float64)
        rep.G[i] = torch.eye(lay.m, dtype=torch.float64)
    dp_metric.input_shapes(cs)
    return cs.to_arrays(torch.float32)


def _updates(rnd: int, k: int = 3) -> list[ClientUpdate]:
    out = []
    for i in range(k):
        gen = torch.Generator().manual_seed(100 * rnd + i)
        delta = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
        arrays, meta = _release(100 * rnd + i)
        out.append(ClientUpdate(str(i), rnd, delta, 1, curvature=arrays, meta={"curv": meta}))
    return out


DP = {
    "dp_clip": 0.5,
    "dp_curvature_clip": 1.5,
    "dp_noise_multiplier": 0.7,
    "dp_clients": 3,
    "dp_seed": 3,
    "dp_curvature_release": "input",
    "dp_curvature_share": 0.2,
    "dp_curvature_rank": 1,
}


def test_pooled_release_is_the_running_mean_of_the_releases_in_float64() -> None:
    state = _state()
    gen = torch.Generator().manual_seed(0)
    raws = [{"a": torch.randn(7, generator=gen), "b": torch.randn(2, 3, generator=gen)}]
    raws += [{k: torch.randn(v.shape, generator=gen) for k, v in raws[0].items()} for _ in range(3)]
    for t, raw in enumerate(raws, start=1):
        out = stage.pooled_release(state, raw)
        assert state.meta[stage.POOL_COUNT] == t
        for k in raw:
            ref = torch.stack([r[k].double() for r in raws[:t]]).mean(0)
            torch.testing.assert_close(out[k].double(), ref, rtol=0, atol=1e-6)
        out["a"].zero_()  # the caller's copy: the pool keeps its own
        assert float(state.buffers[f"{stage.POOL_PREFIX}a"].abs().sum()) > 0
    # a release of another shape (the model changed) restarts the pool
    fresh = {"a": torch.ones(5)}
    assert torch.equal(stage.pooled_release(state, fresh)["a"], fresh["a"])
    assert state.meta[stage.POOL_COUNT] == 1
    assert not any(k.endswith("/b") for k in state.buffers)


def test_pooling_is_post_processing_the_deltas_and_noise_do_not_change() -> None:
    """Per round, "mean" and "round" give bit-identical deltas (same clip, same noise draw: the
    mechanism and its accounting are unchanged); "mean"'s curvature in round 1 is the
    post-processing of the mean of round 0's and round 1's noised releases."""
    per_round, pooled = _state(**DP), _state(**DP, dp_curvature_pool="mean")
    raws: list[dict[str, torch.Tensor]] = []

    def keep(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raws.append({k: v.clone() for k, v in raw.items()})
        return raw

    for rnd in (0, 1):
        per_round.round = pooled.round = rnd
        ups = _updates(rnd)
        a = stage.defend(per_round, ups)
        b = stage.defend(pooled, ups)
        stage._private(per_round.config, rnd, ups, None, keep)  # this round's raw release
        for x, y in zip(a, b, strict=True):
            for k in x.delta:
                assert torch.equal(x.delta[k], y.delta[k])
    assert pooled.meta[stage.POOL_COUNT] == 2
    meta = ups[0].meta["curv"]
    ref = CurvatureSet.from_arrays({k: (raws[0][k] + raws[1][k]) / 2 for k in raws[0]}, meta)
    stage.psd_project(ref)
    dp_metric.public_input_curvature(ref, DP["dp_curvature_rank"])
    got = CurvatureSet.from_arrays(b[0].curvature, b[0].meta["curv"])
    for x, y in zip(
        got.to_arrays(torch.float32)[0].values(),
        ref.to_arrays(torch.float32)[0].values(),
        strict=True,
    ):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    single = CurvatureSet.from_arrays(a[1].curvature, a[1].meta["curv"])  # "round": r1 only
    assert any(
        not torch.allclose(x, y, atol=1e-4)
        for x, y in zip(
            single.to_arrays(torch.float32)[0].values(),
            got.to_arrays(torch.float32)[0].values(),
            strict=True,
        )
    )


def test_pool_mean_needs_the_input_release_to_act() -> None:
    # under "full" the release is post-processed as before: no pool is kept
    state = _state(**{**DP, "dp_curvature_release": "full"}, dp_curvature_pool="mean")
    stage.defend(state, _updates(0))
    assert stage.POOL_COUNT not in state.meta


@pytest.mark.parametrize("value", ["ema", "", 1])
def test_configs_reject_a_bad_pool_in_one_line(value: Any) -> None:
    for build in (
        lambda: ServerConfig(dp_curvature_pool=value),
        lambda: make_configs("fedng", {"dp_curvature_pool": value}),
    ):
        with pytest.raises(ValueError, match="dp_curvature_pool") as err:
            build()
        assert "\n" not in str(err.value)
