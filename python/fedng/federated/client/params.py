"""A model's trainable parameters as named arrays: read, write, subtract."""

from __future__ import annotations

import torch
from torch import nn

from fedng._typing import Arrays


def get_params(model: nn.Module) -> Arrays:
    """The model's trainable parameters as named fp32 arrays (detached clones)."""
    return {k: p.detach().float().clone() for k, p in model.named_parameters() if p.requires_grad}


def set_params(model: nn.Module, params: Arrays) -> None:
    """Loads named arrays into the model's parameters.

    Raises:
        ValueError: a missing or extra name, or a shape mismatch (named).
    """
    own = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if set(own) != set(params):
        raise ValueError(
            f"set_params: parameter names differ: missing {sorted(set(own) - set(params))},"
            f" unexpected {sorted(set(params) - set(own))}"
        )
    with torch.no_grad():
        for k, p in own.items():
            if tuple(p.shape) != tuple(params[k].shape):
                raise ValueError(
                    f"set_params: '{k}' must have shape {list(p.shape)},"
                    f" got {list(params[k].shape)}"
                )
            p.copy_(params[k])


def sub(a: Arrays, b: Arrays) -> Arrays:
    """a - b per name."""
    return {k: a[k] - b[k] for k in a}
