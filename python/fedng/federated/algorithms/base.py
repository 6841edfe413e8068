"""The interface every federated algorithm implements, and helpers they share."""

from __future__ import annotations

from torch import nn

from fedng.federated.config import ClientConfig
from fedng.federated.local import get_params, local_sgd, set_params, sub
from fedng.federated.protocol import Arrays, ClientUpdate, ServerMessage, ServerState, weights_of
from fedng.federated.serialize import wire_dtype
from fedng.federated.tasks.base import ClientData


class Algorithm:
    """A federated algorithm: client step, server aggregation and broadcast.

    Subclasses override what differs from FedAvg. Every method is a pure function of its
    arguments; `aggregate` receives a state it may modify (the caller passes a copy).
    """

    name: str = "base"
    max_rounds: int | None = None
    """Rounds after which the algorithm stops communicating (None: no limit)."""

    def init_state(self, state: ServerState) -> ServerState:
        """Adds the algorithm's buffers to a fresh state."""
        return state

    def broadcast(self, state: ServerState) -> ServerMessage:
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

    def expected_extras(self, state: ServerState) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the `extras` a client must send (validated on arrival)."""
        return {}

    def check_curvature(self, state: ServerState, update: ClientUpdate) -> str | None:
        """Why an update's curvature payload is unacceptable (None when it is fine)."""
        if update.curvature:
            return f"unexpected curvature payload for {self.name}"
        return None

    def curvature_scale(self, state: ServerState, update: ClientUpdate) -> float | None:
        """A scalar size of the update's curvature (its trace), for the round-median check."""
        return None

    def aggregate(self, state: ServerState, updates: list[ClientUpdate]) -> ServerState:
        """FedAvg: theta += server_lr * sum_k p_k delta_k (with server momentum if configured)."""
        step = mean_delta(updates)
        apply_server_step(state, step)
        return state


def mean_delta(updates: list[ClientUpdate], key: str = "delta") -> Arrays:
    """sum_k p_k x_k in fp32 with p_k = n_k / sum n, for x = update.delta or update.extras."""
    ws = weights_of(updates)
    out: Arrays = {}
    for w, u in zip(ws, updates, strict=True):
        src = u.delta if key == "delta" else u.extras
        for k, v in src.items():
            out[k] = out[k] + w * v.float() if k in out else w * v.float()
    return out


def apply_server_step(state: ServerState, step: Arrays) -> None:
    """theta += server_lr * (momentum buffer or step), heavy-ball momentum `server_momentum`."""
    cfg = state.config
    for k, d in step.items():
        if cfg.server_momentum > 0:
            key = f"m/{k}"
            m = state.buffers.get(key)
            m = d.clone() if m is None else cfg.server_momentum * m + d
            state.buffers[key] = m
            d = m
        state.params[k] = state.params[k] + cfg.server_lr * d
