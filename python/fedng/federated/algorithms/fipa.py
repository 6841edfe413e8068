"""FIPA: Fisher-informed parameterwise aggregation (Chang, He and Hao 2026), and fedng's summable
variant of it.

Each round, each client computes the Fisher of its data at the broadcast model on the trainable
parameters only (a LoRA adapter on a frozen base: the adapter), trains locally as FedAvg does, and
sends delta_m with a low-rank Fisher:
- "fipa": its top-r eigenpairs (U_m [d, r], S_m [r]) — the payload of the paper;
- "fipa_sketch": the shared-seed sketch `H_m Omega` [d, r] and `H_m delta_m` [d], which are
  summable (the server's work is a weighted sum plus one Nystrom of a d x r matrix; it works
  under secure aggregation).
The server steps by `H^+ sum_m p_m H_m delta_m` (`aggregation.lowrank_fisher`), with
`server_lr` and server momentum as FedAvg's. For the first `warmup_rounds` rounds it is FedAvg
(no Fisher computed or sent), as the paper warms image classification up with a first-order
method.
"""

from __future__ import annotations

import torch
from torch import nn

from fedng._typing import Arrays
from fedng.federated.aggregation.lowrank_fisher import (
    eigenpair_step,
    flatten,
    sketch_step,
    unflatten,
)
from fedng.federated.aggregation.mean import apply_server_step, mean_delta, weights_of
from fedng.federated.algorithms.base import Algorithm, State
from fedng.federated.client.lowrank_fisher import (
    fipa_omega,
    fisher_rows,
    sketch_and_product,
    top_eigenpairs,
    trainable_names,
)
from fedng.federated.client.params import set_params
from fedng.federated.client.sgd import (
    local_sgd,
    ordered_batches,
    round_seed,
    training_batches,
)
from fedng.federated.config.common import ClientConfig
from fedng.federated.config.fipa import FIPAConfig
from fedng.federated.messages import ClientUpdate, ServerMessage
from fedng.federated.tasks.base import ClientData
from fedng.federated.wire import wire_dtype

_PSD_TOL = 1e-3
"""Relative tolerance of the payload checks (negative eigenvalues, column norms)."""


def _dim(params: Arrays) -> int:
    return sum(v.numel() for v in params.values())


class FIPA(Algorithm[FIPAConfig]):
    """FIPA with eigenpair payloads ("fipa") or summable sketches (`summable=True`)."""

    config_type = FIPAConfig

    def __init__(self, name: str, *, summable: bool = False) -> None:
        super().__init__(name)
        self.summable = summable

    def active(self, opts: FIPAConfig, round_: int) -> bool:
        """Whether round `round_` uses the Fisher (False during the FedAvg warm-up)."""
        return round_ >= opts.warmup_rounds

    def client_step(
        self,
        model: nn.Module,
        data: ClientData,
        message: ServerMessage,
        config: ClientConfig,
        client_state: Arrays,
    ) -> ClientUpdate:
        """The Fisher at the broadcast model (after the warm-up), then FedAvg's local SGD."""
        opts = self.options(config)
        set_params(model, message.params)
        rows = None
        if self.active(opts, message.round):
            if opts.fisher_samples > 0:  # one seeded batch (a DataLoader: its next batch)
                seed = round_seed(opts.sketch_seed, message.round, data.client_id)
                x, y = next(training_batches(data, opts.fisher_samples, 1, seed))
            else:
                batches = list(ordered_batches(data, config.batch_size))
                x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
            rows = fisher_rows(model, x, y, config.loss, opts.fisher_type)
        metrics = local_sgd(model, data, config, message.round)
        upd = self.make_update(model, data, message, config, metrics, client_state)
        if rows is None:
            return upd
        wd = wire_dtype(opts.payload_dtype, "payload_dtype")
        names = trainable_names(model)
        if self.summable:
            delta = flatten(upd.delta, names)
            y_m, c_m = sketch_and_product(rows, delta, opts.rank, opts.sketch_seed)
            upd.extras = {"fipa_Y": y_m.to(wd), "fipa_c": c_m.to(wd)}
        else:
            u, s = top_eigenpairs(
                rows, opts.rank, eig=opts.eig, oversample=opts.oversample, seed=opts.sketch_seed
            )
            upd.extras = {"fipa_U": u.to(wd), "fipa_S": s.to(wd)}
        return upd

    def expected_extras(self, state: State) -> dict[str, tuple[int, ...]]:
        """The Fisher payload's names and shapes (none during the warm-up)."""
        opts = self.options(state.config)
        if not self.active(opts, state.round):
            return {}
        d = _dim(state.params)
        if self.summable:
            return {"fipa_Y": (d, min(opts.rank, d)), "fipa_c": (d,)}
        return {"fipa_U": (d, opts.rank), "fipa_S": (opts.rank,)}

    def check_curvature(self, state: State, update: ClientUpdate) -> str | None:
        """No curvature payload; eigenvalues >= 0 and eigenvector columns of norm <= 1 (within
        `_PSD_TOL`); a sketch with `Omega^T Y` of nonnegative diagonal."""
        reason = super().check_curvature(state, update)
        if reason or not update.extras:
            return reason
        if "fipa_S" in update.extras:
            s = update.extras["fipa_S"].double()
            if float(s.min()) < -_PSD_TOL * max(float(s.max()), 0.0):
                return f"fipa: negative Fisher eigenvalue {float(s.min()):.3g}"
            norms = update.extras["fipa_U"].double().norm(dim=0)
            if float(norms.max()) > 1 + _PSD_TOL:
                return f"fipa: eigenvector column of norm {float(norms.max()):.4g} > 1"
        elif "fipa_Y" in update.extras:
            y = update.extras["fipa_Y"].double()
            quad = (self._omega(state).T @ y).diagonal()
            if float(quad.min()) < -_PSD_TOL * float(quad.abs().max()):
                return "fipa: sketch is not of a PSD matrix (omega^T Y has a negative diagonal)"
        return None

    def curvature_scale(self, state: State, update: ClientUpdate) -> float | None:
        """tr(H_m): the eigenvalue sum, or the sketch's Hutchinson estimate `mean diag(Omega^T
        Y)`, for the round-median check."""
        if "fipa_S" in update.extras:
            return float(update.extras["fipa_S"].double().sum())
        if "fipa_Y" in update.extras:
            y = update.extras["fipa_Y"].double()
            return float((self._omega(state).T @ y).diagonal().mean())
        return None

    def _omega(self, state: State) -> torch.Tensor:
        opts = self.options(state.config)
        return fipa_omega(_dim(state.params), opts.rank, opts.sketch_seed)

    def aggregate(self, state: State, updates: list[ClientUpdate]) -> State:
        """`H^+ sum_m p_m H_m delta_m` after the warm-up; the weighted mean before it."""
        opts = self.options(state.config)
        if not self.active(opts, state.round) or any(not u.extras for u in updates):
            apply_server_step(state, mean_delta(updates))
            state.log["aggregation"] = "mean"
            return state
        names = sorted(state.params)
        deltas = [flatten(u.delta, names) for u in updates]
        p = weights_of(updates)
        if self.summable:
            step, log = sketch_step(
                deltas,
                [u.extras["fipa_Y"] for u in updates],
                [u.extras["fipa_c"] for u in updates],
                self._omega(state),
                p,
                cutoff=opts.cutoff,
                null_space=opts.null_space,
            )
        else:
            step, log = eigenpair_step(
                deltas,
                [u.extras["fipa_U"] for u in updates],
                [u.extras["fipa_S"] for u in updates],
                p,
                cutoff=opts.cutoff,
                null_space=opts.null_space,
            )
        state.log.update({"aggregation": self.name, **log})
        apply_server_step(state, unflatten(step, state.params, names))
        return state
