"""Loss names and functions, one table for configs, tasks and local training.

The names are those of `fedng.curvature.sampled_loss`: "cross_entropy" and "mse".
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal, TypeGuard

import torch
from torch import nn

LossName = Literal["cross_entropy", "mse"]
LOSSES: tuple[LossName, ...] = ("cross_entropy", "mse")
"""Loss names understood everywhere in `fedng.federated`."""

_ALIASES: dict[str, LossName] = {"ce": "cross_entropy"}
"""Deprecated spellings (the 0.1 configs and tasks said "ce")."""

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _is_loss(name: str) -> TypeGuard[LossName]:
    return name in LOSSES


def canonical_loss(name: str, where: str, stacklevel: int = 3) -> LossName:
    """The loss name `name` stands for: "ce" is accepted (with a DeprecationWarning) for
    "cross_entropy".

    Args:
        name: a loss name.
        where: the caller, named in the warning and the error.
        stacklevel: passed to `warnings.warn` (points the warning at the user's call).

    Raises:
        ValueError: an unknown name.
    """
    if _is_loss(name):
        return name
    if name in _ALIASES:
        new = _ALIASES[name]
        warnings.warn(
            f"{where}: loss {name!r} is deprecated, use {new!r}",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
        return new
    raise ValueError(f"{where}: 'loss' must be one of {list(LOSSES)}, got {name!r}")


def loss_fn(name: LossName) -> LossFn:
    """The mean-reduced loss function called `name`."""
    return nn.functional.cross_entropy if name == "cross_entropy" else nn.functional.mse_loss
