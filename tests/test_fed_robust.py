"""A server no client can crash or steer: planted payloads (issue items 1-7) are rejected with a
reason, the round goes on, and the state is bit-identical to the round without them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from _fed import blobs_task, fed_round
from fedng.federated import wire
from fedng.federated.algorithms.curvature_payload import attach_curvature, decoded_curvature
from fedng.federated.client import get_params
from fedng.federated.config import make_configs
from fedng.federated.messages import ClientUpdate, ServerState
from fedng.federated.round import client_step, server_init, server_step
from fedng.federated.simulator import simulate


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def make_round(
    algo: str = "fedng", extra: dict[str, Any] | None = None, n: int = 4, rounds: int = 0
) -> tuple[ServerState[Any], list[ClientUpdate]]:
    """The server state after `rounds` honest rounds, and the next round's decoded updates."""
    return fed_round(algo, extra, n, rounds)


def assert_same(a: ServerState[Any], b: ServerState[Any]) -> None:
    """Bit-identical params, buffers and meta."""
    assert a.round == b.round
    for got, want in ((a.params, b.params), (a.buffers, b.buffers)):
        assert sorted(got) == sorted(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k
    assert a.meta == b.meta


def assert_rejected_cleanly(
    state: ServerState[Any], good: list[ClientUpdate], bad: ClientUpdate, word: str
) -> None:
    """`bad` is rejected (a reason containing `word`) and the round equals the one without it."""
    new, _ = server_step(state, [*good, bad])
    ref, _ = server_step(state, good)
    assert bad.client_id in new.log["rejected"], new.log
    assert word in " ".join(new.log["rejected"][bad.client_id]), new.log["rejected"]
    assert new.log["accepted"] == ref.log["accepted"] == [u.client_id for u in good]
    assert_same(new, ref)


def fresh(u: ClientUpdate) -> ClientUpdate:
    """A decoded copy of `u` (no cached curvature)."""
    return ClientUpdate.from_bytes(u.to_bytes())


def set_curv_meta(key: str | None, value: object) -> Callable[[ClientUpdate], None]:
    def fn(u: ClientUpdate) -> None:
        if key is None:
            u.meta["curv"] = value
        else:
            u.meta["curv"][key] = value

    return fn


# --- 1: malformed curvature metadata -----------------------------------------------------------


@pytest.mark.parametrize(
    "mutate",
    [
        set_curv_meta(None, {}),
        set_curv_meta(None, 5),
        set_curv_meta(None, None),
        set_curv_meta("rep_meta", []),
        set_curv_meta("rep_meta", {"kfac": {"rank": "x"}}),
        set_curv_meta("kinds", "kfac"),
        set_curv_meta("kinds", [1, 2]),
        set_curv_meta("layouts", None),
        set_curv_meta("layouts", [[1, 2, 3]]),
        set_curv_meta("layouts", [["a", "kron", 10**9, 10**9, "x", None, None, None, 0]] * 2),
    ],
)
def test_malformed_curvature_metadata_is_rejected(mutate: Callable[[ClientUpdate], None]) -> None:
    state, ups = make_round()
    bad = fresh(ups[3])
    mutate(bad)
    assert_rejected_cleanly(state, ups[:3], bad, "curvature")


# --- 2: round-0 consistency ------------------------------------------------------------------


def test_round0_client_with_other_kinds_is_rejected() -> None:
    state, ups = make_round(extra={"aggregation": "fisher"})
    task = blobs_task(num_clients=4, n=30)
    cc, _ = make_configs("fedng", {"local_steps": 3, "curvature": "diag", "aggregation": "fisher"})
    model = task.model_fn(0)
    _, msg = server_init(get_params(model), state.config)
    bad = ClientUpdate.from_bytes(client_step(model, task.clients[3], msg, cc).to_bytes())
    assert bad.meta["curv"]["kinds"] != ups[0].meta["curv"]["kinds"]
    assert_rejected_cleanly(state, ups[:3], bad, "differ")


def test_round0_swapped_block_names_are_rejected() -> None:
    state, ups = make_round()
    bad = fresh(ups[3])
    lays = bad.meta["curv"]["layouts"]
    lays[0][0], lays[1][0] = lays[1][0], lays[0][0]
    assert_rejected_cleanly(state, ups[:3], bad, "differ")


def test_first_of_a_tie_wins() -> None:
    """Two updates that disagree: the first one is kept, the other rejected."""
    state, ups = make_round(n=2)
    bad = fresh(ups[1])
    bad.meta["curv"]["layouts"][0][0] = "renamed"
    assert_rejected_cleanly(state, ups[:1], bad, "differ")


# --- 3: num_examples --------------------------------------------------------------------------


def test_num_examples_above_the_cap_is_rejected() -> None:
    state, ups = make_round("fedavg")
    bad = fresh(ups[3])
    bad.num_examples = 10**9
    assert_rejected_cleanly(state, ups[:3], bad, "num_examples")


def rewrite_meta(data: bytes, fn: Callable[[dict[str, Any]], None]) -> bytes:
    """Valid wire bytes (checksum recomputed) with the header metadata changed by `fn`."""
    p = wire.unpack(data)
    meta = dict(p.meta)
    fn(meta)
    return wire.pack(p.arrays, meta=meta, symmetric=p.symmetric)


@pytest.mark.parametrize("value", [1e9, 2.7, 2.0, True, "3", None, -1, 0, [3]])
def test_num_examples_on_the_wire_must_be_a_positive_int(value: object) -> None:
    _, ups = make_round("fedavg", n=1)
    data = rewrite_meta(ups[0].to_bytes(), lambda m: m.update(num_examples=value))
    with pytest.raises(wire.PayloadError, match="num_examples"):
        ClientUpdate.from_bytes(data)


def test_num_examples_cap_is_configurable() -> None:
    _, sc = make_configs("fedavg", {"max_num_examples": 10})
    assert sc.max_num_examples == 10
    with pytest.raises(ValueError, match="max_num_examples"):
        make_configs("fedavg", {"max_num_examples": 0})


# --- 4: K-FAC factor rescaling -----------------------------------------------------------------


@pytest.mark.parametrize("rounds,n", [(0, 4), (1, 4), (0, 2), (1, 2)])
def test_kfac_factor_rescaling_is_rejected(rounds: int, n: int) -> None:
    """A * 1e6 with G * 1e-6 keeps tr(A) tr(G) but moves the global tr(A); each factor is checked
    against the round's median, or with 2 updates the server's curvature (round 1) or the other
    update (round 0)."""
    state, ups = make_round(extra={"aggregation": "fisher"}, n=n, rounds=rounds)
    bad = fresh(ups[-1])
    cs = decoded_curvature(bad)
    assert cs is not None
    rep = cs.reps["kfac"]
    rep.A[0] = rep.A[0] * 1e6
    rep.G[0] = rep.G[0] * 1e-6
    attach_curvature(bad, cs, "fp32")
    bad = fresh(bad)
    if (rounds, n) != (0, 2):
        assert_rejected_cleanly(state, ups[:-1], bad, "/A")
        return
    # Round 0, two updates, no reference: the honest G is now "too large" against the planted
    # one, so both are rejected and the round is skipped, not steered.
    new, _ = server_step(state, [*ups[:-1], bad])
    assert new.log["accepted"] == [] and "/A" in " ".join(new.log["rejected"][1])
    assert_same(new, server_step(state, [])[0])


# --- 5: decode errors ------------------------------------------------------------------------


def test_bit_flips_and_truncation_raise_only_payload_error() -> None:
    _, ups = make_round("fedng", n=1)
    data = ups[0].to_bytes()
    gen = torch.Generator().manual_seed(0)
    positions = (
        list(range(min(len(data), 600)))
        + torch.randint(0, len(data), (300,), generator=gen).tolist()
    )
    for pos in positions:
        flipped = bytearray(data)
        flipped[pos] ^= 1 << (pos % 8)
        with pytest.raises(wire.PayloadError):
            ClientUpdate.from_bytes(bytes(flipped))
    for cut in (0, 3, 9, len(data) // 2, len(data) - 1):
        with pytest.raises(wire.PayloadError):
            ClientUpdate.from_bytes(data[:cut])


def test_old_version_is_rejected_with_reason() -> None:
    data = bytearray(wire.pack({"x": torch.zeros(2)}))
    data[4] = 1
    with pytest.raises(wire.PayloadError, match="version 1"):
        wire.unpack(bytes(data))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.update(client_id="7"),
        lambda m: m.update(client_id=True),
        lambda m: m.update(round=0.0),
        lambda m: m.update(metrics=[1]),
        lambda m: m.update(metrics={"loss": "x"}),
        lambda m: m.update(meta=3),
        lambda m: m.pop("meta"),
        lambda m: m.update(type="server_message"),
    ],
)
def test_type_confusion_in_metadata_raises_payload_error(
    mutate: Callable[[dict[str, Any]], None],
) -> None:
    _, ups = make_round("fedavg", n=1)
    with pytest.raises(wire.PayloadError):
        ClientUpdate.from_bytes(rewrite_meta(ups[0].to_bytes(), mutate))


def test_simulator_logs_undecodable_bytes_and_goes_on() -> None:
    task = blobs_task(num_clients=4, n=40)
    cc, sc = make_configs("fedavg", {"local_steps": 4, "lr": 0.1})

    def flip(r: int, cid: int, data: bytes) -> bytes:
        if cid != 0:
            return data
        out = bytearray(data)
        out[len(out) // 2] ^= 0x10
        return bytes(out)

    h = simulate(task, cc, sc, rounds=3, participation=1.0, seed=0, tamper_bytes=flip)
    assert all(set(r.rejected) == {"0"} for r in h.rounds[1:])
    assert "does not decode" in h.rounds[1].rejected["0"]
    assert h.final() > 0.8


# --- 6: overflow and small rounds --------------------------------------------------------------


def test_huge_finite_delta_with_two_clients_is_rejected() -> None:
    state, ups = make_round(extra={"aggregation": "fisher"}, n=2)
    bad = fresh(ups[1])
    bad.delta = {k: torch.full_like(v, 3e38) for k, v in bad.delta.items()}
    assert_rejected_cleanly(state, ups[:1], bad, "delta norm")


def test_thousandfold_delta_with_two_clients_is_rejected() -> None:
    state, ups = make_round("fedavg", n=2)
    bad = fresh(ups[1])
    bad.delta = {k: v * 1e3 for k, v in bad.delta.items()}
    assert_rejected_cleanly(state, ups[:1], bad, "delta norm")


def test_previous_round_is_the_reference_of_a_small_round() -> None:
    state, ups = make_round("fedavg", n=4, rounds=1)
    assert state.meta["reference"]["delta_norm"] > 0
    bad = fresh(ups[3])
    bad.delta = {k: v * 1e3 for k, v in bad.delta.items()}
    assert_rejected_cleanly(state, ups[:1], bad, "delta norm")


def test_lone_huge_delta_is_rejected_against_the_model() -> None:
    state, ups = make_round("fedavg", n=1)
    ups[0].delta = {k: torch.full_like(v, 1e30) for k, v in ups[0].delta.items()}
    new, _ = server_step(state, ups)
    assert new.log["accepted"] == [] and 0 in new.log["rejected"]
    assert_same(new, server_step(state, [])[0])


def test_overflowing_merge_drops_only_the_offender() -> None:
    """With the scale checks off (a huge ratio), a 3e38 delta that passes validation overflows the
    Fisher merge; only that client is left out, with a reason, never the whole round."""
    state, ups = make_round(extra={"aggregation": "fisher", "max_norm_ratio": 1e300}, n=4)
    bad = fresh(ups[3])
    bad.delta = {k: torch.full_like(v, 3e38) for k, v in bad.delta.items()}
    new, _ = server_step(state, [*ups[:3], bad])
    ref, _ = server_step(state, ups[:3])
    assert new.log["accepted"] == [0, 1, 2]
    assert "left out" in " ".join(new.log["rejected"][3])
    assert "rolled_back" not in new.log
    assert_same(new, ref)


# --- 7: duplicate client ids ------------------------------------------------------------------


def test_entries_that_are_not_updates_are_dropped() -> None:
    state, ups = make_round("fedavg", n=3)
    junk: list[Any] = [None, "x", 3]
    new, _ = server_step(state, [*ups, *junk])
    assert_same(new, server_step(state, ups)[0])


def test_duplicate_client_ids_are_all_rejected_with_every_reason() -> None:
    state, ups = make_round("fedavg", n=4)
    impostor = fresh(ups[0])
    impostor.round = 5
    new, _ = server_step(state, [*ups, impostor])
    ref, _ = server_step(state, ups[1:])
    reasons = new.log["rejected"][0]
    assert isinstance(reasons, list) and len(reasons) == 2
    assert "client id" in reasons[0] and "round 5" in reasons[1]
    assert new.log["accepted"] == [1, 2, 3]
    assert_same(new, ref)
