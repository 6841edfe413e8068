"""What a federated task is: clients' local data, a global test set, a model and a metric."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeAlias

import torch
from torch import nn

from fedng.curvature.fisher import LossType
from fedng.federated.losses import canonical_loss, loss_fn
from fedng.federated.tasks.data import (
    EVAL_BATCH_SIZE,
    DataSource,
    TensorPair,
    check_source,
    evaluate_batches,
    sequential_batches,
    source_len,
    tensors_of,
)

UserData: TypeAlias = "TensorPair | DataSource"
"""What a user gives for one client's (or the test) data: an (x, y) tensor pair, a map-style
`Dataset` of (input, target) examples, or a `DataLoader` of (inputs, targets) batches."""

METRICS: tuple[str, ...] = ("accuracy", "rel_l2")
"""Task metrics: accuracy (higher is better) or relative L2 error (lower is better)."""


_EMPTY = torch.empty(0)


@dataclass
class ClientData:
    """One client's local data: in-memory tensors, or a data source read batch by batch.

    Build it with `ClientData.from_data` from whatever the user has; the local loops read it
    through `fedng.federated.client.sgd.training_batches` / `ordered_batches`, never through `x` /
    `y` directly.

    Attributes:
        client_id: the client's index.
        x: training inputs [n, ...] (float32); empty when `train` is set.
        y: training targets: class indices [n] (int64) or regression targets [n, k] (float32);
            empty when `train` is set.
        x_val: the client-held validation inputs [n_val, ...] (used only for tuning).
        y_val: validation targets.
        train: a `Dataset` or `DataLoader` of the training data (None: `x`, `y`).
        val: a `Dataset` or `DataLoader` of the validation data (None: `x_val`, `y_val`).
        build: builds (train, val) on first use (`ClientData.lazy`); None once built.
    """

    client_id: int
    x: torch.Tensor
    y: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    train: DataSource | None = None
    val: DataSource | None = None
    build: Callable[[], tuple[UserData, UserData | None]] | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def num_examples(self) -> int:
        """Training examples (the aggregation weight)."""
        self.materialize()
        return int(self.x.shape[0]) if self.train is None else source_len(self.train)

    @staticmethod
    def lazy(client_id: int, build: Callable[[], tuple[UserData, UserData | None]]) -> ClientData:
        """A client whose data `build()` returns as (train, val) on first use, so that a node of a
        federation calls the data factory of its own partition only."""
        return ClientData(client_id, _EMPTY, _EMPTY, _EMPTY, _EMPTY, build=build)

    def materialize(self) -> ClientData:
        """Builds the data of a `lazy` client (once); returns self.

        Raises:
            TypeError, ValueError: as `from_data`, for what `build` returned.
        """
        if self.build is not None:
            made = ClientData.from_data(self.client_id, *self.build())
            self.x, self.y, self.x_val, self.y_val = made.x, made.y, made.x_val, made.y_val
            self.train, self.val, self.build = made.train, made.val, None
        return self

    @staticmethod
    def from_data(client_id: int, train: UserData, val: UserData | None = None) -> ClientData:
        """One client's data from tensors, a `Dataset` or a `DataLoader` (nothing is copied).

        Args:
            client_id: the client's index.
            train: its training data: an (x, y) tensor pair, a map-style `Dataset` of
                (input, target) examples (batched with the config's `batch_size` in the seeded
                order every algorithm shares), or a `DataLoader` (its own batches and order,
                restarted when exhausted; `batch_size` does not apply).
            val: its validation data, the same kinds (None: none).

        Raises:
            TypeError: data of another kind, or without a length (one line).
            ValueError: no training example.
        """
        where = f"client {client_id}"
        pair = tensors_of(train)
        if pair is None:
            src = check_source(train, f"{where} training data")
            x, y = _EMPTY, _EMPTY
        else:
            src, (x, y) = None, pair
        vpair = tensors_of(val) if val is not None else (_EMPTY, _EMPTY)
        vsrc = None if vpair is not None else check_source(val, f"{where} validation data")
        xv, yv = vpair if vpair is not None else (_EMPTY, _EMPTY)
        data = ClientData(client_id, x, y, xv, yv, src, vsrc)
        if data.num_examples < 1:
            raise ValueError(f"{where}: the training data holds no example")
        return data


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
    test: DataSource | None = None

    def __post_init__(self) -> None:
        self.loss = canonical_loss(self.loss, "FederatedTask", stacklevel=4)

    @classmethod
    def from_datasets(
        cls,
        model_fn: Callable[[], nn.Module],
        client_data: Sequence[UserData] | Callable[[int], UserData],
        test_data: UserData,
        *,
        loss: LossType = "cross_entropy",
        metric: str = "accuracy",
        num_clients: int | None = None,
        val_data: Sequence[UserData | None] | Callable[[int], UserData | None] | None = None,
        name: str = "custom",
        num_classes: int = 0,
    ) -> FederatedTask:
        """A task from your own model factory and data, for `simulate` (and the Flower apps).

        Args:
            model_fn: builds the model, no argument; it is called under `torch.manual_seed(s)`
                (`seeded_model`), so one seed gives one initialization.
            client_data: each client's training data (an (x, y) tensor pair, a `Dataset`, or a
                `DataLoader`), as a sequence or as a function of the client id.
            test_data: the global test set (the same kinds).
            loss: "cross_entropy" (targets: class indices) or "mse".
            metric: "accuracy" or "rel_l2".
            num_clients: clients; needed when `client_data` is a function.
            val_data: each client's validation data (used for tuning, reported as `val_metric`),
                a sequence or a function; None: none.
            name: the task's name in reports.
            num_classes: classes (0: regression or unknown).

        Raises:
            ValueError: a bad metric, or no client / `num_clients` missing or wrong.
            TypeError: data of an unsupported kind (one line, naming the client).
        """
        if metric not in METRICS:
            raise ValueError(
                f"FederatedTask.from_datasets: 'metric' must be one of {list(METRICS)}, got"
                f" {metric!r}"
            )
        if callable(client_data):
            if num_clients is None or num_clients < 1:
                raise ValueError(
                    "FederatedTask.from_datasets: 'num_clients' >= 1 is needed when"
                    f" 'client_data' is a function, got {num_clients!r}"
                )
            n, train_of = num_clients, client_data
        else:
            given = list(client_data)
            n, train_of = len(given), given.__getitem__
            if not given or num_clients not in (None, n):
                raise ValueError(
                    f"FederatedTask.from_datasets: {n} client data sets for"
                    f" 'num_clients'={num_clients!r}"
                )
        val_of: Callable[[int], UserData | None]
        if val_data is None:
            val_of = _no_data
        elif callable(val_data):
            val_of = val_data
        else:
            vals = list(val_data)
            if len(vals) != n:
                raise ValueError(
                    f"FederatedTask.from_datasets: {len(vals)} validation sets for {n} clients"
                )
            val_of = vals.__getitem__
        if callable(client_data) or callable(val_data):  # factories run on first use only
            clients = [ClientData.lazy(c, partial(_data_of, train_of, val_of, c)) for c in range(n)]
        else:
            clients = [ClientData.from_data(c, train_of(c), val_of(c)) for c in range(n)]
        pair = tensors_of(test_data)
        test = None if pair is not None else check_source(test_data, "test data")
        x_test, y_test = pair if pair is not None else (_EMPTY, _EMPTY)
        return cls(
            name,
            clients,
            x_test,
            y_test,
            lambda s: seeded_model(model_fn, s),
            loss,
            metric,
            num_classes,
            test=test,
        )

    def test_data(self) -> EvalData:
        """The global test set."""
        if self.test is None:
            return EvalData((self.x_test, self.y_test))
        return EvalData(None, (self.test,))

    def validation_data(self) -> EvalData:
        """All clients' validation data (federated evaluation weighted by example count)."""
        for c in self.clients:
            c.materialize()
        sources = tuple(c.val for c in self.clients if c.val is not None)
        held = [c for c in self.clients if c.val is None and c.x_val.shape[0] > 0]
        tensors = None
        if held:
            tensors = (torch.cat([c.x_val for c in held]), torch.cat([c.y_val for c in held]))
        return EvalData(tensors, sources)

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


def _no_data(client_id: int) -> None:
    """No validation data for any client."""


def _data_of(
    train_of: Callable[[int], UserData], val_of: Callable[[int], UserData | None], client_id: int
) -> tuple[UserData, UserData | None]:
    """(train, val) of one client from the factories."""
    return train_of(client_id), val_of(client_id)


@dataclass(frozen=True)
class EvalData:
    """Where a model is evaluated: in-memory tensors and/or data sources.

    Attributes:
        tensors: (x, y); alone, evaluated in one pass (exactly `evaluate`).
        sources: `Dataset`s / `DataLoader`s, evaluated batch by batch (with the tensors, if any).
        batch_size: examples per forward pass over a `Dataset` or the tensors beside sources.
    """

    tensors: TensorPair | None = None
    sources: tuple[DataSource, ...] = ()
    batch_size: int = EVAL_BATCH_SIZE

    def batches(self) -> Iterator[TensorPair]:
        """Every example once: the tensors in chunks, then each source."""
        if self.tensors is not None:
            x, y = self.tensors
            for lo in range(0, int(x.shape[0]), self.batch_size):
                yield x[lo : lo + self.batch_size], y[lo : lo + self.batch_size]
        for s in self.sources:
            yield from sequential_batches(s, self.batch_size)

    def evaluate(self, model: nn.Module, loss: str, metric: str) -> dict[str, float]:
        """{"loss": mean loss, metric: value} of `model` (no grad); NaN without examples."""
        if self.tensors is not None and not self.sources:
            return evaluate(model, self.tensors[0], self.tensors[1], loss, metric)
        return evaluate_batches(model, self.batches(), loss, metric)


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
