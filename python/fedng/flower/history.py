"""The per-round log of a Flower run, in the simulator's `History` form.

The Flower strategy fills the same `RoundRecord` fields as `fedng.federated.simulate`, from the
same quantities: the global model evaluated on the task's test and validation sets, the wire bytes
of every update received and of the broadcast times the clients it went to, the accepted clients'
mean training loss, and every rejection with its reason (a client's error, a timeout and bytes that
do not decode included).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from fedng._typing import Arrays
from fedng.federated.client.params import set_params
from fedng.federated.report.history import RoundRecord
from fedng.federated.tasks.base import FederatedTask

Evaluator = Callable[[int, Arrays], RoundRecord]
"""(rounds completed, global parameters) -> the round's record with its metrics filled in."""


def task_evaluator(task: FederatedTask, seed: int) -> Evaluator:
    """Evaluates the global model on `task`'s test data and its clients' validation data, as the
    simulator does (one model built by `task.model_fn(seed)`, reused)."""
    model = task.model_fn(seed)
    test_data, val_data = task.test_data(), task.validation_data()

    def record(r: int, params: Arrays) -> RoundRecord:
        set_params(model, params)
        model.eval()
        te = test_data.evaluate(model, task.loss, task.metric)
        va = val_data.evaluate(model, task.loss, task.metric)
        return RoundRecord(r, te[task.metric], te["loss"], va[task.metric], va["loss"])

    return record


def no_evaluation(r: int, params: Arrays) -> RoundRecord:
    """A record without metrics (NaN), for runs with no server-side data."""
    return RoundRecord(r, math.nan, math.nan, math.nan, math.nan)
