"""Your own model and data: FederatedTask.from_datasets with tensors, a custom Dataset or a
DataLoader per client, in the in-process simulator."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from _fed import blobs_task
from fedng.federated import ClientData, FederatedTask, make_configs, simulate
from fedng.federated.report.history import History
from fedng.federated.resume import MODEL_FILE
from fedng.federated.tasks.base import mlp
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset


class Rows(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A map-style dataset over tensors that counts the examples read."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.reads = x, y, 0

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads += 1
        return self.x[i], self.y[i]


def _model() -> nn.Module:
    return mlp([5, 8, 3])


def _run(task: FederatedTask, algo: str = "fedavg", rounds: int = 3, **kw: Any) -> History:
    cc, sc = make_configs(algo, {"local_steps": 3, "batch_size": 8})
    return simulate(task, cc, sc, rounds=rounds, participation=0.75, seed=2, **kw)


def _final(folder: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = torch.load(folder / MODEL_FILE, weights_only=True)
    return sd


def _task(kind: str) -> FederatedTask:
    """The blobs task with each client's data (and the test set) as `kind`."""
    base = blobs_task(num_clients=4, n=30)

    def wrap(x: torch.Tensor, y: torch.Tensor) -> Any:
        return {"tensors": (x, y), "tensor_dataset": TensorDataset(x, y), "dataset": Rows(x, y)}[
            kind
        ]

    return FederatedTask.from_datasets(
        _model,
        [wrap(c.x, c.y) for c in base.clients],
        wrap(base.x_test, base.y_test),
        val_data=[wrap(c.x_val, c.y_val) for c in base.clients],
        name="blobs",
        num_classes=3,
    )


@pytest.mark.parametrize("algo", ["fedavg", "scaffold", "fedng", "fedfisher"])
def test_a_custom_dataset_trains_exactly_like_tensors(algo: str, tmp_path: Path) -> None:
    """The same examples as tensors, a TensorDataset or a Dataset: the same trained model."""
    runs = {k: _run(_task(k), algo, checkpoint_dir=tmp_path / k) for k in ("tensors", "dataset")}
    ref = _final(tmp_path / "tensors")
    got = _final(tmp_path / "dataset")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    a, b = runs["tensors"].rounds, runs["dataset"].rounds
    assert [r.train_loss for r in a] == pytest.approx([r.train_loss for r in b], nan_ok=True)
    assert [r.bytes_up for r in a] == [r.bytes_up for r in b]
    for key in ("metric", "test_loss", "val_metric", "val_loss"):  # batched evaluation
        assert [getattr(r, key) for r in a] == pytest.approx([getattr(r, key) for r in b])


def test_a_tensor_dataset_is_the_tensor_path() -> None:
    td, t = _task("tensor_dataset"), _task("tensors")
    assert td.clients[0].train is None and td.test is None  # used as its tensors, no copy
    x, y = torch.randn(4, 5), torch.zeros(4, dtype=torch.long)
    assert ClientData.from_data(0, TensorDataset(x, y)).x.data_ptr() == x.data_ptr()
    strip = ("client_time_s", "server_time_s")
    rounds = [
        [{k: v for k, v in vars(r).items() if k not in strip} for r in _run(task).rounds]
        for task in (td, t)
    ]
    assert rounds[0] == rounds[1]


def test_a_dataset_is_read_batch_by_batch() -> None:
    task = _task("dataset")
    _run(task, rounds=2)
    reads = [c.train.reads for c in task.clients]  # type: ignore[union-attr]
    # 2 rounds x 3 participants x 3 steps x 8 examples, never a whole-data copy up front
    assert sum(reads) == 2 * 3 * 3 * 8 and max(reads) < 2 * 3 * 8 + 1


def test_dataloaders_with_their_own_shuffle_resume_bit_identical(tmp_path: Path) -> None:
    """A DataLoader's shuffling draws from torch's global RNG, which the checkpoint carries."""
    base = blobs_task(num_clients=3, n=20)

    def task() -> FederatedTask:
        loaders = [
            DataLoader(TensorDataset(c.x, c.y), batch_size=6, shuffle=True) for c in base.clients
        ]
        return FederatedTask.from_datasets(
            _model, loaders, DataLoader(TensorDataset(base.x_test, base.y_test), batch_size=64)
        )

    straight = _run(task(), rounds=4, checkpoint_dir=tmp_path / "a")
    _run(task(), rounds=2, checkpoint_dir=tmp_path / "b")
    torch.manual_seed(99)
    resumed = _run(task(), rounds=4, checkpoint_dir=tmp_path / "b", resume=True)
    a, b = _final(tmp_path / "a"), _final(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r.metric for r in straight.rounds] == [r.metric for r in resumed.rounds]
    assert all(math.isnan(r.val_metric) for r in straight.rounds)  # no validation data given
    assert straight.rounds[-1].metric > straight.rounds[0].metric


def test_client_data_from_a_function_and_a_cnn() -> None:
    """A data factory per client id and a conv net on 1x6x6 images."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(80, 1, 6, 6, generator=gen)
    y = (x.mean((1, 2, 3)) > 0).long()

    def cnn() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))

    built: list[int] = []

    def data_of(c: int) -> Rows:
        built.append(c)
        return Rows(x[c * 20 : (c + 1) * 20], y[c * 20 : (c + 1) * 20])

    task = FederatedTask.from_datasets(cnn, data_of, (x, y), num_clients=4)
    assert built == []  # a factory runs on first use: a node builds only its own partition
    assert task.clients[2].num_examples == 20 and built == [2]
    assert [c.num_examples for c in task.clients] == [20] * 4 and sorted(built) == [0, 1, 2, 3]
    hist = _run(task, "fedng", rounds=2)
    assert all(math.isfinite(r.metric) for r in hist.rounds) and not hist.rounds[-1].rejected


def test_bad_data_is_a_one_line_error() -> None:
    class Stream(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
        def __iter__(self) -> Any:
            return iter([])

    x, y = torch.randn(4, 5), torch.zeros(4, dtype=torch.long)
    cases: list[tuple[Any, type[Exception], str]] = [
        (lambda: ClientData.from_data(0, [1, 2, 3]), TypeError, "client 0 training data: expected"),
        (lambda: ClientData.from_data(1, Stream()), TypeError, "must have a length"),
        (lambda: ClientData.from_data(2, (x[:0], y[:0])), ValueError, "holds no example"),
        (lambda: ClientData.from_data(3, (x, y), "val"), TypeError, "client 3 validation data"),
        (
            lambda: FederatedTask.from_datasets(_model, [(x, y)], (x, y), metric="f1"),
            ValueError,
            "'metric' must be one of",
        ),
        (
            lambda: FederatedTask.from_datasets(_model, lambda c: (x, y), (x, y)),
            ValueError,
            "'num_clients' >= 1 is needed",
        ),
        (
            lambda: FederatedTask.from_datasets(_model, [(x, y)], (x, y), num_clients=2),
            ValueError,
            "1 client data sets for 'num_clients'=2",
        ),
        (lambda: FederatedTask.from_datasets(_model, [(x, y)], "test"), TypeError, "test data"),
    ]
    for make, kind, text in cases:
        with pytest.raises(kind, match=text) as err:
            make()
        assert "\n" not in str(err.value)

    class Triples(Rows):
        def __getitem__(self, i: int) -> Any:
            return self.x[i], self.y[i], 0

    lazy = FederatedTask.from_datasets(_model, lambda c: "oops", (x, y), num_clients=2)
    with pytest.raises(TypeError, match="client 1 training data: expected") as err:
        lazy.clients[1].materialize()
    assert "\n" not in str(err.value)
    task = FederatedTask.from_datasets(_model, [Triples(x, y)], (x, y))
    with pytest.raises(TypeError, match="Triples: each batch must be an \\(inputs, targets\\)"):
        _run(task, rounds=1)
    empty = DataLoader(TensorDataset(x, y), batch_size=8, drop_last=True)
    task = FederatedTask.from_datasets(_model, [empty], (x, y))
    with pytest.raises(ValueError, match="its DataLoader yields no batch"):
        _run(task, rounds=1)


def test_validation_data_mixes_tensors_datasets_and_none() -> None:
    """Clients with tensors, a Dataset or no validation data: every given example counts once."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 5, generator=gen), torch.randint(0, 3, (12,), generator=gen)
    task = FederatedTask.from_datasets(
        _model, [(x, y)] * 3, (x, y), val_data=[(x[:4], y[:4]), None, Rows(x[4:], y[4:])]
    )
    model = task.model_fn(0).eval()
    got = task.validation_data().evaluate(model, "cross_entropy", "accuracy")
    ref = task.test_data().evaluate(model, "cross_entropy", "accuracy")  # the same 12 examples
    assert got == pytest.approx(ref)
    bare = FederatedTask.from_datasets(_model, [(x, y)], (x, y))
    assert all(
        math.isnan(v) for v in bare.validation_data().evaluate(model, "mse", "rel_l2").values()
    )
