"""Diagonal Fisher: `diag(F) = E_b[(per-sample gradient)^2]`, exact (no Kronecker approximation).

Elementwise work (damping, division) runs as single `torch._foreach_*` calls over all blocks;
the per-block squared sums come from one GEMM per block (`(g^2)^T (a^2)` when a sample has one
row). No native op computes that cross product yet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from fedng._typing import Arrays
from fedng.curvature.base import FisherRepresentation, InverseReport, clone_list
from fedng.curvature.checks import (
    check_aggregate,
    check_damping,
    check_decay,
    check_dtype,
    check_grads,
    check_stats,
    check_tensor,
)
from fedng.curvature.ema import ema_weights
from fedng.curvature.registry import register
from fedng.curvature.spec import BlockSpec, Payload, PayloadReader, check_wire_dtype
from fedng.curvature.stats import BlockStats
from fedng.curvature.validation import PsdCheck, check_nonnegative, finite_scale


@register
class DiagonalFisher(FisherRepresentation):
    """The diagonal of the empirical (or Monte-Carlo) Fisher, per block.

    Args:
        specs: the blocks (any kind).
        dtype: float32 or float64.

    Attributes:
        diag: per block, [m, n], the Fisher diagonal laid out like the block's gradient matrix.
        inv: per block, `1 / (diag + λ)` from the last `inverse` (None before).
    """

    kind = "diag"
    order = 1

    def __init__(self, specs: Sequence[BlockSpec], dtype: torch.dtype = torch.float32) -> None:
        super().__init__(specs, dtype)
        self.diag: list[torch.Tensor] = [torch.zeros(s.m, s.n, dtype=dtype) for s in self.specs]
        self.inv: list[torch.Tensor | None] = [None] * len(self.specs)

    @property
    def ready(self) -> list[bool]:
        """Per block: whether it has an inverse."""
        return [v is not None for v in self.inv]

    def update(self, stats: Sequence[BlockStats | None], decay: float | None = 0.95) -> None:
        """`diag <- decay diag + (1 - decay) fisher_scale * sum_b psg_b^2` per block seen."""
        check_stats("DiagonalFisher.update", stats, self.specs)
        decay = check_decay("DiagonalFisher.update", decay)
        seen = [(i, st) for i, st in enumerate(stats) if st is not None]
        if not seen:
            return
        old, new = ema_weights(self.counts, decay)
        fresh = [st.squared_sum(self.specs[i].m, self.specs[i].n).to(self.dtype) for i, st in seen]
        targets = [self.diag[i] for i, _ in seen]
        torch._foreach_mul_(targets, [old[i] for i, _ in seen])
        torch._foreach_mul_(fresh, [new[i] * st.fisher_scale for i, st in seen])
        torch._foreach_add_(targets, fresh)
        for i, _ in seen:
            self.counts[i] += 1

    @classmethod
    def aggregate(cls, reps: Sequence[DiagonalFisher], weights: Sequence[float]) -> DiagonalFisher:
        """`sum_k w_k diag_k`, exact."""
        w = check_aggregate("DiagonalFisher.aggregate", cls, reps, weights)
        out = cls(reps[0].specs, reps[0].dtype)
        for r, wk in zip(reps, w, strict=True):
            torch._foreach_add_(out.diag, r.diag, alpha=wk)
        out.counts = [  # only reps that contribute (weight > 0) make a block 'seen'
            max((r.counts[i] for r, wk in zip(reps, w, strict=True) if wk > 0), default=0)
            for i in range(len(out.specs))
        ]
        return out

    def inverse(self, damping: float | Sequence[float], *, factored: bool = False) -> InverseReport:
        """`1 / (diag + λ)` for every block with curvature (λ > 0 keeps it finite; `factored`
        does not apply to a diagonal).

        A block with NaN/Inf curvature is reported FAILED (status 2) and keeps its previous
        inverse (or stays unpreconditioned).
        """
        lam = check_damping("DiagonalFisher.inverse", damping, len(self.specs))
        live = [i for i, c in enumerate(self.counts) if c > 0]
        norms = torch._foreach_norm([self.diag[i] for i in live]) if live else []
        ok = [i for i, nm in zip(live, norms, strict=True) if math.isfinite(float(nm))]
        if ok:
            shifted = torch._foreach_add([self.diag[i] for i in ok], [lam[i] for i in ok])
            for i, v in zip(ok, torch._foreach_reciprocal(shifted), strict=True):
                self.inv[i] = v
        return InverseReport.per_block(self.specs, live, ok, lam)

    def precondition(
        self,
        grads: Sequence[torch.Tensor | None],
        stats: Sequence[BlockStats | None] | None = None,
        *,
        out: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor | None]:
        """`grad / (diag + λ)` for every block with a gradient and an inverse."""
        check_grads("DiagonalFisher.precondition", grads, self.specs)
        live = [
            (i, g.to(self.dtype), inv)
            for i, (g, inv) in enumerate(zip(grads, self.inv, strict=True))
            if g is not None and inv is not None
        ]
        result: list[torch.Tensor | None] = [None] * len(self.specs)
        if live:
            res = torch._foreach_mul([g for _, g, _ in live], [inv for _, _, inv in live])
            for (i, _, _), p in zip(live, res, strict=True):
                result[i] = p
        return result

    def block_diagonal(self, i: int) -> torch.Tensor | None:
        """The diagonal itself [m, n]."""
        return self.diag[i]

    def reset(self, indices: Sequence[int]) -> None:
        """Zero diagonal, no inverse, count 0 for these blocks."""
        for i in indices:
            self.diag[i].zero_()
            self.inv[i] = None
            self.counts[i] = 0

    def quadratic(self, vectors: Sequence[torch.Tensor | None]) -> float:
        """`sum_i sum diag_i * v_i^2`."""
        check_grads("DiagonalFisher.quadratic", vectors, self.specs)
        return sum(
            float((self.diag[i] * v.to(self.dtype).square()).sum())
            for i, v in enumerate(vectors)
            if v is not None and self.counts[i] > 0
        )

    @property
    def nbytes(self) -> int:
        """Exact payload bytes in `self.dtype`: one number per parameter."""
        return torch.finfo(self.dtype).bits // 8 * sum(s.numel for s in self.specs)

    def to_payload(self, dtype: torch.dtype = torch.float32) -> Payload:
        """All diagonals, concatenated, in `dtype`."""
        check_wire_dtype("DiagonalFisher.to_payload", dtype)
        data = (
            torch.cat([d.reshape(-1) for d in self.diag]).to(dtype)
            if self.diag
            else torch.zeros(0, dtype=dtype)
        )
        return Payload(self.kind, self.specs, data)

    @classmethod
    def from_payload(cls, payload: Payload, dtype: torch.dtype = torch.float32) -> DiagonalFisher:
        """Diagonals from a payload (all-zero blocks count as never updated)."""
        check_dtype("DiagonalFisher.from_payload", dtype)
        out = cls(payload.specs, dtype)
        rd = PayloadReader(
            "DiagonalFisher.from_payload", payload, cls.kind, sum(s.numel for s in out.specs)
        )
        for i, s in enumerate(out.specs):
            out.diag[i] = rd.take(s.numel).to(dtype).reshape(s.m, s.n).clone()
            out.counts[i] = int(bool(out.diag[i].any()))
        return out

    def block_traces(self) -> list[float]:
        """`sum(diag_i)` per block."""
        return [float(d.sum()) for d in self.diag]

    def trace(self, start: float = 0.0) -> float:
        """`start + sum_i tr(F_i)`, the blocks summed first (the order the federated trace check
        has always used; kept so that its results do not move by an ulp)."""
        return start + sum(self.block_traces())

    def psd_checks(self, tol: float, wire_eps: float) -> list[PsdCheck]:
        """Every diagonal finite, bounded and >= -tol max|diag| (nothing left to factorize)."""
        for i, d in enumerate(self.diag):
            label = f"{self._label(i)} diag"
            check_nonnegative(label, d, tol, finite_scale(label, d))
        return []

    def inverse_arrays(self) -> tuple[Arrays, set[str]]:
        """`<block>/inv` [m, n] per inverted block (none symmetric)."""
        arrays = {
            self._inverse_key(i, "inv"): inv for i, inv in enumerate(self.inv) if inv is not None
        }
        return arrays, set()

    def load_inverse_arrays(self, arrays: Arrays) -> None:
        """Installs `inv` of the blocks `arrays` holds."""
        for i, s in enumerate(self.specs):
            parts = self._inverse_parts(arrays, i, ("inv",), ((s.m, s.n),))
            if parts is not None:
                self.inv[i] = parts[0]

    def state_dict(self) -> dict[str, Any]:
        """Diagonals, counts and inverses (copies)."""
        return {
            "kind": self.kind,
            "specs": [s.to_dict() for s in self.specs],
            "counts": list(self.counts),
            "diag": clone_list(self.diag),
            "inv": clone_list(self.inv),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores `state_dict()`'s output."""
        self._check_state(state)
        w = "DiagonalFisher.load_state_dict"
        for i, s in enumerate(self.specs):
            self.diag[i] = check_tensor(w, f"diag[{i}]", state["diag"][i], (s.m, s.n), self.dtype)
            v = state["inv"][i]
            self.inv[i] = (
                None if v is None else check_tensor(w, f"inv[{i}]", v, (s.m, s.n), self.dtype)
            )
        self.counts = [int(c) for c in state["counts"]]
