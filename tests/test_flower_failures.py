"""On Flower, a client that crashes, times out or returns a malformed reply costs that reply only:
the round goes on, the reason is logged, and the server state is exactly the simulator's for the
same round without that client (never corrupted)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

pytest.importorskip("flwr", reason="needs the flower extra (Python >= 3.11)")

import torch
from _fed import blobs_task
from fedng.federated import ClientUpdate, FederatedTask, History, simulate
from fedng.flower import RunSpec, make_client_app, run_server
from fedng.flower.codec import decode_update, encode_update, wire_bytes, wire_record
from fedng.flower.strategy import FedNGStrategy
from fedng.flower.testing import LocalGrid
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

VICTIM, ROUND = 2, 1
"""The failing client and the (0-based) round it fails in."""

# No carried trust region: a crashed client keeps its previous client state, while the
# simulator's client whose reply is lost kept its new one, so with `carry_trust` the two runs
# would differ from the next round on; these tests compare the server's handling of the loss.
SPEC = RunSpec(
    algorithm="fedng",
    rounds=3,
    participation=1.0,
    seed=4,
    timeout=0.3,
    settings={"carry_trust": False},
)


def task_fn(spec: RunSpec) -> FederatedTask:
    return blobs_task(num_clients=4, n=40, seed=spec.seed)


def simulated(
    tamper: Callable[[int, ClientUpdate], ClientUpdate] | None = None,
    tamper_bytes: Callable[[int, int, bytes], bytes] | None = None,
) -> History:
    client, server = SPEC.configs()
    return simulate(
        task_fn(SPEC),
        client,
        server,
        rounds=SPEC.rounds,
        participation=SPEC.participation,
        seed=SPEC.seed,
        tamper=tamper,
        tamper_bytes=tamper_bytes,
    )


def lost_in_simulator() -> History:
    """The simulator's run in which the victim's update of ROUND never decodes."""
    return simulated(tamper_bytes=lambda r, c, b: b"" if (r, c) == (ROUND, VICTIM) else b)


def on_flower(
    app: ClientApp | None = None,
    on_reply: Callable[[int, Message], Message | None] | None = None,
) -> tuple[FedNGStrategy, LocalGrid]:
    grid = LocalGrid(app or make_client_app(task_fn), 4, SPEC.to_run_config(), on_reply=on_reply)
    return run_server(grid, SPEC, task_fn(SPEC)), grid


def victim_reply(grid: LocalGrid, node: int, reply: Message) -> bool:
    cid = grid.contexts[node].node_config["partition-id"]
    return cid == VICTIM and reply.metadata.group_id == str(ROUND + 1)


def same_run(got: History, want: History, *, reasons: bool) -> None:
    """Equal metrics, bytes up to the lost reply's, accepted sets and final model inputs; with
    `reasons`, equal rejection reasons too."""
    assert len(got.rounds) == len(want.rounds)
    for g, w in zip(got.rounds, want.rounds, strict=True):
        for key in ("metric", "test_loss", "val_metric", "val_loss", "train_loss"):
            a, b = getattr(g, key), getattr(w, key)
            assert a == b or (math.isnan(a) and math.isnan(b)), (g.round, key, a, b)
        assert g.participants == w.participants
        assert sorted(g.rejected) == sorted(w.rejected)
        if reasons:
            assert g.rejected == w.rejected


def rejected_in(strategy: FedNGStrategy) -> str:
    rec = strategy.history.rounds[ROUND + 1]
    assert list(rec.rejected) == [str(VICTIM)]
    return rec.rejected[str(VICTIM)]


def test_crashing_client_costs_its_reply_only() -> None:
    """The ClientApp raises: Flower's error reply is logged with the exception, the round
    aggregates the other three, later rounds go on (the victim trains again)."""
    inner = make_client_app(task_fn)
    app = ClientApp()

    @app.query()
    def query(msg: Message, ctx: Context) -> Message:
        return inner(msg, ctx)

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        if ctx.node_config["partition-id"] == VICTIM and msg.metadata.group_id == str(ROUND + 1):
            raise ZeroDivisionError("the client's data loader broke")
        return inner(msg, ctx)

    @app.train("probe")  # the second summable phase (FedNG's line search)
    def probe(msg: Message, ctx: Context) -> Message:
        return inner(msg, ctx)

    strategy, _ = on_flower(app=app)
    why = rejected_in(strategy)
    assert why.startswith("client error:") and "ZeroDivisionError" in why
    same_run(strategy.history, lost_in_simulator(), reasons=False)
    assert strategy.history.rounds[ROUND + 2].rejected == {}


def test_client_that_never_answers_times_out() -> None:
    """A reply that never arrives: the round waits `timeout` seconds, then goes on without it."""
    grid_box: list[LocalGrid] = []

    def lose(node: int, reply: Message) -> Message | None:
        return None if victim_reply(grid_box[0], node, reply) else reply

    grid = LocalGrid(make_client_app(task_fn), 4, SPEC.to_run_config(), on_reply=lose)
    grid_box.append(grid)
    strategy = run_server(grid, SPEC, task_fn(SPEC))
    assert rejected_in(strategy) == "no reply within 0.3 s"
    same_run(strategy.history, lost_in_simulator(), reasons=False)


def replace_victim(make: Callable[[Message], RecordDict]) -> tuple[FedNGStrategy, LocalGrid]:
    box: list[LocalGrid] = []

    def hook(node: int, reply: Message) -> Message | None:
        if victim_reply(box[0], node, reply):
            reply.content = make(reply)
        return reply

    grid = LocalGrid(make_client_app(task_fn), 4, SPEC.to_run_config(), on_reply=hook)
    box.append(grid)
    return run_server(grid, SPEC, task_fn(SPEC)), grid


def flip(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 0x40]) + blob[at + 1 :]


def test_corrupt_bytes_are_rejected_as_in_the_simulator() -> None:
    """A flipped bit in the wire bytes: the same rejection (CRC) and the same run as the
    simulator's with the same bytes."""
    at = 200
    strategy, _ = replace_victim(
        lambda m: RecordDict({"fedng": wire_record(flip(wire_bytes(m.content), at))})
    )
    want = simulated(tamper_bytes=lambda r, c, b: flip(b, at) if (r, c) == (ROUND, VICTIM) else b)
    assert rejected_in(strategy).startswith("does not decode:")
    same_run(strategy.history, want, reasons=True)


@pytest.mark.parametrize(
    "content",
    [
        RecordDict(),
        RecordDict({"fedng": ConfigRecord({"x": 1})}),
        RecordDict({"fedng": wire_record(b"FNGB")}),
    ],
    ids=["empty", "wrong-record-type", "truncated"],
)
def test_malformed_reply_costs_its_reply_only(content: RecordDict) -> None:
    strategy, _ = replace_victim(lambda m: content)
    assert rejected_in(strategy).startswith("does not decode")
    same_run(strategy.history, lost_in_simulator(), reasons=False)


def test_invalid_update_is_rejected_by_fedng_validation() -> None:
    """A well-formed update with a NaN delta reaches fedng's validation, which rejects it with the
    simulator's reason; the run is the simulator's with the same tampered update."""

    def poison(u: ClientUpdate) -> ClientUpdate:
        u.delta = {k: torch.full_like(v, math.nan) for k, v in u.delta.items()}
        return u

    def remake(m: Message) -> RecordDict:
        return encode_update(poison(decode_update(m.content)))

    strategy, _ = replace_victim(remake)
    want = simulated(tamper=lambda r, u: poison(u) if (r, u.client_id) == (ROUND, VICTIM) else u)
    assert "NaN" in rejected_in(strategy)
    same_run(strategy.history, want, reasons=True)


def test_reply_for_another_client_is_rejected() -> None:
    """A node answering with another client's id (impersonation) is rejected before validation
    (which would otherwise reject both updates of the duplicated id)."""

    def other(m: Message) -> RecordDict:
        u = decode_update(m.content)
        u.client_id = 0
        return encode_update(u)

    strategy, _ = replace_victim(other)
    assert "claims client id 0" in rejected_in(strategy)
    same_run(strategy.history, lost_in_simulator(), reasons=False)


def test_node_that_fails_the_query_is_left_out() -> None:
    """A node whose ClientApp fails the initial query is never sampled; its client is logged
    as served by no live node every round, and the others train."""
    inner = make_client_app(task_fn)
    app = ClientApp()

    @app.query()
    def query(msg: Message, ctx: Context) -> Message:
        if ctx.node_config["partition-id"] == VICTIM:
            raise RuntimeError("no")
        return inner(msg, ctx)

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        return inner(msg, ctx)

    strategy, _ = on_flower(app=app)
    assert VICTIM not in strategy.client_of.values()
    for rec in strategy.history.rounds[1:]:
        assert rec.rejected == {str(VICTIM): "no live node serves this client"}
    assert strategy.num_clients == 4


def test_lost_second_phase_answer_costs_its_scalars_only() -> None:
    """FedNG's summable line search runs as `train.probe` messages on the grid: an answer that
    never arrives leaves the victim's update accepted and the round answered by the others."""
    grid_box: list[LocalGrid] = []

    def lose_probe(node: int, reply: Message) -> Message | None:
        is_probe = reply.metadata.message_type.endswith(".probe")
        return None if is_probe and victim_reply(grid_box[0], node, reply) else reply

    grid = LocalGrid(make_client_app(task_fn), 4, SPEC.to_run_config(), on_reply=lose_probe)
    grid_box.append(grid)
    strategy = run_server(grid, SPEC, task_fn(SPEC))
    rec = strategy.history.rounds[ROUND + 1]
    assert rec.rejected == {}
    assert rec.server_log["aggregation"] == "summable"
    assert rec.server_log["probe_answered"] == 3
    full = strategy.history.rounds[ROUND + 2].server_log
    assert full["probe_answered"] == 4
    assert all(math.isfinite(r.metric) for r in strategy.history.rounds)
