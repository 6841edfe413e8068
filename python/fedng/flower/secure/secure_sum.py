"""One secure weighted mean over Flower's SecAgg+ (`SecAggPlusWorkflow`, flwr 1.41).

In flwr 1.41 SecAgg+ only runs through the legacy workflow path: the workflow takes a
`LegacyContext` whose `strategy` is a legacy `flwr.server.strategy.Strategy`, asks it for the
`FitIns` of each node (`configure_fit`), runs the four SecAgg+ stages over the Grid (setup,
share keys, collect masked vectors, unmask), and hands `aggregate_fit` only the unmasked weighted
mean (in every `FitRes.parameters`) with each client's plaintext `num_examples` and metrics.
`secure_mean` wraps that into one call: the FitIns config in, the mean out.

The workflow is built per call, so that the quantization levels fit the number of clients: the
masked sum of N clients' entries (each < Q, plus the weight entry) must stay below the modulus
2**32, and SecAgg+ rounds to int32, so `Q = min(2**30, 2**floor(log2(2**32 / (N + 1))))`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedng.flower.secure.vector import secagg_weights

CLIPPING_RANGE = 1.0
"""SecAgg+'s clipping range: fedng scales every entry into [-1, 1] itself (`vector`)."""
MODULUS = 2**32
"""SecAgg+'s modulus (its largest allowed)."""


def levels_for(num_clients: int) -> int:
    """The quantization levels Q for `num_clients` (see the module docstring)."""
    return int(min(2**30, 2 ** math.floor(math.log2(MODULUS / (num_clients + 1)))))


@dataclass
class SecureMean:
    """What one secure pass returns.

    Attributes:
        mean: the weighted mean vector (float64), None when the pass failed.
        num_examples: node id -> the `num_examples` it reported (plaintext, the weights).
        metrics: node id -> its plaintext FitRes metrics.
        levels: the quantization levels Q used.
        max_weight: SecAgg+'s max_weight W used.
        failures: the pass's failures (errors, missing replies) as strings.
    """

    mean: np.ndarray | None
    num_examples: dict[int, int] = field(default_factory=dict)
    metrics: dict[int, dict[str, Scalar]] = field(default_factory=dict)
    levels: int = 0
    max_weight: float = 1.0
    failures: list[str] = field(default_factory=list)

    @property
    def total_weight(self) -> float:
        """`A = sum a_k`, the weights SecAgg+ applied (`vector.secagg_weights`)."""
        return sum(secagg_weights(list(self.num_examples.values()), self.levels, self.max_weight))


class _PassStrategy(LegacyStrategy):
    """The legacy strategy SecAgg+ talks to: the given FitIns out, the secure mean back."""

    def __init__(self, instructions: dict[int, FitIns], grid: Grid, run_id: int) -> None:
        self.instructions = instructions
        self.proxies = {n: GridClientProxy(n, grid, run_id) for n in instructions}
        self.results: list[tuple[ClientProxy, FitRes]] | None = None
        self.failures: list[str] = []

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return [(self.proxies[n], ins) for n, ins in sorted(self.instructions.items())]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.results = results
        self.failures = [str(f)[:200] for f in failures]
        return None, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return None


def secure_mean(
    grid: Grid,
    configs: Mapping[int, Mapping[str, Scalar]],
    *,
    server_round: int,
    max_weight: float,
    num_shares: int | float = 1.0,
    threshold: int | float = 0.5,
    timeout: float | None = None,
    run_id: int = 0,
) -> SecureMean:
    """Runs SecAgg+ once over the nodes in `configs`, each getting its FitIns config.

    Args:
        grid: the Flower grid.
        configs: node id -> its FitIns config (scalars and bytes).
        server_round: the round number the messages carry (group id).
        max_weight: SecAgg+'s `max_weight` (>= every node's num_examples, else it overflows).
        num_shares: SecAgg+'s shares per secret (an int > 2, or a fraction of the nodes).
        threshold: shares needed to reconstruct (an int, or a fraction of `num_shares`).
        timeout: seconds each stage waits (None: until every reply).
        run_id: the run id of the client proxies.

    Returns:
        The mean and the plaintext side information (`mean` None if SecAgg+ halted: fewer than
        2 nodes, or too few left to reconstruct).
    """
    levels = levels_for(len(configs))
    workflow = SecAggPlusWorkflow(
        num_shares,
        threshold,
        max_weight=max_weight,
        clipping_range=CLIPPING_RANGE,
        quantization_range=levels,
        modulus_range=MODULUS,
        timeout=timeout,
    )
    instructions = {
        int(n): FitIns(Parameters(tensors=[], tensor_type="numpy.ndarray"), dict(c))
        for n, c in configs.items()
    }
    strategy = _PassStrategy(instructions, grid, run_id)
    state = RecordDict(
        {
            MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
            MAIN_PARAMS_RECORD: ArrayRecord(),
        }
    )
    context = LegacyContext(
        Context(run_id=run_id, node_id=0, node_config={}, state=state, run_config={}),
        strategy=strategy,
    )
    workflow(grid, context)
    out = SecureMean(None, levels=levels, max_weight=max_weight, failures=strategy.failures)
    if strategy.results is None:
        out.failures.append("SecAgg+ halted (too few nodes to run or to unmask)")
        return out
    for proxy, res in strategy.results:
        node = int(proxy.node_id)
        out.num_examples[node] = int(res.num_examples)
        out.metrics[node] = dict(res.metrics)
    if strategy.results:
        vec = parameters_to_ndarrays(strategy.results[0][1].parameters)
        out.mean = np.concatenate([np.asarray(v, dtype=np.float64).reshape(-1) for v in vec])
    return out
