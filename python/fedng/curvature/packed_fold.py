"""Native helpers of the int8 curvature payload (`fedng._C`): one-pass folds of received payloads
into float32 running sums, and the quantization of packed triangles.

A streaming server adds every client's int8 curvature payload and bf16 contribution to its
sums. Decoding to float32 first and adding after reads and writes ~5 temporaries per entry; the
native folds decode each entry in registers and add it in place: one read of the payload, one
read-write of the sum.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedng._backend import native

_READ = (torch.float32, torch.bfloat16)
"""The dtypes `sum_squares` reads in place."""

Triples = Sequence[int]
"""Flattened `(offset in the payload, offset in the scales, n)` triples."""


def _sum_buffer(acc: torch.Tensor, n: int, what: str) -> None:
    if acc.dtype != torch.float32 or not acc.is_contiguous() or not acc.is_cpu or acc.is_neg():
        raise ValueError(f"{what}: the sum must be a contiguous float32 CPU tensor")
    if acc.numel() != n:
        raise ValueError(f"{what}: the sum has {acc.numel()} entries, the payload {n}")


def bf16_axpy(accs: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], weight: float) -> None:
    """`acc += weight * x` for each bfloat16 `x` into its float32 sum `acc`, all in one native
    call (no float32 copy of any `x`).

    Raises:
        ValueError: tensors of the wrong dtype, layout or size.
    """
    if len(accs) != len(xs):
        raise ValueError("bf16_axpy: as many sums as arrays expected")
    for acc, x in zip(accs, xs, strict=True):
        _sum_buffer(acc, x.numel(), "bf16_axpy")
        if x.dtype != torch.bfloat16 or not x.is_contiguous() or not x.is_cpu or x.is_neg():
            raise ValueError("bf16_axpy: arrays must be contiguous bfloat16 CPU tensors")
    native.bf16_axpy(
        xs=[x.data_ptr() for x in xs],
        accs=[a.data_ptr() for a in accs],
        n=[x.numel() for x in xs],
        weight=weight,
    )


Sextuples = Sequence[int]
"""Flattened `(form, offset in the float payload, offset in the int8 values, offset in the scales,
n, k)` sextuples (form 0 a triangle, 1 a vector, 2 a low-rank factor of rank k)."""


def _int8_buffers(what: str, q: torch.Tensor, side: torch.Tensor) -> None:
    if q.dtype != torch.int8 or not q.is_contiguous() or not q.is_cpu or q.is_neg():
        raise ValueError(f"{what}: 'q' must be a contiguous int8 CPU tensor")
    if side.dtype != torch.float32 or not side.is_contiguous() or not side.is_cpu or side.is_neg():
        raise ValueError(f"{what}: 'side' must be a contiguous float32 CPU tensor")


def _int8_fold_buffers(what: str, acc: torch.Tensor, q: torch.Tensor, side: torch.Tensor) -> None:
    """`_int8_buffers` plus the float32 sum an int8 payload folds into (its size is checked
    natively against the segments)."""
    _int8_buffers(what, q, side)
    if acc.dtype != torch.float32 or not acc.is_contiguous() or not acc.is_cpu or acc.is_neg():
        raise ValueError(f"{what}: the sum must be a contiguous float32 CPU tensor")


def payload_axpy(
    acc: torch.Tensor,
    q: torch.Tensor,
    side: torch.Tensor,
    segs: Sextuples,
    chunk: int,
    weight: float,
) -> None:
    """`acc += weight * dequantize(q, side)` for a whole int8 payload, in one native pass (the
    arithmetic of `fedng.curvature.quantize.dequantize` per entry; a low-rank factor's
    `B~ B~^T + sigma I` by float32 dots, never formed).

    Args:
        acc: float32, contiguous (written in place).
        q: int8, contiguous; side: float32 scales, contiguous.
        segs: flattened `(form, at, qat, sat, n, k)` sextuples.
        chunk: entries of a vector that share one scale.
        weight: the fold's weight.

    Raises:
        ValueError: tensors of the wrong dtype or layout, or segments past their ends.
    """
    _int8_fold_buffers("payload_axpy", acc, q, side)
    native.int8_payload_axpy(
        q=q.data_ptr(),
        side=side.data_ptr(),
        acc=acc.data_ptr(),
        nq=q.numel(),
        nside=side.numel(),
        nacc=acc.numel(),
        segs=segs,
        chunk=chunk,
        weight=weight,
    )


def payload_traces(
    q: torch.Tensor, side: torch.Tensor, segs: Sextuples, chunk: int
) -> list[float] | None:
    """Per segment, the trace of its dequantized matrix read from its scales (a triangle:
    `sum_i D_i (1 + delta)`, float32 products summed in float64) or a low-rank factor's digits
    (`||B~||_F^2 + n sigma`); None when a segment is a vector or a scale is negative or not
    finite.

    Raises:
        ValueError: tensors of the wrong dtype or layout, or segments past their ends.
    """
    _int8_buffers("payload_traces", q, side)
    got: list[float] = native.int8_payload_traces(
        q=q.data_ptr(),
        side=side.data_ptr(),
        nq=q.numel(),
        nside=side.numel(),
        segs=segs,
        chunk=chunk,
    )
    return got if got or not segs else None


def int8_triangles(vals: torch.Tensor, q: torch.Tensor, side: torch.Tensor, tris: Triples) -> None:
    """Quantizes the packed triangles `tris` of `vals` into `q` and `side` (their diagonals and
    certified error bounds; see `fedng.curvature.quantize` and csrc/cpu/int8_quantize_cpu.cpp).

    Args:
        vals: float32 [N], contiguous.
        q: int8 [N], contiguous (the triangles' entries written).
        side: float32, contiguous (each triangle's n + 1 scales written).
        tris: flattened `(at, sat, n)` triples.

    Raises:
        ValueError: tensors of the wrong dtype, layout or size, or triangles past their ends.
    """
    for t, dt, name in (
        (vals, torch.float32, "vals"),
        (q, torch.int8, "q"),
        (side, torch.float32, "side"),
    ):
        if t.dtype != dt or not t.is_contiguous() or not t.is_cpu or t.is_neg():
            raise ValueError(f"int8_triangles: {name!r} must be a contiguous {dt} CPU tensor")
    if q.numel() != vals.numel():
        raise ValueError("int8_triangles: 'q' and 'vals' differ in size")
    native.int8_quantize_triangles(
        vals=vals.data_ptr(),
        q=q.data_ptr(),
        side=side.data_ptr(),
        nvals=vals.numel(),
        nside=side.numel(),
        tris=tris,
    )


def quantize_signed(x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed float32 values as int8 and one float32 scale per `chunk` entries, in one native
    pass: `scale_c = float(max |x| / 127)` over the chunk and `round(x / scale_c)` (half to
    even, clamped to +-127) in float64, bit for bit `quantize._quantize_vec`'s torch arithmetic.

    Args:
        x: float32 [n], contiguous.
        chunk: entries per scale (> 0).

    Returns:
        (int8 [n], float32 [ceil(n / chunk)]).

    Raises:
        ValueError: `x` not a contiguous float32 CPU vector, or `chunk` not positive.
    """
    if (
        x.dtype != torch.float32
        or x.dim() != 1
        or not x.is_contiguous()
        or not x.is_cpu
        or x.is_neg()
    ):
        raise ValueError("quantize_signed: 'x' must be a contiguous float32 CPU vector")
    if chunk <= 0:
        raise ValueError(f"quantize_signed: 'chunk' must be positive, got {chunk}")
    n = x.numel()
    q = torch.empty(n, dtype=torch.int8)
    scale = torch.empty(-(-n // chunk), dtype=torch.float32)
    native.int8_quantize_vector(
        x=x.data_ptr(), q=q.data_ptr(), scale=scale.data_ptr(), n=n, chunk=chunk
    )
    return q, scale


Int8Fold = tuple[torch.Tensor, torch.Tensor, torch.Tensor, Sextuples, int]
"""(float32 sum, int8 values, float32 scales, segment sextuples, chunk) of `fold_update`'s int8
payload."""


def fold_update(
    accs: Sequence[torch.Tensor],
    xs: Sequence[torch.Tensor],
    weight: float,
    payload: Int8Fold | None = None,
) -> None:
    """`acc += weight * x` for every pair (float32 and contiguous bfloat16 `x` read in place,
    other float arrays as float32 copies), then `payload_axpy` of an int8 payload: a whole
    update folded in one native call (a small model's fold is dispatch-bound).

    Args:
        accs: float32 contiguous sums, one per array.
        xs: the arrays (same sizes).
        weight: the fold's weight.
        payload: (sum, q, side, sextuples, chunk) of an int8 payload, or None.

    Raises:
        ValueError: tensors of the wrong dtype, layout or size, or segments past their ends.
    """
    if len(accs) != len(xs):
        raise ValueError("fold_update: as many sums as arrays expected")
    ptr_x: list[int] = []
    ptr_a: list[int] = []
    sizes: list[int] = []
    half: list[bool] = []
    keep: list[torch.Tensor] = []  # float32 copies live until the call returns
    f32, bf16 = torch.float32, torch.bfloat16
    for acc, x in zip(accs, xs, strict=True):  # per-array cost matters on small models
        dt = x.dtype
        if (
            (dt is not f32 and dt is not bf16)
            or not x.is_contiguous()
            or not x.is_cpu
            or x.is_neg()
        ):
            if not x.is_floating_point() or not x.is_cpu:
                raise ValueError("fold_update: expected float CPU tensors")
            x = x.resolve_neg().float().contiguous()  # the kernels read raw memory
            keep.append(x)
            dt = f32
        n = x.numel()
        if (
            acc.dtype is not f32
            or acc.numel() != n
            or not acc.is_contiguous()
            or not acc.is_cpu
            or acc.is_neg()
        ):
            _sum_buffer(acc, n, "fold_update")  # raises the error
        ptr_x.append(x.data_ptr())
        ptr_a.append(acc.data_ptr())
        sizes.append(n)
        half.append(dt is bf16)
    if payload is None:
        acc8, q, side, segs, chunk = _NO_PAYLOAD
    else:
        acc8, q, side, segs, chunk = payload
        _int8_fold_buffers("fold_update", acc8, q, side)
    native.fold_update(
        xs=ptr_x,
        accs=ptr_a,
        n=sizes,
        bf16=half,
        weight=weight,
        q=q.data_ptr(),
        side=side.data_ptr(),
        acc=acc8.data_ptr(),
        nq=q.numel(),
        nside=side.numel(),
        nacc=acc8.numel(),
        segs=segs,
        chunk=chunk,
    )


_NO_PAYLOAD: Int8Fold = (
    torch.zeros(0),
    torch.zeros(0, dtype=torch.int8),
    torch.zeros(0),
    (),
    1,
)


def sum_squares(ts: Sequence[torch.Tensor]) -> list[float]:
    """Per tensor, the sum of its squared entries accumulated in float64, all in one native pass
    (float32 and contiguous bfloat16 read as they are, other float tensors as float32 copies):
    NaN/Inf iff an entry is (float32 squares cannot overflow float64).

    Raises:
        ValueError: a tensor that is not a float tensor on the CPU.
    """
    ptrs: list[int] = []
    sizes: list[int] = []
    half: list[bool] = []
    keep: list[torch.Tensor] = []  # float32 copies live until the call returns
    for t in ts:
        if t.dtype not in _READ or not t.is_contiguous() or not t.is_cpu or t.is_neg():
            if not t.is_floating_point() or not t.is_cpu:
                raise ValueError("sum_squares: expected float CPU tensors")
            t = t.resolve_neg().float().contiguous()  # the kernel reads raw memory
            keep.append(t)
        ptrs.append(t.data_ptr())
        sizes.append(t.numel())
        half.append(t.dtype == torch.bfloat16)
    return native.sum_squares(xs=ptrs, n=sizes, bf16=half)


def dots(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> list[float]:
    """Per pair, `<x, y>` over all entries with products and sums in float64 (the float64 dot
    of float64 copies, without the copies), all pairs in one native call; float32 contiguous
    arrays are read in place, others as float32 copies.

    Raises:
        ValueError: a pair whose sizes differ, or a tensor that is not a float CPU tensor.
    """
    if len(xs) != len(ys):
        raise ValueError("dots: as many xs as ys expected")
    flat: list[list[torch.Tensor]] = [[], []]
    for x, y in zip(xs, ys, strict=True):
        if x.numel() != y.numel():
            raise ValueError(f"dots: sizes differ ({x.numel()} and {y.numel()})")
        for side, t in zip(flat, (x, y), strict=True):
            if not t.is_floating_point() or not t.is_cpu:
                raise ValueError("dots: expected float CPU tensors")
            side.append(t.float().contiguous())
    return native.dots_f64(
        xs=[t.data_ptr() for t in flat[0]],
        ys=[t.data_ptr() for t in flat[1]],
        n=[t.numel() for t in flat[0]],
    )


_UNPACK_CODES = {torch.float32: 0, torch.float64: 1}


def unpack_into(vec: torch.Tensor, n: int) -> torch.Tensor | None:
    """The symmetric [n, n] matrix of a packed lower triangle `vec` (row by row), unpacked in
    one native tiled pass (every entry a copy, as `fedng.curvature.spec.unpack_triangle`); None
    when `vec` is not a contiguous float32/float64 CPU tensor of n (n + 1) / 2 entries (then
    the caller unpacks)."""
    code = _UNPACK_CODES.get(vec.dtype)
    if (
        code is None
        or not vec.is_contiguous()
        or not vec.is_cpu
        or vec.is_neg()
        or vec.numel() != n * (n + 1) // 2
    ):
        return None
    out = torch.empty(n, n, dtype=vec.dtype)
    native.unpack_triangle(dtype=code, vec=vec.data_ptr(), out=out.data_ptr(), n=n)
    return out
