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

from fedng.curvature.base import (
    FisherRepresentation,
    InverseReport,
    check_aggregate,
    check_damping,
    check_decay,
    check_dtype,
    check_grads,
    check_stats,
    check_tensor,
    clone_list,
    ema_weights,
)
from fedng.curvature.spec import BlockSpec, Payload, PayloadReader, check_wire_dtype
from fedng.curvature.stats import BlockStats


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
        seen = [i for i, st in enumerate(stats) if st is not None]
        if not seen:
            return
        old, new = ema_weights(self.counts, decay)
        fresh = []
        for i in seen:
            st = stats[i]
            if st is None:
                raise RuntimeError("fedng internal invariant broken: st is not None")
            s = self.specs[i]
            fresh.append(st.squared_sum(s.m, s.n).to(self.dtype))
        targets = [self.diag[i] for i in seen]
        torch._foreach_mul_(targets, [old[i] for i in seen])
        torch._foreach_mul_(fresh, [new[i] * stats[i].fisher_scale for i in seen])  # type: ignore[union-attr]
        torch._foreach_add_(targets, fresh)
        for i in seen:
            self.counts[i] += 1

    @classmethod
    def aggregate(cls, reps: Sequence[DiagonalFisher], weights: Sequence[float]) -> DiagonalFisher:
        """`sum_k w_k diag_k`, exact."""
        w = check_aggregate("DiagonalFisher.aggregate", cls, reps, weights)
        out = cls(reps[0].specs, reps[0].dtype)
        for r, wk in zip(reps, w, strict=True):
            torch._foreach_add_(out.diag, r.diag, alpha=wk)
        out.counts = [max(r.counts[i] for r in reps) for i in range(len(out.specs))]
        return out

    def inverse(self, damping: float | Sequence[float]) -> InverseReport:
        """`1 / (diag + λ)` for every block with curvature (λ > 0 keeps it finite).

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
        self, grads: Sequence[torch.Tensor | None], stats: Sequence[BlockStats | None] | None = None
    ) -> list[torch.Tensor | None]:
        """`grad / (diag + λ)` for every block with a gradient and an inverse."""
        check_grads("DiagonalFisher.precondition", grads, self.specs)
        live = [i for i, g in enumerate(grads) if g is not None and self.inv[i] is not None]
        out: list[torch.Tensor | None] = [None] * len(self.specs)
        if live:
            res = torch._foreach_mul(
                [grads[i].to(self.dtype) for i in live], [self.inv[i] for i in live]
            )
            for i, p in zip(live, res, strict=True):
                out[i] = p
        return out

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

    def validate(self) -> None:
        """Finite and >= 0 (within rounding) everywhere; ValueError naming the block otherwise."""
        for s, d in zip(self.specs, self.diag, strict=True):
            if not bool(torch.isfinite(d).all()):
                raise ValueError(f"DiagonalFisher.validate: block '{s.name}' has NaN/Inf entries")
            tol = 16 * torch.finfo(self.dtype).eps * float(d.abs().max())
            if float(d.min()) < -tol:
                raise ValueError(
                    f"DiagonalFisher.validate: block '{s.name}' has a negative entry"
                    f" {float(d.min()):.3e} (a Fisher diagonal is >= 0)"
                )

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
