"""In-process federated simulation: seeded, deterministic, partial participation, real bytes.

Every round the server's message is serialized once and decoded by the clients; every client
update is serialized and decoded by the server, so the byte counts in the log are the lengths of
the actual payloads.

With `checkpoint_dir`, the whole run state is checkpointed after every round
(`fedng.federated.checkpoint`, atomic) and the final global model is saved as `model.pt`;
`resume=True` continues from the last complete round and ends bit-identical to an uninterrupted
run (see `RunCheckpoint`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedng._typing import Arrays
from fedng.federated.algorithms.base import Algorithm
from fedng.federated.algorithms.registry import get_algorithm
from fedng.federated.checkpoint import save_model
from fedng.federated.client.params import get_params, set_params
from fedng.federated.config.common import ClientConfig, ServerConfig
from fedng.federated.messages import ClientUpdate, ServerMessage
from fedng.federated.report.history import History, RoundRecord, fill_round
from fedng.federated.resume import MODEL_FILE, RunCheckpoint
from fedng.federated.round import client_step, plan_rounds, server_init, server_step
from fedng.federated.server_round import stream_step
from fedng.federated.tasks.base import FederatedTask
from fedng.federated.wire import PayloadError

Tamper = Callable[[int, ClientUpdate], ClientUpdate]
"""Test hook: (round, update) -> the update actually sent (e.g. a corrupted one)."""

TamperBytes = Callable[[int, int, bytes], bytes]
"""Test hook: (round, client id, wire bytes) -> the bytes actually received."""


def sample_size(num_clients: int, participation: float) -> int:
    """Clients sampled per round: max(1, round(participation * K)), at most K."""
    return max(1, min(num_clients, round(participation * num_clients)))


def sampled_fraction(num_clients: int, participation: float) -> float:
    """The fraction of the K clients a round actually samples, `sample_size / K` (what the
    server's sampling-noise estimate needs; 1.0 whenever rounding samples every client)."""
    return sample_size(num_clients, participation) / num_clients


def sample_clients(rng: np.random.Generator, num_clients: int, participation: float) -> list[int]:
    """`sample_size` distinct client ids, sorted."""
    m = sample_size(num_clients, participation)
    return sorted(rng.choice(num_clients, size=m, replace=False).tolist())


def simulate(
    task: FederatedTask,
    client_config: ClientConfig,
    server_config: ServerConfig,
    *,
    rounds: int,
    participation: float = 1.0,
    seed: int = 0,
    progress: bool = False,
    tamper: Tamper | None = None,
    desc: str | None = None,
    tamper_bytes: TamperBytes | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    streaming: bool = False,
) -> History:
    """Runs one federated training and returns its history.

    Args:
        task: the task (clients' data, test set, model).
        client_config: the clients' config (its `algorithm` must be the server's).
        server_config: the server's config.
        rounds: communication rounds.
        participation: fraction of clients sampled per round, in (0, 1].
        seed: seeds the model initialization, the client sampling and the clients' batch order
            (combined with `client_config.seed`).
        progress: show a tqdm progress bar.
        tamper: a test hook that may replace an update before it is sent.
        desc: progress-bar label.
        tamper_bytes: a test hook that may replace an update's bytes on the wire; bytes that do
            not decode are logged as that client's rejection and the round goes on.
        checkpoint_dir: a folder; the run's state is written to `checkpoint.pt` there after
            every round (atomically: a crash leaves the previous round's), and the final global
            model to `model.pt` (`model.load_state_dict(torch.load(path))` on a model from
            `task.model_fn`). Without `resume`, a checkpoint already there is overwritten by
            the new run. None: nothing is written.
        resume: continue from `checkpoint_dir/checkpoint.pt` when it exists (the same task,
            configs, seed and participation; `rounds` may be larger than the checkpoint's). The
            result is bit-identical to an uninterrupted run. Without a checkpoint the run starts
            from round 0.
        streaming: run each round's server through `ServerRound`, the updates folded one at a
            time in client-id order (memory flat in the number of clients; references from the
            previous round, see `fedng.federated.server_round`) instead of the batch
            `server_step`. Robust aggregation and DP need the batch server.

    Returns:
        The `History` (round 0 = the initial model).

    Raises:
        ValueError: mismatched algorithms, bad rounds / participation, `resume` without
            `checkpoint_dir`.
        CheckpointError: (a ValueError) the checkpoint to resume from is corrupt or truncated, of
            another run, or has more rounds than `rounds` (one line).
    """
    if client_config.algorithm != server_config.algorithm:
        raise ValueError(
            f"simulate: client and server algorithms differ: {client_config.algorithm!r} vs"
            f" {server_config.algorithm!r}"
        )
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"simulate: 'rounds' must be an int >= 0, got {rounds!r}")
    if not 0 < participation <= 1:
        raise ValueError(f"simulate: 'participation' must be in (0, 1], got {participation!r}")
    if resume and checkpoint_dir is None:
        raise ValueError("simulate: 'resume=True' needs 'checkpoint_dir'")
    k = len(task.clients)
    if server_config.num_clients != k:
        server_config = server_config.replace(num_clients=k)
    client_config = client_config.replace(loss=task.loss, seed=client_config.seed + 7919 * seed)
    algo = get_algorithm(client_config.algorithm)
    if algo.max_rounds is not None:
        rounds = min(rounds, algo.max_rounds)
    torch.manual_seed(seed)
    model = task.model_fn(seed)
    algo.check_model(model)
    eval_model = task.model_fn(seed)
    state, message = server_init(
        get_params(model), server_config, sampled_fraction(k, participation), rounds or None
    )
    rng = np.random.default_rng(seed)
    test_data, val_data = task.test_data(), task.validation_data()
    hist = History(
        task.name,
        client_config.algorithm,
        task.metric,
        task.higher_is_better,
        seed,
        client_config.to_dict(),
        server_config.to_dict(),
        {"rounds": rounds, "participation": participation, "num_clients": k},
    )

    def record(r: int, params: Arrays) -> RoundRecord:
        set_params(eval_model, params)
        eval_model.eval()
        te = test_data.evaluate(eval_model, task.loss, task.metric)
        va = val_data.evaluate(eval_model, task.loss, task.metric)
        return RoundRecord(r, te[task.metric], te["loss"], va[task.metric], va["loss"])

    client_states: dict[int, Arrays] = {}
    ckpt = RunCheckpoint(checkpoint_dir, hist, num_examples=[c.num_examples for c in task.clients])
    if resume and ckpt.exists():
        state, message = ckpt.restore(rounds, rng, client_states, model)
        if rounds:  # the plan is this call's (more rounds than the checkpoint's run may follow)
            plan_rounds(state, rounds)
    else:
        hist.rounds.append(record(0, state.params))
    cum = hist.rounds[-1].cum_bytes
    start = hist.rounds[-1].round
    bar = _progress(rounds, progress, desc or f"{task.name} {client_config.algorithm}")
    if bar is not None and start:
        bar.update(start)
    for r in range(start, rounds):
        ids = sample_clients(rng, k, participation)
        blob = message.to_bytes()
        received = ServerMessage.from_bytes(blob)
        updates, times, losses, up = [], [], [], 0
        undecodable: dict[int, str] = {}
        sent: dict[int, ClientUpdate] = {}
        probe_bytes = [0, 0]  # second summable phase (if any): [up, down]
        for cid in ids:
            t0 = time.perf_counter()
            upd = client_step(
                model, task.clients[cid], received, client_config, client_states.get(cid)
            )
            times.append(time.perf_counter() - t0)
            client_states[cid] = upd.client_state
            if tamper is not None:
                upd = tamper(r, upd)
            wire = upd.to_bytes()
            if tamper_bytes is not None:
                wire = tamper_bytes(r, cid, wire)
            up += len(wire)
            sent[cid] = upd
            try:
                updates.append(ClientUpdate.from_bytes(wire))
            except PayloadError as err:
                undecodable[cid] = f"does not decode: {err}"
            losses.append(upd.metrics.get("train_loss", math.nan))
        step = stream_step if streaming else server_step
        state, message = step(state, updates, _answerer(algo, sent, probe_bytes))
        up += probe_bytes[0]
        down = len(blob) * len(ids) + probe_bytes[1]
        cum += up + down
        rec = record(r + 1, state.params)
        fill_round(rec, state.log, undecodable, dict(zip(ids, losses, strict=True)), ids)
        rec.bytes_up, rec.bytes_down, rec.cum_bytes = up, down, cum
        rec.client_time_s = float(np.mean(times)) if times else 0.0
        hist.rounds.append(rec)
        ckpt.save(state, message, rng, client_states, model)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({task.metric: f"{rec.metric:.4f}"})
    if bar is not None:
        bar.close()
    if ckpt.folder is not None:
        set_params(eval_model, state.params)
        save_model(ckpt.folder / MODEL_FILE, eval_model)
    return hist


def _answerer(
    algo: Algorithm[Any], sent: dict[int, ClientUpdate], count: list[int]
) -> Callable[[ServerMessage, list[int]], list[ClientUpdate]]:
    """The clients' side of an algorithm's second summable phase: each accepted client decodes
    the message and answers from the update it sent; the bytes both ways are added to `count`
    ([up, down])."""

    def answer(probe: ServerMessage, ids: list[int]) -> list[ClientUpdate]:
        blob = probe.to_bytes()
        got = ServerMessage.from_bytes(blob)
        replies = []
        for cid in ids:
            wire = algo.answer_probe(sent[cid], got).to_bytes()
            count[0] += len(wire)
            count[1] += len(blob)
            replies.append(ClientUpdate.from_bytes(wire))
        return replies

    return answer


def _progress(total: int, enabled: bool, desc: str) -> Any:
    """A tqdm bar (untyped), or None when disabled."""
    if not enabled:
        return None
    from tqdm.auto import tqdm  # only when a bar is drawn: tqdm.auto probes for notebooks

    # disable=None: drawn on a terminal, skipped when output goes to a file or CI log.
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)
