"""Offline federated tasks: every data set is generated or ships inside a package."""

from fedng.federated.tasks.base import (
    ClientData,
    EvalData,
    FederatedTask,
    UserData,
    evaluate,
    mlp,
    seeded_model,
)
from fedng.federated.tasks.digits import digits_task
from fedng.federated.tasks.mnist1d import generate_mnist1d, mnist1d_task
from fedng.federated.tasks.models import cnn1d_mnist1d, cnn_digits
from fedng.federated.tasks.registry import TASKS, make_task
from fedng.federated.tasks.regression import regression_task, target_function
from fedng.federated.tasks.synthetic import SyntheticDraw, draw_synthetic, synthetic_task

__all__ = [
    "TASKS",
    "ClientData",
    "EvalData",
    "FederatedTask",
    "SyntheticDraw",
    "UserData",
    "cnn1d_mnist1d",
    "cnn_digits",
    "digits_task",
    "draw_synthetic",
    "evaluate",
    "generate_mnist1d",
    "make_task",
    "mlp",
    "mnist1d_task",
    "regression_task",
    "seeded_model",
    "synthetic_task",
    "target_function",
]
