"""Every payload is validated on arrival; a bad one is rejected with a reason, the round goes on,
and the server state is never corrupted."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import pytest
import torch
from _fed import blobs_task, fed_round, replay
from _tols import tol
from fedng.federated.algorithms.curvature_payload import (
    attach_curvature,
    decoded_curvature,
    update_scales,
)
from fedng.federated.algorithms.registry import get_algorithm
from fedng.federated.client import get_params
from fedng.federated.config import make_configs
from fedng.federated.messages import ClientUpdate
from fedng.federated.round import client_step, server_init, server_step
from fedng.federated.simulator import simulate
from fedng.federated.validate import (
    PEAK_GROWTH,
    PEAK_KEY,
    PEAK_QUORUM,
    REFERENCE_KEY,
    curvature_floor,
    validate_updates,
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _round(algo: str, extra: dict | None = None, n: int = 5):  # type: ignore[no-untyped-def]
    task = blobs_task(num_clients=n, n=30)
    cc, sc = make_configs(algo, {"local_steps": 3, **(extra or {})})
    model = task.model_fn(0)
    state, msg = server_init(get_params(model), sc)
    ups = [ClientUpdate.from_bytes(client_step(model, c, msg, cc).to_bytes()) for c in task.clients]
    return state, ups


def _nan_delta(u: ClientUpdate) -> None:
    k = next(iter(u.delta))
    u.delta[k] = u.delta[k].clone()
    u.delta[k].view(-1)[0] = float("nan")


def _wrong_shape(u: ClientUpdate) -> None:
    k = next(iter(u.delta))
    u.delta[k] = torch.zeros(3)


def _missing(u: ClientUpdate) -> None:
    u.delta.pop(next(iter(u.delta)))


def _huge(u: ClientUpdate) -> None:
    u.delta = {k: v * 1e4 for k, v in u.delta.items()}


def _stale(u: ClientUpdate) -> None:
    u.round = 7


def _no_examples(u: ClientUpdate) -> None:
    u.num_examples = 0


CORRUPTIONS: dict[str, tuple[Callable[[ClientUpdate], None], str]] = {
    "nan": (_nan_delta, "NaN"),
    "shape": (_wrong_shape, "shape"),
    "missing": (_missing, "missing"),
    "norm": (_huge, "reference"),
    "stale": (_stale, "round"),
    "examples": (_no_examples, "num_examples"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_bad_delta_rejected_round_continues(name: str) -> None:
    state, ups = _round("fedavg")
    before = {k: v.clone() for k, v in state.params.items()}
    fn, word = CORRUPTIONS[name]
    fn(ups[1])
    new, _ = server_step(state, ups)
    assert list(new.log["rejected"]) == [1]
    assert word in " ".join(new.log["rejected"][1])
    assert new.log["accepted"] == [0, 2, 3, 4]
    assert all(torch.isfinite(v).all() for v in new.params.values())
    assert any(not torch.equal(new.params[k], before[k]) for k in before)
    for k in before:  # the input state is never modified
        assert torch.equal(state.params[k], before[k])


def _offdiag(g: torch.Tensor) -> torch.Tensor:
    """A symmetric off-diagonal pair large enough to make g indefinite (the wire keeps only the
    lower triangle, so an asymmetric attack cannot even be expressed)."""
    e = torch.zeros_like(g)
    e[1, 0] = e[0, 1] = 10 * float(g.abs().max())
    return e


def _curv(u: ClientUpdate, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    cs = decoded_curvature(u)
    rep = cs.reps["kfac"]
    rep.G[0] = fn(rep.G[0])
    attach_curvature(u, cs, "fp32")
    delattr(u, "_fedng_curvature")


@pytest.mark.parametrize(
    "fn,word",
    [
        (lambda g: -g, "positive semi-definite"),
        (lambda g: g + _offdiag(g), "positive semi-definite"),
        (lambda g: g * float("inf"), "NaN/Inf"),
        (lambda g: g * 1e25, "overflow"),
        (lambda g: g * 1e6, "reference"),
    ],
)
def test_bad_curvature_rejected(fn: Callable[[torch.Tensor], torch.Tensor], word: str) -> None:
    state, ups = _round(
        "fedng", {"aggregation": "fisher", "precond": "global", "broadcast": "inverse"}
    )
    _curv(ups[2], fn)
    new, msg = server_step(state, ups)
    assert list(new.log["rejected"]) == [2], new.log
    assert word in " ".join(new.log["rejected"][2])
    assert new.log["aggregation"] == "fisher"
    assert all(torch.isfinite(v).all() for v in {**new.params, **new.buffers}.values())
    assert any(k.startswith("inv/") for k in msg.extras)


def test_corrupt_layout_and_dtype_rejected() -> None:
    state, ups = _round("fedng")
    ups[0].meta["curv"]["layouts"][0][2] = 999
    ups[1].curvature = {k: v.double() for k, v in ups[1].curvature.items()}
    new, _ = server_step(state, ups)
    assert set(new.log["rejected"]) == {0, 1}


def test_all_rejected_keeps_state() -> None:
    state, ups = _round("fedavg", n=3)
    for u in ups:
        _nan_delta(u)
    new, msg = server_step(state, ups)
    assert new.log["skipped"]
    assert new.round == state.round + 1
    for k in state.params:
        assert torch.equal(new.params[k], state.params[k])
        assert torch.equal(msg.params[k], state.params[k])


def test_simulation_logs_rejections_and_keeps_learning() -> None:
    task = blobs_task(num_clients=4, n=40)
    cc, sc = make_configs("fedng", {"local_steps": 4, "lr": 0.1})

    def attack(r: int, u: ClientUpdate) -> ClientUpdate:
        if u.client_id == 0:
            _nan_delta(u)
        return u

    h = simulate(task, cc, sc, rounds=6, participation=1.0, seed=0, tamper=attack)
    assert all(set(r.rejected) == {"0"} for r in h.rounds[1:])
    assert "NaN" in h.rounds[1].rejected["0"]
    assert h.final() > 0.8


def _kfac_scaled(u: ClientUpdate, a: float, g: float) -> ClientUpdate:
    """A copy of `u` as received, with every K-FAC factor A times `a` and G times `g`."""
    u = ClientUpdate.from_bytes(u.to_bytes())
    cs = decoded_curvature(u)
    assert cs is not None
    rep = cs.reps["kfac"]
    rep.A = [x * a for x in rep.A]  # type: ignore[attr-defined]
    rep.G = [x * g for x in rep.G]  # type: ignore[attr-defined]
    attach_curvature(u, cs, "fp32")
    return ClientUpdate.from_bytes(u.to_bytes())


def test_late_training_honest_scales_are_not_rejected() -> None:
    """Replays the late-training rounds of digits-cnn (Dirichlet 0.1; bench_stability p=1): most
    clients fit their data and their G factors (so block traces) fall by ~1e5-1e6, one still
    has a loss and keeps its early-training scales, 2e4-5e4 x the round's median there. The old
    reference (the round's median alone) rejected it; the run's peak median floors the
    reference now. Planted rescalings, 1e6 x the peak, are still rejected."""
    state, ups = fed_round("fedng", n=6, rounds=1)
    algo = get_algorithm("fedng")
    # the floor after one round: the round-0 medians of the accepted updates' scales
    _, first = fed_round("fedng", n=6, rounds=0)
    keys = update_scales(first[0])
    want = {k: statistics.median(update_scales(u)[k] for u in first) for k in keys}
    floor = curvature_floor(state)
    assert floor.keys() == want.keys() and any(k.endswith("/G") for k in floor)
    for k, v in want.items():
        # the server's scales are read from the payloads in float32 blocks (`fast_scales`)
        assert floor[k] == pytest.approx(v, rel=tol(torch.float32, "sum_squares").rtol), k
    late = [_kfac_scaled(u, 1.0, 1e-6) for u in ups[:-1]] + [ups[-1]]
    med = statistics.median(update_scales(u)["kfac/0"] for u in late)
    assert update_scales(late[-1])["kfac/0"] > 1e4 * med  # beyond the old check's 1e4
    ok, rejected = validate_updates(state, late, algo)
    assert rejected == {} and len(ok) == 6
    new, _ = server_step(state, late)
    assert new.log["rejected"] == {}
    # the peak keeps the larger medians: G-based scales stay, A's are the max of both rounds
    assert new.meta[REFERENCE_KEY][PEAK_KEY]["kfac/0"] == floor["kfac/0"]
    # no ratchet: an accepted attacker just under the bound every round leaves the peak where
    # the honest medians put it (a median; the global curvature it inflates is not the floor)
    inflated = _kfac_scaled(ups[-1], 1.0, 5e3)
    state2, _ = server_step(state, [*late[:-1], inflated])
    assert state2.log["rejected"] == {} and curvature_floor(state2) == curvature_floor(new)
    for planted, word in ((_kfac_scaled(ups[-1], 1.0, 1e6), "kfac/0"),
                          (_kfac_scaled(ups[-1], 1e6, 1e-6), "/A")):  # fmt: skip
        ok, rejected = validate_updates(state, [*late[:-1], planted], algo)
        assert len(ok) == 5 and word in " ".join(rejected[planted.client_id]), rejected


def test_a_colluding_majority_of_one_round_cannot_lift_the_peak_floor() -> None:
    """A round whose sample is mostly colluders sets that round's median, but not the run's
    floor: with fewer than `PEAK_QUORUM` updates it leaves the peak alone, and with a quorum it
    raises it by at most `PEAK_GROWTH` x. A later lone attacker 1e9 x the honest scales is
    rejected either way (before the quorum and growth bound, one 3-client round lifted the
    floor 1e6-fold and let it through)."""
    state, ups = fed_round("fedng", n=6, rounds=1)
    floor = curvature_floor(state)
    small = [ups[0], _kfac_scaled(ups[1], 1.0, 1e6), _kfac_scaled(ups[2], 1.0, 1e6)]
    quorate = [ups[0], ups[1], *(_kfac_scaled(u, 1.0, 1e6) for u in ups[2:5])]
    for colluding in (small, quorate):
        s_a, _ = server_step(state, colluding)
        lifted = curvature_floor(s_a)
        assert s_a.log["rejected"] == {}  # they are the round's median: accepted in that round
        assert all(lifted[k] <= PEAK_GROWTH * floor[k] for k in floor)
        if len(colluding) < PEAK_QUORUM:
            assert lifted == floor
        else:
            assert lifted["kfac/0"] > floor["kfac/0"]
        r = s_a.round
        honest = [replay(u, i, round=r) for i, u in enumerate(ups[:5])]
        attacker = _kfac_scaled(ups[5], 1.0, 1e9)
        attacker.round = r
        attacker = replay(attacker, 5)
        s_b, _ = server_step(s_a, [*honest, attacker])
        assert set(s_b.log["rejected"]) == {5}, s_b.log["rejected"]
