"""The one protocol every Fisher representation follows.

A representation holds the curvature of a list of blocks (one `BlockSpec` each) and does all its
heavy work for all blocks in one ragged `fedng.ops` call per operation:

- `update(stats, decay)`: fold a batch's statistics in (exponential moving average, or a running
  mean with `decay=None`);
- `aggregate(reps, weights)`: `sum_k w_k F_k`, exact (what a federated server sums);
- `inverse(damping)`: prepare `(F + damping)^-1`; `precondition(grads)`: apply it;
- `block_traces()` / `trace()`: `tr(F)` per block / summed;
- `validate(tol, wire_eps)`: finite, bounded, symmetric, PSD within a relative tolerance;
- `to_payload(dtype)` / `from_payload(payload)`: the wire format, symmetric matrices as their
  triangle; `nbytes`: the exact payload size in the representation's own dtype;
- `inverse_arrays()` / `load_inverse_arrays()`: the damped inverses as named arrays.

Representations are found by name through `fedng.curvature.registry`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fedng import ops
from fedng._typing import Arrays
from fedng.curvature.checks import check_dtype
from fedng.curvature.spec import BLOCK_KINDS, BlockKind, BlockSpec, Payload, check_specs
from fedng.curvature.stats import BlockStats
from fedng.curvature.validation import PsdCheck, run_psd_checks

if TYPE_CHECKING:
    from typing_extensions import Self


@dataclass
class InverseReport:
    """What `inverse` did, per inverted matrix.

    Attributes:
        names: one label per matrix (e.g. `fc1.A`).
        status: int8 [k], `fedng.ops.CholeskyStatus` codes.
        damping: float64 [k], the damping actually used per matrix (NaN where it failed).
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
        status = [ops.CholeskyStatus.OK if i in good else ops.CholeskyStatus.FAILED for i in live]
        return cls(
            [specs[i].name for i in live],
            torch.tensor([int(s) for s in status], dtype=torch.int8),
            torch.tensor([lam[i] if i in good else math.nan for i in live], dtype=torch.float64),
        )

    @classmethod
    def concat(cls, reports: Sequence[InverseReport]) -> InverseReport:
        """The reports one after another (e.g. every representation of a `CurvatureSet`)."""
        return cls(
            [n for r in reports for n in r.names],
            torch.cat([r.status for r in reports]) if reports else torch.zeros(0, dtype=torch.int8),
            (
                torch.cat([r.damping for r in reports])
                if reports
                else torch.zeros(0, dtype=torch.float64)
            ),
        )

    @property
    def failed(self) -> list[str]:
        """Names of the matrices that could not be inverted."""
        return [
            n
            for n, s in zip(self.names, self.status.tolist(), strict=True)
            if s == ops.CholeskyStatus.FAILED
        ]


class FisherRepresentation(ABC):
    """Base class of `KFAC`, `DiagonalFisher`, `LowRankFisher` (and any registered kind).

    Class attributes:
        kind: the registry name ("kfac", "diag", "lowrank").
        order: where the kind goes among a `CurvatureSet`'s kinds (iteration, wire and summation
            order; unique across the registry).
        block_kinds: the block kinds it can hold.
        default_block_kinds: the block kinds it takes when chosen for a whole model (the others
            get the diagonal Fisher).

    Attributes:
        specs: the blocks, in order.
        dtype: float32 or float64.
        counts: updates folded into each block (0: never seen, no curvature yet).
    """

    kind: ClassVar[str]
    order: ClassVar[int]
    block_kinds: ClassVar[frozenset[BlockKind]] = frozenset(BLOCK_KINDS)
    default_block_kinds: ClassVar[frozenset[BlockKind]] = frozenset(BLOCK_KINDS)

    def __init__(self, specs: Sequence[BlockSpec], dtype: torch.dtype) -> None:
        name = type(self).__name__
        self.specs: tuple[BlockSpec, ...] = tuple(specs)
        for i, s in enumerate(self.specs):
            if not isinstance(s, BlockSpec):
                raise TypeError(f"{name}: 'specs[{i}]' must be a BlockSpec, got {type(s).__name__}")
            if s.kind not in self.block_kinds:
                raise ValueError(
                    f"{name}: block '{s.name}' is {s.kind!r}; {name} holds only"
                    f" {sorted(self.block_kinds)} blocks"
                )
        self.dtype = check_dtype(name, dtype)
        self.counts: list[int] = [0] * len(self.specs)

    @classmethod
    def create(
        cls,
        specs: Sequence[BlockSpec],
        *,
        dtype: torch.dtype = torch.float32,
        rank: int = 16,
        sketch_seed: int = 0,
    ) -> Self:
        """Zero curvature over `specs`; `rank` and `sketch_seed` serve the kinds that sketch."""
        return cls(specs, dtype)

    def __len__(self) -> int:
        return len(self.specs)

    @property
    @abstractmethod
    def ready(self) -> list[bool]:
        """Per block: whether it has an inverse to precondition with."""

    @abstractmethod
    def update(self, stats: Sequence[BlockStats | None], decay: float | None = 0.95) -> None:
        """Folds one batch's statistics in (None entries: blocks not seen, left unchanged)."""

    @classmethod
    @abstractmethod
    def aggregate(cls, reps: Sequence[Self], weights: Sequence[float]) -> Self:
        """`sum_k weights[k] * reps[k]`, exact."""

    @abstractmethod
    def inverse(self, damping: float | Sequence[float], *, factored: bool = False) -> InverseReport:
        """Prepares the damped inverse of every block that has curvature.

        Args:
            damping: λ > 0, one float or one per block.
            factored: split the damping between Kronecker factors by their traces (K-FAC only;
                other kinds add λ as is).
        """

    @abstractmethod
    def precondition(
        self,
        grads: Sequence[torch.Tensor | None],
        stats: Sequence[BlockStats | None] | None = None,
        *,
        out: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor | None]:
        """`(F_i + damping)^-1 grads_i` per block; None where there is no grad or no inverse.

        `out` (optional, one contiguous [m, n] tensor per block that overlaps no input) is where
        a representation may write block i's result, returning `out[i]` itself; one that does not
        returns new tensors (callers check identity).
        """

    def block_diagonal(self, i: int) -> torch.Tensor | None:
        """The diagonal of block i's (undamped) curvature as an [m, n] matrix shaped like its
        gradient, or None when this kind cannot give it (callers then use the identity).

        The fallback preconditioner of a block whose inverse failed: `grad / (diag + λ)`.
        """
        return None

    def reset(self, indices: Sequence[int]) -> None:
        """Forgets the curvature and inverse of these blocks (their count goes back to 0), e.g.
        after it became non-finite or indefinite; the next batch starts them afresh."""
        for i in indices:
            self.counts[i] = 0

    @abstractmethod
    def quadratic(self, vectors: Sequence[torch.Tensor | None]) -> float:
        """`sum_i v_i^T F_i v_i` (undamped) over blocks with curvature."""

    @abstractmethod
    def block_traces(self) -> list[float]:
        """`tr(F_i)` per block (an unbiased estimate for sketches)."""

    def trace(self, start: float = 0.0) -> float:
        """`start + sum_i tr(F_i)`, adding block by block (a container sums its kinds in one
        fixed order by passing its running total)."""
        for t in self.block_traces():
            start += t
        return start

    @abstractmethod
    def psd_checks(self, tol: float, wire_eps: float) -> list[PsdCheck]:
        """Checks finiteness, bounds, symmetry and signs; returns the PSD tests still to run.

        Error labels read `<kind> block '<name>' <matrix>`.

        Raises:
            ValueError: naming the block and matrix.
        """

    def validate(self, tol: float = 1e-3, wire_eps: float = 0.0) -> None:
        """Raises ValueError naming the first block whose curvature is not a Fisher.

        Args:
            tol: relative tolerance (see `fedng.curvature.validation`).
            wire_eps: machine epsilon of the dtype the curvature travelled in (0: none).
        """
        run_psd_checks(self.psd_checks(tol, wire_eps))

    @abstractmethod
    def to_payload(self, dtype: torch.dtype = torch.float32) -> Payload:
        """The curvature packed for the wire in `dtype`."""

    @classmethod
    @abstractmethod
    def from_payload(cls, payload: Payload, dtype: torch.dtype = torch.float32) -> Self:
        """Rebuilds a representation (without inverses) from `to_payload`'s output."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Exact bytes of `to_payload(self.dtype)`."""

    @abstractmethod
    def inverse_arrays(self) -> tuple[Arrays, set[str]]:
        """The damped inverses as named arrays `<kind>/<block>/<part>`, and which are symmetric
        matrices (to travel as triangles). Blocks without an inverse are left out."""

    @abstractmethod
    def load_inverse_arrays(self, arrays: Arrays) -> None:
        """Installs inverses made by `inverse_arrays` (blocks absent there are left as they are).

        Raises:
            ValueError: a block with some of its parts missing or of the wrong shape.
        """

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically (curvature, counts, inverses)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores `state_dict()`'s output (checked against this representation's blocks)."""

    def _label(self, i: int) -> str:
        """`<kind> block '<name>'`: how errors name block i."""
        return f"{self.kind} block '{self.specs[i].name}'"

    def _inverse_key(self, i: int, part: str) -> str:
        return f"{self.kind}/{self.specs[i].name}/{part}"

    def _inverse_parts(
        self, arrays: Arrays, i: int, parts: Sequence[str], shapes: Sequence[tuple[int, ...]]
    ) -> list[torch.Tensor] | None:
        """Block i's inverse parts from `arrays` in this dtype (None when none are there)."""
        keys = [self._inverse_key(i, p) for p in parts]
        present = [k in arrays for k in keys]
        if not any(present):
            return None
        where = f"{type(self).__name__}.load_inverse_arrays"
        if not all(present):
            raise ValueError(f"{where}: {self._label(i)} needs {keys}, got only some of them")
        out = []
        for k, shape in zip(keys, shapes, strict=True):
            t = arrays[k]
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"{where}: '{k}' must have shape {list(shape)}, got {list(t.shape)}"
                )
            out.append(t.to(device="cpu", dtype=self.dtype).contiguous())
        return out

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
