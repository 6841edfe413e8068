"""simulate(checkpoint_dir=..., resume=True): a run stopped after round k and resumed ends
bit-identical to the uninterrupted run; bad or foreign checkpoints give one-line errors."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _fed import blobs_task
from fedng.federated.checkpoint import CheckpointError, load_checkpoint
from fedng.federated.config import make_configs
from fedng.federated.messages import ClientUpdate
from fedng.federated.report.history import History
from fedng.federated.resume import CHECKPOINT_FILE, MODEL_FILE
from fedng.federated.simulator import simulate
from fedng.federated.tasks.base import FederatedTask, mlp, seeded_model
from torch import nn

TIMINGS = ("client_time_s", "server_time_s")
SETTINGS: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "scaffold": {},
    "fedadam": {"server_lr": 0.05},
    # without the server step's decay: a 3-round run decays in its own last rounds, so the
    # 3 + 3 extension below is another run (resume mid-decay: tests/test_fed_step_schedule.py)
    "fedng": {"curvature_ema": 0.5, "server_decay": 0.0},
}


def _task() -> FederatedTask:
    """Blobs with a dropout model: torch's global RNG matters across the restart."""
    task = blobs_task(num_clients=5, n=40)
    task.model_fn = lambda s: seeded_model(
        lambda: nn.Sequential(mlp([5, 8]), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3)), s
    )
    return task


def _run(algo: str, rounds: int, **kw: Any) -> History:
    cc, sc = make_configs(algo, {"local_steps": 3, "batch_size": 8, **SETTINGS[algo]})
    return simulate(_task(), cc, sc, rounds=rounds, participation=0.6, **{"seed": 1, **kw})


def _without_timings(h: History) -> dict[str, Any]:
    d = h.to_dict()
    for r in d["rounds"]:
        for k in TIMINGS:
            r.pop(k)
    return d


def _same(a: Any, b: Any) -> bool:
    """Equality with NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _model(folder: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = torch.load(folder / MODEL_FILE, weights_only=True)
    return sd


@pytest.mark.parametrize("algo", list(SETTINGS))
def test_resume_is_bit_identical(algo: str, tmp_path: Path) -> None:
    straight = _run(algo, 6, checkpoint_dir=tmp_path / "a")
    first = _run(algo, 3, checkpoint_dir=tmp_path / "b")
    torch.manual_seed(123)  # a fresh process would not share torch's RNG state either
    resumed = _run(algo, 6, checkpoint_dir=tmp_path / "b", resume=True)
    assert len(first.rounds) == 4 and len(resumed.rounds) == 7
    assert _same(_without_timings(straight), _without_timings(resumed))
    a, b = _model(tmp_path / "a"), _model(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = _task().model_fn(0)
    model.load_state_dict(a)  # the saved model loads into the task's model
    assert load_checkpoint(tmp_path / "b" / CHECKPOINT_FILE).state["server"]["round"] == 6


def test_killed_run_resumes_bit_identical(tmp_path: Path) -> None:
    """A run killed inside round 4 resumes from the checkpoint of round 3."""
    straight = _run("scaffold", 6)

    def kill(r: int, upd: ClientUpdate) -> ClientUpdate:
        if r == 3:
            raise KeyboardInterrupt
        return upd

    with pytest.raises(KeyboardInterrupt):
        _run("scaffold", 6, checkpoint_dir=tmp_path, tamper=kill)
    assert not (tmp_path / MODEL_FILE).exists()
    resumed = _run("scaffold", 6, checkpoint_dir=tmp_path, resume=True)
    assert _same(_without_timings(straight), _without_timings(resumed))


def test_a_crash_while_checkpointing_leaves_the_previous_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_replace = os.replace
    calls = []

    def replace(src: Any, dst: Any) -> None:
        calls.append(dst)
        if len(calls) == 3:  # the checkpoint of round 3 never lands
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="power cut"):
        _run("fedavg", 6, checkpoint_dir=tmp_path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]
    assert load_checkpoint(tmp_path / CHECKPOINT_FILE).state["server"]["round"] == 2
    resumed = _run("fedavg", 6, checkpoint_dir=tmp_path, resume=True)
    assert _same(_without_timings(_run("fedavg", 6)), _without_timings(resumed))


def test_bad_checkpoints_and_arguments(tmp_path: Path) -> None:
    _run("fedavg", 2, checkpoint_dir=tmp_path)
    path = tmp_path / CHECKPOINT_FILE
    with pytest.raises(ValueError, match="has 2 rounds, more than 'rounds'=1"):
        _run("fedavg", 1, checkpoint_dir=tmp_path, resume=True)
    assert len(_run("fedavg", 2, checkpoint_dir=tmp_path, resume=True).rounds) == 3
    cc, sc = make_configs("fedavg", {"local_steps": 3, "batch_size": 8, "lr": 0.1})
    with pytest.raises(ValueError, match="of another run: client_config differs"):
        simulate(
            _task(),
            cc,
            sc,
            rounds=3,
            participation=0.6,
            seed=1,
            checkpoint_dir=tmp_path,
            resume=True,
        )
    with pytest.raises(ValueError, match="of another run: seed differs"):
        _run("fedavg", 3, checkpoint_dir=tmp_path, resume=True, seed=2)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated") as err:
        _run("fedavg", 3, checkpoint_dir=tmp_path, resume=True)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="needs 'checkpoint_dir'"):
        _run("fedavg", 3, resume=True)
    fresh = _run("fedavg", 1, checkpoint_dir=tmp_path / "none", resume=True)  # nothing to resume
    assert len(fresh.rounds) == 2


class Jittered(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Examples with augmentation noise from Python's and NumPy's global generators."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        jitter = random.gauss(0.0, 0.1) + float(np.random.standard_normal())
        return self.x[i] + 0.1 * jitter, self.y[i]


def test_augmentations_from_global_generators_resume_bit_identical(tmp_path: Path) -> None:
    base = blobs_task(num_clients=3, n=20)

    def run(rounds: int, folder: str, **kw: Any) -> History:
        task = FederatedTask.from_datasets(
            lambda: mlp([5, 8, 3]),
            [Jittered(c.x, c.y) for c in base.clients],
            (base.x_test, base.y_test),
        )
        cc, sc = make_configs("fedavg", {"local_steps": 2, "batch_size": 4})
        return simulate(task, cc, sc, rounds=rounds, checkpoint_dir=tmp_path / folder, **kw)

    random.seed(0)
    np.random.seed(0)
    straight = run(4, "a")
    random.seed(0)
    np.random.seed(0)
    run(2, "b")
    random.seed(5)
    np.random.seed(5)
    resumed = run(4, "b", resume=True)
    assert _same(_without_timings(straight), _without_timings(resumed))
    a, b = _model(tmp_path / "a"), _model(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
