"""The Fisher of a model on a client's data, for one-shot Fisher merging."""

from __future__ import annotations

import torch
from torch import nn

from fedng.curvature import CurvatureCapture, sampled_loss
from fedng.federated.client.sgd import round_seed
from fedng.federated.config.common import ClientConfig
from fedng.federated.config.curvature import CurvatureConfig, curvature_mapping
from fedng.federated.curvature_set import CurvatureSet
from fedng.federated.layout import layouts_of
from fedng.federated.losses import loss_fn
from fedng.federated.tasks.base import ClientData
from fedng.optim.config import assign


def fisher_at(
    model: nn.Module, data: ClientData, config: ClientConfig, options: CurvatureConfig
) -> CurvatureSet:
    """The Fisher of `model` on all of the client's training data (a running mean over batches).

    Used by one-shot Fisher merging: one recorded forward/backward pass per batch, no update.
    """
    cap = CurvatureCapture(model, warn=False)
    try:
        layouts = layouts_of(model, cap.blocks)
        kinds = assign(cap.blocks, curvature_mapping(options.curvature))
        cs = CurvatureSet.empty(layouts, kinds, options.rank, options.sketch_seed)
        crit = loss_fn(config.loss)
        gen = torch.Generator().manual_seed(round_seed(options.sketch_seed, 0, data.client_id))
        with cap.record(True):
            for lo in range(0, data.num_examples, config.batch_size):
                x = data.x[lo : lo + config.batch_size]
                y = data.y[lo : lo + config.batch_size]
                model.zero_grad(set_to_none=True)
                out = model(x)
                if options.fisher_type == "mc":
                    cap.fisher_backward(sampled_loss(out, config.loss, "mean", gen))
                torch.autograd.backward(crit(out, y))
                cs.update(cap.collect(options.fisher_type), None)
        model.zero_grad(set_to_none=True)
        return cs
    finally:
        cap.remove()
