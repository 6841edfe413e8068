"""One round of the federated protocol every algorithm speaks.

    client_step(model, data, server_message, config) -> ClientUpdate
    server_step(state, updates) -> (state, server_message)

`server_step` is the batch form of `fedng.federated.server_round.ServerRound` (the streaming
server a deployment feeds reply by reply): it validates the whole round first (round medians),
then folds the accepted updates into the algorithm's accumulator with weights `n_k / sum n`, so
FedAvg's result is the weighted mean bit for bit. An optional `answer` callback carries an
algorithm's second summable phase to the clients (FedNG's summable line search); without it the
server answers from the updates it holds.

Both are pure functions of tensors and configs: the client's result depends only on the message,
its data, its config (and its own persistent `client_state`, the analogue of a Flower ClientApp's
`context.state`); the server validates every update, aggregates the accepted ones and builds the
next broadcast, never mutating the state it was given.
"""

from __future__ import annotations

import time
from typing import Any

from torch import nn

from fedng._typing import Arrays
from fedng.federated.aggregation.stage import defend, holds_round
from fedng.federated.algorithms.base import Algorithm, Answer, State, run_batch
from fedng.federated.algorithms.registry import get_algorithm
from fedng.federated.algorithms.sample_noise import PARTICIPATION_KEY
from fedng.federated.algorithms.step_schedule import NUM_ROUNDS_KEY
from fedng.federated.client.privacy import privatize_update
from fedng.federated.config.common import ClientConfig, ServerConfig
from fedng.federated.messages import ClientUpdate, ServerMessage, ServerState
from fedng.federated.server_round import non_finite
from fedng.federated.tasks.base import ClientData
from fedng.federated.validate import REFERENCE_KEY, delta_norm, reference_of, validate_updates


def server_init(
    params: Arrays,
    config: ServerConfig,
    participation: float = 1.0,
    num_rounds: int | None = None,
) -> tuple[State, ServerMessage]:
    """The initial server state and the first round's message.

    Args:
        params: the initial global model (named arrays; cloned to fp32).
        config: the server config; `config.algorithm` picks the algorithm.
        participation: the fraction of the clients the driver samples per round, in (0, 1];
            below 1 it is kept in `state.meta["participation"]` (FedNG's server step reads it:
            `fedng.federated.algorithms.sample_noise`).
        num_rounds: the rounds the driver plans to run, or None (unknown); kept in
            `state.meta["num_rounds"]` (FedNG's server step decays over the run's last rounds:
            `fedng.federated.algorithms.step_schedule`; `plan_rounds` changes it).

    Returns:
        (state, message for round 0).
    """
    algo = get_algorithm(config.algorithm)
    if not 0 < participation <= 1:
        raise ValueError(f"server_init: 'participation' must be in (0, 1], got {participation!r}")
    state = ServerState(0, {k: v.detach().float().clone() for k, v in params.items()}, config)
    if participation < 1:
        state.meta[PARTICIPATION_KEY] = float(participation)
    if num_rounds is not None:
        plan_rounds(state, num_rounds)
    state = algo.init_state(state)
    return state, algo.broadcast(state).seal()


def plan_rounds(state: State, num_rounds: int) -> None:
    """Tells the server (in place) how many rounds the run will have in all, e.g. when a
    resumed run is given more rounds than it was started with.

    Raises:
        ValueError: `num_rounds` not an int >= 1.
    """
    if isinstance(num_rounds, bool) or not isinstance(num_rounds, int) or num_rounds < 1:
        raise ValueError(f"server_init: 'num_rounds' must be an int >= 1, got {num_rounds!r}")
    state.meta[NUM_ROUNDS_KEY] = num_rounds


def client_step(
    model: nn.Module,
    data: ClientData,
    server_message: ServerMessage,
    config: ClientConfig,
    client_state: Arrays | None = None,
) -> ClientUpdate:
    """Runs one client's local step.

    Args:
        model: a module of the task's architecture, used as workspace (its parameters are
            overwritten with `server_message.params`).
        data: the client's local data.
        server_message: the round's broadcast.
        config: the client config; `config.algorithm` must match the message's algorithm.
        client_state: what this client kept from its previous round (None the first time).

    Returns:
        The sealed `ClientUpdate` (its `client_state` is what to pass next time).

    Raises:
        ValueError: the config's algorithm is not the message's.
    """
    if config.algorithm != server_message.algorithm:
        raise ValueError(
            f"client_step: 'config.algorithm' must match the server message's algorithm"
            f" {server_message.algorithm!r}, got {config.algorithm!r}"
        )
    upd = get_algorithm(config.algorithm).client_step(
        model, data, server_message, config, dict(client_state or {})
    )
    privatize_update(upd, config)  # DP: clip (and noise) before the update leaves
    return upd.seal()


def _aggregate(
    state: State, accepted: list[ClientUpdate], algo: Algorithm[Any], answer: Answer | None = None
) -> State | str:
    """The aggregated copy of `state`, or why aggregation failed (non-finite result, error)."""
    work = state.copy()
    work.log = {}
    try:
        ask = None if holds_round(state.config) else answer  # robust / DP: the server answers
        new = run_batch(algo, work, defend(work, accepted), ask)  # robust / DP stage first
    except Exception as err:  # a payload that breaks aggregation is dropped
        return f"aggregation failed ({type(err).__name__}: {str(err)[:120]})"
    bad = non_finite(new)
    return f"aggregation produced non-finite {bad[:5]}" if bad else new


def _without_culprit(
    state: State,
    accepted: list[ClientUpdate],
    algo: Algorithm[Any],
    why: str,
    answer: Answer | None,
) -> tuple[State, list[ClientUpdate], dict[int, str]] | None:
    """Leaves out one update at a time (largest delta first) until aggregation succeeds;
    None if no set of at least one update aggregates."""
    dropped: dict[int, str] = {}
    rest = list(accepted)
    while len(rest) > 1:
        order = sorted(rest, key=delta_norm, reverse=True)
        for cand in order:
            trial = [u for u in rest if u is not cand]
            res = _aggregate(state, trial, algo, answer)
            if not isinstance(res, str):
                dropped[cand.client_id] = f"{why} with this update; left out"
                return res, trial, dropped
        dropped[order[0].client_id] = f"{why} with this update; left out"
        rest = order[1:]
    return None


def server_step(
    state: State, updates: list[ClientUpdate], answer: Answer | None = None
) -> tuple[State, ServerMessage]:
    """Validates every update, aggregates the accepted ones, and builds the next message.

    A payload that fails validation is rejected with its reasons in `state.log["rejected"]`
    (client id -> list of reasons); the round goes on with the rest, and the result is exactly
    that of the round without it. If aggregation fails or produces a non-finite model, the
    updates are left out one at a time (largest delta first) until it succeeds, each with a
    reason; if none can be aggregated the round is rolled back (the returned state keeps the
    previous parameters) and logged.

    Args:
        state: the current server state (not modified).
        updates: the round's client updates (decoded from the wire).
        answer: carries an algorithm's second-phase message to the accepted clients and
            returns their replies (None: the server answers from the updates it holds, as the
            clients would).

    Returns:
        (new state, message for the next round).
    """
    t0 = time.perf_counter()
    algo = get_algorithm(state.config.algorithm)
    accepted, rejected = validate_updates(state, updates, algo)
    new = state.copy()
    new.log = {}
    log: dict[str, Any] = {"rejected": rejected}
    if accepted:
        res = _aggregate(state, accepted, algo, answer)
        if isinstance(res, str):
            retry = _without_culprit(state, accepted, algo, res, answer)
            if retry is None:
                log["rolled_back"] = res
                accepted = []
            else:
                new, accepted, dropped = retry
                for cid, why in dropped.items():
                    rejected.setdefault(cid, []).append(why)
        else:
            new = res
        if accepted:
            new.meta[REFERENCE_KEY] = reference_of(state, accepted)
    else:
        log["skipped"] = "no valid update this round"
    new.log = {"accepted": [u.client_id for u in accepted], **log, **new.log}
    new.round = state.round + 1
    message = algo.broadcast(new).seal()
    new.log["server_time_s"] = time.perf_counter() - t0
    return new, message
