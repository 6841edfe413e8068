"""A Flower ServerApp that runs a fedng algorithm with `FedNGStrategy`.

It reads the run settings from the run config (`fedng.flower.runconfig`), builds the task with
the same `task_fn` the ClientApps use, initializes the global model exactly as
`fedng.federated.simulate` does (`torch.manual_seed(seed)`, `task.model_fn(seed)`), runs the
rounds, and, when `checkpoint-dir` is set, checkpoints the server there after every round and
writes the final global model (`fedng.flower.persist`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedng.federated.algorithms.registry import get_algorithm
from fedng.federated.client.params import get_params
from fedng.federated.report.history import History
from fedng.federated.tasks.base import FederatedTask
from fedng.flower.client_app import TaskFn, default_task
from fedng.flower.history import task_evaluator
from fedng.flower.persist import ServerCheckpoint
from fedng.flower.runconfig import RunSpec
from fedng.flower.strategy import FedNGStrategy, RoundHook, arrays_to_record


def build_strategy(
    spec: RunSpec,
    task: FederatedTask,
    on_round: RoundHook | None = None,
    checkpoint: ServerCheckpoint | None = None,
) -> tuple[FedNGStrategy, ArrayRecord]:
    """The strategy for `spec` on `task` and the initial global model, as `simulate` sets them
    up (same seed, same initial weights, same history header); it checkpoints to `checkpoint`
    after every round and resumes from it when `spec.resume`.

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
        checkpoint=checkpoint,
        resume=spec.resume,
        streaming=spec.streaming,
    )
    return strategy, arrays_to_record(get_params(model))


Build = Callable[
    [RunSpec, FederatedTask, RoundHook | None, ServerCheckpoint | None],
    tuple[FedNGStrategy, ArrayRecord],
]
"""What `run_server` builds its strategy with (`build_strategy`; the secure one for SecAgg+)."""


def run_server(
    grid: Grid,
    spec: RunSpec,
    task: FederatedTask,
    on_round: RoundHook | None = None,
    build: Build = build_strategy,
) -> FedNGStrategy:
    """Runs the whole federation on `grid`. With `spec.checkpoint_dir`, the server is
    checkpointed after every round (`checkpoint.pt`, `history.json`), a run with `spec.resume`
    continues from there, and the final global model is written as `model.pt`.

    Returns:
        The strategy after the run (`.state`, `.history`).
    """
    ckpt = ServerCheckpoint(spec.checkpoint_dir) if spec.checkpoint_dir else None
    if spec.resume and ckpt is None:
        raise ValueError("run config 'resume = true' needs a 'checkpoint-dir'")
    strategy, initial = build(spec, task, on_round, ckpt)
    strategy.start(grid, initial, num_rounds=spec.rounds, timeout=spec.timeout)
    if ckpt is not None and strategy.state is not None:
        ckpt.save_model(task, spec.seed, strategy.state.params)
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
