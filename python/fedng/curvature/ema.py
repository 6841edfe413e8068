"""Weights of the running curvature: exponential moving average or running mean, per block."""

from __future__ import annotations

from collections.abc import Sequence


def ema_weights(counts: Sequence[int], decay: float | None) -> tuple[list[float], list[float]]:
    """Per block (decay of the old value, weight of the new one).

    A float decay is an exponential moving average; None a running mean (weights 1/(k+1)).
    A block's first update takes the new value as is (its old value is zero, so its decay may be
    anything: it is reported as the decay of the other blocks, letting one call do them all).
    """
    old: list[float | None] = []
    new: list[float] = []
    for k in counts:
        if k == 0:
            old.append(None)
            new.append(1.0)
        elif decay is None:
            old.append(k / (k + 1))
            new.append(1.0 / (k + 1))
        else:
            old.append(decay)
            new.append(1.0 - decay)
    known = [d for d in old if d is not None]
    fill = known[0] if known else 0.0
    return [fill if d is None else d for d in old], new


def decay_groups(decays: Sequence[float], members: Sequence[int]) -> dict[float, list[int]]:
    """Block indices grouped by decay (kron_accumulate takes one decay per call)."""
    groups: dict[float, list[int]] = {}
    for i in members:
        groups.setdefault(decays[i], []).append(i)
    return groups
