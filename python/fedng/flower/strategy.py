"""A Flower Strategy that runs any fedng algorithm's server step on Flower's Message API.

Each round the strategy samples fedng client ids exactly as `fedng.federated.simulate` does
(`sample_clients` on a generator seeded with the run seed, over the clients the nodes serve),
sends the encoded broadcast to the nodes serving them, and folds every reply into the round as
it arrives. A reply that is an error (the ClientApp raised or crashed), never comes (timeout), does
not decode, or claims another client's id costs that reply only: its reason is logged in the
round's `rejected`, and the round goes on with the rest. Everything else (payload validation,
rejection reasons, aggregation, rollback of a failed merge) is fedng's own server step, so the
server state is exactly what the simulator's would be for the same updates.

Which node serves which client is asked once (a `query` message, answered with the node's
`partition-id`), so that sampling, SCAFFOLD's client count and the history do not depend on
Flower's random node ids.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedng._typing import Arrays
from fedng.federated.algorithms.base import Answer, State
from fedng.federated.algorithms.registry import get_algorithm
from fedng.federated.config.common import ServerConfig
from fedng.federated.messages import ClientUpdate, ServerMessage
from fedng.federated.report.history import History, RoundRecord, fill_round
from fedng.federated.round import plan_rounds, server_init, server_step
from fedng.federated.server_round import ServerRound
from fedng.federated.simulator import sample_clients, sampled_fraction
from fedng.federated.wire import PayloadError
from fedng.flower.client_app import PROBE_ACTION, QUERY_RECORD
from fedng.flower.codec import decode_update, encode_message, payload_nbytes
from fedng.flower.history import Evaluator, no_evaluation
from fedng.flower.persist import ServerCheckpoint

logger = logging.getLogger("fedng.flower")

RoundHook = Callable[[State, History], None]
"""Called after every round with the new server state and the history so far (checkpoints)."""


class _BatchRound:
    """`fedng.federated.round.server_step` behind the per-reply interface (`add`, `finish`):
    replies are decoded and checked for transport failures as they arrive, then validated and
    aggregated together in client-id order (the simulator's), so that the float sums do not depend
    on the order replies arrive in."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.updates: list[ClientUpdate] = []

    def add(self, update: ClientUpdate) -> None:
        self.updates.append(update)

    def finish(self, answer: Answer | None = None) -> tuple[State, ServerMessage]:
        """Validates and aggregates the round; `answer` carries an algorithm's second phase to
        the clients (without it, the server would answer from the updates it holds)."""
        return server_step(self.state, sorted(self.updates, key=lambda u: u.client_id), answer)


class _StreamRound:
    """`fedng.federated.ServerRound` behind the same interface: each reply is validated and
    folded into running sums as it arrives (memory flat in the number of clients)."""

    def __init__(self, state: State) -> None:
        self.round = ServerRound(state)

    def add(self, update: ClientUpdate) -> None:
        self.round.add(update)

    def finish(self, answer: Answer | None = None) -> tuple[State, ServerMessage]:
        """Runs the second phase (if the algorithm has one) through `answer`, then finishes."""
        probe = self.round.probe()
        if probe is not None and answer is not None:
            for reply in answer(probe, self.round.accepted_ids):
                self.round.add_reply(reply)
        return self.round.finish()


def begin_round(state: State, streaming: bool = False) -> _BatchRound | _StreamRound:
    """The server side of one round, fed one decoded update at a time (the one place that picks
    the server's round implementation): streaming (`ServerRound`), or batch at the round's end."""
    return _StreamRound(state) if streaming else _BatchRound(state)


def arrays_to_record(params: Arrays) -> ArrayRecord:
    """Named fp32 arrays as a Flower `ArrayRecord` (numpy arrays, for Flower's tooling)."""
    return ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in params.items()})


def record_to_arrays(record: ArrayRecord) -> Arrays:
    """A Flower `ArrayRecord` of numpy arrays as named fp32 tensors."""
    return {k: torch.from_numpy(a.numpy().copy()).float() for k, a in record.items()}


class FedNGStrategy(Strategy):
    """Runs `server_config.algorithm` (any fedng algorithm) on a Flower `Grid`.

    Args:
        server_config: the server config (its `num_clients` is set to the clients the nodes
            serve).
        participation: fraction of clients sampled per round, in (0, 1].
        seed: seeds the client sampling (as `simulate(seed=...)`).
        evaluator: fills a round's metrics from the global model (default: none, NaN).
        history: the history to append the rounds to (default: a bare one).
        on_round: called after every round with the new state and the history.
        checkpoint: where to checkpoint the server after every round (None: nowhere).
        resume: continue from `checkpoint`'s last complete round when it holds one.
        streaming: validate and fold each reply into running sums as it arrives
            (`fedng.federated.ServerRound`); otherwise the round is validated and aggregated at
            its end, in client-id order (bit-identical to `simulate`).
        poll_interval: seconds between two pulls while replies are outstanding.

    Attributes:
        state: the server state after the last round (None before `start`).
        history: every round's record.
        client_of: node id -> the client id it serves.
    """

    def __init__(
        self,
        server_config: ServerConfig,
        *,
        participation: float = 1.0,
        seed: int = 0,
        evaluator: Evaluator | None = None,
        history: History | None = None,
        on_round: RoundHook | None = None,
        checkpoint: ServerCheckpoint | None = None,
        resume: bool = False,
        streaming: bool = False,
        poll_interval: float = 0.05,
    ) -> None:
        if not 0 < participation <= 1:
            raise ValueError(
                f"FedNGStrategy: 'participation' must be in (0, 1], got {participation!r}"
            )
        self.server_config = server_config
        self.participation = participation
        self.seed = seed
        self.evaluator = evaluator or no_evaluation
        self.history = history or History(
            "flower", server_config.algorithm, "accuracy", True, seed, {}, {}, {}
        )
        self.on_round = on_round
        self.checkpoint = checkpoint
        self.resume = resume
        self.streaming = streaming
        self.poll_interval = poll_interval
        self.state: State | None = None
        self.message: ServerMessage | None = None
        self.client_of: dict[int, int] = {}
        self.num_clients = 0
        self._rng = np.random.default_rng(seed)

    # --- Flower's Strategy interface ---------------------------------------------------------

    def summary(self) -> None:
        """Logs the configuration."""
        logger.info(
            "FedNGStrategy: %s, participation %s, seed %d",
            self.server_config.algorithm,
            self.participation,
            self.seed,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The round's train messages (the broadcast of the current state; `arrays` and `config`
        are ignored: the server state is the strategy's own)."""
        if self.message is None:
            raise RuntimeError("FedNGStrategy: call start() (it initializes the server state)")
        ids = self._sample(server_round)
        return self._messages(self._targets(grid, ids, {}), server_round)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Folds a round's replies in and finishes the round: one more round driven by the
        caller (`configure_train`, the grid, then this) after `start`, which initializes the
        state. Replies that cannot be used are logged with their reason."""
        if self.state is None:
            raise RuntimeError("FedNGStrategy: call start() (it initializes the server state)")
        rnd = begin_round(self.state, self.streaming)
        failed: dict[int, str] = {}
        losses: dict[int, float] = {}
        for reply in replies:
            cid = self.client_of.get(reply.metadata.src_node_id, -1)
            self._fold(rnd, cid, reply, failed, losses)
        self.state, self.message = rnd.finish()
        for cid, why in {**failed, **self.state.log.get("rejected", {})}.items():
            logger.warning("round %d: client %s rejected: %s", server_round, cid, why)
        return arrays_to_record(self.state.params), None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: the server evaluates the global model (`evaluator`)."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """No federated evaluation."""
        return None

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Runs `num_rounds` rounds, folding each reply in as it arrives.

        Args:
            grid: the Flower grid.
            initial_arrays: the initial global model: the model's trainable parameters by name
                (`arrays_to_record(get_params(model))`; buffers are not part of the protocol).
            num_rounds: communication rounds (capped by the algorithm's `max_rounds`).
            timeout: seconds a round (and the initial query) waits for replies.
            train_config: unused (the broadcast carries everything).
            evaluate_config: unused.
            evaluate_fn: Flower-style central evaluation, called with the global model before
                the first round and after each.

        Returns:
            Flower's `Result`: the final model, and per round the server's metrics and counts.
        """
        t0 = time.perf_counter()
        self._discover(grid, timeout)
        config = self.server_config.replace(num_clients=self.num_clients)
        algo = get_algorithm(config.algorithm)
        rounds = num_rounds if algo.max_rounds is None else min(num_rounds, algo.max_rounds)
        self.history.server_config = config.to_dict()
        self.history.sim = {
            "rounds": rounds,
            "participation": self.participation,
            "num_clients": self.num_clients,
        }
        self.state, self.message = server_init(
            record_to_arrays(initial_arrays),
            config,
            sampled_fraction(self.num_clients, self.participation),
            rounds or None,
        )
        self._rng = np.random.default_rng(self.seed)
        result = Result(arrays=arrays_to_record(self.state.params))
        identity = {
            "task": self.history.task,
            "seed": self.seed,
            "participation": self.participation,
            "num_clients": self.num_clients,
            "client_config": self.history.client_config,
            "server_config": config.to_dict(),
        }
        if self.resume and self.checkpoint is not None and self.checkpoint.exists():
            self.state, self.message = self.checkpoint.restore(
                self._rng, self.history, identity, rounds
            )
            if rounds:  # this call's plan (the run may be given more rounds than it had)
                plan_rounds(self.state, rounds)
            result.arrays = arrays_to_record(self.state.params)
            logger.info("resumed after round %d", self.state.round)
        else:
            self.history.rounds.append(self._evaluate(0, result, evaluate_fn))
        for r in range(self.history.rounds[-1].round + 1, rounds + 1):
            rec = self._run_round(grid, r, timeout)
            rec = self._evaluate(r, result, evaluate_fn, rec)
            self.history.rounds.append(rec)
            result.arrays = arrays_to_record(self.state.params)
            result.train_metrics_clientapp[r] = MetricRecord(
                {
                    "train_loss": rec.train_loss,
                    "accepted": len(self.state.log.get("accepted", [])),
                    "rejected": len(rec.rejected),
                    "bytes_up": rec.bytes_up,
                    "bytes_down": rec.bytes_down,
                }
            )
            logger.info(
                "round %d/%d: %s %.4f, %d rejected, %d B up, %d B down",
                r,
                rounds,
                self.history.metric,
                rec.metric,
                len(rec.rejected),
                rec.bytes_up,
                rec.bytes_down,
            )
            for cid, why in rec.rejected.items():
                logger.warning("round %d: client %s rejected: %s", r, cid, why)
            if self.checkpoint is not None:
                self.checkpoint.save(self.state, self.message, self._rng, self.history, identity)
            if self.on_round is not None:
                self.on_round(self.state, self.history)
        logger.info("FedNGStrategy: %d rounds in %.1f s", rounds, time.perf_counter() - t0)
        return result

    # --- the pieces -------------------------------------------------------------------------

    def _evaluate(
        self,
        r: int,
        result: Result,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
        into: RoundRecord | None = None,
    ) -> RoundRecord:
        """The round's record with the evaluator's metrics (and Flower's `evaluate_fn`)."""
        if self.state is None:
            raise RuntimeError("FedNGStrategy: call start() (it initializes the server state)")
        rec = self.evaluator(r, self.state.params)
        if into is not None:
            into.metric, into.test_loss = rec.metric, rec.test_loss
            into.val_metric, into.val_loss = rec.val_metric, rec.val_loss
            rec = into
        if evaluate_fn is not None:
            res = evaluate_fn(r, result.arrays if r else arrays_to_record(self.state.params))
            if res is not None:
                result.evaluate_metrics_serverapp[r] = res
        return rec

    def _discover(self, grid: Grid, timeout: float) -> None:
        """Asks every node which client it serves (`query`); a node that does not answer, or
        claims a client another node serves, is left out (logged)."""
        nodes = sorted(int(n) for n in grid.get_node_ids())
        msgs = [Message(RecordDict(), n, MessageType.QUERY, group_id="fedng.query") for n in nodes]
        counts: set[int] = set()
        for node, reply in self._exchange(grid, msgs, timeout):
            why = None
            if reply is None:
                why = f"no reply within {timeout:g} s"
            elif reply.has_error():
                why = f"error: {reply.error.reason}"
            else:
                rec = reply.content.config_records.get(QUERY_RECORD)
                cid = None if rec is None else rec.get("client-id")
                k = None if rec is None else rec.get("num-clients")
                if not isinstance(cid, int) or not isinstance(k, int) or not 0 <= cid < k:
                    why = f"malformed query reply {rec!r:.80}"
                elif cid in self.client_of.values():
                    why = f"claims client {cid}, already served by another node"
                else:
                    self.client_of[node] = cid
                    counts.add(k)
            if why is not None:
                logger.warning("node %d left out: %s", node, why)
        if not self.client_of:
            raise RuntimeError("FedNGStrategy: no node answered which client it serves")
        if len(counts) > 1:
            raise RuntimeError(f"FedNGStrategy: nodes disagree on the number of clients {counts}")
        self.num_clients = counts.pop()
        logger.info(
            "%d nodes serve %d of %d clients", len(nodes), len(self.client_of), self.num_clients
        )

    def _sample(self, server_round: int) -> list[int]:
        """The round's client ids (the simulator's sampling, same seed, same ids)."""
        return sample_clients(self._rng, self.num_clients, self.participation)

    def _targets(self, grid: Grid, ids: list[int], failed: dict[int, str]) -> dict[int, int]:
        """node id -> client id for the sampled clients a live node serves (the others go into
        `failed`)."""
        live = {int(n) for n in grid.get_node_ids()}
        node_of = {c: n for n, c in self.client_of.items()}
        out: dict[int, int] = {}
        for cid in ids:
            node = node_of.get(cid)
            if node is None or node not in live:
                failed[cid] = "no live node serves this client"
            else:
                out[node] = cid
        return out

    def _messages(self, targets: dict[int, int], server_round: int) -> list[Message]:
        if self.message is None:
            raise RuntimeError("FedNGStrategy: call start() (it builds the first broadcast)")
        content = encode_message(self.message)
        return [
            Message(content, node, MessageType.TRAIN, group_id=str(server_round))
            for node in targets
        ]

    def _run_round(self, grid: Grid, server_round: int, timeout: float) -> RoundRecord:
        """One round: sample, broadcast, fold every reply as it arrives, finish."""
        if self.state is None or self.message is None:
            raise RuntimeError("FedNGStrategy: call start() (it initializes the server state)")
        failed: dict[int, str] = {}
        losses: dict[int, float] = {}
        ids = self._sample(server_round)
        targets = self._targets(grid, ids, failed)
        msgs = self._messages(targets, server_round)
        down = payload_nbytes(msgs[0].content) * len(msgs) if msgs else 0
        rnd = begin_round(self.state, self.streaming)
        up, times = 0, []
        for node, reply in self._exchange(grid, msgs, timeout):
            cid = targets[node]
            if reply is None:
                failed[cid] = f"no reply within {timeout:g} s"
                continue
            times.append(time.time() - msgs[0].metadata.created_at)
            if reply.has_content():
                up += payload_nbytes(reply.content)
            self._fold(rnd, cid, reply, failed, losses)
        probe_bytes = [0, 0]
        answer = self._answerer(grid, targets, server_round, timeout, probe_bytes)
        self.state, self.message = rnd.finish(answer)
        up, down = up + probe_bytes[0], down + probe_bytes[1]
        rec = RoundRecord(server_round, math.nan, math.nan, math.nan, math.nan)
        rec.bytes_up, rec.bytes_down = up, down
        prev = self.history.rounds[-1].cum_bytes if self.history.rounds else 0
        rec.cum_bytes = prev + up + down
        rec.client_time_s = float(np.mean(times)) if times else 0.0
        return fill_round(rec, self.state.log, failed, losses, ids)

    def _answerer(
        self,
        grid: Grid,
        targets: dict[int, int],
        server_round: int,
        timeout: float,
        count: list[int],
    ) -> Answer:
        """The second phase on the grid: the probe goes to the nodes of the accepted clients as
        `train.probe`; their decoded answers come back (a missing or malformed answer only drops
        that client's scalars: the server's log counts the answers it used, `probe_answered`);
        bytes both ways are added to `count` ([up, down]), as the simulator counts them."""
        node_of = {c: n for n, c in targets.items()}

        def answer(probe: ServerMessage, ids: list[int]) -> list[ClientUpdate]:
            content = encode_message(probe)
            kind = f"{MessageType.TRAIN}.{PROBE_ACTION}"
            group = str(server_round)
            msgs = [Message(content, node_of[c], kind, group_id=group) for c in ids if c in node_of]
            replies: list[ClientUpdate] = []
            for node, reply in self._exchange(grid, msgs, timeout):
                cid = targets[node]
                count[1] += payload_nbytes(content)
                if reply is None or reply.has_error():
                    why = "no reply" if reply is None else str(reply.error.reason)[:200]
                    logger.warning("client %d: second phase unanswered: %s", cid, why)
                    continue
                count[0] += payload_nbytes(reply.content)
                try:
                    got = decode_update(reply.content)
                except Exception as err:  # a malformed answer drops this client's scalars
                    logger.warning("client %d: second phase does not decode: %s", cid, err)
                    continue
                if got.client_id == cid:
                    replies.append(got)
            return sorted(replies, key=lambda u: u.client_id)

        return answer

    @staticmethod
    def _fold(
        rnd: _BatchRound | _StreamRound,
        cid: int,
        reply: Message,
        failed: dict[int, str],
        losses: dict[int, float],
    ) -> None:
        """Adds one reply to the round, or records why it cannot be (error, malformed, wrong
        client id)."""
        if reply.has_error():
            failed[cid] = f"client error: {str(reply.error.reason)[:200]}"
            return
        try:
            update = decode_update(reply.content)
        except PayloadError as err:
            failed[cid] = f"does not decode: {err}"
            return
        except Exception as err:  # whatever a malformed reply provokes is its rejection
            failed[cid] = f"does not decode ({type(err).__name__}: {str(err)[:120]})"
            return
        if update.client_id != cid:
            failed[cid] = f"reply claims client id {update.client_id}, the node serves {cid}"
            return
        losses[cid] = update.metrics.get("train_loss", math.nan)
        rnd.add(update)

    def _exchange(
        self, grid: Grid, msgs: list[Message], timeout: float
    ) -> Iterator[tuple[int, Message | None]]:
        """Pushes `msgs` and yields (node id, reply) as replies arrive; (node id, None) for each
        message without a reply by `timeout` seconds (or that could not be pushed)."""
        if not msgs:
            return
        ids = list(grid.push_messages(msgs))
        pending: dict[str, int] = {}
        for msg, mid in zip(msgs, ids, strict=False):
            if mid:
                pending[str(mid)] = msg.metadata.dst_node_id
            else:
                yield msg.metadata.dst_node_id, None
        for msg in msgs[len(ids) :]:
            yield msg.metadata.dst_node_id, None
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            got = list(grid.pull_messages(list(pending)))
            for reply in got:
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is not None:
                    yield node, reply
            if pending and not got:
                time.sleep(self.poll_interval)
        for node in pending.values():
            yield node, None
