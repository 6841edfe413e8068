"""Low-rank Fisher from a shared-seed Nyström sketch: `F ≈ U diag(S) U^T` per block.

Each block keeps only the sketch `Y = F Ω` [d, r] of its empirical (or MC) Fisher
`F = fisher_scale * J^T J` (J: per-sample gradients, d = m n parameters), built with
`sketch_accumulate` without ever forming F. Ω [d, r] is a Gaussian matrix generated from
(seed, block name) by a counter-based RNG, identical on every client, so sketches from different
batches or clients add up exactly: `sum_k w_k Y_k = (sum_k w_k F_k) Ω`. `inverse` turns the
sketches into eigendecompositions (`nystrom`), `precondition` applies
`(U S U^T + λ I)^-1` by Woodbury (`lowrank_precondition`); each is one ragged call.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

import torch

from fedng import ops
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
    decay_groups,
    ema_weights,
)
from fedng.curvature.spec import BlockSpec, Payload, PayloadReader, check_wire_dtype
from fedng.curvature.stats import _CHUNK_BYTES, BlockStats


def stream_id(name: str) -> int:
    """The sketch stream of a block: a stable hash of its name (the same on every client)."""
    return zlib.crc32(name.encode("utf-8"))


def _check_int(where: str, name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{where}: '{name}' must be an int >= {low}, got {value!r}")
    return value


class LowRankFisher(FisherRepresentation):
    """Nyström-sketched Fisher per block.

    Args:
        specs: the blocks (any kind; the sketch has d = m n rows, so mind large embeddings).
        rank: sketch columns r (capped at d per block).
        seed: the shared sketch seed (all clients must use the same).
        dtype: float32 or float64.

    Attributes:
        Y: per block, the sketch [d, r].
        U, S: the eigendecomposition from the last `inverse` (None before).
        damping: per block, the λ of the last `inverse` (None before).
    """

    kind = "lowrank"

    def __init__(
        self,
        specs: Sequence[BlockSpec],
        rank: int = 32,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(specs, dtype)
        self.rank = _check_int("LowRankFisher", "rank", rank, 1)
        self.seed = _check_int("LowRankFisher", "seed", seed, 0)
        self.ranks = [min(rank, s.numel) for s in self.specs]
        self.omega = [
            ops.gaussian_sketch_matrix(s.numel, r, self.seed, stream_id(s.name), dtype=dtype)
            for s, r in zip(self.specs, self.ranks, strict=True)
        ]
        self.Y: list[torch.Tensor] = [torch.zeros_like(o) for o in self.omega]
        self.U: list[torch.Tensor | None] = [None] * len(self.specs)
        self.S: list[torch.Tensor | None] = [None] * len(self.specs)
        self.damping: list[float | None] = [None] * len(self.specs)

    @property
    def ready(self) -> list[bool]:
        """Per block: whether it has an eigendecomposition."""
        return [u is not None for u in self.U]

    def update(self, stats: Sequence[BlockStats | None], decay: float | None = 0.95) -> None:
        """`Y <- decay Y + (1 - decay) fisher_scale J^T (J Ω)`, J in bounded chunks of samples."""
        check_stats("LowRankFisher.update", stats, self.specs)
        decay = check_decay("LowRankFisher.update", decay)
        seen = [i for i, st in enumerate(stats) if st is not None]
        old, new = ema_weights(self.counts, decay)
        itemsize = torch.finfo(self.dtype).bits // 8
        for d, members in decay_groups(old, seen).items():
            width = sum(self.specs[i].numel for i in members)
            step = max(1, _CHUNK_BYTES // (itemsize * width))
            batch = {i: stats[i].batch_size for i in members}  # type: ignore[union-attr]
            for lo in range(0, max(batch.values()), step):
                part = [i for i in members if lo < batch[i]]
                js = [
                    stats[i]
                    .per_sample(
                        lo,
                        min(batch[i], lo + step),  # type: ignore[union-attr]
                        self.specs[i].n,
                    )
                    .to(self.dtype)
                    for i in part
                ]
                ops.sketch_accumulate(
                    [self.Y[i] for i in part],
                    js,
                    [self.omega[i] for i in part],
                    d if lo == 0 else 1.0,
                    [new[i] * stats[i].fisher_scale for i in part],  # type: ignore[union-attr]
                )
        for i in seen:
            self.counts[i] += 1

    @classmethod
    def aggregate(cls, reps: Sequence[LowRankFisher], weights: Sequence[float]) -> LowRankFisher:
        """`sum_k w_k Y_k`: exactly the sketch of `sum_k w_k F_k` (same seed and rank needed)."""
        where = "LowRankFisher.aggregate"
        w = check_aggregate(where, cls, reps, weights)
        for k, r in enumerate(reps):
            if (r.seed, r.rank) != (reps[0].seed, reps[0].rank):
                raise ValueError(
                    f"{where}: 'reps[{k}]' has (seed, rank) = ({r.seed}, {r.rank}),"
                    f" reps[0] has ({reps[0].seed}, {reps[0].rank}); sketches with"
                    " different test matrices do not add up"
                )
        out = cls(reps[0].specs, reps[0].rank, reps[0].seed, reps[0].dtype)
        for r, wk in zip(reps, w, strict=True):
            torch._foreach_add_(out.Y, r.Y, alpha=wk)
        out.counts = [max(r.counts[i] for r in reps) for i in range(len(out.specs))]
        return out

    def inverse(self, damping: float | Sequence[float]) -> InverseReport:
        """Nyström eigendecompositions of every sketched block; λ kept for `precondition`.

        A block whose sketch is not finite is reported FAILED (status 2) and keeps its previous
        decomposition (or stays unpreconditioned): never a crash, never a NaN step.
        """
        lam = check_damping("LowRankFisher.inverse", damping, len(self.specs))
        live = [i for i, c in enumerate(self.counts) if c > 0]
        norms = [float(v) for v in torch._foreach_norm([self.Y[i] for i in live])] if live else []
        ok = [i for i, nm in zip(live, norms, strict=True) if math.isfinite(nm)]
        if ok:
            eps = torch.finfo(self.dtype).eps
            shifts = [
                max(math.sqrt(self.specs[i].numel) * eps * nm, 1e-30)
                for i, nm in zip(live, norms, strict=True)
                if math.isfinite(nm)
            ]
            res = ops.nystrom([self.Y[i] for i in ok], [self.omega[i] for i in ok], shifts)
            for k, i in enumerate(ok):
                self.U[i], self.S[i], self.damping[i] = res.U[k], res.S[k], lam[i]
        return InverseReport.per_block(self.specs, live, ok, lam)

    def precondition(
        self, grads: Sequence[torch.Tensor | None], stats: Sequence[BlockStats | None] | None = None
    ) -> list[torch.Tensor | None]:
        """`(U S U^T + λ I)^-1 vec(grad)` for every block with a gradient and a decomposition."""
        check_grads("LowRankFisher.precondition", grads, self.specs)
        live = [i for i, g in enumerate(grads) if g is not None and self.U[i] is not None]
        out: list[torch.Tensor | None] = [None] * len(self.specs)
        if live:
            res = ops.lowrank_precondition(
                [self.U[i] for i in live],
                [self.S[i] for i in live],
                [self.damping[i] for i in live],
                [grads[i].to(self.dtype).reshape(-1).contiguous() for i in live],
            )
            for i, p in zip(live, res, strict=True):
                out[i] = p.view(self.specs[i].m, self.specs[i].n)
        return out

    def quadratic(self, vectors: Sequence[torch.Tensor | None]) -> float:
        """`sum_i v_i^T U_i S_i U_i^T v_i` over blocks with a decomposition."""
        check_grads("LowRankFisher.quadratic", vectors, self.specs)
        total = 0.0
        for i, v in enumerate(vectors):
            if v is not None and self.U[i] is not None:
                c = self.U[i].T @ v.to(self.dtype).reshape(-1)
                total += float((self.S[i] * c.square()).sum())
        return total

    @property
    def nbytes(self) -> int:
        """Exact payload bytes in `self.dtype`: the sketches (d r numbers per block)."""
        per = torch.finfo(self.dtype).bits // 8
        return per * sum(s.numel * r for s, r in zip(self.specs, self.ranks, strict=True))

    def to_payload(self, dtype: torch.dtype = torch.float32) -> Payload:
        """All sketches, concatenated, in `dtype`; meta carries rank and seed."""
        check_wire_dtype("LowRankFisher.to_payload", dtype)
        data = (
            torch.cat([y.reshape(-1) for y in self.Y]).to(dtype)
            if self.Y
            else torch.zeros(0, dtype=dtype)
        )
        return Payload(self.kind, self.specs, data, {"rank": self.rank, "seed": self.seed})

    @classmethod
    def from_payload(cls, payload: Payload, dtype: torch.dtype = torch.float32) -> LowRankFisher:
        """Sketches from a payload (Ω is regenerated from the seed)."""
        where = "LowRankFisher.from_payload"
        check_dtype(where, dtype)
        if (
            not isinstance(payload, Payload)
            or "rank" not in payload.meta
            or "seed" not in payload.meta
        ):
            raise ValueError(
                f"{where}: 'payload.meta' must hold 'rank' and 'seed', got"
                f" {getattr(payload, 'meta', None)!r}"
            )
        out = cls(payload.specs, payload.meta["rank"], payload.meta["seed"], dtype)
        rd = PayloadReader(
            where,
            payload,
            cls.kind,
            sum(s.numel * r for s, r in zip(out.specs, out.ranks, strict=True)),
        )
        for i, (s, r) in enumerate(zip(out.specs, out.ranks, strict=True)):
            out.Y[i] = rd.take(s.numel * r).to(dtype).reshape(s.numel, r).clone()
            out.counts[i] = int(bool(out.Y[i].any()))
        return out

    def validate(self) -> None:
        """Finite sketches whose core `Ω^T Y` is symmetric PSD within rounding.

        Raises:
            ValueError: naming the block.
        """
        cores, names, shifts = [], [], []
        for s, y, om in zip(self.specs, self.Y, self.omega, strict=True):
            label = f"LowRankFisher.validate: block '{s.name}'"
            if not bool(torch.isfinite(y).all()):
                raise ValueError(f"{label} has NaN/Inf sketch entries")
            core = om.T @ y
            scale = float(core.abs().max()) if core.numel() else 0.0
            tol = max(64 * math.sqrt(s.numel) * torch.finfo(self.dtype).eps, 1e-6) * scale
            asym = float((core - core.T).abs().max()) if core.numel() else 0.0
            if asym > tol:
                raise ValueError(
                    f"{label}: Ω^T Y is not symmetric (max asymmetry {asym:.3e}),"
                    " so Y is not a sketch of a symmetric matrix with this seed"
                )
            cores.append(((core + core.T) / 2).contiguous())
            names.append(label)
            shifts.append(tol + 1e-30)
        res = ops.damped_cholesky_inverse(cores, shifts, max_tries=1)
        for label, st in zip(names, res.status.tolist(), strict=True):
            if st != 0:
                raise ValueError(
                    f"{label}: Ω^T Y is not positive semi-definite, so Y is not a"
                    " sketch of a Fisher"
                )

    def state_dict(self) -> dict[str, Any]:
        """Sketches, counts, decompositions, damping, rank and seed (copies; Ω is regenerated)."""
        return {
            "kind": self.kind,
            "specs": [s.to_dict() for s in self.specs],
            "rank": self.rank,
            "seed": self.seed,
            "counts": list(self.counts),
            "Y": clone_list(self.Y),
            "U": clone_list(self.U),
            "S": clone_list(self.S),
            "damping": list(self.damping),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores `state_dict()`'s output (rank and seed must match)."""
        self._check_state(state)
        w = "LowRankFisher.load_state_dict"
        if (state["rank"], state["seed"]) != (self.rank, self.seed):
            raise ValueError(
                f"{w}: (rank, seed) must be ({self.rank}, {self.seed}), got"
                f" ({state['rank']}, {state['seed']})"
            )
        for i, (s, r) in enumerate(zip(self.specs, self.ranks, strict=True)):
            self.Y[i] = check_tensor(w, f"Y[{i}]", state["Y"][i], (s.numel, r), self.dtype)
            u, sv = state["U"][i], state["S"][i]
            self.U[i] = (
                None if u is None else check_tensor(w, f"U[{i}]", u, (s.numel, r), self.dtype)
            )
            self.S[i] = None if sv is None else check_tensor(w, f"S[{i}]", sv, (r,), self.dtype)
        self.damping = [None if v is None else float(v) for v in state["damping"]]
        self.counts = [int(c) for c in state["counts"]]
