"""The one protocol every Fisher representation follows, and the checks they share.

A representation holds the curvature of a list of blocks (one `BlockSpec` each) and does all its
heavy work for all blocks in one ragged `fedng.ops` call per operation:

- `update(stats, decay)`: fold a batch's statistics in (exponential moving average, or a running
  mean with `decay=None`);
- `aggregate(reps, weights)`: `sum_k w_k F_k`, exact (what a federated server sums);
- `inverse(damping)`: prepare `(F + damping)^-1`; `precondition(grads)`: apply it;
- `to_payload(dtype)` / `from_payload(payload)`: the wire format, symmetric matrices as their
  triangle; `nbytes`: the exact payload size in the representation's own dtype;
- `validate()`: finiteness, symmetry, positive semi-definiteness within tolerance.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

from fedng.curvature.spec import BlockSpec, Payload, check_specs
from fedng.curvature.stats import BlockStats

R = TypeVar("R", bound="FisherRepresentation")

CURVATURE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)


@dataclass
class InverseReport:
    """What `inverse` did, per inverted matrix.

    Attributes:
        names: one label per matrix (e.g. `fc1.A`).
        status: int8 [k], `fedng.ops.CholeskyStatus` codes (0 ok, 1 damping escalated, 2 failed).
        damping: float64 [k], the damping actually used per matrix.
    """

    names: list[str]
    status: torch.Tensor
    damping: torch.Tensor

    @classmethod
    def per_block(
        cls,
        specs: Sequence[BlockSpec],
        live: Sequence[int],
        ok: Sequence[int],
        lam: Sequence[float],
    ) -> InverseReport:
        """One matrix per live block: OK with damping `lam[i]` when `i` is in `ok`, else FAILED."""
        good = set(ok)
        return cls(
            [specs[i].name for i in live],
            torch.tensor([0 if i in good else 2 for i in live], dtype=torch.int8),
            torch.tensor([lam[i] if i in good else math.nan for i in live], dtype=torch.float64),
        )

    @property
    def failed(self) -> list[str]:
        """Names of the matrices that could not be inverted."""
        return [n for n, s in zip(self.names, self.status.tolist(), strict=True) if s == 2]


def check_dtype(where: str, dtype: object) -> torch.dtype:
    """float32 or float64, else TypeError naming the argument."""
    if dtype not in CURVATURE_DTYPES:
        raise TypeError(f"{where}: 'dtype' must be torch.float32 or torch.float64, got {dtype}")
    return dtype  # type: ignore[return-value]


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
    """One entry per block, each None or BlockStats of the block's kind."""
    if len(stats) != len(specs):
        raise ValueError(
            f"{where}: 'stats' must have {len(specs)} entries (one per block), got {len(stats)}"
        )
    for spec, st in zip(specs, stats, strict=True):
        if st is not None and (not isinstance(st, BlockStats) or st.kind != spec.kind):
            raise TypeError(
                f"{where}: stats for block '{spec.name}' must be BlockStats of kind"
                f" {spec.kind!r}, got {getattr(st, 'kind', type(st).__name__)!r}"
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
        if g is not None and (
            not isinstance(g, torch.Tensor) or tuple(g.shape) != (spec.m, spec.n)
        ):
            got = list(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            raise ValueError(
                f"{where}: grads for block '{spec.name}' must have shape"
                f" [{spec.m}, {spec.n}], got {got}"
            )


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


def check_aggregate(
    where: str, cls: type, reps: Sequence[Any], weights: Sequence[float]
) -> list[float]:
    """Same class, same blocks, same dtype, one finite weight >= 0 each."""
    if isinstance(reps, (str, bytes)) or not isinstance(reps, Sequence) or not reps:
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


class FisherRepresentation(ABC):
    """Base class of `KFAC`, `DiagonalFisher` and `LowRankFisher`.

    Attributes:
        specs: the blocks, in order.
        dtype: float32 or float64.
        counts: updates folded into each block (0: never seen, no curvature yet).
    """

    kind: ClassVar[str]

    def __init__(self, specs: Sequence[BlockSpec], dtype: torch.dtype) -> None:
        name = type(self).__name__
        self.specs: tuple[BlockSpec, ...] = tuple(specs)
        for i, s in enumerate(self.specs):
            if not isinstance(s, BlockSpec):
                raise TypeError(f"{name}: 'specs[{i}]' must be a BlockSpec, got {type(s).__name__}")
        self.dtype = check_dtype(name, dtype)
        self.counts: list[int] = [0] * len(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def ready(self) -> list[bool]:
        """Per block: whether it has an inverse to precondition with."""
        raise NotImplementedError

    @abstractmethod
    def update(self, stats: Sequence[BlockStats | None], decay: float | None = 0.95) -> None:
        """Folds one batch's statistics in (None entries: blocks not seen, left unchanged)."""

    @classmethod
    @abstractmethod
    def aggregate(cls: type[R], reps: Sequence[R], weights: Sequence[float]) -> R:
        """`sum_k weights[k] * reps[k]`, exact."""

    @abstractmethod
    def inverse(self, damping: float | Sequence[float]) -> InverseReport:
        """Prepares the damped inverse of every block that has curvature."""

    @abstractmethod
    def precondition(
        self, grads: Sequence[torch.Tensor | None], stats: Sequence[BlockStats | None] | None = None
    ) -> list[torch.Tensor | None]:
        """`(F_i + damping)^-1 grads_i` per block; None where there is no grad or no inverse."""

    @abstractmethod
    def quadratic(self, vectors: Sequence[torch.Tensor | None]) -> float:
        """`sum_i v_i^T F_i v_i` (undamped) over blocks with curvature."""

    @abstractmethod
    def to_payload(self, dtype: torch.dtype = torch.float32) -> Payload:
        """The curvature packed for the wire in `dtype`."""

    @classmethod
    @abstractmethod
    def from_payload(cls: type[R], payload: Payload, dtype: torch.dtype = torch.float32) -> R:
        """Rebuilds a representation (without inverses) from `to_payload`'s output."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Exact bytes of `to_payload(self.dtype)`."""

    @abstractmethod
    def validate(self) -> None:
        """Raises ValueError naming the first block whose curvature is not finite/symmetric/PSD."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically (curvature, counts, inverses)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores `state_dict()`'s output (checked against this representation's blocks)."""

    def _check_state(self, state: dict[str, Any]) -> None:
        where = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state, dict) or state.get("kind") != self.kind:
            raise ValueError(
                f"{where}: 'state' must be a {self.kind!r} state dict, got"
                f" kind {state.get('kind') if isinstance(state, dict) else state!r}"
            )
        check_specs(where, [BlockSpec.from_dict(d) for d in state["specs"]], self.specs)


def clone_list(ts: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Deep copies (None kept)."""
    return [None if t is None else t.detach().clone() for t in ts]


def check_tensor(
    where: str, name: str, t: object, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """A tensor of exactly `shape`, cast to `dtype` (ValueError/TypeError naming it otherwise)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: '{name}' must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{where}: '{name}' must have shape {list(shape)}, got {list(t.shape)}")
    return t.detach().to(dtype).clone()
