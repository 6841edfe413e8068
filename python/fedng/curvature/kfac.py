"""K-FAC: each block's Fisher approximated as `A ⊗ G` (inputs ⊗ output gradients).

For a block with inputs a (bias folded in as a last 1) and output gradients g,
`A = E[a a^T]` [n, n] and `G = E[g g^T]` [m, m] (per-sample-loss scale, see `stats.py`); the
natural gradient of its gradient matrix W' [m, n] is `(G + γ_G I)^-1 W' (A + γ_A I)^-1`.
Embedding blocks have a diagonal A (token frequencies), kept as a vector.

Every heavy step is one ragged native call for all blocks: `kron_accumulate` (all A and G
factors), `damped_cholesky_inverse` (all factors), `kron_precondition` (all gradients; the batch
form `(Gb G^-1)^T (Ab A^-1)` where the batch has fewer rows than the layer is wide).
"""

from __future__ import annotations

import math
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
from fedng.curvature.spec import (
    BlockKind,
    BlockSpec,
    Payload,
    PayloadReader,
    check_wire_dtype,
    pack_triangle,
    triangle_size,
    unpack_triangle,
)
from fedng.curvature.stats import BlockStats, EmbeddingStats, KronStats
from fedng.curvature.validation import PsdCheck, check_nonnegative, finite_scale, symmetric_check
from fedng.ops import trusted

_PROBE_SEED = 0x5EED
"""Seed of the fixed random vectors that check the batch form's precondition applies."""

_FAILED = ops.CholeskyStatus.FAILED


def batch_form_cheaper(rows: int, m: int, n: int) -> bool:
    """Whether `(Gb G^-1)^T (Ab A^-1)` (2 rows (m^2+n^2+mn) flops) beats 2 m n (m+n)."""
    return rows * (m * m + n * n + m * n) < m * n * (m + n)


def _kfac_stats(
    where: str, stats: Sequence[BlockStats | None], specs: Sequence[BlockSpec]
) -> dict[int, KronStats | EmbeddingStats]:
    """The blocks seen (index -> stats), after checking each entry matches its block's kind."""
    check_stats(where, stats, specs)
    return {i: st for i, st in enumerate(stats) if isinstance(st, (KronStats, EmbeddingStats))}


@register
class KFAC(FisherRepresentation):
    """Kronecker-factored Fisher of `kron` and `embedding` blocks.

    Args:
        specs: the blocks (kinds "kron" or "embedding").
        dtype: float32 or float64.

    Attributes:
        A: per block, [n, n] (or [n] for embeddings).
        G: per block, [m, m].
        a_inv, g_inv: the damped inverses from the last `inverse` (None before).

    The fused step (`fedng.optim.fused_kfac`) updates the factors' lower triangles only and
    marks the blocks (`lower_only`); reading `A` or `G` mirrors them first, so every reader sees
    symmetric factors. The inversion reads the lower triangles only (`stored`): on the fused
    path a factor is mirrored only when something else reads it. Read `A` / `G` afresh after
    each step: a factor tensor kept from before a fused step may have a stale upper triangle.
    """

    kind = "kfac"
    order = 0
    block_kinds: ClassVar[frozenset[BlockKind]] = frozenset({"kron", "embedding"})
    default_block_kinds: ClassVar[frozenset[BlockKind]] = frozenset({"kron", "embedding"})

    def __init__(self, specs: Sequence[BlockSpec], dtype: torch.dtype = torch.float32) -> None:
        super().__init__(specs, dtype)
        self._lagging: set[int] = set()  # blocks whose upper triangles lag (`lower_only`)
        self._A: list[torch.Tensor] = [
            torch.zeros((s.n, s.n) if s.kind == "kron" else (s.n,), dtype=dtype) for s in self.specs
        ]
        self._G: list[torch.Tensor] = [torch.zeros(s.m, s.m, dtype=dtype) for s in self.specs]
        self.a_inv: list[torch.Tensor | None] = [None] * len(self.specs)
        self.g_inv: list[torch.Tensor | None] = [None] * len(self.specs)
        self._probes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __setstate__(self, state: dict[str, object]) -> None:
        """Unpickles this class's state and that of objects pickled before the factors became
        properties (plain `A` / `G` attributes, no `_lagging`)."""
        for old, new in (("A", "_A"), ("G", "_G")):
            if old in state:
                state[new] = state.pop(old)
        state.setdefault("_lagging", set())
        self.__dict__.update(state)

    @property
    def A(self) -> list[torch.Tensor]:
        """Per block, the input-side factor [n, n] (or [n] for embeddings), symmetric (a tensor
        kept across a fused step may lag: read the property afresh)."""
        self._mirror()
        return self._A

    @A.setter
    def A(self, value: list[torch.Tensor]) -> None:
        self._mirror()
        self._A = value

    @property
    def G(self) -> list[torch.Tensor]:
        """Per block, the output-side factor [m, m], symmetric (as `A`: read it afresh)."""
        self._mirror()
        return self._G

    @G.setter
    def G(self, value: list[torch.Tensor]) -> None:
        self._mirror()
        self._G = value

    def stored(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The factor lists as stored, without mirroring: the lower triangles (and diagonals)
        are current, the upper ones may lag (`lower_only`). For readers of the lower triangle
        only, and for writers that only update it."""
        return self._A, self._G

    def lower_only(self, blocks: Sequence[int]) -> None:
        """Marks blocks whose [n, n] and [m, m] factors were updated in their lower triangles
        only: the next read of `A` or `G` copies those onto the upper triangles."""
        self._lagging.update(blocks)

    def _mirror(self) -> None:
        if not self._lagging:
            return
        for i in sorted(self._lagging):
            for f in (self._A[i], self._G[i]):
                if f.dim() == 2:  # each upper entry a copy of its mirror (-0.0 stays -0.0)
                    rows, cols = torch.triu_indices(f.shape[0], f.shape[0], 1)
                    f[rows, cols] = f[cols, rows]
        self._lagging.clear()

    @property
    def ready(self) -> list[bool]:
        """Per block: whether it has inverses."""
        return [
            a is not None and g is not None for a, g in zip(self.a_inv, self.g_inv, strict=True)
        ]

    def _a_shape(self, s: BlockSpec) -> tuple[int, ...]:
        return (s.n, s.n) if s.kind == "kron" else (s.n,)

    # --- accumulation -----------------------------------------------------------------------

    def update(self, stats: Sequence[BlockStats | None], decay: float | None = 0.95) -> None:
        """Folds a batch in: `F <- decay F + (1 - decay) F_batch` per factor.

        Args:
            stats: per block, its `KronStats` / `EmbeddingStats` (or None: unchanged).
            decay: EMA decay in [0, 1), or None for a running mean over updates. A block's first
                update takes the batch value.
        """
        where = "KFAC.update"
        seen = _kfac_stats(where, stats, self.specs)
        decay = check_decay(where, decay)
        old, new = ema_weights(self.counts, decay)
        for d, members in decay_groups(old, list(seen)).items():
            factors: list[torch.Tensor] = []
            inputs: list[torch.Tensor] = []
            scales: list[float] = []
            for i in members:
                st = seen[i]
                if isinstance(st, KronStats):
                    factors.append(self.A[i])
                    inputs.append(st.a_rows().to(self.dtype))
                    scales.append(new[i] / st.rows)
                else:  # one-hot inputs: A is the diagonal of token frequencies
                    freq = st.frequencies(self.specs[i].n)
                    self.A[i].mul_(d).add_(freq.to(self.dtype), alpha=new[i] / st.rows)
            for i in members:
                factors.append(self.G[i])
                inputs.append(seen[i].g_rows().to(self.dtype))
                scales.append(new[i] * seen[i].fisher_scale)
            trusted.kron_accumulate(factors, inputs, d, scales)
        for i in seen:
            self.counts[i] += 1

    @classmethod
    def aggregate(cls, reps: Sequence[KFAC], weights: Sequence[float]) -> KFAC:
        """`A = sum_k w_k A_k`, `G = sum_k w_k G_k` per block: the factors of the pooled data when
        the weights are the clients' data fractions. Inverses are not carried over."""
        w = check_aggregate("KFAC.aggregate", cls, reps, weights)
        out = cls(reps[0].specs, reps[0].dtype)
        for i in range(len(out.specs)):
            for r, wk in zip(reps, w, strict=True):
                out.A[i].add_(r.A[i], alpha=wk)
                out.G[i].add_(r.G[i], alpha=wk)
            # Only reps that contribute make a block 'seen' (a weight-0 rep adds no curvature).
            out.counts[i] = max(
                (r.counts[i] for r, wk in zip(reps, w, strict=True) if wk > 0), default=0
            )
        return out

    # --- inversion --------------------------------------------------------------------------

    def pi(self, i: int) -> float:
        """Factored-damping ratio `sqrt((tr(A)/n) / (tr(G)/m))` of block i (1 if degenerate)."""
        a, g = self._A[i], self._G[i]  # their diagonals only: never lagging
        ta = float(a.sum() if a.dim() == 1 else a.diagonal().sum()) / a.shape[0]
        tg = float(g.diagonal().sum()) / g.shape[0]
        p = math.sqrt(ta / tg) if ta > 0 and tg > 0 else 1.0
        return p if math.isfinite(p) and p > 0 else 1.0

    def inverse(self, damping: float | Sequence[float], *, factored: bool = False) -> InverseReport:
        """`(A + π sqrt(λ) I)^-1` and `(G + sqrt(λ)/π I)^-1` for every block with curvature.

        Args:
            damping: λ > 0, one float or one per block.
            factored: π from the factors' traces (Martens & Grosse), else π = 1 (Tikhonov on
                each factor).

        Returns:
            Per factor (`<block>.A`, `<block>.G`): status and the damping actually used. A factor
            that fails to invert keeps its previous inverse (or leaves the block unpreconditioned).
        """
        lam = check_damping("KFAC.inverse", damping, len(self.specs))
        live = [i for i, c in enumerate(self.counts) if c > 0]
        da, dg = {}, {}
        for i in live:
            p = self.pi(i) if factored else 1.0
            root = math.sqrt(lam[i])
            da[i], dg[i] = p * root, root / p
        dense = [i for i in live if self.specs[i].kind == "kron"]
        # the inversion reads lower triangles only: no mirror of lagging factors (`stored`)
        mats = [self._A[i] for i in dense] + [self._G[i] for i in live]
        res = trusted.damped_cholesky_inverse(mats, [da[i] for i in dense] + [dg[i] for i in live])
        # Python lists first: indexing the result tensors entry by entry cost more than the
        # inversion of a small MLP's factors.
        res_status, res_used = res.status.tolist(), res.damping.tolist()
        a_new = dict(zip(dense, res.inverses[: len(dense)], strict=True))
        a_status = dict(zip(dense, res_status[: len(dense)], strict=True))
        a_used = dict(zip(dense, res_used[: len(dense)], strict=True))
        names, status, used = [], [], []
        for k, i in enumerate(live):
            spec = self.specs[i]
            if spec.kind == "embedding":
                a_new[i] = 1.0 / (self._A[i] + da[i])
                a_status[i], a_used[i] = int(ops.CholeskyStatus.OK), da[i]
            g_status = res_status[len(dense) + k]
            names += [f"{spec.name}.A", f"{spec.name}.G"]
            status += [a_status[i], g_status]
            used += [a_used[i], res_used[len(dense) + k]]
            if a_status[i] != _FAILED and g_status != _FAILED:
                self.a_inv[i], self.g_inv[i] = a_new[i], res.inverses[len(dense) + k]
        return InverseReport(
            names, torch.tensor(status, dtype=torch.int8), torch.tensor(used, dtype=torch.float64)
        )

    # --- application ------------------------------------------------------------------------

    def probe_vectors(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i's fixed random test vectors `(u [m], v [n])` of the batch-form check
        `u^T grad v == (Gb u) . (Ab v)` (see `_batch_rows`): drawn once per block from a fixed
        seed, in the representation's dtype, and cached, so every caller running the same test
        (the fused K-FAC step, `fedng.optim.fused_kfac`) uses the same vectors.

        Args:
            i: the block index.

        Returns:
            (u, v), shapes [m] and [n] of block i (the cached tensors: do not write into them).
        """
        if i not in self._probes:
            gen = torch.Generator().manual_seed(_PROBE_SEED + i)
            s = self.specs[i]
            self._probes[i] = (
                torch.randn(s.m, generator=gen, dtype=self.dtype),
                torch.randn(s.n, generator=gen, dtype=self.dtype),
            )
        return self._probes[i]

    def _batch_rows(
        self, i: int, grad: torch.Tensor, st: BlockStats | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The batch's (inputs, output grads) if the batch form is cheaper and reproduces `grad`.

        `grad = Gb^T Ab` is checked against fixed random vectors: `u^T grad v` must equal
        `(Gb u) . (Ab v)`. It fails when something else changed `.grad` (a penalty term, clipping,
        a backward pass that was not recorded); the dense form is used then.
        """
        s = self.specs[i]
        if not isinstance(st, KronStats) or not batch_form_cheaper(st.rows, s.m, s.n):
            return None
        g_loss = st.g_loss_rows()
        if g_loss is None:
            return None
        a, g = st.a_rows().to(self.dtype), g_loss.to(self.dtype)
        u, v = self.probe_vectors(i)
        gu, av = g @ u, a @ v
        lhs, rhs = float(u @ (grad @ v)), float(gu @ av)
        tol = 1e-3 * float(torch.linalg.vector_norm(grad)) + 1e-5 * float((gu * av).abs().sum())
        return (a, g) if abs(lhs - rhs) <= tol else None

    def precondition(
        self,
        grads: Sequence[torch.Tensor | None],
        stats: Sequence[BlockStats | None] | None = None,
        *,
        out: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor | None]:
        """`G^-1 grad A^-1` for every block with a gradient and an inverse.

        Args:
            grads: [m, n] per block (None: skipped).
            stats: optional, the batch that produced `grads`; enables the batch form per block.
            out: optional [m, n] per block to write the results into (kron blocks).

        Returns:
            [m, n] tensors, `out[i]` where given (None where skipped).
        """
        check_grads("KFAC.precondition", grads, self.specs)
        if stats is not None:
            check_stats("KFAC.precondition", stats, self.specs)
        result: list[torch.Tensor | None] = [None] * len(self.specs)
        # (block, gradient, A^-1, G^-1) of the blocks to precondition with each form
        batch: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        dense: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, g in enumerate(grads):
            a_inv, g_inv = self.a_inv[i], self.g_inv[i]
            if g is None or a_inv is None or g_inv is None:
                continue
            if self.specs[i].kind == "embedding":
                scaled = g.to(self.dtype) * a_inv
                result[i] = (
                    g_inv @ scaled if out is None else torch.matmul(g_inv, scaled, out=out[i])
                )
                continue
            r = self._batch_rows(i, g, stats[i]) if stats is not None else None
            if r is None:
                dense.append((i, g.to(self.dtype).contiguous(), a_inv, g_inv))
            else:
                rows.append(r)
                batch.append((i, g.to(self.dtype).contiguous(), a_inv, g_inv))
        if batch:
            res = trusted.kron_precondition(
                [b[1] for b in batch],
                [b[2] for b in batch],
                [b[3] for b in batch],
                [r[0] for r in rows],
                [r[1] for r in rows],
                None if out is None else [out[b[0]] for b in batch],
            )
            for b, p in zip(batch, res, strict=True):
                result[b[0]] = p
        if dense:
            res = trusted.kron_precondition(
                [d[1] for d in dense],
                [d[2] for d in dense],
                [d[3] for d in dense],
                outs=None if out is None else [out[d[0]] for d in dense],
            )
            for d, p in zip(dense, res, strict=True):
                result[d[0]] = p
        return result

    def block_diagonal(self, i: int) -> torch.Tensor | None:
        """`diag(G) diag(A)^T` [m, n]: the diagonal of `A ⊗ G`."""
        a = self.A[i]
        return torch.outer(self.G[i].diagonal(), a if a.dim() == 1 else a.diagonal())

    def reset(self, indices: Sequence[int]) -> None:
        """Zero factors, no inverses, count 0 for these blocks."""
        for i in indices:
            self.A[i].zero_()
            self.G[i].zero_()
            self.a_inv[i] = self.g_inv[i] = None
            self.counts[i] = 0

    def quadratic(self, vectors: Sequence[torch.Tensor | None]) -> float:
        """`sum_i <G_i V_i A_i, V_i>` over blocks with curvature: `vec(V)^T (A ⊗ G) vec(V)`."""
        check_grads("KFAC.quadratic", vectors, self.specs)
        live = [
            (i, v.to(self.dtype))
            for i, v in enumerate(vectors)
            if v is not None and self.counts[i] > 0
        ]
        dense = [(i, v.contiguous()) for i, v in live if self.specs[i].kind == "kron"]
        total = 0.0
        if dense:
            vs = [v for _, v in dense]
            fv = trusted.kron_precondition(
                vs, [self.A[i] for i, _ in dense], [self.G[i] for i, _ in dense]
            )
            total += sum(float((f * v).sum()) for f, v in zip(fv, vs, strict=True))
        for i, v in live:
            if self.specs[i].kind == "embedding":
                total += float(((self.G[i] @ (v * self.A[i])) * v).sum())
        return total

    def block_traces(self) -> list[float]:
        """`tr(A_i) tr(G_i)` per block: the trace of `A ⊗ G`."""
        out = []
        for a, g in zip(self._A, self._G, strict=True):  # diagonals only: never lagging
            ta = float(a.sum()) if a.dim() == 1 else float(a.diagonal().sum())
            out.append(ta * float(g.diagonal().sum()))
        return out

    # --- checks -----------------------------------------------------------------------------

    def psd_checks(self, tol: float, wire_eps: float) -> list[PsdCheck]:
        """Both factors of every block: finite, bounded; a diagonal A non-negative, dense
        factors symmetric (their PSD tests returned)."""
        checks = []
        for i in range(len(self.specs)):
            for tag, f in (("A", self.A[i]), ("G", self.G[i])):
                label = f"{self._label(i)} {tag}"
                big = finite_scale(label, f)
                if f.dim() == 1:
                    check_nonnegative(label, f, tol, big)
                else:
                    checks.append(symmetric_check(label, f, tol, wire_eps))
        return checks

    # --- wire format ------------------------------------------------------------------------

    def _a_size(self, s: BlockSpec) -> int:
        return triangle_size(s.n) if s.kind == "kron" else s.n

    @property
    def nbytes(self) -> int:
        """Exact payload bytes in `self.dtype`: A and G triangles (A diagonals for embeddings)."""
        per = torch.finfo(self.dtype).bits // 8
        return per * sum(self._a_size(s) + triangle_size(s.m) for s in self.specs)

    def to_payload(self, dtype: torch.dtype = torch.float32) -> Payload:
        """`[tri(A_0), tri(G_0), tri(A_1), ...]` in `dtype`."""
        check_wire_dtype("KFAC.to_payload", dtype)
        parts = []
        for s, a, g in zip(self.specs, self.A, self.G, strict=True):
            parts.append(pack_triangle(a) if s.kind == "kron" else a)
            parts.append(pack_triangle(g))
        data = torch.cat(parts).to(dtype) if parts else torch.zeros(0, dtype=dtype)
        return Payload(self.kind, self.specs, data)

    @classmethod
    def from_payload(cls, payload: Payload, dtype: torch.dtype = torch.float32) -> KFAC:
        """Factors from a payload (blocks whose factors are all zero count as never updated)."""
        check_dtype("KFAC.from_payload", dtype)
        out = cls(payload.specs, dtype)
        rd = PayloadReader(
            "KFAC.from_payload",
            payload,
            cls.kind,
            sum(out._a_size(s) + triangle_size(s.m) for s in out.specs),
        )
        for i, s in enumerate(out.specs):
            va = rd.take(out._a_size(s))
            out.A[i] = unpack_triangle(va, s.n, dtype) if s.kind == "kron" else va.to(dtype)
            out.G[i] = unpack_triangle(rd.take(triangle_size(s.m)), s.m, dtype)
            out.counts[i] = int(bool(out.A[i].any() or out.G[i].any()))
        return out

    def inverse_arrays(self) -> tuple[Arrays, set[str]]:
        """`<block>/A_inv` (a vector for embeddings) and `<block>/G_inv` per inverted block."""
        arrays: Arrays = {}
        sym: set[str] = set()
        for i, (a_inv, g_inv) in enumerate(zip(self.a_inv, self.g_inv, strict=True)):
            if a_inv is None or g_inv is None:
                continue
            ka, kg = self._inverse_key(i, "A_inv"), self._inverse_key(i, "G_inv")
            arrays[ka], arrays[kg] = a_inv, g_inv
            if a_inv.dim() == 2:
                sym.add(ka)
            sym.add(kg)
        return arrays, sym

    def load_inverse_arrays(self, arrays: Arrays) -> None:
        """Installs `A_inv`/`G_inv` of the blocks `arrays` holds."""
        for i, s in enumerate(self.specs):
            parts = self._inverse_parts(
                arrays, i, ("A_inv", "G_inv"), (self._a_shape(s), (s.m, s.m))
            )
            if parts is not None:
                self.a_inv[i], self.g_inv[i] = parts

    # --- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Factors, counts and inverses (copies)."""
        return {
            "kind": self.kind,
            "specs": [s.to_dict() for s in self.specs],
            "counts": list(self.counts),
            "A": clone_list(self.A),
            "G": clone_list(self.G),
            "a_inv": clone_list(self.a_inv),
            "g_inv": clone_list(self.g_inv),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores `state_dict()`'s output."""
        self._check_state(state)
        w = "KFAC.load_state_dict"
        for i, s in enumerate(self.specs):
            a_shape = self._a_shape(s)
            self.A[i] = check_tensor(w, f"A[{i}]", state["A"][i], a_shape, self.dtype)
            self.G[i] = check_tensor(w, f"G[{i}]", state["G"][i], (s.m, s.m), self.dtype)
            ai, gi = state["a_inv"][i], state["g_inv"][i]
            self.a_inv[i] = (
                None if ai is None else check_tensor(w, f"a_inv[{i}]", ai, a_shape, self.dtype)
            )
            self.g_inv[i] = (
                None if gi is None else check_tensor(w, f"g_inv[{i}]", gi, (s.m, s.m), self.dtype)
            )
        self.counts = [int(c) for c in state["counts"]]
