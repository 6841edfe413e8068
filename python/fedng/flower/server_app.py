"""A Flower ServerApp that runs a fedng algorithm with `FedNGStrategy`.

It reads the run settings from the run config (`fedng.flower.runconfig`), builds the task with
the same `task_fn` the ClientApps use, initializes the global model exactly as
`fedng.federated.simulate` does (`torch.manual_seed(seed)`, `task.model_fn(seed)`), runs the
rounds, and, when `checkpoint-dir` is set, writes there the history (`history.json`) and the final
global model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedng.federated.algorithms.base import State
from fedng.federated.algorithms.registry import get_algorithm
from fedng.federated.client.params import get_params
from fedng.federated.report.history import History
from fedng.federated.tasks.base import FederatedTask
from fedng.flower.client_app import TaskFn, default_task
from fedng.flower.history import task_evaluator
from fedng.flower.runconfig import RunSpec
from fedng.flower.strategy import FedNGStrategy, RoundHook, arrays_to_record

HISTORY_FILE = "history.json"
MODEL_FILE = "model.pt"
PROGRESS_FILE = "progress.json"
"""The history so far, rewritten (atomically) after every round of a run with a checkpoint-dir."""


def _write_progress(folder: Path) -> RoundHook:
    def hook(state: State, history: History) -> None:
        tmp = folder / f".{PROGRESS_FILE}.tmp"
        history.to_json(tmp)
        os.replace(tmp, folder / PROGRESS_FILE)

    return hook


def build_strategy(
    spec: RunSpec, task: FederatedTask, on_round: RoundHook | None = None
) -> tuple[FedNGStrategy, ArrayRecord]:
    """The strategy for `spec` on `task` and the initial global model, as `simulate` sets them
    up (same seed, same initial weights, same history header).

    Returns:
        (strategy, initial arrays for `strategy.start`).
    """
    client_config, server_config = spec.configs()
    client_config = spec.client_config(task)
    torch.manual_seed(spec.seed)
    model = task.model_fn(spec.seed)
    get_algorithm(spec.algorithm).check_model(model)
    history = History(
        task.name,
        spec.algorithm,
        task.metric,
        task.higher_is_better,
        spec.seed,
        client_config.to_dict(),
        server_config.to_dict(),
        {},
    )
    strategy = FedNGStrategy(
        server_config,
        participation=spec.participation,
        seed=spec.seed,
        evaluator=task_evaluator(task, spec.seed),
        history=history,
        on_round=on_round,
    )
    return strategy, arrays_to_record(get_params(model))


def run_server(grid: Grid, spec: RunSpec, task: FederatedTask) -> FedNGStrategy:
    """Runs the whole federation on `grid`; writes the history and the final model to
    `spec.checkpoint_dir` when set.

    Returns:
        The strategy after the run (`.state`, `.history`).
    """
    out = Path(spec.checkpoint_dir) if spec.checkpoint_dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    strategy, initial = build_strategy(spec, task, None if out is None else _write_progress(out))
    strategy.start(grid, initial, num_rounds=spec.rounds, timeout=spec.timeout)
    if out is not None and strategy.state is not None:
        strategy.history.to_json(out / HISTORY_FILE)
        torch.save(strategy.state.params, out / MODEL_FILE)
    return strategy


def make_server_app(task_fn: TaskFn = default_task) -> ServerApp:
    """A ServerApp running the run config's algorithm on `task_fn`'s task.

    Args:
        task_fn: builds the task from the run settings (the ClientApps' `task_fn`).

    Returns:
        The ServerApp (assign it at module level, `app = make_server_app(...)`, for a FAB).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        spec = RunSpec.from_run_config(context.run_config)
        run_server(grid, spec, task_fn(spec))

    return app
