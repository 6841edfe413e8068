"""What a federated task is: clients' local data, a global test set, a model and a metric."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedng.curvature.fisher import LossType
from fedng.federated.losses import canonical_loss, loss_fn


@dataclass
class ClientData:
    """One client's local data.

    Attributes:
        client_id: the client's index.
        x: training inputs [n, ...] (float32).
        y: training targets: class indices [n] (int64) or regression targets [n, k] (float32).
        x_val: the client-held validation inputs [n_val, ...] (used only for tuning).
        y_val: validation targets.
    """

    client_id: int
    x: torch.Tensor
    y: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor

    @property
    def num_examples(self) -> int:
        """Training examples."""
        return int(self.x.shape[0])


@dataclass
class FederatedTask:
    """A federated benchmark task.

    Attributes:
        name: e.g. "synthetic(1,1)".
        clients: the clients' data.
        x_test: global test inputs [n_test, ...].
        y_test: global test targets.
        model_fn: builds the model from a seed (same seed, same initial weights).
        loss: "cross_entropy" or "mse" ("ce" is accepted, deprecated).
        metric: "accuracy" (higher is better) or "rel_l2" (lower is better).
        num_classes: classes (0 for regression).
        info: generator details (for tests and reports).
    """

    name: str
    clients: list[ClientData]
    x_test: torch.Tensor
    y_test: torch.Tensor
    model_fn: Callable[[int], nn.Module]
    loss: LossType
    metric: str
    num_classes: int
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.loss = canonical_loss(self.loss, "FederatedTask", stacklevel=4)

    @property
    def higher_is_better(self) -> bool:
        """Whether larger metric values are better."""
        return self.metric == "accuracy"

    def validation_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All clients' validation data (federated evaluation weighted by example count)."""
        return (
            torch.cat([c.x_val for c in self.clients]),
            torch.cat([c.y_val for c in self.clients]),
        )


def seeded_model(builder: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Builds a model with torch's RNG forked and seeded, so global RNG state is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder()


def mlp(sizes: list[int], act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """An MLP `sizes[0] - ... - sizes[-1]` with `act` between Linear layers."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str, metric: str
) -> dict[str, float]:
    """Loss and metric of `model` on (x, y), in one no-grad pass.

    Args:
        model: the model.
        x: inputs [n, ...].
        y: targets [n] (class indices) or [n, k].
        loss: "cross_entropy" or "mse".
        metric: "accuracy" or "rel_l2".

    Returns:
        {"loss": mean loss, metric: accuracy in [0, 1] or relative L2 error}.
    """
    with torch.no_grad():
        out = model(x)
        val = float(loss_fn(canonical_loss(loss, "evaluate"))(out, y))
        if metric == "accuracy":
            m = float((out.argmax(1) == y).float().mean())
        else:
            m = float(torch.linalg.vector_norm(out - y) / torch.linalg.vector_norm(y))
    return {"loss": val, metric: m}
