"""Builds a task by name (the registry behind `fedng simulate --task`)."""

from __future__ import annotations

from typing import Any

from fedng.federated.tasks.base import FederatedTask
from fedng.federated.tasks.digits import digits_task
from fedng.federated.tasks.lora_finetune import lora_task
from fedng.federated.tasks.mnist1d import mnist1d_task
from fedng.federated.tasks.pinn import pinn_task
from fedng.federated.tasks.regression import regression_task
from fedng.federated.tasks.synthetic import synthetic_task

TASKS: tuple[str, ...] = (
    "synthetic",
    "synthetic_iid",
    "digits",
    "digits-cnn",
    "mnist1d",
    "mnist1d-cnn",
    "regression",
    "pinn",
    "lora-digits",
)
"""Task names for `make_task` and `fedng simulate --task`."""


def make_task(
    name: str,
    *,
    num_clients: int | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    seed: int = 0,
) -> FederatedTask:
    """Builds a task by name with the benchmark protocol's defaults.

    Args:
        name: one of `TASKS`.
        num_clients: clients (default: 30 synthetic, 20 digits and digits-cnn, 50 mnist1d and
            mnist1d-cnn, 10 regression and lora-digits, 8 pinn).
        alpha: synthetic: model heterogeneity (default 1); digits / mnist1d and their -cnn
            variants: Dirichlet concentration (default 0.1); lora-digits: Dirichlet
            concentration (default 0.3). Ignored by the regression and pinn tasks.
        beta: synthetic: feature heterogeneity (default: equal to alpha).
        seed: data seed.

    Returns:
        The task.

    Raises:
        ValueError: an unknown task name.
    """
    kw: dict[str, Any] = {"seed": seed}
    if num_clients is not None:
        kw["num_clients"] = num_clients
    if name == "synthetic":
        a = 1.0 if alpha is None else alpha
        return synthetic_task(a, a if beta is None else beta, **kw)
    if name == "synthetic_iid":
        return synthetic_task(0.0, 0.0, iid=True, **kw)
    if name in ("digits", "digits-cnn"):
        a = 0.1 if alpha is None else alpha
        return digits_task(alpha=a, model="cnn" if name == "digits-cnn" else "mlp", **kw)
    if name in ("mnist1d", "mnist1d-cnn"):
        a = 0.1 if alpha is None else alpha
        return mnist1d_task(alpha=a, model="cnn" if name == "mnist1d-cnn" else "mlp", **kw)
    if name == "regression":
        return regression_task(**kw)
    if name == "pinn":
        return pinn_task(**kw)
    if name == "lora-digits":
        return lora_task(alpha=0.3 if alpha is None else alpha, **kw)
    raise ValueError(f"make_task: 'name' must be one of {list(TASKS)}, got {name!r}")
