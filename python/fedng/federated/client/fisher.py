"""The Fisher of a model on a client's data, for one-shot Fisher merging."""

from __future__ import annotations

import torch
from torch import nn

from fedng.curvature import CurvatureSet
from fedng.federated.client.sgd import ordered_batches, round_seed
from fedng.federated.config.common import ClientConfig
from fedng.federated.config.curvature import CurvatureConfig, curvature_mapping
from fedng.federated.losses import loss_fn
from fedng.federated.tasks.base import ClientData
from fedng.optim import NaturalGradient


def fisher_at(
    model: nn.Module, data: ClientData, config: ClientConfig, options: CurvatureConfig
) -> CurvatureSet:
    """The Fisher of `model` on all of the client's training data (a running mean over batches).

    Used by one-shot Fisher merging: one recorded forward/backward pass per batch, no update. The
    curvature is a `NaturalGradient`'s own with source "none" (it accumulates, gradients stay).
    """
    ng = NaturalGradient(
        model,
        curvature=curvature_mapping(options.curvature, model),
        curvature_decay=None,
        fisher_type=options.fisher_type,
        loss=config.loss,
        rank=options.rank,
        sketch_seed=options.sketch_seed,
        source="none",
        warn_unsupported=False,  # the simulator warns once per run (`Algorithm.check_model`)
    )
    try:
        crit = loss_fn(config.loss)
        gen = torch.Generator().manual_seed(round_seed(options.sketch_seed, 0, data.client_id))
        for x, y in ordered_batches(data, config.batch_size):
            model.zero_grad(set_to_none=True)
            out = model(x)
            if options.fisher_type == "mc":
                ng.mc_backward(out, gen)
            torch.autograd.backward(crit(out, y))
            ng.step()
        model.zero_grad(set_to_none=True)
        return ng.local_curvature
    finally:
        ng.remove()
