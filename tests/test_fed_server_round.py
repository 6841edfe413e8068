"""The streaming server (`ServerRound`): reply-by-reply validation and folding, memory flat in
the number of clients, the batch `server_step` as its wrapper, the optional second phase."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _fed import blobs_task, fed_round
from fedng.federated import ServerRound
from fedng.federated.aggregation.mean import apply_server_step, mean_delta
from fedng.federated.config import make_configs
from fedng.federated.messages import ClientUpdate
from fedng.federated.round import server_step
from fedng.federated.simulator import simulate


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _replay(u: ClientUpdate, cid: int) -> ClientUpdate:
    out = ClientUpdate.from_bytes(u.to_bytes())
    out.client_id = cid
    return out


def test_fedavg_server_step_is_the_weighted_mean_bit_for_bit() -> None:
    """server_step (now a fold into running sums) equals the batch weighted mean exactly."""
    state, ups = fed_round("fedavgm", {"server_momentum": 0.9}, rounds=1)
    new, _ = server_step(state, ups)
    ref = state.copy()
    apply_server_step(ref, mean_delta(ups))
    for k in ref.params:
        assert torch.equal(new.params[k], ref.params[k]), k
        assert torch.equal(new.buffers[f"m/{k}"], ref.buffers[f"m/{k}"]), k


@pytest.mark.parametrize("algo,extra", [("fedavg", {}), ("fedng", {"aggregation": "summable"})])
def test_streaming_round_matches_batch(algo: str, extra: dict[str, Any]) -> None:
    """Reply by reply (weights n_k, one rescale at the end) = the batch round up to rounding."""
    state, ups = fed_round(algo, extra, rounds=1)
    ref, _ = server_step(state, ups)
    rnd = ServerRound(state)
    assert [rnd.add(u).status for u in ups] == ["accepted"] * len(ups)
    probe = rnd.probe()
    assert (probe is not None) == (algo == "fedng")
    if probe is not None:
        for u in ups:
            assert rnd.add_reply(rnd.algo.answer_probe(u, probe)).status == "accepted"
    new, msg = rnd.finish()
    assert new.log["accepted"] == ref.log["accepted"]
    assert new.round == state.round + 1 and msg.round == new.round
    for k in ref.params:
        # the summable step solves with the pooled factors: float32 sums folded at weights n_k
        # instead of p_k round differently, and the damped solve (condition ~1e3 here) and
        # line search scale that up: ~1e-5 of the parameters' size
        big = float(ref.params[k].abs().max())
        atol = 1e-6 if algo == "fedavg" else 1e-4 * big
        torch.testing.assert_close(new.params[k], ref.params[k], rtol=1e-5, atol=atol)


@pytest.mark.parametrize("algo,extra", [("fedavg", {}), ("fedng", {"aggregation": "summable"})])
def test_memory_is_flat_in_the_number_of_clients(algo: str, extra: dict[str, Any]) -> None:
    """The round holds its running sums only: the same bytes after 3 and after 40 replies."""
    state, ups = fed_round(algo, extra, rounds=1)
    sizes = []
    rnd = ServerRound(state)
    for i in range(40):
        assert rnd.add(_replay(ups[i % len(ups)], i)).status == "accepted"
        if i in (2, 39):
            sizes.append(rnd.nbytes)
    assert sizes[0] == sizes[1] > 0
    rnd.finish()


def test_exact_merge_holds_the_updates() -> None:
    """The exact merge is not summable: its accumulator holds every update (O(K))."""
    state, ups = fed_round("fedng", {"aggregation": "fisher"}, rounds=1)
    rnd = ServerRound(state)
    for i in range(10):
        rnd.add(_replay(ups[i % len(ups)], i))
    assert rnd.nbytes >= 10 * sum(v.numel() * 4 for v in ups[0].delta.values())
    new, _ = rnd.finish()
    assert new.log["aggregation"] == "fisher"


def test_bad_replies_rejected_round_goes_on() -> None:
    """NaN delta, a duplicate id, a huge delta against the previous round's reference: each
    rejected with its reason as it arrives; the others are folded."""
    state, ups = fed_round("fedavg", rounds=1)
    rnd = ServerRound(state)
    assert rnd.add(ups[0]).status == "accepted"
    bad = _replay(ups[1], 1)
    k = next(iter(bad.delta))
    bad.delta[k] = bad.delta[k].clone()
    bad.delta[k].view(-1)[0] = float("nan")
    v = rnd.add(bad)
    assert v.status == "rejected" and v.reason is not None and "NaN" in v.reason
    assert rnd.add(_replay(ups[0], 0)).status == "rejected"  # a second reply under id 0
    huge = _replay(ups[2], 2)
    huge.delta = {k: x * 1e4 for k, x in huge.delta.items()}
    assert "reference" in (rnd.add(huge).reason or "")
    assert rnd.add(ups[3]).status == "accepted"
    assert rnd.add("not an update").status == "rejected"  # type: ignore[arg-type]
    new, _ = rnd.finish()
    assert new.log["accepted"] == [0, 3]
    assert sorted(new.log["rejected"]) == [0, 1, 2]
    ref, _ = server_step(state, [ups[0], ups[3]])
    for k in ref.params:
        torch.testing.assert_close(new.params[k], ref.params[k], rtol=1e-5, atol=1e-6)


def test_first_round_warms_up_on_a_bounded_buffer() -> None:
    """With no previous reference, the first 3 valid replies are held, their median becomes the
    reference, and an outlier among them is rejected."""
    state, ups = fed_round("fedavg")
    assert "reference" not in state.meta
    huge = _replay(ups[1], 1)
    huge.delta = {k: x * 1e4 for k, x in huge.delta.items()}
    rnd = ServerRound(state)
    assert rnd.add(ups[0]).status == "pending"
    assert rnd.add(huge).status == "pending"
    assert rnd.add(ups[2]).status == "pending"  # the third releases the buffer
    assert rnd.add(ups[3]).status == "accepted"
    new, _ = rnd.finish()
    assert new.log["accepted"] == [0, 2, 3]
    assert "reference" in " ".join(new.log["rejected"][1])
    assert new.meta["reference"]["delta_norm"] > 0


def test_unanswered_probe_keeps_the_mean_on_probed_blocks() -> None:
    """A summable round whose line search gets no answer takes the mean step (alpha = 0)."""
    state, ups = fed_round("fedng", {"aggregation": "summable"}, rounds=1)
    rnd = ServerRound(state)
    for u in ups:
        rnd.add(u)
    probe = rnd.probe()
    assert probe is not None
    reply = rnd.algo.answer_probe(ups[0], probe)
    reply.extras = {"line_search": torch.zeros(1, 2)}
    assert rnd.add_reply(reply).status == "rejected"  # wrong shape
    new, _ = rnd.finish()
    assert new.log["line_search"].startswith("unanswered")
    ref = state.copy()
    apply_server_step(ref, mean_delta(ups))
    for k in ref.params:
        torch.testing.assert_close(new.params[k], ref.params[k], rtol=1e-5, atol=1e-6)


def test_simulator_counts_the_second_phase_bytes() -> None:
    """The line search's broadcast (M, d) and replies are counted in the round's bytes."""
    task = blobs_task(num_clients=3, n=30)
    cc, sc = make_configs("fedng", {"local_steps": 2, "aggregation": "summable"})
    h = simulate(task, cc, sc, rounds=2)
    cm, sm = make_configs("fedng", {"local_steps": 2, "aggregation": "mean"})
    hm = simulate(task, cm, sm, rounds=2)
    params = sum(p.numel() for p in task.model_fn(0).parameters())
    r, rm = h.rounds[2], hm.rounds[2]
    assert r.server_log["probe_answered"] == 3
    assert r.bytes_down >= rm.bytes_down + 3 * 2 * 4 * params  # M and d to each client
    assert r.bytes_up >= rm.bytes_up + 3 * 4 * params  # c_k with each update


@pytest.mark.parametrize("change", [{"robust": "median"}, {"dp_clip": 1.0}])
def test_streaming_refuses_whole_round_stages(change: dict[str, Any]) -> None:
    """Robust combiners and DP need the whole round: ServerRound says so in one line."""
    state, _ = fed_round("fedavg", {}, rounds=1)
    state.config = state.config.replace(**change)
    with pytest.raises(ValueError, match="need the whole round"):
        ServerRound(state)


@pytest.mark.parametrize("algo", ["fedavg", "fedng", "scaffold"])
def test_streaming_simulation_follows_the_batch_one(algo: str) -> None:
    """`simulate(streaming=True)` folds each update as it arrives: with honest clients it
    accepts the same updates, sends the same bytes and lands where the batch server does (up
    to float summation order; the line search's probe is answered by every client)."""
    task = blobs_task(num_clients=4, n=40)
    cc, sc = make_configs(algo, {"local_steps": 3})
    batch = simulate(task, cc, sc, rounds=3, participation=0.75, seed=2)
    stream = simulate(task, cc, sc, rounds=3, participation=0.75, seed=2, streaming=True)
    for b, s in zip(batch.rounds[1:], stream.rounds[1:], strict=True):
        assert s.participants == b.participants and s.rejected == b.rejected == {}
        assert abs(s.bytes_up - b.bytes_up) <= 8 * len(b.participants)
        assert s.bytes_down == b.bytes_down
        assert abs(s.test_loss - b.test_loss) <= 1e-4 * abs(b.test_loss) + 1e-6
        if algo == "fedng":
            assert s.server_log["probe_answered"] == len(b.participants)
