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
from fedng.curvature import CurvatureSet
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
    n = torch.tensor([1.0 if uniform else float(u.num_examples) for u in updates], dtype=torch.float64)
    p = n / n.sum()
    out: dict[str, torch.Tensor] = {}
    for u, w in zip(updates, p, strict=True):
        _, arrays = payload_parts(u)
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


def test_kfac_round_sums_equal_plaintext_within_the_quantization_bound() -> None:
    strategy, grid = secure_run({})
    rep = strategy.reports[-1]
    log = strategy.state.log  # type: ignore[union-attr]
    assert rep.passes == 3 and log["aggregation"] == "summable" and log["probe_answered"] == NODES
    assert rep.clipped == 0.0 and rep.probe_clipped == 0.0
    assert sorted(log["accepted"]) == list(range(NODES))
    ups = sent_updates(grid)
    want = plain_means(ups)
    assert set(want) == {k for k in rep.sums if k != "ls"}
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
        p = cs.reps["diag"].diag[i].double().reshape(m.shape)
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
    plain = run_server(LocalGrid(make_client_app(lambda s: task), NODES, spec.to_run_config()), spec, task)
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
