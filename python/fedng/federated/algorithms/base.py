"""The interface every federated algorithm implements.

Aggregation is streaming: `Algorithm.begin(state)` returns an `Accumulator` that folds each
validated update in as it arrives (`fold(update, weight)`), may ask the clients one cheap
summable question (`probe()` -> a message; `fold_reply(reply, weight)`), and applies the round
(`finish(state, scale)`). Summable algorithms (FedAvg and its variants, FedNG's mean and
summable aggregations) keep only running sums: server memory O(model + curvature), flat in the
number of clients. An algorithm that overrides `aggregate(state, updates)` instead gets a
`Collect` accumulator that holds the round's updates and calls it (memory O(K)).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from torch import nn

from fedng._typing import Arrays
from fedng.curvature import KFAC, CurvatureSet
from fedng.federated.aggregation.mean import apply_server_step, mean_delta, weights_of
from fedng.federated.aggregation.sums import WeightedSum
from fedng.federated.client.params import get_params, set_params, sub
from fedng.federated.client.sgd import local_sgd
from fedng.federated.config.base import AlgorithmConfig
from fedng.federated.config.common import ClientConfig, ServerConfig
from fedng.federated.messages import ClientUpdate, ServerMessage, ServerState
from fedng.federated.tasks.base import ClientData
from fedng.federated.wire import wire_dtype

State = ServerState[ServerConfig]
"""The server state of every algorithm."""

Answer = Callable[[ServerMessage, list[int]], list[ClientUpdate]]
"""(second-phase message, the accepted client ids) -> their replies (e.g. the simulator's
clients); see `Accumulator.probe`."""

OptionsT = TypeVar("OptionsT", bound=AlgorithmConfig)


def curvature_scales(cs: CurvatureSet) -> dict[str, float]:
    """Named scale measures of a curvature set, each checked against the round's median.

    Per block: `tr(F_i)`; for K-FAC blocks also each factor on its own, `tr(A_i) / n` and
    `tr(G_i) / m`. The factors are summed separately across clients (`CurvatureSet.combine`), so
    a product check `tr(A) tr(G)` alone would pass `A * c` with `G / c`; bounding each factor
    bounds what any one client can add to each factor of the global curvature.
    """
    out: dict[str, float] = {}
    for kind, rep in cs.reps.items():
        for spec, tr in zip(rep.specs, rep.block_traces(), strict=True):
            out[f"{kind}/{spec.name}"] = float(tr)
        if isinstance(rep, KFAC):
            for spec, a, g in zip(rep.specs, rep.A, rep.G, strict=True):
                ta = a.double().sum() if a.dim() == 1 else a.double().diagonal().sum()
                out[f"{kind}/{spec.name}/A"] = float(ta) / spec.n
                out[f"{kind}/{spec.name}/G"] = float(g.double().diagonal().sum()) / spec.m
    return out


class Accumulator(Protocol):
    """One round's aggregation, fed one validated update at a time.

    Weights: a server that knows the round's accepted set folds with `p_k = n_k / sum n` and
    finishes with `scale = 1`; a streaming server folds with `n_k` and finishes with
    `scale = 1 / sum n_k` (the sums are linear, so both give the same round up to rounding).
    """

    def fold(self, update: ClientUpdate, weight: float) -> None:
        """Adds one validated update with its weight."""

    def probe(self, state: State, scale: float) -> ServerMessage | None:
        """The message of an optional second summable phase (None: no second phase); called
        once, after the last fold."""

    def fold_reply(self, reply: ClientUpdate, weight: float) -> str | None:
        """Adds one client's answer to `probe()`'s message; the reason it is unusable, or None."""

    def finish(self, state: State, scale: float) -> State:
        """Applies the round to `state` (the caller's copy) and returns it."""

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data the accumulator holds (the server's round memory)."""


class Collect:
    """The accumulator of an algorithm that aggregates a list: holds every update (O(K))."""

    def __init__(self, algo: Algorithm[Any]) -> None:
        self.algo = algo
        self.updates: list[ClientUpdate] = []

    def fold(self, update: ClientUpdate, weight: float) -> None:
        """Keeps the update (its weight is recomputed from `num_examples` by `aggregate`)."""
        self.updates.append(update)

    def probe(self, state: State, scale: float) -> ServerMessage | None:
        """No second phase."""
        return None

    def fold_reply(self, reply: ClientUpdate, weight: float) -> str | None:
        """No second phase: every reply is unexpected."""
        return f"{self.algo.name} has no second phase"

    def finish(self, state: State, scale: float) -> State:
        """`algo.aggregate(state, updates)`."""
        return self.algo.aggregate(state, self.updates)

    @property
    def nbytes(self) -> int:
        """Every held update's tensors."""
        return sum(
            v.numel() * v.element_size()
            for u in self.updates
            for part in (u.delta, u.curvature, u.extras)
            for v in part.values()
        )


class MeanStep:
    """FedAvg's accumulator: the running weighted sum of the deltas, then the server step."""

    def __init__(self) -> None:
        self.deltas = WeightedSum()

    def fold(self, update: ClientUpdate, weight: float) -> None:
        """Adds `weight * delta_k`."""
        self.deltas.fold(update.delta, weight)

    def probe(self, state: State, scale: float) -> ServerMessage | None:
        """No second phase."""
        return None

    def fold_reply(self, reply: ClientUpdate, weight: float) -> str | None:
        """No second phase: every reply is unexpected."""
        return "FedAvg has no second phase"

    def finish(self, state: State, scale: float) -> State:
        """theta += server_lr * mean delta (with server momentum if configured)."""
        apply_server_step(state, self.deltas.scaled(scale))
        return state

    @property
    def nbytes(self) -> int:
        """One model's worth of sums."""
        return self.deltas.nbytes


class Algorithm(Generic[OptionsT]):
    """A federated algorithm: client step, server aggregation and broadcast.

    Subclasses override what differs from FedAvg. Every method is a pure function of its
    arguments; `aggregate` receives a state it may modify (the caller passes a copy).

    Attributes:
        name: the name it is registered (and broadcast) under.
        config_type: the type of its own config (`ClientConfig.options` / `ServerConfig.options`).
        max_rounds: rounds after which it stops communicating (None: no limit).
    """

    config_type: type[OptionsT]
    max_rounds: int | None = None

    def __init__(self, name: str) -> None:
        self.name = name

    def options(self, config: ClientConfig | ServerConfig) -> OptionsT:
        """The algorithm's own config inside `config`."""
        return config.options_as(self.config_type)

    def check_model(self, model: nn.Module) -> None:
        """Warns about what the algorithm cannot serve in the task's model (nothing here); called
        once per run, before round 0, so that clients can build their machinery silently."""

    def init_state(self, state: State) -> State:
        """Adds the algorithm's buffers to a fresh state."""
        return state

    def broadcast(self, state: State) -> ServerMessage:
        """The message for the round `state.round`."""
        return ServerMessage(state.round, self.name, state.params)

    def client_step(
        self,
        model: nn.Module,
        data: ClientData,
        message: ServerMessage,
        config: ClientConfig,
        client_state: Arrays,
    ) -> ClientUpdate:
        """Local training from the broadcast parameters; returns the unsealed update."""
        set_params(model, message.params)
        metrics = local_sgd(model, data, config, message.round)
        return self.make_update(model, data, message, config, metrics, client_state)

    def make_update(
        self,
        model: nn.Module,
        data: ClientData,
        message: ServerMessage,
        config: ClientConfig,
        metrics: dict[str, float],
        client_state: Arrays,
    ) -> ClientUpdate:
        """The update holding `theta_k - theta_t` in the configured wire dtype."""
        wd = wire_dtype(config.update_dtype, "update_dtype")
        delta = {k: v.to(wd) for k, v in sub(get_params(model), message.params).items()}
        return ClientUpdate(
            data.client_id,
            message.round,
            delta,
            data.num_examples,
            metrics=metrics,
            client_state=client_state,
        )

    def expected_extras(self, state: State) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the `extras` a client must send (validated on arrival)."""
        return {}

    def check_curvature(self, state: State, update: ClientUpdate) -> str | None:
        """Why an update's curvature payload is unacceptable (None when it is fine)."""
        if update.curvature:
            return f"unexpected curvature payload for {self.name}"
        return None

    def curvature_scale(self, state: State, update: ClientUpdate) -> float | None:
        """A scalar size of the update's curvature (its trace), for the round-median check."""
        return None

    def reference_curvature(self, state: State) -> CurvatureSet | None:
        """The server's own curvature, the reference scale of a round with fewer than 3
        curvature payloads (None: the algorithm keeps none)."""
        return None

    def reference_scales(self, state: State) -> dict[str, float] | None:
        """`curvature_scales` of `reference_curvature` (None without one): the per-block and
        per-factor reference scales of a round with fewer than 3 curvature payloads."""
        glob = self.reference_curvature(state)
        return None if glob is None else curvature_scales(glob)

    def aggregate(self, state: State, updates: list[ClientUpdate]) -> State:
        """FedAvg: theta += server_lr * sum_k p_k delta_k (with server momentum if configured)."""
        apply_server_step(state, mean_delta(updates))
        return state

    def begin(self, state: State) -> Accumulator:
        """The round's accumulator: FedAvg's running sums (`MeanStep`) unless the algorithm
        overrides `aggregate`, whose list of updates `Collect` then holds."""
        if type(self).aggregate is not Algorithm.aggregate:
            return Collect(self)
        return MeanStep()

    def answer_probe(self, update: ClientUpdate, probe: ServerMessage) -> ClientUpdate:
        """A client's answer to the round's second-phase message (see `Accumulator.probe`),
        computed from the update it sent. Only algorithms with a second phase answer.

        Raises:
            ValueError: the algorithm has no second phase.
        """
        raise ValueError(f"{self.name} has no second phase to answer")


def run_batch(
    algo: Algorithm[Any], work: State, updates: list[ClientUpdate], answer: Answer | None = None
) -> State:
    """A whole round through the algorithm's accumulator, with the weights `n_k / sum n` of the
    given updates: fold each, run the second phase if there is one (through `answer`, else
    answered from the updates themselves, as their clients would), then apply it to `work`.

    Returns:
        `work`, updated (`work.log["probe_answered"]` counts the usable replies).
    """
    acc = algo.begin(work)
    ws = weights_of(updates)
    for u, w in zip(updates, ws, strict=True):
        acc.fold(u, w)
    probe = acc.probe(work, 1.0)
    if probe is not None:
        weight = {u.client_id: w for u, w in zip(updates, ws, strict=True)}
        if answer is not None:
            replies = answer(probe.seal(), [u.client_id for u in updates])
        else:
            replies = [algo.answer_probe(u, probe) for u in updates]
        got = 0
        for r in replies:
            if r.client_id in weight and acc.fold_reply(r, weight.pop(r.client_id)) is None:
                got += 1
        work.log["probe_answered"] = got
    return acc.finish(work, 1.0)
