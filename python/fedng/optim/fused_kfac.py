"""`FusedKFAC`: the K-FAC step of `NaturalGradient` on Linear layers in one native call.

The general step turns each recorded layer into `KronStats` (a `torch.cat` for the bias column),
groups blocks by decay, calls `kron_accumulate`, then per block runs the batch form's probe check
in torch and calls `kron_precondition` twice: ~100 Python frames per step, which on a small MLP
cost more than the kernels. Here the hooks' raw records (inputs, output gradients) go straight
to `fedng.ops.kfac_step`, which updates every A and G and preconditions every gradient into the
flat output buffer, with the same formulas (equal up to rounding; `tests/test_fused_kfac.py`).

It applies when every block is a K-FAC `nn.Linear` block fed by one 2-D call per forward pass,
with the empirical Fisher and the own curvature as the preconditioner; any step that does not
fit (a tied layer, a 3-D input, autocast, a missing output gradient, another source) takes the
general path, unchanged. Steps without a factor update (`factor_every`) only precondition.

Two kinds of block leave the native call's preconditioning (it still updates their factors):
large blocks taking the batch form (`TORCH_MIN`, torch's GEMM is faster there), and blocks whose
weight gradient `NaturalGradient.backward` left out: their natural gradient comes from the rows
alone, `(g G^-1)^T ([x 1] A^-1)`, and their plain gradient is formed from the rows only when
something needs it (`materialize`, `fill`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedng.curvature.base import InverseReport
from fedng.curvature.block_diagonal import CurvatureSet
from fedng.curvature.capture import CurvatureCapture
from fedng.curvature.ema import ema_weights
from fedng.curvature.kfac import KFAC, batch_form_cheaper
from fedng.curvature.layers import LinearSite
from fedng.curvature.stats import fisher_scale
from fedng.ops import bf16_gemm
from fedng.ops.kfac_step import KfacStepPlan
from fedng.optim.gather import FlatGrads

TORCH_MIN = 1 << 16
"""Blocks with at least this many entries (m n) that take the batch form are preconditioned
with torch's GEMM (MKL here: ~15% faster than the native BLAS at 256 x 1024 x 1024), the rest in
the one native call."""

BF16_MIN = 256
"""With `bf16` "factors" or "all" (and a CPU that runs bf16 GEMMs fast,
`fedng.ops.bf16_gemm.fast`), blocks with max(m, n) at least this fold their factor Grams
`[x 1]^T [x 1]` and `g^T g` from bf16-rounded rows with float32 accumulation (MKL, ~4x the float32
rate here); with "all" their batch-form products `P = g G^-1` and `P^T Q` also run in bf16
(float32 accumulation and result; `Q = [x 1] A^-1` stays float32, see `_products16`). Narrower
blocks are overhead-bound and stay float32."""

BF16_MODES = ("off", "factors", "all")

Piece = tuple[int, torch.Tensor, torch.Tensor | None]
"""A block whose weight gradient was left out, with its recorded inputs and output gradients."""

FusedResult = tuple[CurvatureSet | None, InverseReport | None, list[torch.Tensor | None]]
"""The preconditioner, the inversion report, the preconditioned gradients."""


def _max_abs(t: torch.Tensor) -> float:
    """max |t| in one pass (NaN if t holds one); 0 for an empty t."""
    if t.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(t)
    return max(-float(lo), float(hi)) if not (lo.isnan() or hi.isnan()) else math.nan


@dataclass
class Rows:
    """One step's batch rows, per block: inputs [B, k], output gradients [B, m] (loss pass)."""

    records: list  # type: ignore[type-arg]  # capture records, for the general path's stats
    x: list[torch.Tensor]
    g: list[torch.Tensor]


class FusedKFAC:
    """The fused step for one model (see the module docstring); `build` says if it applies."""

    def __init__(
        self,
        capture: CurvatureCapture,
        curvature: CurvatureSet,
        kfac: KFAC,
        flat: FlatGrads,
        site_block: dict[int, int],
        bf16: str = "off",
    ) -> None:
        self.kfac, self.flat = kfac, flat
        self.curvature = curvature
        self.dtype = kfac.dtype
        self.site_block = site_block
        self.bias = [b.bias is not None for b in capture.blocks]
        self.specs = [(b.spec.m, b.spec.n) for b in capture.blocks]
        self.count = len(capture.blocks)
        self.reduction = capture.reduction
        self._plan: KfacStepPlan | None = None
        weights = [b.weight for b in capture.blocks]
        # Rows-only candidates: a trainable bias (it keeps the layer's output on the backward
        # path, so its output gradient is still recorded) and a weight no other block shares.
        self._may_skip = [
            b.bias is not None
            and b.w_rows is None
            and b.b_rows is None
            and sum(w is b.weight for w in weights) == 1
            for b in capture.blocks
        ]
        self.weights = weights
        self.biases = [b.bias for b in capture.blocks]
        self._empty: Rows | None = None  # the rows of an unrecorded step (dense form everywhere)
        self.bf16_blocks: tuple[int, ...] = (
            tuple(i for i, (m, n) in enumerate(self.specs) if max(m, n) >= BF16_MIN)
            if bf16 != "off" and self.dtype == torch.float32 and bf16_gemm.fast()
            else ()
        )
        """The blocks whose factor Grams are folded in bf16 (see `BF16_MIN`)."""
        self.bf16_products = bf16 == "all" and bool(self.bf16_blocks)
        """Whether those blocks' batch-form products run in bf16 too."""
        self._bf16_inv: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}  # G^-1 in bf16
        self._bf16_rows: dict[tuple[int, int], torch.Tensor] = {}  # (block, B) -> [B, n] buffer
        self.dot = math.nan
        """`sum_i <p_i, g_i>` of the last `step`'s fused preconditioning (NaN if none)."""
        # Per-step lists that only change with the batch sizes (and the decay): the EMA and
        # scale factors of `update` once every block has curvature, and the `_big` blocks.
        self._scales: dict[tuple[float, tuple[int, ...]], tuple[list[float], ...]] = {}
        self._bigs: dict[tuple[int, ...], tuple[int, ...]] = {}
        self._batch: dict[tuple[int, ...], bool] = {}

    @classmethod
    def build(
        cls,
        capture: CurvatureCapture,
        curvature: CurvatureSet,
        flat: FlatGrads | None,
        fisher_type: str,
        bf16: str = "off",
    ) -> FusedKFAC | None:
        """The fused step, or None when the model or options need the general path. `bf16`:
        one of `BF16_MODES` (see `BF16_MIN`)."""
        blocks = capture.blocks
        if flat is None or not blocks or fisher_type != "empirical":
            return None
        if set(curvature.reps) != {KFAC.kind} or curvature.groups[KFAC.kind] != list(
            range(len(blocks))
        ):
            return None
        kfac = curvature.reps[KFAC.kind]
        if not isinstance(kfac, KFAC) or any(s.kind != "kron" for s in kfac.specs):
            return None
        site_block: dict[int, int] = {}
        for s, site in enumerate(capture.sites):
            if not isinstance(site, LinearSite) or site.batch_dim != 0 or len(site.blocks) != 1:
                return None
            site_block[s] = site.blocks[0]
        if sorted(site_block.values()) != list(range(len(blocks))):
            return None
        return cls(capture, curvature, kfac, flat, site_block, bf16)

    def plan(self) -> KfacStepPlan:
        """The native plan over the current factor tensors (rebuilt if they were replaced)."""
        kfac = self.kfac
        a, g = kfac.stored()  # not mirrored: the plan writes lower triangles (`update`)
        if self._plan is None or not self._plan.matches(a, g):
            probes = [kfac.probe_vectors(i) for i in range(self.count)]
            self._plan = KfacStepPlan(
                a,
                g,
                self.flat.grads,
                self.flat.outs,
                [u for u, _ in probes],
                [v for _, v in probes],
                self.bias,
            )
        return self._plan

    def take(self, capture: CurvatureCapture, factor_step: bool = True) -> Rows | None:
        """This step's rows, handed over from the capture, when they fit the fused step (one
        2-D, contiguous record per block, of the curvature dtype, with its loss gradient); else
        None, the records left for `collect`. On a step without factor update (`factor_step`
        False) and nothing recorded, empty rows: every block takes the dense form."""
        records = capture._records
        if not records and not factor_step:
            if self._empty is None:
                self._empty = Rows(
                    [],
                    [
                        torch.empty(0, n - b, dtype=self.dtype)
                        for (_, n), b in zip(self.specs, self.bias, strict=True)
                    ],
                    [torch.empty(0, m, dtype=self.dtype) for m, _ in self.specs],
                )
            return self._empty
        if len(records) != self.count:
            return None
        xs: list[torch.Tensor | None] = [None] * self.count
        gs: list[torch.Tensor | None] = [None] * self.count
        forward = records[0].forward
        dtype = self.dtype
        for rec in records:
            x, g = rec.x, rec.g_loss
            i = self.site_block[rec.site]
            if (
                xs[i] is not None
                or g is None
                or rec.g_fisher is not None
                or rec.forward != forward
                or x.dim() != 2
                or g.dim() != 2
                or x.dtype != dtype
                or g.dtype != dtype
                or x.shape[0] == 0
                or g.shape[0] != x.shape[0]
                or not x.is_contiguous()
                or not g.is_contiguous()
            ):
                return None
            xs[i], gs[i] = x, g
        return Rows(capture.take_records(), xs, gs)  # type: ignore[arg-type]

    def skippable(self, capture: CurvatureCapture) -> tuple[int, ...]:
        """Before the backward pass: the blocks whose weight gradient the next step can do
        without (`NaturalGradient.backward`): one 2-D record per block from one forward pass,
        the batch form cheaper, a bias, no gradient accumulated in the weight yet."""
        records = capture._records
        if len(records) != self.count:
            return ()
        seen = [False] * self.count
        forward = records[0].forward
        skip = []
        for rec in records:
            i = self.site_block[rec.site]
            x = rec.x
            if seen[i] or rec.forward != forward or x.dim() != 2 or x.dtype != self.dtype:
                return ()
            seen[i] = True
            m, n = self.specs[i]
            if (
                self._may_skip[i]
                and self.weights[i].grad is None
                and batch_form_cheaper(x.shape[0], m, n)
            ):
                skip.append(i)
        return tuple(sorted(skip))

    def used_once(self, loss: torch.Tensor, skip: tuple[int, ...]) -> tuple[int, ...]:
        """The blocks of `skip` whose weight reaches `loss` through one edge of the autograd
        graph only (its layer's own call: no weight decay in the loss, no functional reuse),
        found by one walk of the graph."""
        wanted = {id(self.weights[i]): 0 for i in skip}
        root = loss.grad_fn
        seen: set[int] = set()
        stack = [] if root is None else [root]
        while stack:
            node = stack.pop()
            for nxt, _ in node.next_functions:
                if nxt is None:
                    continue
                var = getattr(nxt, "variable", None)  # an AccumulateGrad node: a leaf
                if var is not None:
                    if id(var) in wanted:
                        wanted[id(var)] += 1
                elif id(nxt) not in seen:
                    seen.add(id(nxt))
                    stack.append(nxt)
        return tuple(i for i in skip if wanted[id(self.weights[i])] == 1)

    def rows_explain(self, rows: Rows, pieces: list[Piece]) -> bool:
        """Whether the skipped blocks' gradients are exactly their rows' `g^T [x 1]`, and finite:
        no weight gradient from elsewhere, a bias gradient equal to the output gradients' column
        sums (to 1e-5 B max|g|, the probe's relative tolerance), and a bound `B max|g| max(|x|,
        1)` on every entry that is finite (no overflow possible)."""
        with torch.no_grad():
            return all(
                rows.x[i] is x and rows.g[i] is g and self._explains(rows, i) for i, x, g in pieces
            )

    def _explains(self, rows: Rows, i: int) -> bool:
        bias = self.biases[i]
        bg = None if bias is None else bias.grad
        if bg is None or self.weights[i].grad is not None:
            return False
        x, g = rows.x[i], rows.g[i]
        gmax, xmax = _max_abs(g), _max_abs(x)
        bound = x.shape[0] * gmax * max(xmax, 1.0)  # on every entry of g^T [x 1]
        if not bound < torch.finfo(self.dtype).max:  # NaN: False
            return False
        gap = _max_abs(bg.to(self.dtype) - g.sum(0))
        return gap <= 1e-5 * x.shape[0] * gmax

    def snapshot(self, capture: CurvatureCapture, skip: tuple[int, ...]) -> list[Piece]:
        """Right after the backward pass that left out the weight gradients of `skip`: their
        rows as that pass recorded them (a later backward may add to the records)."""
        wanted = set(skip)
        return [
            (self.site_block[r.site], r.x, r.g_loss)
            for r in capture._records
            if self.site_block[r.site] in wanted
        ]

    def materialize(self, pieces: list[Piece]) -> None:
        """Forms the left-out weight gradients from their rows (`W.grad += g^T x`, what autograd
        would have accumulated), for a step that needs them after all."""
        with torch.no_grad():
            for i, x, g in pieces:
                if g is None:  # the layer did not reach the loss: autograd leaves no gradient
                    continue
                w = self.weights[i]
                part = torch.mm(g.t().to(w.dtype), x.to(w.dtype))
                w.grad = part if w.grad is None else w.grad.add_(part)

    def fill(self, rows: Rows, skip: tuple[int, ...]) -> None:
        """Writes the skipped blocks' weight gradients `g^T x` into their gathered views (the
        bias column is already there) and their outputs into theirs, for code after the step
        that reads them."""
        with torch.no_grad():
            for i in skip:
                view = self.flat.grads[i]
                view[:, :-1] = torch.mm(rows.g[i].t(), rows.x[i])
            self.flat.complete()

    def _rows_only(self, rows: Rows, skip: tuple[int, ...]) -> float:
        """Preconditions the skipped blocks from their rows, `(g G^-1)^T ([x 1] A^-1)` (torch's
        GEMM, the fastest here at these sizes): the bias column into the flat outputs, the
        weight part as a tensor of its own (`FlatGrads.give`, the weight's new `.grad`).
        Returns a finiteness witness: finite exactly when the bound `B max|P| max|Q|` on every
        output entry is (NaN or inf otherwise: the caller then checks the outputs themselves)."""
        kfac = self.kfac
        big = torch.finfo(self.dtype).max
        witness = 0.0
        with torch.no_grad():
            for i in skip:
                a_inv, g_inv = kfac.a_inv[i], kfac.g_inv[i]
                if a_inv is None or g_inv is None:  # unreachable: `ready` held
                    raise RuntimeError("FusedKFAC: a block without an inverse in the rows step")
                k = a_inv.shape[0] - 1
                w = self.weights[i]
                if self.bf16_products and i in self.bf16_blocks:
                    p, q = self._products16(rows, i)
                    self.flat.outs[i][:, k] = torch.mv(p.t(), q[:, k])
                    part = torch.empty(p.shape[1], k, dtype=torch.float32)
                    bf16_gemm.gemm(
                        part, p.to(torch.bfloat16), q[:, :k].to(torch.bfloat16), trans_a=True
                    )
                else:
                    p = torch.mm(rows.g[i], g_inv.t())
                    q = torch.addmm(a_inv[k], rows.x[i], a_inv[:k])
                    self.flat.outs[i][:, k] = torch.mv(p.t(), q[:, k])
                    part = torch.mm(p.t(), q[:, :k])
                self.flat.give(i, part if part.dtype == w.dtype else part.to(w.dtype))
                bound = p.shape[0] * _max_abs(p) * _max_abs(q)
                witness += bound if bound < big else math.nan
        return witness

    def _big(self, rows: Rows, skip: tuple[int, ...]) -> tuple[int, ...]:
        """The blocks (not in `skip`) preconditioned with torch's GEMM rather than natively:
        batch form cheaper and at least `TORCH_MIN` entries, where torch's GEMM is faster and
        the Python of a few calls is negligible."""
        return tuple(
            i
            for i, ((m, n), x) in enumerate(zip(self.specs, rows.x, strict=True))
            if m * n >= TORCH_MIN
            and x.shape[0] > 0
            and batch_form_cheaper(x.shape[0], m, n)
            and i not in skip
        )

    def _grad_sum(self, blocks: tuple[int, ...]) -> float:
        """The sum of these blocks' gathered gradients (an overflow of finite entries reads as
        not finite: `NaturalGradient` then checks them entry by entry and calls again without
        the check)."""
        return sum(float(self.flat.grads[i].sum()) for i in blocks)

    def _precondition_big(self, rows: Rows, i: int) -> float:
        """Block i preconditioned as the native step does it, with torch's GEMM: the batch form
        where the probe test passes (the test of `KFAC._batch_rows` and the kernel), else the
        dense form; returns `<out_i, grad_i>`."""
        kfac = self.kfac
        a_inv, g_inv = kfac.a_inv[i], kfac.g_inv[i]
        if a_inv is None or g_inv is None:  # unreachable: `ready` held
            raise RuntimeError("FusedKFAC: a block without an inverse in the fused step")
        grad, out = self.flat.grads[i], self.flat.outs[i]
        x, g = rows.x[i], rows.g[i]
        k = x.shape[1]
        u, v = kfac.probe_vectors(i)
        with torch.no_grad():
            gu = g @ u
            av = x @ v[:k] + v[k] if self.bias[i] else x @ v
            lhs, rhs = float(u @ (grad @ v)), float(gu @ av)
            mass = float((gu * av).abs().sum())
            gap = abs(lhs - rhs)
            if gap <= 1e-5 * mass or gap <= 1e-3 * float(torch.linalg.vector_norm(grad)) + (
                1e-5 * mass
            ):
                if self.bf16_products and self.bias[i] and i in self.bf16_blocks:
                    p, q = self._products16(rows, i)
                    bf16_gemm.gemm(out, p.to(torch.bfloat16), q.to(torch.bfloat16), trans_a=True)
                else:
                    p = torch.mm(g, g_inv.t())
                    q = torch.addmm(a_inv[k], x, a_inv[:k]) if self.bias[i] else torch.mm(x, a_inv)
                    torch.mm(p.t(), q, out=out)
            else:
                torch.mm(g_inv, torch.mm(grad, a_inv), out=out)
            return float(torch.dot(out.view(-1), grad.view(-1)))

    def batch_form(self, rows: Rows) -> bool:
        """Whether the batch form is cheaper for some block (`NaturalGradient._note_batch`)."""
        sizes = tuple(x.shape[0] for x in rows.x)
        got = self._batch.get(sizes)
        if got is None:
            if len(self._batch) > 16:  # ragged batch sizes: keep a few
                self._batch.clear()
            got = self._batch[sizes] = any(
                batch_form_cheaper(b, m, n) for b, (m, n) in zip(sizes, self.specs, strict=True)
            )
        return got

    def update(
        self,
        rows: Rows,
        decay: float | None,
        *,
        precondition: bool,
        check_finite: bool,
        factors: bool = True,
        skip: tuple[int, ...] = (),
    ) -> bool:
        """Folds the rows into A and G as `KFAC.update` does (if `factors`), then, if
        `precondition`, preconditions the flat gradients with the inverses the factors have now.
        With `check_finite`, False (nothing done) when a gathered gradient does not sum to a
        finite value."""
        kfac = self.kfac
        sizes = tuple(x.shape[0] for x in rows.x)
        if factors:
            old, a_scale, g_scale = self._ema_scales(decay, sizes)
        else:
            old = a_scale = g_scale = [0.0] * self.count
        inverses = (kfac.a_inv, kfac.g_inv) if precondition else None
        big = self._big_cached(rows, sizes) if precondition and not skip else ()
        if precondition and skip:
            big = self._big(rows, skip)
        if check_finite and big and not math.isfinite(self._grad_sum(big)):
            return False
        plan = self.plan()
        own = self.bf16_blocks if factors else ()
        plan(
            rows.x,
            rows.g,
            old,
            a_scale,
            g_scale,
            update=factors,
            inverses=inverses,  # type: ignore[arg-type]
            check_finite=check_finite,
            skip=tuple(sorted(skip + big)) if big else skip,
            own=own,
            lower_only=True,
        )
        if factors:  # mirrored when something reads them (`KFAC.lower_only`)
            kfac.lower_only([i for i in range(self.count) if i not in own])
        sums = plan.sums.tolist()
        count = self.count
        if check_finite and not math.isfinite(sum(sums[:count])):
            return False
        for i in own:  # after the finiteness check: a skipped step changes nothing
            self._fold_bf16(rows, i, old[i], a_scale[i], g_scale[i])
        self.dot = sum(sums[count:]) if precondition else math.nan
        if big:
            self.dot += sum(self._precondition_big(rows, i) for i in big)
        if precondition and skip:  # the skipped blocks' dots read 0: only their finiteness
            self.dot += 0.0 * self._rows_only(rows, skip)
        if factors:
            kfac.counts[:] = [c + 1 for c in kfac.counts]
        return True

    def _ema_scales(
        self, decay: float | None, sizes: tuple[int, ...]
    ) -> tuple[list[float], list[float], list[float]]:
        """Per block the decay of the old factors and the scales of the batch's Grams (as
        `KFAC.update`): cached per batch sizes once every block has curvature (then they depend
        on nothing else) under an EMA decay."""
        counts = self.kfac.counts
        steady = decay is not None and all(counts)
        key = (decay, sizes)
        if steady:
            got = self._scales.get(key)  # type: ignore[arg-type]
            if got is not None:
                return got  # type: ignore[return-value]
        old, new = ema_weights(counts, decay)
        a_scale = [w / b for w, b in zip(new, sizes, strict=True)]
        g_scale = [w * fisher_scale(b, self.reduction) for w, b in zip(new, sizes, strict=True)]
        if steady:
            if len(self._scales) > 16:  # ragged batch sizes: keep a few
                self._scales.clear()
            self._scales[key] = (old, a_scale, g_scale)  # type: ignore[index]
        return old, a_scale, g_scale

    def _big_cached(self, rows: Rows, sizes: tuple[int, ...]) -> tuple[int, ...]:
        """`_big(rows, ())`, cached per batch sizes (it depends on nothing else)."""
        got = self._bigs.get(sizes)
        if got is None:
            if len(self._bigs) > 16:
                self._bigs.clear()
            got = self._bigs[sizes] = self._big(rows, ())
        return got

    def _fold_bf16(self, rows: Rows, i: int, decay: float, a_scale: float, g_scale: float) -> None:
        """`A_i <- decay A_i + a_scale [x 1]^T [x 1]`, `G_i <- decay G_i + g_scale g^T g` (what
        the native call does) from the rows rounded to bf16, float32 accumulation: the exact
        Grams of rows within a relative 2^-8 of the recorded ones, so the factors stay
        symmetric positive semidefinite (`fedng.ops.bf16_gemm`)."""
        kfac = self.kfac
        x, g = rows.x[i], rows.g[i]
        b, k = x.shape
        buf = self._bf16_rows.get((i, b))
        if buf is None:
            if len(self._bf16_rows) > 4 * self.count:  # ragged batch sizes: keep a few
                self._bf16_rows.clear()
            buf = torch.empty(b, k + self.bias[i], dtype=torch.bfloat16)
            if self.bias[i]:
                buf[:, k] = 1.0  # the ones column, exact in bf16
            self._bf16_rows[(i, b)] = buf
        a_f, g_f = kfac.stored()  # these blocks are never lower-only (`update`'s `own`)
        with torch.no_grad():
            buf[:, :k].copy_(x)
            bf16_gemm.gram(a_f[i], buf, alpha=a_scale, beta=decay)
            bf16_gemm.gram(g_f[i], g.to(torch.bfloat16), alpha=g_scale, beta=decay)

    def _g_inv16(self, i: int) -> torch.Tensor:
        """Block i's `G^-1 ^T` rounded to bf16, cached until the inverse changes."""
        g_inv = self.kfac.g_inv[i]
        if g_inv is None:  # unreachable: `ready` held
            raise RuntimeError("FusedKFAC: a block without an inverse in the bf16 products")
        got = self._bf16_inv.get(i)
        if got is None or got[0] is not g_inv or got[1] != g_inv._version:
            got = (g_inv, g_inv._version, g_inv.t().to(torch.bfloat16).contiguous())
            self._bf16_inv[i] = got
        return got[2]

    def _products16(self, rows: Rows, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`P = g G^-1 ^T` [B, m] in bf16 (float32 result) and `Q = [x 1] A^-1` [B, n] in
        float32 (bias blocks; `bf16_products`). Q stays float32: the inputs (ReLU outputs, a
        ones column) are far from centred, A^-1 has large entries of both signs, and a bf16 Q
        lost 4-30% of its bias column on the bench MLP; P lost 0.2%."""
        a_inv = self.kfac.a_inv[i]
        if a_inv is None:  # unreachable: `ready` held
            raise RuntimeError("FusedKFAC: a block without an inverse in the bf16 products")
        x, g = rows.x[i], rows.g[i]
        k = x.shape[1]
        p = torch.empty(x.shape[0], self.specs[i][0], dtype=torch.float32)
        bf16_gemm.gemm(p, g.to(torch.bfloat16), self._g_inv16(i))
        return p, torch.addmm(a_inv[k], x, a_inv[:k])

    def precondition(self, rows: Rows, skip: tuple[int, ...] = ()) -> None:
        """Preconditions the flat gradients into the flat outputs (every block ready)."""
        self.update(rows, None, precondition=True, check_finite=False, factors=False, skip=skip)

    def ready(self) -> bool:
        """Whether every block has curvature and an inverse."""
        kfac = self.kfac
        return (
            all(kfac.counts)
            and all(a is not None for a in kfac.a_inv)
            and all(g is not None for g in kfac.g_inv)
        )

    def step(
        self,
        capture: CurvatureCapture,
        source_current: Callable[[], tuple[CurvatureSet | None, InverseReport | None]],
        rows: Rows,
        decay: float | None,
        inverse_step: bool,
        grads: list[torch.Tensor | None],
        check_finite: bool,
        factor_step: bool = True,
        skip: tuple[int, ...] = (),
    ) -> FusedResult | None:
        """Update, inversion when due (`source_current`), preconditioning: the preconditioner,
        the inversion report and the preconditioned gradients (the flat outputs when fused; then
        `dot` is `sum_i <p_i, g_i>`, else NaN). None, with nothing changed, when `check_finite`
        finds a gradient that does not sum to a finite value. Without `factor_step` the factors
        are left alone (`NaturalGradient`'s `factor_every`). Blocks in `skip` have no weight
        gradient (`rows_explain` held): they are preconditioned from their rows, and then `dot`
        leaves them out (it only says whether their outputs are finite)."""
        outs: list[torch.Tensor | None] = list(self.flat.outs)
        self.dot = math.nan
        upd = factor_step
        if not inverse_step and self.ready():  # no inversion can fall due: one call
            if not self.update(
                rows, decay, precondition=True, check_finite=check_finite, factors=upd, skip=skip
            ):
                return None
            return self.curvature, None, outs  # what source "local" returns without inverting
        if (upd or check_finite) and not self.update(
            rows, decay, precondition=False, check_finite=check_finite, factors=upd, skip=skip
        ):
            return None
        pre, report = source_current()
        if pre is None:
            return None, report, [None] * self.count
        if self.ready():
            self.precondition(rows, skip)
            return pre, report, outs
        self.fill(rows, skip)  # the general preconditioning reads every gradient
        stats = capture.stats_of(rows.records, "empirical")
        return pre, report, pre.precondition(grads, stats, out=self.flat.outs)
