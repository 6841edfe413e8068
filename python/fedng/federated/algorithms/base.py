"""The interface every federated algorithm implements."""

from __future__ import annotations

from typing import Generic, TypeVar

from torch import nn

from fedng._typing import Arrays
from fedng.federated.aggregation.mean import apply_server_step, mean_delta
from fedng.federated.client.params import get_params, set_params, sub
from fedng.federated.client.sgd import local_sgd
from fedng.federated.config.base import AlgorithmConfig
from fedng.federated.config.common import ClientConfig, ServerConfig
from fedng.federated.messages import ClientUpdate, ServerMessage, ServerState
from fedng.federated.tasks.base import ClientData
from fedng.federated.wire import wire_dtype

State = ServerState[ServerConfig]
"""The server state of every algorithm."""

OptionsT = TypeVar("OptionsT", bound=AlgorithmConfig)


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

    def aggregate(self, state: State, updates: list[ClientUpdate]) -> State:
        """FedAvg: theta += server_lr * sum_k p_k delta_k (with server momentum if configured)."""
        apply_server_step(state, mean_delta(updates))
        return state
