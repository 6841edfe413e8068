"""What the ServerApp and every ClientApp agree on, read from Flower's run config.

Flower flattens `[tool.flwr.app.config]` (and `flwr run --run-config` overrides) into one dict
whose nested tables become dotted keys. fedng reads:

    num-server-rounds = 3        rounds
    algorithm = "fedng"          any of fedng.federated.ALGORITHMS
    participation = 1.0          fraction of clients sampled per round
    seed = 0                     model init, sampling, batch order (as `simulate(seed=...)`)
    timeout = 600.0              seconds a round waits for replies
    checkpoint-dir = ""          where the server checkpoints after each round ("" = nowhere)
    resume = false               continue from checkpoint-dir's last complete round
    streaming = false            fold each reply into running sums as it arrives (ServerRound)
    task = "digits"              a fedng task (fedng.federated.TASKS) ...
    [task-args]                  ... and its `make_task` keywords (num_clients, alpha, beta, seed)
    [settings]                   `make_configs` settings (lr, local_steps, curvature, prox_mu, ...)

The same keys with the same values give the same run as
`simulate(make_task(task, **task-args), *make_configs(algorithm, settings), rounds=...,
participation=..., seed=...)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedng.federated.config.common import ClientConfig, ServerConfig
from fedng.federated.config.make import make_configs
from fedng.federated.tasks.base import FederatedTask
from fedng.federated.tasks.registry import make_task

SEED_STRIDE = 7919
"""The clients' batch-order seed is `client seed + SEED_STRIDE * run seed`, as in `simulate`."""

_SCALARS = {
    "num-server-rounds": "rounds",
    "algorithm": "algorithm",
    "participation": "participation",
    "seed": "seed",
    "timeout": "timeout",
    "checkpoint-dir": "checkpoint_dir",
    "resume": "resume",
    "streaming": "streaming",
    "task": "task",
}
_TABLES = {"task-args": "task_args", "settings": "settings"}


@dataclass(frozen=True)
class RunSpec:
    """One federated run's settings (see the module docstring for the run-config keys).

    Attributes:
        algorithm: the fedng algorithm.
        rounds: communication rounds.
        participation: fraction of clients per round, in (0, 1].
        seed: the run seed.
        timeout: seconds a round waits for its replies.
        checkpoint_dir: the server's checkpoint folder ("" for none).
        resume: continue from the checkpoint in `checkpoint_dir`.
        streaming: fold each reply into the round's running sums as it arrives
            (`fedng.federated.ServerRound`: memory flat in the number of clients, the same
            result as `simulate(streaming=True)` up to float summation order); otherwise the
            round is validated and aggregated at its end in client-id order, bit-identical to
            `simulate`.
        task: a task of `fedng.federated.TASKS` (used by the ready-made apps).
        task_args: `make_task` keywords.
        settings: `make_configs` settings.
    """

    algorithm: str = "fedng"
    rounds: int = 3
    participation: float = 1.0
    seed: int = 0
    timeout: float = 600.0
    checkpoint_dir: str = ""
    resume: bool = False
    streaming: bool = False
    task: str = "digits"
    task_args: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 0:
            raise ValueError(
                f"run config 'num-server-rounds' must be an int >= 0, got {self.rounds!r}"
            )
        if not 0 < self.participation <= 1:
            raise ValueError(
                f"run config 'participation' must be in (0, 1], got {self.participation!r}"
            )
        if not self.timeout > 0:
            raise ValueError(f"run config 'timeout' must be > 0, got {self.timeout!r}")

    @staticmethod
    def from_run_config(run_config: Mapping[str, Any]) -> RunSpec:
        """Reads a (flattened) Flower run config.

        Raises:
            ValueError: an unknown key (one line, naming the valid ones) or a bad value.
        """
        kwargs: dict[str, Any] = {name: {} for name in _TABLES.values()}
        for key, value in run_config.items():
            head, dot, tail = key.partition(".")
            if key in _SCALARS:
                kwargs[_SCALARS[key]] = value
            elif dot and head in _TABLES:
                kwargs[_TABLES[head]][tail] = value
            else:
                valid = sorted(_SCALARS) + [f"{t}.<key>" for t in _TABLES]
                raise ValueError(f"unknown run config key {key!r}; valid keys: {valid}")
        if "seed" in kwargs and "seed" not in kwargs["task_args"]:
            kwargs["task_args"]["seed"] = kwargs["seed"]
        return RunSpec(**kwargs)

    def to_run_config(self) -> dict[str, bool | float | int | str]:
        """The settings as a flattened Flower run config (inverse of `from_run_config`)."""
        out: dict[str, bool | float | int | str] = {
            key: getattr(self, name) for key, name in _SCALARS.items()
        }
        for key, name in _TABLES.items():
            out.update({f"{key}.{k}": v for k, v in getattr(self, name).items()})
        return out

    def configs(self) -> tuple[ClientConfig, ServerConfig]:
        """The algorithm's client and server configs with `settings` on top."""
        return make_configs(self.algorithm, self.settings)

    def client_config(self, task: FederatedTask) -> ClientConfig:
        """The clients' config for `task`, exactly as `simulate(seed=...)` derives it (the task's
        loss; batch-order seed `seed + SEED_STRIDE * run seed`)."""
        client, _ = self.configs()
        return client.replace(loss=task.loss, seed=client.seed + SEED_STRIDE * self.seed)

    def make_task(self) -> FederatedTask:
        """The named task built with `task_args`."""
        return make_task(self.task, **self.task_args)
