"""FedNG's summable round under Flower's SecAgg+ (`fedng.flower.secure`), in process.

The real SecAgg+ protocol (flwr's `SecAggPlusWorkflow` and `secaggplus_mod`: key agreement,
Shamir shares, pairwise and private masks) runs over `LocalGrid`; the server sees only the
unmasked weighted means. Each test compares them with the plaintext quantities computed in
float64 from the updates the clients actually sent (kept in their `Context.state`), with the
tolerance the quantization step gives (`vector.error_bound`: `3 N / (Q A)` times the segment's
scale, plus the float32 rounding of the result), never a hand-picked number.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import pytest

pytest.importorskip("flwr", reason="needs the flower extra (Python >= 3.11)")

import numpy as np
import torch
from fedng.curvature import CurvatureSet, DiagonalFisher
from fedng.federated import FederatedTask, make_configs
from fedng.federated.aggregation.matvec import block_vectors
from fedng.federated.messages import ClientUpdate
from fedng.flower import RunSpec, make_client_app, run_server
from fedng.flower.client_app import SENT_RECORD
from fedng.flower.codec import record_bytes
from fedng.flower.secure import SecureFedNGStrategy, check_secure, make_secure_client_app
from fedng.flower.secure.server import run_secure
from fedng.flower.secure.vector import (
    BUCKETS,
    E_MIN,
    Template,
    error_bound,
    exponents,
    main_vector,
    payload_parts,
    range_vector,
    scales_from_histogram,
    unpack_mean,
)
from fedng.flower.testing import LocalGrid
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from hypothesis import given, settings
from hypothesis import strategies as st

NODES = 4
EPS32 = 2.0**-24


@cache
def digits() -> FederatedTask:
    from fedng.federated.tasks.registry import make_task

    return make_task("digits", num_clients=NODES, alpha=0.5, seed=0)


def spec_of(settings_: dict[str, Any]) -> RunSpec:
    return RunSpec(
        algorithm="fedng",
        rounds=1,
        seed=0,
        task="digits",
        task_args={"num_clients": NODES, "alpha": 0.5, "seed": 0},
        settings={"local_steps": 3, "lr": 0.05, **settings_},
    )


def secure_run(settings_: dict[str, Any], **grid_kw: Any) -> tuple[SecureFedNGStrategy, LocalGrid]:
    spec = spec_of(settings_)
    task = digits()
    grid = LocalGrid(make_secure_client_app(lambda s: task), NODES, spec.to_run_config(), **grid_kw)
    return run_secure(grid, spec, task), grid


def sent_updates(grid: LocalGrid) -> list[ClientUpdate]:
    """The update every node sent this round (its `Context.state`), in client-id order."""
    ups = [
        ClientUpdate.from_bytes(record_bytes(c.state.array_records[SENT_RECORD]))
        for c in grid.contexts.values()
    ]
    return sorted(ups, key=lambda u: u.client_id)


def plain_means(
    updates: list[ClientUpdate], uniform: bool = False, absolute: bool = False
) -> dict[str, torch.Tensor]:
    """The float64 weighted means of every summable part (the plaintext server's sums), or of
    their absolute values (what bounds the float32 rounding of those sums)."""
    n = torch.tensor(
        [1.0 if uniform else float(u.num_examples) for u in updates], dtype=torch.float64
    )
    p = n / n.sum()
    out: dict[str, torch.Tensor] = {}
    for u, w in zip(updates, p, strict=True):
        _, arrays = payload_parts(u, metrics=not uniform)
        for k, v in arrays.items():
            x = v.double().abs() if absolute else v.double()
            out[k] = out.get(k, torch.zeros(v.shape, dtype=torch.float64)) + w * x
    return out


def assert_within(
    got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor | float, what: str
) -> None:
    """|got - want| <= bound entrywise."""
    over = (got.double() - want.double()).abs() - bound
    assert float(over.max()) <= 0, f"{what}: the error exceeds its bound by {float(over.max()):.3g}"


@pytest.mark.parametrize(("curvature", "passes"), [("kfac", 3), ("lowrank", 4)])
def test_summable_round_sums_equal_plaintext_within_the_quantization_bound(
    curvature: str, passes: int
) -> None:
    """K-FAC: range, main, line search scaled by the PSD bound. Low-rank sketches: that bound
    does not hold for Nystrom approximations, so the answers get a range pass of their own."""
    strategy, grid = secure_run({"curvature": curvature})
    rep = strategy.reports[-1]
    log = strategy.state.log  # type: ignore[union-attr]
    assert rep.passes == passes and log["aggregation"] == "summable"
    assert log["probe_answered"] == NODES
    assert rep.clipped == 0.0 and rep.probe_clipped == 0.0
    assert sorted(log["accepted"]) == list(range(NODES))
    ups = sent_updates(grid)
    want = plain_means(ups)
    assert set(want) == {k for k in rep.sums if k != "ls"}
    assert "m/train_loss" in want  # the weighted mean training loss, summed securely
    assert strategy.history.rounds[-1].train_loss == rep.metrics["train_loss"]
    for k, v in want.items():
        assert_within(rep.sums[k], v, rep.bound[k], k)
    # the line search: every client's answer to the probe the server actually sent
    assert rep.probe is not None
    from fedng.federated.algorithms.registry import get_algorithm

    algo = get_algorithm("fedng")
    p = torch.tensor([u.num_examples for u in ups], dtype=torch.float64)
    p = p / p.sum()
    ls = sum(
        w * algo.answer_probe(u, rep.probe).extras["line_search"].double()
        for u, w in zip(ups, p, strict=True)
    )
    assert isinstance(ls, torch.Tensor)
    assert_within(rep.sums["ls"], ls, rep.bound["ls"], "line search")


def diag_merge(
    want: dict[str, torch.Tensor], bound: dict[str, torch.Tensor], meta: dict[str, Any], rel: float
) -> tuple[CurvatureSet, list[torch.Tensor], list[torch.Tensor]]:
    """Per diagonal block, the plaintext merge X = (S + lam M) / (P + lam), lam = rel mean(P),
    and a rigorous bound on |X' - X| when M, S, P move by at most their quantization bounds:
    |X' - X| <= (eS + lam eM + el |M| + el eM + |X| (eP + el)) / (P + lam - eP - el), el = rel eP.
    """
    cs = CurvatureSet.from_arrays({"diag": want["c/diag"].float()}, meta)
    mb = block_vectors(cs, {k[2:]: v.float() for k, v in want.items() if k.startswith("d/")})
    sb = block_vectors(cs, {k[3:]: v.float() for k, v in want.items() if k.startswith("fd/")})
    e_m = max(float(v.max()) for k, v in bound.items() if k.startswith("d/"))
    e_s = max(float(v.max()) for k, v in bound.items() if k.startswith("fd/"))
    e_p = float(bound["c/diag"].max())
    xs, errs = [], []
    for i, (m, s) in enumerate(zip(mb, sb, strict=True)):
        rep = cs.reps["diag"]
        assert isinstance(rep, DiagonalFisher)
        p = rep.diag[i].double().reshape(m.shape)
        m, s = m.double(), s.double()
        lam = rel * float(p.sum().clamp_min(0)) / p.numel()
        e_l = rel * e_p
        x = (s + lam * m) / (p + lam)
        num = e_s + lam * e_m + e_l * m.abs() + e_l * e_m + x.abs() * (e_p + e_l)
        errs.append(num / (p + lam - e_p - e_l))
        xs.append(x)
    return cs, xs, errs


def test_diag_round_model_equals_plaintext_within_the_propagated_bound() -> None:
    """Diagonal curvature: the summable step is the exact merge, elementwise; the secure model
    must be within the bound that the sums' quantization bounds give through that formula (plus
    the float32 rounding of theta + X), and no line-search pass is needed."""
    settings_ = {"curvature": "diag"}
    strategy, grid = secure_run(settings_)
    rep = strategy.reports[-1]
    assert rep.passes == 2 and strategy.state is not None
    spec = spec_of(settings_)
    task = digits()
    plain = run_server(
        LocalGrid(make_client_app(lambda s: task), NODES, spec.to_run_config()), spec, task
    )
    assert plain.state is not None and plain.state.log["aggregation"] == "summable"
    want = plain_means(sent_updates(grid))
    for k, v in want.items():
        assert_within(rep.sums[k], v, rep.bound[k], k)
    # both sides' sums may move: the secure ones by their bound, the plaintext ones by the
    # float32 rounding of N weighted folds
    mags = plain_means(sent_updates(grid), absolute=True)
    moved = {k: b + (NODES + 2) * EPS32 * mags[k] for k, b in rep.bound.items() if k in mags}
    rel = make_configs("fedng", spec.settings)[1].options.fisher_damping  # type: ignore[attr-defined]
    meta = sent_updates(grid)[0].meta["curv"]
    cs, xs, errs = diag_merge(want, moved, meta, rel)
    theta_s = block_vectors(cs, strategy.state.params)
    theta_p = block_vectors(cs, plain.state.params)
    for i, (a, b, x, e) in enumerate(zip(theta_s, theta_p, xs, errs, strict=True)):
        tol = e + 8 * EPS32 * (x.abs() + b.double().abs())
        gap = (a.double() - b.double()).abs()
        assert bool((gap <= tol).all()), f"block {i}: gap {float((gap - tol).max()):.3g} over"


def test_mean_round_model_equals_plaintext_within_the_quantization_bound() -> None:
    """aggregation="mean": theta_1 = theta_0 + M, and round 0's global curvature is the pooled
    one, so both differ from the plaintext run by at most the bound of M (resp. the curvature),
    plus the float32 rounding of the sum."""
    settings_ = {"aggregation": "mean"}
    strategy, grid = secure_run(settings_)
    mags = plain_means(sent_updates(grid), absolute=True)
    spec = spec_of(settings_)
    task = digits()
    plain = run_server(
        LocalGrid(make_client_app(lambda s: task), NODES, spec.to_run_config()), spec, task
    )
    rep = strategy.reports[-1]
    sec, ref = strategy.state, plain.state
    assert sec is not None and ref is not None
    assert rep.passes == 2  # no line search for the mean
    gamma = (NODES + 2) * EPS32  # float32 rounding of N weighted folds and the update
    for k, v in ref.params.items():
        tol = rep.bound[f"d/{k}"] + gamma * (v.double().abs() + mags[f"d/{k}"])
        assert_within(sec.params[k], v, tol, k)
    assert set(ref.buffers) == {"curv/kfac"}
    v = ref.buffers["curv/kfac"]
    tol = rep.bound["c/kfac"] + gamma * (v.double().abs() + mags["c/kfac"])
    assert_within(sec.buffers["curv/kfac"], v, tol, "global curvature")


def test_distributed_dp_composes_clients_noise_before_masking() -> None:
    """dp_mode="distributed": each client clips and adds its noise share before SecAgg+ masks
    it, with weight 1; the secure mean is the uniform mean of those private updates, and the
    line search is answered from the pooled (private) curvature: no third pass."""
    knobs = {
        "dp_clip": 0.05,
        "dp_curvature_clip": 1.0,
        "dp_noise_multiplier": 0.5,
        "dp_mode": "distributed",
        "dp_clients": NODES,
        "dp_seed": 5,
    }
    strategy, grid = secure_run(knobs)
    rep = strategy.reports[-1]
    assert rep.passes == 2 and strategy.state is not None
    assert strategy.state.log["aggregation"] == "summable"
    ups = sent_updates(grid)
    want = plain_means(ups, uniform=True)
    for k, v in want.items():
        assert_within(rep.sums[k], v, rep.bound[k], k)
    joint = sum(
        float((v.double() ** 2).sum()) for u in ups for v in {**u.delta, **u.extras}.values()
    )
    assert joint > 0 and all(torch.isfinite(v).all() for v in strategy.state.params.values())


@pytest.mark.parametrize(
    ("settings_", "needle"),
    [
        ({"robust": "median"}, "robust aggregation"),
        ({"aggregation": "fisher"}, "exact Fisher merge"),
        ({"curvature_check": "full"}, "curvature_check='full'"),
        ({"dp_clip": 0.1, "dp_noise_multiplier": 1.0}, "central DP"),
    ],
)
def test_configs_that_need_each_clients_payload_are_refused(
    settings_: dict[str, Any], needle: str
) -> None:
    client, server = make_configs("fedng", settings_)
    with pytest.raises(ValueError, match="secure aggregation: ") as err:
        check_secure(client, server)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_algorithms_that_aggregate_a_list_are_refused() -> None:
    client, server = make_configs("scaffold", {})
    with pytest.raises(ValueError, match="scaffold aggregates a list of updates"):
        check_secure(client, server)
    client, server = make_configs("fedavg", {})
    check_secure(client, server)  # a weighted sum: fine


def test_a_node_sending_a_malformed_masked_vector_fails_the_round_not_the_server() -> None:
    """SecAgg+ cannot attribute a masked vector of the wrong length to anyone: the round is
    skipped (model unchanged), and the server keeps running."""
    victim = {"done": False}

    def tamper(node: int, reply: Any) -> Any:
        if reply.has_content() and RECORD_KEY_CONFIGS in reply.content.config_records:
            cfg = reply.content.config_records[RECORD_KEY_CONFIGS]
            if Key.MASKED_PARAMETERS in cfg and not victim["done"]:
                victim["done"] = True
                arrs = list(cfg[Key.MASKED_PARAMETERS])
                short = np.zeros(3, dtype=np.int64)
                from flwr.common import ndarray_to_bytes

                cfg[Key.MASKED_PARAMETERS] = [*arrs[:-1], ndarray_to_bytes(short)]
        return reply

    strategy, _ = secure_run({}, on_reply=tamper)
    state = strategy.state
    assert state is not None and victim["done"]
    assert "SecAgg+ failed" in state.log["skipped"]
    assert state.log["accepted"] == []
    init = strategy.history.rounds[0]
    assert strategy.history.rounds[-1].metric == init.metric  # the model did not move


def test_a_client_lost_in_the_main_pass_is_unmasked_around() -> None:
    """SecAgg+'s dropout recovery: a node whose masked vector never arrives is left out, its
    pairwise masks removed from the shares of the others; the mean is the other three's."""
    seen: dict[int, int] = {}
    lost = {"node": -1}

    def drop(node: int, reply: Any) -> Any:
        cfg = reply.content.config_records.get(RECORD_KEY_CONFIGS) if reply.has_content() else None
        if cfg is not None and Key.MASKED_PARAMETERS in cfg:
            seen[node] = seen.get(node, 0) + 1
            if seen[node] == 2 and lost["node"] < 0:  # its main-pass vector
                lost["node"] = node
                return None
        return reply

    strategy, grid = secure_run({}, on_reply=drop)
    rep = strategy.reports[-1]
    state = strategy.state
    assert state is not None and lost["node"] > 0
    gone = grid.contexts[lost["node"]].node_config["partition-id"]
    assert sorted(state.log["accepted"]) == [c for c in range(NODES) if c != gone]
    ups = [u for u in sent_updates(grid) if u.client_id != gone]
    for k, v in plain_means(ups).items():
        assert_within(rep.sums[k], v, rep.bound[k], k)


# --- the fixed-point vector (no Flower) -------------------------------------------------------


magnitudes = st.lists(st.floats(-50, 30), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None)
@given(magnitudes, st.integers(0, 2**31 - 1))
def test_range_scales_cover_every_entry_so_nothing_is_clipped(exps: list[float], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    arrays = {f"d/p{i}": torch.randn(3, 2, generator=gen) * 2.0**e for i, e in enumerate(exps)}
    tpl = Template(tuple((k, (3, 2), (6,)) for k in arrays), None)
    hist = range_vector(tpl, arrays)
    assert hist.sum() == tpl.segments and hist.size == tpl.segments * BUCKETS
    scales = scales_from_histogram(hist, tpl.segments, 0.5)
    vec, clipped = main_vector(tpl, arrays, scales)
    assert clipped == 0 and vec[-1] == 0.0 and float(np.abs(vec).max()) <= 1.0
    back, frac = unpack_mean(tpl, vec, scales)
    assert frac == 0.0
    for k, v in arrays.items():  # one client: the mean is the vector itself (float32 round trip)
        assert torch.equal(back[k], v)


def test_entries_beyond_the_scale_are_clipped_and_counted() -> None:
    x = {"d/w": torch.tensor([0.5, -3.0, float("nan"), 1.0])}
    tpl = Template((("d/w", (4,), (4,)),), None)
    vec, clipped = main_vector(tpl, x, [1.0])
    assert clipped == 2 and vec[-1] == 0.5
    assert vec[:-1].tolist() == [0.5, -1.0, 0.0, 1.0]
    assert exponents(tpl, {"d/w": torch.zeros(4)}).tolist() == [E_MIN]
    with pytest.raises(ValueError, match="1 positive scales expected"):
        main_vector(tpl, x, [0.0])


def test_kfac_payloads_get_one_scale_per_factor() -> None:
    """A and G triangles of each K-FAC block are segments of their own (their magnitudes differ
    by orders), and the template travels as JSON."""
    _, grid = secure_run({})
    tpl, _ = payload_parts(sent_updates(grid)[0])
    segs = dict((n, s) for n, _, s in tpl.parts)["c/kfac"]
    assert len(segs) == 2 * 2  # two Linear layers, A and G each
    assert Template.from_json(tpl.to_json()) == tpl
    with pytest.raises(ValueError, match="secure template"):
        Template.from_json('{"parts": [["d/w", [2, 2], [3]]], "curv_meta": null}')
    with pytest.raises(ValueError, match="secure template"):
        Template.from_json("[1, 2]")


def test_error_bound_is_the_stated_formula() -> None:
    assert error_bound(4, 2**29, 2.0) == pytest.approx(3 * 4 / (2**29 * 2.0) + 2.0**-24)
    assert math.isfinite(error_bound(1, 1, 1.0))


def test_the_docs_secure_example_runs(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/federated.md's SecAgg+ snippet, after the Flower example it builds on (one round)."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "federated.md").read_text()

    def block(after: str) -> str:
        match = re.search(r"```python\n(.*?)```", doc.split(after, 1)[1], re.DOTALL)
        assert match is not None
        return match.group(1)

    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {"__name__": "__main__"}
    for title in ("## A complete example", "### Your CNN and Dataset on Flower"):
        code = block(title).replace("rounds=10", "rounds=1")
        if title.startswith("###"):  # only its definitions: the secure run replaces its run
            code = code.split("strategy = run_server")[0]
        else:
            code = code.split("hist = simulate")[0]
        exec(compile(code, "federated.md", "exec"), scope)
    exec(compile(block("### Secure aggregation (SecAgg+)"), "federated.md", "exec"), scope)
    strategy = scope["strategy"]
    assert isinstance(strategy, SecureFedNGStrategy)
    assert strategy.reports[-1].clipped == 0.0 and strategy.reports[-1].passes == 3


def test_partial_participation_checkpoint_and_resume(tmp_path: Any) -> None:
    """3 of 4 clients per round (the simulator's sampling), checkpointed after each round; a
    second run resumes after round 1 and adds round 2."""
    task = digits()
    base = spec_of({})
    first = RunSpec(**{**base.__dict__, "participation": 0.75, "checkpoint_dir": str(tmp_path)})
    app = make_secure_client_app(lambda s: task)
    one = run_secure(LocalGrid(app, NODES, first.to_run_config()), first, task)
    assert len(one.history.rounds[-1].participants) == 3 and one.reports[-1].passes == 3
    assert (tmp_path / "model.pt").exists()
    again = RunSpec(**{**first.__dict__, "rounds": 2, "resume": True})
    two = run_secure(LocalGrid(app, NODES, again.to_run_config()), again, task)
    assert two.state is not None and two.state.round == 2
    assert [r.round for r in two.history.rounds] == [0, 1, 2] and len(two.reports) == 1
    assert two.history.rounds[1].metric == one.history.rounds[1].metric
