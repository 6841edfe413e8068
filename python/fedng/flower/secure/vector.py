"""A client update as the fixed-point vector SecAgg+ sums, with server-chosen scales.

SecAgg+ (`flwr`'s `secaggplus_mod`) quantizes every entry of the vector a client sends to one
of `Q` levels of `[-c, c]` and silently clips what lies outside. fedng never lets it clip: the
vector is cut into *segments* (one per parameter of the delta, one per parameter of the
contribution `c_k = F_k delta_k`, one per curvature factor: each K-FAC A and G triangle, each
diagonal block), the server broadcasts one power-of-two scale `s` per segment, and the client
sends `x / s` after clipping `x` to `[-s, s]` itself, counting what it clipped (the last entry of
the vector: the fraction of entries clipped, whose weighted mean the server reads). With `c = 1`
nothing is left for SecAgg+ to clip.

The scales come from a first, tiny secure sum (the *range* pass): each client sends, per
segment, a one-hot vector over the exponents `E_MIN..E_MAX` of `ceil(log2 max|x|)`; the sum is a
weighted histogram, and the server takes the largest exponent any client needs. The server thus
learns, per segment, which power-of-two ranges are used and by what share of the weight, never
which client uses which.

Error (stated for one weighted mean, in units of the segment's scale `s`): with `N` clients,
`a_k = round(Q n_k / W) / Q` the weights SecAgg+ applies (`W` its `max_weight`) and
`A = sum a_k`, every entry of the secure mean differs from the plaintext weighted mean
`sum n_k x_k / sum n_k` of the clipped values by at most `3 N / (Q A)` (stochastic rounding:
`2 N / (Q A)`; the rounded weights: `N / (Q A)`), plus the float32 rounding of the result.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedng._typing import Arrays
from fedng.curvature.layout import BlockLayout
from fedng.curvature.quantize import COMPRESSIBLE, float_payload, segment_entries, segments
from fedng.federated.messages import ClientUpdate

E_MIN = -60
"""The smallest scale exponent (entries below 2**E_MIN share its scale)."""
E_MAX = 40
"""The largest scale exponent (larger entries are clipped to 2**E_MAX, and counted)."""
BUCKETS = E_MAX - E_MIN + 1
DELTA, CONTRIB, CURV, METRIC = "d/", "fd/", "c/", "m/"
"""Part prefixes: the delta, the contribution `c_k = F_k delta_k` (extras `fd/<param>`), a
curvature payload kind, a client metric (its weighted mean is what the server learns)."""
SECURE_METRICS = ("train_loss",)
"""Client metrics summed with the payload (never under DP: they are not noised)."""


@dataclass(frozen=True)
class Template:
    """The structure of a round's secure vector: parts (name, shape, segment sizes) and the
    curvature metadata (plain structure, no data: the clients send it in the clear).

    Attributes:
        parts: (name, shape, segment sizes) in vector order; names `d/<param>`, `fd/<param>`,
            `c/<kind>`.
        curv_meta: the pooled curvature's metadata (`CurvatureSet.to_arrays`), None without.
    """

    parts: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]
    curv_meta: dict[str, Any] | None

    @property
    def segments(self) -> int:
        """Segments in the vector (one scale each)."""
        return sum(len(s) for _, _, s in self.parts)

    @property
    def size(self) -> int:
        """Entries of the main vector (the payload plus the clipped fraction)."""
        return sum(math.prod(shape) for _, shape, _ in self.parts) + 1

    def to_json(self) -> str:
        """The template as a JSON string (what a client sends in the clear)."""
        parts = [[n, list(sh), list(sg)] for n, sh, sg in self.parts]
        return json.dumps({"parts": parts, "curv_meta": self.curv_meta}, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> Template:
        """Inverse of `to_json`.

        Raises:
            ValueError: not a template.
        """
        try:
            obj = json.loads(text)
            parts = tuple(
                (str(n), tuple(int(x) for x in sh), tuple(int(x) for x in sg))
                for n, sh, sg in obj["parts"]
            )
            meta = obj["curv_meta"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"secure template: malformed ({err})") from err
        if meta is not None and not isinstance(meta, dict):
            raise ValueError("secure template: 'curv_meta' must be an object or null")
        for n, sh, sg in parts:
            if sum(sg) != math.prod(sh) or any(x < 0 for x in sh + sg):
                raise ValueError(f"secure template: part {n!r} segments do not cover its shape")
        return Template(parts, meta)


def _curv_segments(kind: str, data: torch.Tensor, meta: dict[str, Any]) -> tuple[int, ...]:
    """Segment sizes of one curvature payload: per factor for K-FAC / diagonal (their scales
    differ by orders of magnitude), one segment for the others."""
    if kind not in COMPRESSIBLE:
        return (data.numel(),)
    specs = [
        BlockLayout.from_json(lay).spec
        for k, lay in zip(meta["kinds"], meta["layouts"], strict=True)
        if k == kind
    ]
    return tuple(segment_entries(s) for s in segments(kind, specs))


def payload_parts(update: ClientUpdate, metrics: bool = False) -> tuple[Template, Arrays]:
    """An update's summable parts and their template: the delta, the contribution extras, the
    curvature payloads as floats (int8 kinds dequantized: what a plaintext server sums), and
    with `metrics` the `SECURE_METRICS` (NaN when missing: sent as 0 and counted as clipped).

    Raises:
        ValueError: extras other than the contribution (nothing else is summable).
    """
    arrays: Arrays = {f"{DELTA}{k}": v for k, v in update.delta.items()}
    other = [k for k in update.extras if not k.startswith(CONTRIB)]
    if other:
        raise ValueError(f"secure aggregation: extras {other[:3]} are not summable")
    arrays.update(update.extras)
    meta = None
    if update.curvature:
        floats, meta = float_payload(update.curvature, update.meta["curv"])
        arrays.update({f"{CURV}{k}": v for k, v in floats.items()})
    if metrics:
        for name in SECURE_METRICS:
            value = update.metrics.get(name, math.nan)
            arrays[f"{METRIC}{name}"] = torch.tensor([value], dtype=torch.float64)
    parts = []
    for name, v in arrays.items():
        segs = (
            _curv_segments(name[len(CURV) :], v, meta)
            if name.startswith(CURV) and meta is not None
            else (v.numel(),)
        )
        parts.append((name, tuple(v.shape), segs))
    return Template(tuple(parts), meta), arrays


def _flat(template: Template, arrays: Arrays) -> torch.Tensor:
    return torch.cat([arrays[n].double().reshape(-1) for n, _, _ in template.parts])


def _seg_ids(template: Template) -> torch.Tensor:
    sizes = [s for _, _, segs in template.parts for s in segs]
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long))


def exponents(template: Template, arrays: Arrays) -> torch.Tensor:
    """Per segment, `ceil(log2 max|x|)` clamped to [E_MIN, E_MAX] (E_MAX if not finite)."""
    flat = _flat(template, arrays)
    ids = _seg_ids(template)
    mx = torch.zeros(template.segments, dtype=torch.float64)
    mx.scatter_reduce_(0, ids, flat.abs().nan_to_num(nan=math.inf), "amax")
    e = torch.ceil(torch.log2(mx.clamp_min(2.0**E_MIN)))
    return e.clamp(E_MIN, E_MAX).to(torch.long)


def range_vector(template: Template, arrays: Arrays) -> np.ndarray:
    """The range pass's vector: per segment a one-hot over the exponents E_MIN..E_MAX."""
    out = np.zeros((template.segments, BUCKETS), dtype=np.float64)
    out[np.arange(template.segments), exponents(template, arrays).numpy() - E_MIN] = 1.0
    return out.reshape(-1)


def scales_from_histogram(hist: np.ndarray, segments: int, threshold: float) -> list[float]:
    """Per segment the scale `2**e` of the largest exponent whose weighted count exceeds
    `threshold` (the secure sum's error bound); 2**E_MIN for an unused segment.

    Raises:
        ValueError: a histogram of the wrong size.
    """
    if hist.size != segments * BUCKETS:
        raise ValueError(f"range histogram: {hist.size} entries, expected {segments * BUCKETS}")
    h = hist.reshape(segments, BUCKETS)
    out = []
    for row in h:
        used = np.nonzero(row > threshold)[0]
        out.append(2.0 ** (E_MIN + int(used[-1]) if used.size else E_MIN))
    return out


def main_vector(
    template: Template, arrays: Arrays, scales: Sequence[float]
) -> tuple[np.ndarray, int]:
    """The main pass's vector: every segment divided by its scale after clipping to
    `[-s, s]` (non-finite entries sent as 0), then the fraction of entries clipped.

    Returns:
        (the float64 vector, entries clipped or zeroed).

    Raises:
        ValueError: not one positive scale per segment.
    """
    if len(scales) != template.segments or not all(s > 0 for s in scales):
        raise ValueError(
            f"secure vector: {template.segments} positive scales expected, got {len(scales)}"
        )
    flat = _flat(template, arrays)
    s = torch.tensor(list(scales), dtype=torch.float64)[_seg_ids(template)]
    bad = ~torch.isfinite(flat) | (flat.abs() > s)
    scaled = (flat.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0) / s).clamp(-1.0, 1.0)
    n = int(bad.sum())
    frac = n / max(flat.numel(), 1)
    return np.concatenate([scaled.numpy(), [frac]]), n


def unpack_mean(
    template: Template, vector: np.ndarray, scales: Sequence[float]
) -> tuple[Arrays, float]:
    """Inverse of `main_vector` on the secure mean: the parts (float32, named as in the
    template) and the weighted mean fraction of clipped entries.

    Raises:
        ValueError: a vector of the wrong size.
    """
    if vector.size != template.size:
        raise ValueError(f"secure mean: {vector.size} entries, expected {template.size}")
    flat = torch.from_numpy(np.asarray(vector[:-1], dtype=np.float64))
    s = torch.tensor(list(scales), dtype=torch.float64)[_seg_ids(template)]
    flat = flat * s
    out: Arrays = {}
    at = 0
    for name, shape, _ in template.parts:
        n = math.prod(shape)
        out[name] = flat[at : at + n].reshape(shape).float()
        at += n
    return out, float(vector[-1])


ANSWER = "ls"
"""The part of a line-search answer: per block `[<M, F_k d>, <d, F_k d>]`."""


def answer_template(blocks: int) -> Template:
    """The template of a line-search answer: `[blocks, 2]`, one segment (scale) per entry."""
    return Template(((ANSWER, (blocks, 2), (1,) * (2 * blocks)),), None)


def error_bound(num_clients: int, levels: int, total_weight: float) -> float:
    """The bound `3 N / (Q A)` on one entry of a secure mean, in units of its scale (see the
    module docstring), plus the float32 rounding of an entry of magnitude <= 1."""
    return 3.0 * num_clients / (levels * total_weight) + 2.0**-24


def secagg_weights(num_examples: Sequence[int], levels: int, max_weight: float) -> list[float]:
    """The weights `a_k = round(Q n_k / W) / Q` SecAgg+ applies (`secaggplus_mod`)."""
    return [round(n / max_weight * levels) / levels for n in num_examples]
