"""`CurvatureSet`: a model's block-diagonal curvature, one representation per kind.

A model's blocks are split by curvature kind (chosen per layer, e.g. by
`fedng.optim.config.assign`); every operation is forwarded to one representation per kind (each
does one ragged native call for all its blocks), kinds in registry order. The set converts to and
from named arrays for the wire: the curvature payloads (`to_arrays`) and the damped inverses
(`inverse_arrays`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from fedng._typing import Arrays
from fedng.curvature.base import FisherRepresentation, InverseReport
from fedng.curvature.layout import BlockLayout
from fedng.curvature.registry import kinds as registered_kinds
from fedng.curvature.registry import representation
from fedng.curvature.spec import Payload
from fedng.curvature.stats import BlockStats
from fedng.curvature.validation import run_psd_checks

if TYPE_CHECKING:
    from typing_extensions import Self

T = TypeVar("T")

Damping = float | Mapping[str, Sequence[float]]
"""λ for every block, or per kind one λ per block of that kind."""


@dataclass
class CurvatureSet:
    """Per-kind representations over a model's blocks.

    Attributes:
        layouts: every block, in capture order.
        kinds: the curvature kind of each block (a registered kind: "kfac", "diag", "lowrank").
        groups: kind -> indices of its blocks (in `layouts`), kinds in registry order.
        reps: kind -> its representation (over exactly those blocks, in that order).
    """

    layouts: list[BlockLayout]
    kinds: list[str]
    groups: dict[str, list[int]] = field(default_factory=dict)
    reps: dict[str, FisherRepresentation] = field(default_factory=dict)

    @classmethod
    def empty(
        cls,
        layouts: Sequence[BlockLayout],
        kinds: Sequence[str],
        rank: int = 16,
        sketch_seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> Self:
        """Zero curvature for these blocks.

        Args:
            layouts: the blocks.
            kinds: one registered kind per block.
            rank: sketch rank of low-rank blocks.
            sketch_seed: the shared sketch seed.
            dtype: float32 or float64.

        Raises:
            ValueError: an unknown kind, or as many kinds as blocks.
        """
        cs = cls(list(layouts), list(kinds))
        cs._check_kinds("CurvatureSet.empty")
        for kind in registered_kinds():
            idx = [i for i, k in enumerate(cs.kinds) if k == kind]
            if idx:
                cs.groups[kind] = idx
                cs.reps[kind] = representation(kind).create(
                    [cs.layouts[i].spec for i in idx],
                    dtype=dtype,
                    rank=rank,
                    sketch_seed=sketch_seed,
                )
        return cs

    def _check_kinds(self, where: str) -> None:
        known = registered_kinds()
        if len(self.kinds) != len(self.layouts) or any(k not in known for k in self.kinds):
            raise ValueError(
                f"{where}: bad kinds {self.kinds[:5]} for {len(self.layouts)} blocks"
                f" (one of {list(known)} per block)"
            )

    def _split(self, items: Sequence[T], kind: str) -> list[T]:
        return [items[i] for i in self.groups[kind]]

    def _check_len(self, where: str, name: str, items: Sequence[object]) -> None:
        if len(items) != len(self.layouts):
            raise ValueError(
                f"CurvatureSet.{where}: '{name}' must have {len(self.layouts)} entries"
                f" (one per block), got {len(items)}"
            )

    @property
    def dtype(self) -> torch.dtype:
        """The representations' dtype (float32 for a set without blocks)."""
        return next((r.dtype for r in self.reps.values()), torch.float32)

    @property
    def ready(self) -> list[bool]:
        """Per block: whether it has an inverse to precondition with."""
        out = [False] * len(self.layouts)
        for kind, rep in self.reps.items():
            for i, r in zip(self.groups[kind], rep.ready, strict=True):
                out[i] = r
        return out

    # --- curvature --------------------------------------------------------------------------

    def update(self, stats: Sequence[BlockStats | None], decay: float | None) -> None:
        """Folds one batch's statistics (one entry per block, None: unseen) into every
        representation; `decay`: EMA decay in [0, 1), or None for a running mean."""
        self._check_len("update", "stats", stats)
        for kind, rep in self.reps.items():
            rep.update(self._split(stats, kind), decay)

    @classmethod
    def combine(cls, sets: Sequence[CurvatureSet], weights: Sequence[float]) -> Self:
        """`sum_k w_k F_k` per kind (exact; sets must share blocks and kinds). Inverses are not
        carried over."""
        if not sets:
            raise ValueError("CurvatureSet.combine: 'sets' must not be empty")
        first = sets[0]
        for s in sets[1:]:
            if s.kinds != first.kinds or [x.spec for x in s.layouts] != [
                x.spec for x in first.layouts
            ]:
                raise ValueError("CurvatureSet.combine: sets have different blocks or kinds")
        out = cls(first.layouts, first.kinds, dict(first.groups))
        for kind, rep in first.reps.items():
            out.reps[kind] = type(rep).aggregate([s.reps[kind] for s in sets], list(weights))
        return out

    def trace(self) -> float:
        """tr(F) summed over blocks (a Hutchinson estimate for sketches), for sanity checks."""
        total = 0.0
        for rep in self.reps.values():
            total = rep.trace(total)
        return total

    def relative_damping(self, rel: float) -> dict[str, list[float]]:
        """Per kind, per block: `rel` x the mean eigenvalue `tr(F_i) / d_i` of the block's
        curvature (0 where the trace is not positive)."""
        out: dict[str, list[float]] = {}
        for kind, rep in self.reps.items():
            out[kind] = [
                rel * max(tr, 0.0) / spec.numel
                for tr, spec in zip(rep.block_traces(), rep.specs, strict=True)
            ]
        return out

    def validate(self, tol: float = 1e-3, wire_eps: float = 0.0) -> None:
        """Checks received (or computed) curvature: finite, not overflowing float32 arithmetic,
        symmetric and positive semi-definite within tolerance (see
        `fedng.curvature.validation`; the PSD tests of all kinds are one native call).

        Args:
            tol: relative tolerance.
            wire_eps: machine epsilon of the dtype the payload travelled in.

        Raises:
            ValueError: naming the kind and block (`kfac block 'fc1' A has NaN/Inf entries`).
        """
        checks = []
        for rep in self.reps.values():
            checks += rep.psd_checks(tol, wire_eps)
        run_psd_checks(checks)

    # --- preconditioning --------------------------------------------------------------------

    def inverse(self, damping: Damping, *, factored: bool = False) -> InverseReport:
        """Damped inverses of every representation (see their `inverse`).

        Args:
            damping: λ > 0 for every block, or per kind one λ per block of that kind (e.g.
                from `relative_damping`).
            factored: split K-FAC's damping between its factors by their traces.

        Returns:
            One report over all kinds; `.failed` names the matrices that could not be inverted.
        """
        return InverseReport.concat(
            [
                rep.inverse(self._damping_of(damping, k), factored=factored)
                for k, rep in self.reps.items()
            ]
        )

    def _pending_kinds(self) -> list[str]:
        return [
            k
            for k, rep in self.reps.items()
            if any(c > 0 and not r for c, r in zip(rep.counts, rep.ready, strict=True))
        ]

    @property
    def pending(self) -> bool:
        """Whether some block has curvature but no inverse yet (`inverse_pending` would work)."""
        return bool(self._pending_kinds())

    @staticmethod
    def _damping_of(damping: Damping, kind: str) -> float | Sequence[float]:
        if isinstance(damping, Mapping):
            if kind not in damping:
                raise ValueError(
                    f"CurvatureSet.inverse: 'damping' has no entry for kind {kind!r}"
                    f" (got {sorted(damping)})"
                )
            return damping[kind]
        return damping

    def block_rep(self, i: int) -> tuple[FisherRepresentation, int]:
        """Block i's representation and its index there."""
        kind = self.kinds[i]
        return self.reps[kind], self.groups[kind].index(i)

    def inverse_pending(self, damping: Damping, *, factored: bool = False) -> InverseReport | None:
        """Inverts the representations holding a block that has curvature but no inverse yet (seen
        for the first time, or never inverted successfully), so that it is preconditioned from the
        step it first has curvature on; each such representation is inverted as a whole.

        Returns:
            The report over the kinds inverted, or None when no block was pending.
        """
        due = self._pending_kinds()
        if not due:
            return None
        return InverseReport.concat(
            [self.reps[k].inverse(self._damping_of(damping, k), factored=factored) for k in due]
        )

    def precondition(
        self,
        grads: Sequence[torch.Tensor | None],
        stats: Sequence[BlockStats | None] | None = None,
        *,
        out: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor | None]:
        """Preconditioned block gradients (None where a block has no inverse or no gradient).

        Args:
            grads: per block, its gradient matrix [m, n] (or None).
            stats: optional, per block, the batch that produced `grads` (K-FAC's batch form).
            out: optional, per block, a contiguous [m, n] tensor a representation may write its
                result into (see `FisherRepresentation.precondition`).
        """
        self._check_len("precondition", "grads", grads)
        if stats is not None:
            self._check_len("precondition", "stats", stats)
        result: list[torch.Tensor | None] = [None] * len(self.layouts)
        for kind, rep in self.reps.items():
            res = rep.precondition(
                self._split(grads, kind),
                None if stats is None else self._split(stats, kind),
                out=None if out is None else self._split(out, kind),
            )
            for i, p in zip(self.groups[kind], res, strict=True):
                result[i] = p
        return result

    def quadratic(self, vectors: Sequence[torch.Tensor | None]) -> float:
        """`sum_i v_i^T F_i v_i` over all blocks (undamped)."""
        self._check_len("quadratic", "vectors", vectors)
        return sum(rep.quadratic(self._split(vectors, k)) for k, rep in self.reps.items())

    # --- wire: curvature --------------------------------------------------------------------

    def to_arrays(self, dtype: torch.dtype) -> tuple[Arrays, dict[str, Any]]:
        """The payloads as named arrays (`<kind>`, 1-D, symmetric parts as triangles) and the JSON
        metadata to rebuild them (kinds, layouts, representation meta)."""
        arrays: Arrays = {}
        rmeta: dict[str, Any] = {}
        for kind, rep in self.reps.items():
            p = rep.to_payload(dtype)
            arrays[kind] = p.data
            rmeta[kind] = dict(p.meta)
        meta = {
            "kinds": self.kinds,
            "layouts": [x.to_json() for x in self.layouts],
            "rep_meta": rmeta,
        }
        return arrays, meta

    @classmethod
    def from_arrays(
        cls, arrays: Arrays, meta: dict[str, Any], dtype: torch.dtype = torch.float32
    ) -> Self:
        """Inverse of `to_arrays` (representations in `dtype`, without inverses).

        Raises:
            ValueError: inconsistent metadata or payload sizes.
        """
        layouts = [BlockLayout.from_json(x) for x in meta["layouts"]]
        kinds = [str(k) for k in meta["kinds"]]
        known = registered_kinds()
        if len(kinds) != len(layouts) or any(k not in known for k in kinds):
            raise ValueError(f"curvature meta: bad kinds {kinds[:5]} for {len(layouts)} blocks")
        cs = cls(layouts, kinds)
        present = [k for k in known if k in kinds]
        if sorted(arrays) != sorted(present):
            raise ValueError(f"curvature arrays {sorted(arrays)} do not match kinds {present}")
        for kind in present:
            idx = [i for i, k in enumerate(kinds) if k == kind]
            cs.groups[kind] = idx
            rm = {str(a): int(b) for a, b in meta.get("rep_meta", {}).get(kind, {}).items()}
            payload = Payload(
                kind, tuple(layouts[i].spec for i in idx), arrays[kind].reshape(-1), rm
            )
            cs.reps[kind] = representation(kind).from_payload(payload, dtype)
        return cs

    # --- wire: inverses ---------------------------------------------------------------------

    def inverse_arrays(self) -> tuple[Arrays, set[str]]:
        """The damped inverses (after `inverse`) as named arrays `<kind>/<block>/<part>`, and the
        names of the symmetric matrices among them."""
        arrays: Arrays = {}
        sym: set[str] = set()
        for rep in self.reps.values():
            a, s = rep.inverse_arrays()
            arrays.update(a)
            sym |= s
        return arrays, sym

    def load_inverse_arrays(self, arrays: Arrays) -> None:
        """Installs inverses made by `inverse_arrays` (blocks absent there stay as they are)."""
        for rep in self.reps.values():
            rep.load_inverse_arrays(arrays)
