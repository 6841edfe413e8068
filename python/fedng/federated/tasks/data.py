"""Your own data in a federated task: in-memory tensors, any map-style `Dataset`, or a
`DataLoader`, read batch by batch (nothing is copied up front).

A data source yields `(inputs, targets)` pairs: a `Dataset` item is one example's pair (collated
into a batch with `torch.utils.data.default_collate`), a `DataLoader` batch is already a pair. A
`TensorDataset` of two tensors is used as its tensors directly (the fast in-memory path).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sized
from typing import Any, TypeAlias

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

from fedng.federated.losses import canonical_loss, loss_fn

DataSource: TypeAlias = "Dataset[Any] | DataLoader[Any]"
"""A map-style `Dataset` of (input, target) examples, or a `DataLoader` of (inputs, targets)."""

TensorPair: TypeAlias = "tuple[torch.Tensor, torch.Tensor]"
"""(inputs [n, ...], targets [n] or [n, k])."""

EVAL_BATCH_SIZE = 1024
"""Examples per forward pass when a model is evaluated on a data source."""


def tensors_of(data: object) -> TensorPair | None:
    """`data`'s two tensors when it is an (x, y) tensor pair or a `TensorDataset` of two tensors
    (no copy); None for any other source."""
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        return data.tensors[0], data.tensors[1]
    if (
        isinstance(data, tuple)
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
    ):
        return data[0], data[1]
    return None


def check_source(data: object, where: str) -> DataSource:
    """`data` if it is a sized `Dataset` or a `DataLoader` over one.

    Raises:
        TypeError: another type, or a source without `len` (e.g. an `IterableDataset`); one line.
    """
    if not isinstance(data, (Dataset, DataLoader)):
        raise TypeError(
            f"{where}: expected an (x, y) tensor pair, a torch Dataset or a DataLoader, got"
            f" {type(data).__name__}"
        )
    inner = data.dataset if isinstance(data, DataLoader) else data
    if not isinstance(inner, Sized):
        raise TypeError(
            f"{where}: the dataset must have a length (a map-style Dataset), got"
            f" {type(inner).__name__}"
        )
    return data


def source_len(source: DataSource) -> int:
    """Examples in a source (its dataset's length)."""
    inner = source.dataset if isinstance(source, DataLoader) else source
    return len(inner)  # type: ignore[arg-type]  # check_source made sure it is Sized


def as_pair(batch: object, where: str = "data") -> TensorPair:
    """A collated batch as (inputs, targets).

    Raises:
        TypeError: the batch is not a pair of tensors (one line).
    """
    if (
        isinstance(batch, (tuple, list))
        and len(batch) == 2
        and all(isinstance(t, torch.Tensor) for t in batch)
    ):
        return batch[0], batch[1]
    raise TypeError(
        f"{where}: each batch must be an (inputs, targets) pair of tensors, got"
        f" {type(batch).__name__}"
    )


def collate(dataset: Dataset[Any], idx: torch.Tensor) -> TensorPair:
    """The examples `idx` of a map-style dataset as one (inputs, targets) batch."""
    return as_pair(default_collate([dataset[i] for i in idx.tolist()]), type(dataset).__name__)


def sequential_batches(source: DataSource, batch_size: int) -> Iterator[TensorPair]:
    """Every example once, in order: a `DataLoader` as it iterates, a `Dataset` in chunks of
    `batch_size`."""
    if isinstance(source, DataLoader):
        for batch in source:
            yield as_pair(batch, "DataLoader")
        return
    n = source_len(source)
    for lo in range(0, n, batch_size):
        yield collate(source, torch.arange(lo, min(n, lo + batch_size)))


def evaluate_batches(
    model: nn.Module, batches: Iterable[TensorPair], loss: str, metric: str
) -> dict[str, float]:
    """Loss and metric of `model` over batches, weighted by batch size (no grad).

    Args:
        model: the model (in eval mode).
        batches: (inputs, targets) batches.
        loss: "cross_entropy" or "mse".
        metric: "accuracy" or "rel_l2".

    Returns:
        {"loss": mean loss, metric: accuracy or relative L2 error over all examples}; NaN with
        no example.
    """
    crit = loss_fn(canonical_loss(loss, "evaluate"))
    n = 0
    total = correct = err2 = ref2 = 0.0
    with torch.no_grad():
        for x, y in batches:
            out = model(x)
            b = int(y.shape[0])
            total += float(crit(out, y)) * b
            n += b
            if metric == "accuracy":
                correct += float((out.argmax(1) == y).sum())
            else:
                err2 += float(torch.sum((out - y) ** 2))
                ref2 += float(torch.sum(y**2))
    if n == 0:
        return {"loss": math.nan, metric: math.nan}
    m = correct / n if metric == "accuracy" else math.sqrt(err2 / ref2)
    return {"loss": total / n, metric: m}
