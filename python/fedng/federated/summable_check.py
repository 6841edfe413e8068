"""The fast path of FedNG's summable replies: checked and folded in one native call.

A summable reply carries its delta, its contribution `c_k` (extras `fd/<param>`) and one int8
K-FAC payload. The server's Python checks of such a reply (`validate.check_update`, the
signature, the norm and curvature-scale checks of `ServerRound._judge`, `CurvatureSums.fold`)
cost ~100 us on a small model, most of it re-deciding what the round's first accepted reply
already settled: the names, shapes and metadata. `SummablePlan` keeps that once per round; a
reply that matches it exactly (the same curvature metadata, types included; plain int fields;
contiguous float32 / bfloat16 arrays of the planned names and shapes; int8 values and float32
scales of the planned sizes) goes through `_C.summable_check_fold`, which measures it with the
routines the Python checks call (squared norms, the int8 scales' traces, `math.fsum`'s exact
sum), applies the same bounds, and folds it with `CurvatureSums.fold`'s kernel. Anything else,
and any reply that call does not accept, takes the Python path, which gives the verdict and
its reason: the same verdicts, reasons and bit-identical sums either way
(tests/test_summable_fast.py).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from fedng._backend import native
from fedng.curvature.quantize import SCALE_SUFFIX, VEC_CHUNK, fold_plan
from fedng.curvature.validation import MAX_ABS
from fedng.federated.aggregation.summable import CONTRIB_PREFIX
from fedng.federated.aggregation.sums import WeightedSum
from fedng.federated.algorithms.base import Algorithm, State
from fedng.federated.algorithms.curvature_payload import int8_scale_plan
from fedng.federated.algorithms.fedng import FedNG
from fedng.federated.algorithms.fedng_server import CurvatureSums
from fedng.federated.messages import ClientUpdate
from fedng.federated.validate import curvature_ratio, expected_shapes, plain_fields

_FOLDED = 0
_F32_EPS = torch.finfo(torch.float32).eps


@dataclass
class SummablePlan:
    """What every summable reply of a round must match to take the fast path.

    Attributes:
        names: the delta's names, then the extras' (`fd/<param>`), in `check_update`'s order.
        shapes: their shapes; `sizes` their entries.
        ndelta: how many of `names` are the delta's.
        kind: the int8 payload's kind; `scale_key` its scales' name.
        meta: the curvature metadata of the round's first accepted reply; `meta_repr` its repr
            (equality alone would take 1, 1.0 and True for one another), `meta_json` its
            key-sorted JSON (the same metadata in another key order matches by that).
        nq: int8 values; `nside`: scales; `nacc`: entries of the payload's float sum; `segs`:
            the fold's sextuples.
        pairs: per curvature scale measure, its two trace indices (-1: one trace).
        divs: per measure, its divisor; `scale_names`: its name (`curvature_scales`' keys).
        accs: the running sums' data addresses, in `names` order; `acc8`: the payload's sum.
        sums: the sums themselves (kept alive with the addresses).
        owners: (WeightedSum, key) of each of `sums`: a reply takes the fast path only while
            those are still the same tensors.
    """

    names: list[str]
    shapes: list[tuple[int, ...]]
    sizes: list[int]
    ndelta: int
    kind: str
    scale_key: str
    meta: dict[str, Any]
    meta_repr: str
    meta_json: str
    nq: int
    nside: int
    nacc: int
    segs: tuple[int, ...]
    pairs: list[int]
    divs: list[float]
    scale_names: list[str]
    accs: list[int]
    acc8: int
    sums: list[torch.Tensor]
    owners: list[tuple[WeightedSum, str]]


def summable_plan(
    state: State, algo: Algorithm[Any], acc: object, update: ClientUpdate
) -> SummablePlan | None:
    """The plan of a round whose accumulator has just folded `update` through the Python path
    (its first accepted reply), or None when its replies cannot take the fast path (another
    algorithm or aggregation, the full curvature checks, the participation-aware step, a payload
    that is not one int8 K-FAC kind, sums that are exact or not all started)."""
    if type(algo) is not FedNG or type(acc) is not CurvatureSums:
        return None
    opts = algo.options(state.config)
    if opts.aggregation != "summable" or not opts.fast_check() or acc.spread is not None:
        return None
    if acc.deltas.exact or acc.contrib.exact or acc.curv.exact:
        return None
    meta = update.meta.get("curv") if type(update.meta) is dict else None
    if type(meta) is not dict or type(update.curvature) is not dict:
        return None
    try:
        got = int8_scale_plan(update)
    except (ValueError, KeyError, TypeError):
        return None
    if got is None:
        return None
    kind, segments, scales = got
    shapes, extras = expected_shapes(state, algo)
    if not shapes or not extras or any(not k.startswith(CONTRIB_PREFIX) for k in extras):
        return None
    names = [*shapes, *extras]
    sums = [acc.deltas.sums.get(k) for k in shapes]
    sums += [acc.contrib.sums.get(k[len(CONTRIB_PREFIX) :]) for k in extras]
    acc8 = acc.curv.sums.get(kind)
    if set(acc.curv.sums) != {kind} or acc8 is None:  # the payload's sum only
        return None
    segs, nacc, nq, nside = fold_plan(segments)
    every = [*sums, acc8]
    if any(
        s is None or s.dtype != torch.float32 or not s.is_contiguous() or not s.is_cpu
        for s in every
    ):
        return None
    live = [s for s in sums if s is not None]
    if [s.numel() for s in live] != [math.prod(v) for v in [*shapes.values(), *extras.values()]]:
        return None
    if acc8.numel() != nacc:
        return None
    pairs: list[int] = []  # segment indices: the traces come in segment order
    for _, idx, _ in scales:
        pairs += [idx[0], idx[1] if len(idx) == 2 else -1]
    return SummablePlan(
        names=names,
        shapes=[*shapes.values(), *extras.values()],
        sizes=[s.numel() for s in live],
        ndelta=len(shapes),
        kind=kind,
        scale_key=kind + SCALE_SUFFIX,
        meta=copy.deepcopy(meta),  # the reply's own dict may change after the round took it
        meta_repr=repr(meta),
        meta_json=_canonical(meta),
        nq=nq,
        nside=nside,
        nacc=nacc,
        segs=segs,
        pairs=pairs,
        divs=[div for _, _, div in scales],
        scale_names=[name for name, _, _ in scales],
        accs=[s.data_ptr() for s in live],
        acc8=acc8.data_ptr(),
        sums=[*live, acc8],
        owners=[
            *((acc.deltas, k) for k in shapes),
            *((acc.contrib, k[len(CONTRIB_PREFIX) :]) for k in extras),
            (acc.curv, kind),
        ],
    )


def _canonical(meta: dict[str, Any]) -> str:
    """Key-sorted JSON of curvature metadata: 1, 1.0 and true stay apart, key order does not
    matter."""
    return json.dumps(meta, sort_keys=True, default=repr)


def _arrays(
    plan: SummablePlan, delta: object, extras: object
) -> tuple[list[int], list[bool]] | None:
    """(addresses, bfloat16 flags) of the reply's delta and extras arrays when they are exactly
    the plan's (names, shapes, contiguous float32 / bfloat16 CPU tensors); their sizes are the
    plan's."""
    if type(delta) is not dict or type(extras) is not dict:
        return None
    nd = plan.ndelta
    if len(delta) != nd or len(extras) != len(plan.names) - nd:
        return None
    ptrs: list[int] = []
    half: list[bool] = []
    tensor, strided, f32, bf16 = torch.Tensor, torch.strided, torch.float32, torch.bfloat16
    for i, (k, shape) in enumerate(zip(plan.names, plan.shapes, strict=True)):
        t = delta.get(k) if i < nd else extras.get(k)
        if type(t) is not tensor:
            return None
        dt = t.dtype
        if (
            (dt is not f32 and dt is not bf16)
            or t.layout is not strided  # sparse / mkldnn: is_contiguous or data_ptr raise
            or t.shape != shape
            or not t.is_contiguous()
            or not t.is_cpu
            or t.is_neg()  # a lazy negation the native kernels would not apply
        ):
            return None
        ptrs.append(t.data_ptr())
        half.append(dt is bf16)
    return ptrs, half


def _payload(plan: SummablePlan, curvature: object) -> tuple[int, int] | None:
    """The addresses of the reply's int8 values and float32 scales when they are the plan's."""
    if type(curvature) is not dict or len(curvature) != 2:
        return None
    out: list[int] = []
    want = ((plan.kind, torch.int8, plan.nq), (plan.scale_key, torch.float32, plan.nside))
    for key, dt, n in want:
        t = curvature.get(key)
        if (
            type(t) is not torch.Tensor
            or t.layout is not torch.strided
            or t.dtype is not dt
            or t.numel() != n
            or not t.is_contiguous()
            or not t.is_cpu
            or t.is_neg()
        ):
            return None
        out.append(t.data_ptr())
    return out[0], out[1]


class SummableFast:
    """A round's fast path for summable replies (see the module docstring).

    Args:
        state: the round's server state.
        plan: the round's plan (`summable_plan`).
        acc: the round's accumulator (whose sums the plan addresses).
    """

    def __init__(self, state: State, plan: SummablePlan, acc: CurvatureSums) -> None:
        self.state = state
        self.plan = plan
        self.acc = acc
        self._bounds: list[float] = []
        self._refs: object = None

    def try_fold(
        self,
        update: ClientUpdate,
        weight: float,
        norm_ref: float | None,
        scale_ref: dict[str, float] | None,
    ) -> tuple[float, list[float]] | None:
        """Checks and folds one reply; (its delta norm, its curvature scales in `scale_names`
        order) when folded, None when it must take the Python path (nothing written then).

        Args:
            update: the reply (its client id already handled by the caller).
            weight: its fold weight.
            norm_ref: the round's delta-norm reference (None: no bound).
            scale_ref: the round's curvature-scale references, floored as the checks use them
                (None: no bound).
        """
        plan, state = self.plan, self.state
        if not plain_fields(state, update):
            return None
        curv = update.meta.get("curv")
        if type(curv) is not dict or curv != plan.meta:
            return None
        if repr(curv) != plan.meta_repr and _canonical(curv) != plan.meta_json:
            return None  # another key order is the same metadata (a first reply can't stall us)
        arrays = _arrays(plan, update.delta, update.extras)
        payload = _payload(plan, update.curvature)
        if arrays is None or payload is None:
            return None
        if not all(
            w.sums.get(k) is t and t.data_ptr() == p
            for (w, k), t, p in zip(plan.owners, plan.sums, (*plan.accs, plan.acc8), strict=True)
        ):
            return None  # a sum was replaced or moved: its address is stale (the Python path)
        ptrs, half = arrays
        ratio = state.config.max_norm_ratio
        bound = ratio * norm_ref if norm_ref is not None and norm_ref > 0 else math.inf
        status, norm, _, scales = native.summable_check_fold(
            xs=ptrs,
            accs=plan.accs,
            n=plan.sizes,
            bf16=half,
            ndelta=plan.ndelta,
            q=payload[0],
            side=payload[1],
            acc=plan.acc8,
            nq=plan.nq,
            nside=plan.nside,
            nacc=plan.nacc,
            segs=plan.segs,
            chunk=VEC_CHUNK,
            max_abs=MAX_ABS,
            pairs=plan.pairs,
            divs=plan.divs,
            bounds=self._scale_bounds(scale_ref),
            weight=weight,
            norm_bound=bound,
        )
        if status != _FOLDED:
            return None
        acc = self.acc
        for s in (acc.deltas, acc.contrib, acc.curv):  # `fold_all`'s counts
            s.total_weight += weight
            s.count += 1
        acc.wire_eps = max(acc.wire_eps, _F32_EPS)
        return float(norm), scales

    def _scale_bounds(self, refs: dict[str, float] | None) -> list[float]:
        """Per scale measure, `curvature_ratio(ratio) * ref` (NaN without a positive ref: only
        finiteness is checked, as `validate.too_large` does); cached per reference dict."""
        if refs is not self._refs or not self._bounds:
            cratio = curvature_ratio(self.state.config.max_norm_ratio)
            got = refs or {}
            self._bounds = [
                cratio * r if (r := got.get(k)) is not None and r > 0 else math.nan
                for k in self.plan.scale_names
            ]
            self._refs = refs
        return self._bounds
