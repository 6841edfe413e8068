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
import warnings
import zlib
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from fedng import ops
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
from fedng.curvature.ema import decay_groups, ema_weights
from fedng.curvature.registry import register
from fedng.curvature.spec import BlockKind, BlockSpec, Payload, PayloadReader, check_wire_dtype
from fedng.curvature.stats import CHUNK_BYTES, BlockStats
from fedng.curvature.validation import PsdCheck, finite_scale, symmetric_check


def stream_id(name: str) -> int:
    """The sketch stream of a block: a stable hash of its name (the same on every client)."""
    return zlib.crc32(name.encode("utf-8"))


def _check_int(where: str, name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{where}: '{name}' must be an int >= {low}, got {value!r}")
    return value


@register
class LowRankFisher(FisherRepresentation):
    """Nyström-sketched Fisher per block.

    Args:
        specs: the blocks (any kind; the sketch has d = m n rows, so mind large embeddings: chosen
            for a whole model, it leaves embeddings and normalization layers to the diagonal).
        rank: sketch columns r (capped at d per block).
        sketch_seed: the shared sketch seed (all clients must use the same).
        dtype: float32 or float64.
        seed: deprecated name of `sketch_seed`.

    Attributes:
        Y: per block, the sketch [d, r].
        U, S: the eigendecomposition from the last `inverse` (None before).
        damping: per block, the λ of the last `inverse` (None before).
    """

    kind = "lowrank"
    order = 2
    default_block_kinds: ClassVar[frozenset[BlockKind]] = frozenset({"kron"})

    def __init__(
        self,
        specs: Sequence[BlockSpec],
        rank: int = 16,
        sketch_seed: int = 0,
        dtype: torch.dtype = torch.float32,
        *,
        seed: int | None = None,
    ) -> None:
        super().__init__(specs, dtype)
        if seed is not None:
            warnings.warn(
                "LowRankFisher: 'seed' is deprecated, use 'sketch_seed'",
                DeprecationWarning,
                stacklevel=2,
            )
            sketch_seed = seed
        self.rank = _check_int("LowRankFisher", "rank", rank, 1)
        self.sketch_seed = _check_int("LowRankFisher", "sketch_seed", sketch_seed, 0)
        self.ranks = [min(rank, s.numel) for s in self.specs]
        self.omega = [
            ops.gaussian_sketch_matrix(s.numel, r, self.sketch_seed, stream_id(s.name), dtype=dtype)
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

    @classmethod
    def create(
        cls,
        specs: Sequence[BlockSpec],
        *,
        dtype: torch.dtype = torch.float32,
        rank: int = 16,
        sketch_seed: int = 0,
    ) -> LowRankFisher:
        """Zero sketches over `specs` with this rank and sketch seed."""
        return cls(specs, rank, sketch_seed, dtype)

    def _decomposition(self, i: int) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(U, S, λ) of block i, or None before its first successful `inverse`."""
        u, sv, lam = self.U[i], self.S[i], self.damping[i]
        return None if u is None or sv is None or lam is None else (u, sv, lam)

    def update(self, stats: Sequence[BlockStats | None], decay: float | None = 0.95) -> None:
        """`Y <- decay Y + (1 - decay) fisher_scale J^T (J Ω)`, J in bounded chunks of samples."""
        check_stats("LowRankFisher.update", stats, self.specs)
        decay = check_decay("LowRankFisher.update", decay)
        seen = {i: st for i, st in enumerate(stats) if st is not None}
        old, new = ema_weights(self.counts, decay)
        itemsize = torch.finfo(self.dtype).bits // 8
        for d, members in decay_groups(old, list(seen)).items():
            width = sum(self.specs[i].numel for i in members)
            step = max(1, CHUNK_BYTES // (itemsize * width))
            batch = {i: seen[i].batch_size for i in members}
            for lo in range(0, max(batch.values()), step):
                part = [i for i in members if lo < batch[i]]
                js = [
                    seen[i].per_sample(lo, min(batch[i], lo + step), self.specs[i].n).to(self.dtype)
                    for i in part
                ]
                ops.sketch_accumulate(
                    [self.Y[i] for i in part],
                    js,
                    [self.omega[i] for i in part],
                    d if lo == 0 else 1.0,
                    [new[i] * seen[i].fisher_scale for i in part],
                )
        for i in seen:
            self.counts[i] += 1

    @classmethod
    def aggregate(cls, reps: Sequence[LowRankFisher], weights: Sequence[float]) -> LowRankFisher:
        """`sum_k w_k Y_k`: exactly the sketch of `sum_k w_k F_k` (same seed and rank needed)."""
        where = "LowRankFisher.aggregate"
        w = check_aggregate(where, cls, reps, weights)
        first = reps[0]
        for k, r in enumerate(reps):
            if (r.sketch_seed, r.rank) != (first.sketch_seed, first.rank):
                raise ValueError(
                    f"{where}: 'reps[{k}]' has (sketch_seed, rank) = ({r.sketch_seed}, {r.rank}),"
                    f" reps[0] has ({first.sketch_seed}, {first.rank}); sketches with"
                    " different test matrices do not add up"
                )
        out = cls(first.specs, first.rank, first.sketch_seed, first.dtype)
        for r, wk in zip(reps, w, strict=True):
            torch._foreach_add_(out.Y, r.Y, alpha=wk)
        out.counts = [  # only reps that contribute (weight > 0) make a block 'seen'
            max((r.counts[i] for r, wk in zip(reps, w, strict=True) if wk > 0), default=0)
            for i in range(len(out.specs))
        ]
        return out

    def inverse(self, damping: float | Sequence[float], *, factored: bool = False) -> InverseReport:
        """Nyström eigendecompositions of every sketched block; λ kept for `precondition`
        (`factored` does not apply to a sketch).

        A block whose sketch is not finite is reported FAILED and keeps its previous
        decomposition (or stays unpreconditioned): never a crash, never a NaN step.
        """
        lam = check_damping("LowRankFisher.inverse", damping, len(self.specs))
        live, found = self._nystrom()
        for i, (u, sv) in found.items():
            self.U[i], self.S[i], self.damping[i] = u, sv, lam[i]
        return InverseReport.per_block(self.specs, live, list(found), lam)

    def eigendecompositions(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per block, `(U [d, r], S [r])` with `F ≈ U diag(S) U^T` (orthonormal U, S >= 0) from
        its current sketch, as `inverse` computes them (one ragged call), leaving the inverses
        alone; None for a block without curvature or with a non-finite sketch."""
        _, found = self._nystrom()
        return [found.get(i) for i in range(len(self.specs))]

    def _nystrom(self) -> tuple[list[int], dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        """The blocks with curvature, and (U, S) of those among them whose sketch is finite."""
        live = [i for i, c in enumerate(self.counts) if c > 0]
        norms = [float(v) for v in torch._foreach_norm([self.Y[i] for i in live])] if live else []
        finite = [(i, nm) for i, nm in zip(live, norms, strict=True) if math.isfinite(nm)]
        if not finite:
            return live, {}
        eps = torch.finfo(self.dtype).eps
        shifts = [max(math.sqrt(self.specs[i].numel) * eps * nm, 1e-30) for i, nm in finite]
        res = ops.nystrom(
            [self.Y[i] for i, _ in finite], [self.omega[i] for i, _ in finite], shifts
        )
        return live, {i: (res.U[k], res.S[k]) for k, (i, _) in enumerate(finite)}

    def precondition(
        self,
        grads: Sequence[torch.Tensor | None],
        stats: Sequence[BlockStats | None] | None = None,
        *,
        out: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor | None]:
        """`(U S U^T + λ I)^-1 vec(grad)` for every block with a gradient and a decomposition."""
        check_grads("LowRankFisher.precondition", grads, self.specs)
        live = []
        for i, g in enumerate(grads):
            dec = self._decomposition(i)
            if g is not None and dec is not None:
                live.append((i, g, dec))
        result: list[torch.Tensor | None] = [None] * len(self.specs)
        if live:
            res = ops.lowrank_precondition(
                [dec[0] for _, _, dec in live],
                [dec[1] for _, _, dec in live],
                [dec[2] for _, _, dec in live],
                [g.to(self.dtype).reshape(-1).contiguous() for _, g, _ in live],
            )
            for (i, _, _), p in zip(live, res, strict=True):
                result[i] = p.view(self.specs[i].m, self.specs[i].n)
        return result

    def block_diagonal(self, i: int) -> torch.Tensor | None:
        """`diag(U S U^T)` [m, n] of the last decomposition (None before one)."""
        dec = self._decomposition(i)
        if dec is None:
            return None
        return (dec[0].square() @ dec[1]).view(self.specs[i].m, self.specs[i].n)

    def reset(self, indices: Sequence[int]) -> None:
        """Zero sketch, no decomposition, count 0 for these blocks."""
        for i in indices:
            self.Y[i].zero_()
            self.U[i] = self.S[i] = None
            self.damping[i] = None
            self.counts[i] = 0

    def quadratic(self, vectors: Sequence[torch.Tensor | None]) -> float:
        """`sum_i v_i^T U_i S_i U_i^T v_i` over blocks with a decomposition."""
        check_grads("LowRankFisher.quadratic", vectors, self.specs)
        total = 0.0
        for i, v in enumerate(vectors):
            dec = self._decomposition(i)
            if v is not None and dec is not None:
                c = dec[0].T @ v.to(self.dtype).reshape(-1)
                total += float((dec[1] * c.square()).sum())
        return total

    def block_traces(self) -> list[float]:
        """Per block, the estimate `tr(Ω^T Y) / r` of `tr(F)` (Ω has unit-variance entries)."""
        return [
            float((y * om).sum()) / max(1, y.shape[1])
            for y, om in zip(self.Y, self.omega, strict=True)
        ]

    def psd_checks(self, tol: float, wire_eps: float) -> list[PsdCheck]:
        """Finite, bounded sketches whose core `Ω^T Y` [r, r] is symmetric (its PSD test
        returned): otherwise Y is not `F Ω` for a Fisher F and this seed."""
        checks = []
        for i, (y, om) in enumerate(zip(self.Y, self.omega, strict=True)):
            label = f"{self._label(i)} sketch"
            finite_scale(label, y)
            checks.append(symmetric_check(label, om.T @ y, tol, wire_eps, rounded_entries=False))
        return checks

    @property
    def nbytes(self) -> int:
        """Exact payload bytes in `self.dtype`: the sketches (d r numbers per block)."""
        per = torch.finfo(self.dtype).bits // 8
        return per * sum(s.numel * r for s, r in zip(self.specs, self.ranks, strict=True))

    def to_payload(self, dtype: torch.dtype = torch.float32) -> Payload:
        """All sketches, concatenated, in `dtype`; meta carries the rank and the sketch seed (as
        "rank" and "seed")."""
        check_wire_dtype("LowRankFisher.to_payload", dtype)
        data = (
            torch.cat([y.reshape(-1) for y in self.Y]).to(dtype)
            if self.Y
            else torch.zeros(0, dtype=dtype)
        )
        return Payload(self.kind, self.specs, data, {"rank": self.rank, "seed": self.sketch_seed})

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
        rank = payload.meta["rank"]
        total = sum(s.numel * min(rank, s.numel) for s in payload.specs)
        # Sizes first: building the representation draws Ω (d x r per block), which a rank the
        # data does not back would make arbitrarily large.
        rd = PayloadReader(where, payload, cls.kind, total)
        out = cls(payload.specs, rank, payload.meta["seed"], dtype)
        for i, (s, r) in enumerate(zip(out.specs, out.ranks, strict=True)):
            out.Y[i] = rd.take(s.numel * r).to(dtype).reshape(s.numel, r).clone()
            out.counts[i] = int(bool(out.Y[i].any()))
        return out

    def inverse_arrays(self) -> tuple[Arrays, set[str]]:
        """`<block>/U` [d, r], `<block>/S` [r] and `<block>/lambda` [1] (float32: λ travels
        rounded to float32) per decomposed block."""
        arrays: Arrays = {}
        for i in range(len(self.specs)):
            dec = self._decomposition(i)
            if dec is not None:
                arrays[self._inverse_key(i, "U")] = dec[0]
                arrays[self._inverse_key(i, "S")] = dec[1]
                arrays[self._inverse_key(i, "lambda")] = torch.tensor(
                    [float(dec[2])], dtype=torch.float32
                )
        return arrays, set()

    def load_inverse_arrays(self, arrays: Arrays) -> None:
        """Installs `U`, `S` and `lambda` of the blocks `arrays` holds."""
        for i, (s, r) in enumerate(zip(self.specs, self.ranks, strict=True)):
            shapes = ((s.numel, r), (r,), (1,))
            parts = self._inverse_parts(arrays, i, ("U", "S", "lambda"), shapes)
            if parts is not None:
                self.U[i], self.S[i], self.damping[i] = parts[0], parts[1], float(parts[2][0])

    def state_dict(self) -> dict[str, Any]:
        """Sketches, counts, decompositions, damping, rank and sketch seed (copies; Ω is
        regenerated)."""
        return {
            "kind": self.kind,
            "specs": [s.to_dict() for s in self.specs],
            "rank": self.rank,
            "sketch_seed": self.sketch_seed,
            "counts": list(self.counts),
            "Y": clone_list(self.Y),
            "U": clone_list(self.U),
            "S": clone_list(self.S),
            "damping": list(self.damping),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores `state_dict()`'s output (rank and sketch seed must match)."""
        self._check_state(state)
        w = "LowRankFisher.load_state_dict"
        if (state["rank"], state["sketch_seed"]) != (self.rank, self.sketch_seed):
            raise ValueError(
                f"{w}: (rank, sketch_seed) must be ({self.rank}, {self.sketch_seed}), got"
                f" ({state['rank']}, {state['sketch_seed']})"
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
