"""Loss functions for configs, tasks and local training, by the loss names of
`fedng.curvature.fisher` (`LOSS_TYPES`: "cross_entropy" and "mse", what `sampled_loss` samples
from), the one list of loss names.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from fedng.curvature.fisher import LOSS_TYPES, LossType

_ALIASES: dict[str, LossType] = {"ce": "cross_entropy"}
"""Deprecated spellings (the 0.1 configs and tasks said "ce")."""

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def canonical_loss(name: str, where: str, stacklevel: int = 3) -> LossType:
    """The loss name `name` stands for: "ce" is accepted (with a DeprecationWarning) for
    "cross_entropy".

    Args:
        name: a loss name.
        where: the caller, named in the warning and the error.
        stacklevel: passed to `warnings.warn` (points the warning at the user's call).

    Raises:
        ValueError: an unknown name.
    """
    for loss in LOSS_TYPES:
        if name == loss:
            return loss
    if name in _ALIASES:
        new = _ALIASES[name]
        warnings.warn(
            f"{where}: loss {name!r} is deprecated, use {new!r}",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
        return new
    raise ValueError(f"{where}: 'loss' must be one of {list(LOSS_TYPES)}, got {name!r}")


def loss_fn(name: LossType) -> LossFn:
    """The mean-reduced loss function called `name`."""
    return nn.functional.cross_entropy if name == "cross_entropy" else nn.functional.mse_loss
