"""Argument checks the Fisher representations share (each names the argument it rejects)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch

from fedng.curvature.spec import BlockSpec, check_specs
from fedng.curvature.stats import STATS_TYPES, BlockStats


class Blocks(Protocol):
    """What the shared checks read of a representation (`FisherRepresentation` has both); a
    protocol, so that these checks need not import the base class that imports them."""

    @property
    def specs(self) -> tuple[BlockSpec, ...]:
        """The blocks, in order."""

    @property
    def dtype(self) -> torch.dtype:
        """float32 or float64."""


CURVATURE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)


def check_dtype(where: str, dtype: object) -> torch.dtype:
    """float32 or float64, else TypeError naming the argument."""
    for d in CURVATURE_DTYPES:
        if dtype == d:
            return d
    raise TypeError(f"{where}: 'dtype' must be torch.float32 or torch.float64, got {dtype}")


def check_decay(where: str, decay: float | None) -> float | None:
    """None (running mean) or a float in [0, 1)."""
    if decay is None:
        return None
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        raise ValueError(f"{where}: 'decay' must be None or a float in [0, 1), got {decay!r}")
    return float(decay)


def check_damping(where: str, damping: float | Sequence[float], n: int) -> list[float]:
    """A float > 0 or one per block."""
    values = [damping] * n if isinstance(damping, (int, float)) else list(damping)
    if len(values) != n:
        raise ValueError(
            f"{where}: 'damping' must be a float or have {n} values, got {len(values)}"
        )
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{where}: 'damping' must be finite and > 0, got {v!r}")
    return [float(v) for v in values]


def check_stats(where: str, stats: Sequence[BlockStats | None], specs: Sequence[BlockSpec]) -> None:
    """One entry per block, each None or the statistics class of the block's kind."""
    if len(stats) != len(specs):
        raise ValueError(
            f"{where}: 'stats' must have {len(specs)} entries (one per block), got {len(stats)}"
        )
    for spec, st in zip(specs, stats, strict=True):
        want = STATS_TYPES[spec.kind]
        if st is not None and not isinstance(st, want):
            raise TypeError(
                f"{where}: stats for block '{spec.name}' must be {want.__name__}"
                f" ({spec.kind!r} block), got {type(st).__name__}"
            )


def check_grads(
    where: str, grads: Sequence[torch.Tensor | None], specs: Sequence[BlockSpec]
) -> None:
    """One [m, n] tensor (or None) per block."""
    if len(grads) != len(specs):
        raise ValueError(
            f"{where}: 'grads' must have {len(specs)} entries (one per block), got {len(grads)}"
        )
    for spec, g in zip(specs, grads, strict=True):
        if isinstance(g, torch.Tensor) and not g.is_cpu:
            raise ValueError(
                f"{where}: grads for block '{spec.name}' must be on the CPU, got {g.device}"
            )
        if g is not None and (
            not isinstance(g, torch.Tensor) or tuple(g.shape) != (spec.m, spec.n)
        ):
            got = list(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            raise ValueError(
                f"{where}: grads for block '{spec.name}' must have shape"
                f" [{spec.m}, {spec.n}], got {got}"
            )


def check_aggregate(
    where: str, cls: type[Blocks], reps: Sequence[Blocks], weights: Sequence[float]
) -> list[float]:
    """Same class, same blocks, same dtype, one finite weight >= 0 each."""
    if not reps:
        raise ValueError(
            f"{where}: 'reps' must be a non-empty list of {cls.__name__}, got {reps!r}"
        )
    for i, r in enumerate(reps):
        if not isinstance(r, cls):
            raise TypeError(f"{where}: 'reps[{i}]' must be {cls.__name__}, got {type(r).__name__}")
        check_specs(f"{where}: reps[{i}]", r.specs, reps[0].specs)
        if r.dtype != reps[0].dtype:
            raise TypeError(
                f"{where}: 'reps[{i}]' has dtype {r.dtype}, reps[0] has {reps[0].dtype}"
            )
    w = list(weights)
    if len(w) != len(reps):
        raise ValueError(f"{where}: 'weights' must have {len(reps)} values, got {len(w)}")
    for v in w:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{where}: 'weights' must be finite and >= 0, got {v!r}")
    return [float(v) for v in w]


def check_tensor(
    where: str, name: str, t: object, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """A tensor of exactly `shape`, cast to `dtype` (ValueError/TypeError naming it otherwise)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: '{name}' must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{where}: '{name}' must have shape {list(shape)}, got {list(t.shape)}")
    # contiguous CPU copies: the representations hand them to the trusted native ops
    return t.detach().to(device="cpu", dtype=dtype).clone(memory_format=torch.contiguous_format)
