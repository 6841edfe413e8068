"""The tasks' convolutional models (also the bench model zoo's: `bench/zoo.py` imports them).

`cnn_digits` takes sklearn's digits as images [B, 1, 8, 8]; `cnn1d_mnist1d` takes MNIST-1D's
signals [B, 40] and unflattens them to one channel itself. Both are built without seeding: wrap
them in `tasks.base.seeded_model` for a reproducible initialization.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import nn


def cnn_digits(batch_norm: bool = False) -> nn.Sequential:
    """Conv2d 1-16 (3x3) / Conv2d 16-32 (3x3, stride 2) / Linear 512-10, ReLU between.

    Args:
        batch_norm: a BatchNorm2d after each convolution.

    Returns:
        The model, for inputs [B, 1, 8, 8] and logits [B, 10].
    """

    def norm(c: int) -> list[nn.Module]:
        return [nn.BatchNorm2d(c)] if batch_norm else []

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        *norm(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        *norm(32),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def cnn1d_mnist1d() -> nn.Sequential:
    """Conv1d 1-16 (k5, stride 2) / Conv1d 16-32 (k3, stride 2) / Linear 320-10, ReLU between.

    Returns:
        The model, for signals [B, 40] (unflattened to [B, 1, 40] inside) and logits [B, 10].
    """
    return nn.Sequential(
        nn.Unflatten(1, (1, 40)),
        nn.Conv1d(1, 16, 5, padding=2, stride=2),
        nn.ReLU(),
        nn.Conv1d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 10, 10),
    )


def pick_builder(
    where: str, model: str, builders: Mapping[str, Callable[[], nn.Module]]
) -> Callable[[], nn.Module]:
    """The builder a task's `model` argument names.

    Raises:
        ValueError: an unknown `model` (naming `where` and the choices).
    """
    if model not in builders:
        raise ValueError(f"{where}: 'model' must be one of {list(builders)}, got {model!r}")
    return builders[model]
