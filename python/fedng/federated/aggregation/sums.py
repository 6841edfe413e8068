"""Running weighted sums of named arrays: what a streaming server folds each reply into.

`WeightedSum.fold(arrays, w)` adds `w * x` per name in fp32 with the exact arithmetic of
`mean.mean_delta` (`out = w * x` for the first, then `out = out + w * x`, as two `_foreach`
calls over all arrays), so a server that knows
the weights `p_k` up front reproduces the batch mean bit for bit; a server that does not (replies
arriving one by one) folds with `w = n_k` and scales by `1 / sum n_k` once at the end. Memory is
one copy of the arrays, whatever the number of folds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedng._backend import native
from fedng._typing import Arrays
from fedng.curvature.packed_fold import fold_update
from fedng.curvature.quantize import VEC_CHUNK, Segment, dequantize_add, fold_plan, payload_sizes

Int8Payload = tuple[torch.Tensor, torch.Tensor, Sequence[Segment]]
"""(int8 values, float32 scales, segments) of one quantized payload (`fedng.curvature.quantize`)."""


class WeightedSum:
    """`sum_k w_k x_k` over named arrays, folded one `x_k` at a time.

    Args:
        exact: fold with `mean_delta`'s arithmetic (bit-identical to the batch mean); False folds
            in place (`add_` with alpha: no temporaries, faster, rounding may differ).

    Attributes:
        sums: name -> the running sum (fp32); empty before the first fold.
        total_weight: `sum_k w_k` of the folds so far.
        count: folds so far.
    """

    def __init__(self, exact: bool = True) -> None:
        self.exact = exact
        self.sums: Arrays = {}
        self.total_weight = 0.0
        self.count = 0
        self._plain: tuple[Sequence[str], list[torch.Tensor], list[int]] | None = None

    def fold(self, arrays: Arrays, weight: float) -> None:
        """Adds `weight * arrays` (fp32) to the sums.

        Args:
            arrays: name -> array (any float dtype); every fold should carry the same names.
            weight: the fold's weight.
        """
        out = self.sums
        names = list(arrays)
        vals = [arrays[k].float() for k in names]
        if not out:  # contiguous sums (a strided first array would pass on its strides)
            firsts = [v.contiguous() for v in torch._foreach_mul(vals, weight)]
            out.update(zip(names, firsts, strict=True))
        else:  # one dispatch per op for all arrays (small models are dispatch-bound)
            acc = [out[k] for k in names]
            if self.exact:  # w * x rounded, then added: mean_delta's arithmetic, bit for bit
                torch._foreach_add_(acc, torch._foreach_mul(vals, weight))
            else:  # in place, no temporary: one read of x, one read-write of the sum
                torch._foreach_add_(acc, vals, alpha=weight)
        self.total_weight += weight
        self.count += 1

    def fold_checked(
        self, names: Sequence[str], arrays: Sequence[torch.Tensor], weight: float, bound: float
    ) -> tuple[bool, list[float]]:
        """Measures, checks and (when it passes) folds one update in one native call
        (`_C.check_fold`): the arrays' squared norms (`sum_squares`'s values), then, when all
        are finite and the square root of their `math.fsum` is at most `bound`, `weight * x`
        added with `fold`'s exact arithmetic (bit for bit). A rejected update changes nothing.

        Args:
            names: the arrays' names (the sums' names, once started).
            arrays: contiguous float32 / bfloat16 CPU tensors, one per name.
            weight: the fold's weight.
            bound: the largest norm accepted (inf: none).

        Returns:
            (whether it was folded, the squared norm of each array).

        Raises:
            ValueError: not an exact sum, arrays of another dtype or layout, or arrays that do
                not match the started sums.
        """
        if not self.exact:
            raise ValueError("WeightedSum.fold_checked: only an exact sum folds this way")
        first = not self.sums
        if first:
            accs = [torch.empty(x.shape, dtype=torch.float32) for x in arrays]
        else:
            missing = [k for k in names if k not in self.sums]
            if missing or len(names) != len(arrays):
                raise ValueError(
                    f"WeightedSum.fold_checked: arrays do not match the sums (no sum for"
                    f" {missing[:3]}, or {len(arrays)} arrays for {len(names)} names)"
                )
            accs = [self.sums[k] for k in names]
            for i, a in enumerate(accs):  # a first fold of strided arrays keeps their strides
                if not a.is_contiguous():
                    accs[i] = self.sums[names[i]] = a.contiguous()
        f32, bf16 = torch.float32, torch.bfloat16
        xs: list[int] = []
        ps: list[int] = []
        sizes: list[int] = []
        half: list[bool] = []
        for a, x in zip(accs, arrays, strict=True):  # per-array cost matters on small models
            dt, n = x.dtype, x.numel()
            if (
                (dt is not f32 and dt is not bf16)
                or not x.is_contiguous()
                or x.is_neg()
                or not x.is_cpu
            ):
                raise ValueError("WeightedSum.fold_checked: contiguous float32/bf16 CPU arrays")
            if a.numel() != n:
                raise ValueError("WeightedSum.fold_checked: arrays do not match the sums")
            xs.append(x.data_ptr())
            ps.append(a.data_ptr())
            sizes.append(n)
            half.append(dt is bf16)
        folded, sqs = native.check_fold(
            xs=xs, accs=ps, n=sizes, bf16=half, weight=weight, bound=bound, first=first
        )
        if folded:
            if first:
                self.sums.update(zip(names, accs, strict=True))
            self.total_weight += weight
            self.count += 1
        return folded, sqs

    def fold_plain(
        self,
        names: Sequence[str],
        arrays: Sequence[torch.Tensor],
        sizes: Sequence[int],
        weight: float,
        bound: float,
    ) -> tuple[bool, list[float]]:
        """`fold_checked` for a trusted caller (`ServerRound`'s plain path) whose arrays
        `validate.plain_arrays` accepted: contiguous float32 / bfloat16 CPU tensors of the plan's
        shapes, `sizes` their entries. Only their addresses and dtypes are read (the per-array
        checks cost more than the fold on a small model); the sums' addresses are kept while
        the sums are the same tensors, and checked against `sizes` when taken. The first fold,
        or sums of other sizes, go through `fold_checked`.

        Returns:
            (whether it was folded, the squared norm of each array).
        """
        accs = self._plain_addresses(names)
        if accs is None:
            folded, sqs = self.fold_checked(names, arrays, weight, bound)
            live = [a for k in names if (a := self.sums.get(k)) is not None]
            if len(live) == len(names) and all(
                a.is_contiguous() and a.numel() == n for a, n in zip(live, sizes, strict=True)
            ):
                self._plain = (names, live, [a.data_ptr() for a in live])
            return folded, sqs
        bf16 = torch.bfloat16
        folded, sqs = native.check_fold(
            xs=[x.data_ptr() for x in arrays],
            accs=accs,
            n=sizes,
            bf16=[x.dtype is bf16 for x in arrays],
            weight=weight,
            bound=bound,
            first=False,
        )
        if folded:
            self.total_weight += weight
            self.count += 1
        return folded, sqs

    def _plain_addresses(self, names: Sequence[str]) -> list[int] | None:
        """The sums' addresses `fold_plain` took for this `names` object, while the sums are
        still those tensors (None otherwise)."""
        got = self._plain
        if got is None or got[0] is not names or len(got[1]) != len(names):
            return None
        sums = self.sums
        if not all(
            sums.get(k) is t and t.data_ptr() == p  # an in-place set_ would move its memory
            for k, t, p in zip(names, got[1], got[2], strict=True)
        ):
            return None
        return got[2]

    def fold_int8(
        self, payloads: Mapping[str, Int8Payload], weight: float, *, counted: bool = False
    ) -> None:
        """Adds `weight * dequantize(q, side, segs)` per name, each in one native pass (the
        dequantized payload is never materialized); in place, whatever `exact` says.

        Args:
            payloads: name -> (int8 values, float32 scales, segments).
            weight: the fold's weight.
            counted: this fold was already counted (its float arrays went through `fold`).
        """
        for name, (q, side, segs) in payloads.items():
            acc = self.sums.get(name)
            if acc is None:
                # float entries: fewer int8 values than that on low-rank segments
                acc = self.sums[name] = torch.zeros(payload_sizes(segs)[0], dtype=torch.float32)
            dequantize_add(acc, q, side, segs, weight)
        if not counted:
            self.total_weight += weight
            self.count += 1

    def scaled(self, scale: float) -> Arrays:
        """The sums times `scale` (the sums themselves when `scale` is 1)."""
        if scale == 1.0 or not self.sums:  # _foreach ops refuse an empty list
            return self.sums
        names, vals = list(self.sums), list(self.sums.values())
        return dict(zip(names, torch._foreach_mul(vals, scale), strict=True))  # one dispatch

    @property
    def nbytes(self) -> int:
        """Bytes held by the sums."""
        return sum(v.numel() * v.element_size() for v in self.sums.values())


def fold_all(
    parts: list[tuple[WeightedSum, Arrays]],
    weight: float,
    int8_sum: WeightedSum | None = None,
    int8: Mapping[str, Int8Payload] | None = None,
) -> None:
    """Folds several named-array sets into their sums, and int8 payloads into `int8_sum`: one
    native call (`packed_fold.fold_update`) for all the sums that are started, fold in place
    and know every name, with one int8 payload whose sum is started; the others (exact sums,
    first folds, more payloads) fold on their own. A small model's fold is dispatch-bound.

    Args:
        parts: (sum, the arrays to add to it) pairs.
        weight: the fold's weight.
        int8_sum: the sum of the int8 payloads (counted once for this fold, whether or not it
            is also in `parts`).
        int8: name -> (int8 values, float32 scales, segments).
    """
    ready = [not s.exact and bool(s.sums) and s.sums.keys() >= a.keys() for s, a in parts]
    for (s, a), ok in zip(parts, ready, strict=True):
        if not ok:  # exact (bit-identical) or not started: a fold of its own
            s.fold(a, weight)
    payload = None
    if int8_sum is not None and int8:
        counted = any(s is int8_sum for s, _ in parts)
        name = next(iter(int8))
        acc8 = int8_sum.sums.get(name)
        if len(int8) == 1 and acc8 is not None:
            q, side, segs = int8[name]
            flat, nacc, nq, nside = fold_plan(segs)
            if acc8.numel() != nacc or q.numel() != nq or side.numel() != nside:
                raise ValueError(
                    f"fold_all: int8 sizes do not match the segments ({nq} values, {nside}"
                    f" scales and a sum of {nacc} expected)"
                )
            flat_q = q if q.dim() == 1 else q.reshape(-1)
            flat_side = side if side.dim() == 1 else side.reshape(-1)
            payload = (acc8, flat_q, flat_side, flat, VEC_CHUNK)
            if not counted:
                int8_sum.total_weight += weight
                int8_sum.count += 1
        else:
            int8_sum.fold_int8(int8, weight, counted=counted)
    together = [(s, a) for (s, a), ok in zip(parts, ready, strict=True) if ok]
    if not together and payload is None:
        return
    accs: list[torch.Tensor] = []
    vals: list[torch.Tensor] = []
    for s, a in together:
        sums = s.sums
        for k, v in a.items():
            accs.append(sums[k])
            vals.append(v)
        s.total_weight += weight
        s.count += 1
    fold_update(accs, vals, weight, payload)
