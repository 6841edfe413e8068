"""Input validation shared by every op in `fedng.ops`.

Every message names the op, the argument, what was expected and what was got, so a user can fix
the call without reading the source. Nothing here takes a pointer: validation happens first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedng.errors import BackendUnavailable

FLOAT_DTYPES: dict[torch.dtype, int] = {torch.float32: 0, torch.float64: 1}
"""Dtypes the native kernels accept, mapped to the code `fedng._C` expects."""


def tensor_list(op: str, name: str, value: object, length: int | None = None) -> list[torch.Tensor]:
    """Checks that `value` is a sequence of tensors (of `length` items, if given)."""
    if isinstance(value, torch.Tensor) or not isinstance(value, Sequence):
        raise TypeError(f"{op}: '{name}' must be a list of tensors, got {type(value).__name__}")
    items = list(value)
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: '{name}[{i}]' must be a torch.Tensor, got {type(t).__name__}")
    if length is not None and len(items) != length:
        raise ValueError(
            f"{op}: '{name}' must have {length} tensors (one per matrix), got {len(items)}"
        )
    return items


def dtype_code(op: str, groups: dict[str, list[torch.Tensor]]) -> int:
    """Checks that all tensors share one float32/float64 dtype, live on the CPU and are contiguous.

    A fast set-based pass covers the common case (thousands of tiny matrices in one call); only
    when it fails does a per-tensor pass find the first offender for the error message.

    Returns:
        The dtype code for `fedng._C` (0 = float32, 1 = float64).
    """
    dtypes: set[torch.dtype] = set()
    ok = True
    for items in groups.values():
        dtypes.update({t.dtype for t in items})
        ok = ok and all(t.is_cpu for t in items) and all(t.is_contiguous() for t in items)
    if ok and len(dtypes) <= 1 and dtypes <= FLOAT_DTYPES.keys():
        return FLOAT_DTYPES[dtypes.pop()] if dtypes else 0
    _diagnose(op, groups)
    raise AssertionError("unreachable: _diagnose raises")  # pragma: no cover


def _diagnose(op: str, groups: dict[str, list[torch.Tensor]]) -> None:
    """Raises the error for the first tensor that breaks the dtype/device/layout rules."""
    dtype: torch.dtype | None = None
    first = ""
    for name, items in groups.items():
        for i, t in enumerate(items):
            where = f"'{name}[{i}]'"
            if not t.is_cpu:
                raise BackendUnavailable(
                    f"{op}: {where} is on {t.device}, but this build of fedng has CPU kernels only;"
                    " move the tensors to the CPU or install a CUDA build of fedng"
                )
            if t.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{op}: {where} must be float32 or float64, got {t.dtype}")
            if dtype is None:
                dtype, first = t.dtype, where
            elif t.dtype != dtype:
                raise TypeError(
                    f"{op}: all tensors must share one dtype; {first} is {dtype} but {where} is"
                    f" {t.dtype}"
                )
            if not t.is_contiguous():
                raise ValueError(
                    f"{op}: {where} must be contiguous (row-major), got strides {t.stride()}"
                    f" for shape {tuple(t.shape)}; call .contiguous() first"
                )


def square_sizes(op: str, name: str, items: list[torch.Tensor]) -> list[int]:
    """Checks that every tensor is a square matrix; returns the sizes n_i."""
    shapes = [t.shape for t in items]
    if not all(len(s) == 2 and s[0] == s[1] for s in shapes):
        for i, s in enumerate(shapes):
            if len(s) != 2 or s[0] != s[1]:
                raise ValueError(
                    f"{op}: '{name}[{i}]' must be a square matrix [n, n], got {list(s)}"
                )
    return [s[0] for s in shapes]


def out_list(
    op: str,
    out: object,
    like: list[torch.Tensor],
    like_name: str,
    shapes: list[tuple[int, ...]] | None = None,
) -> list[torch.Tensor]:
    """Validates a caller-provided `out` list (or allocates one): shapes, dtype, no aliasing."""
    want = shapes if shapes is not None else [tuple(t.shape) for t in like]
    dtype = like[0].dtype if like else torch.float32
    if out is None:
        return [torch.empty(s, dtype=dtype) for s in want]
    outs = tensor_list(op, "out", out, length=len(want))
    dtype_code(op, {"out": outs})
    for i, (o, s) in enumerate(zip(outs, want, strict=True)):
        if tuple(o.shape) != tuple(s) or o.dtype != dtype:
            raise ValueError(
                f"{op}: 'out[{i}]' must be {dtype} of shape {list(s)},"
                f" got {o.dtype} of shape {list(o.shape)}"
            )
    no_alias(op, "out", outs, like_name, like)
    return outs


def shape(op: str, name: str, i: int, t: torch.Tensor, expected: tuple[int | None, ...]) -> None:
    """Checks `t.shape` against `expected`, where None matches any size."""
    ok = t.dim() == len(expected) and all(
        e is None or e == s for e, s in zip(expected, t.shape, strict=True)
    )
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{op}: '{name}[{i}]' must have shape {want}, got {list(t.shape)}")


def per_item(
    op: str,
    name: str,
    value: object,
    n: int,
    *,
    positive: bool = False,
    nonnegative: bool = False,
) -> list[float]:
    """Broadcasts a scalar or checks a per-matrix sequence of finite floats.

    `value` is typed `object`: callers declare `float | Sequence[float]`, but a user may pass
    anything (a CPU tensor is accepted too), and every case is checked here at run time.
    """
    if isinstance(value, torch.Tensor):
        if not value.is_cpu:
            raise TypeError(
                f"{op}: '{name}' must be a float or a CPU tensor, got a {value.device} tensor"
            )
        value = value.detach().double().reshape(-1).tolist() if value.dim() else value.item()
    if isinstance(value, (str, bytes)):
        raise TypeError(
            f"{op}: '{name}' must be a float or a list of floats, got {type(value).__name__}"
        )
    if isinstance(value, (int, float)):
        values = [float(value)] * n
    elif isinstance(value, Sequence):
        values = [float(v) for v in value]
        if len(values) != n:
            raise ValueError(
                f"{op}: '{name}' must be a scalar or have {n} values, got {len(values)}"
            )
    else:
        raise TypeError(
            f"{op}: '{name}' must be a float or a list of floats, got {type(value).__name__}"
        )
    for v in values:
        if not math.isfinite(v):
            raise ValueError(f"{op}: '{name}' must be finite, got {v}")
        if positive and v <= 0:
            raise ValueError(f"{op}: '{name}' must be > 0, got {v}")
        if nonnegative and v < 0:
            raise ValueError(f"{op}: '{name}' must be >= 0, got {v}")
    return values


def finite_scalar(op: str, name: str, value: float) -> float:
    """Checks a finite float scalar."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: '{name}' must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{op}: '{name}' must be finite, got {value}")
    return float(value)


def ptrs(items: list[torch.Tensor]) -> list[int]:
    """Raw data pointers, taken only after validation."""
    return [t.data_ptr() for t in items]


def no_alias(
    op: str, a_name: str, a: list[torch.Tensor], b_name: str, b: list[torch.Tensor]
) -> None:
    """Tensors written in place (`a`) must not overlap each other or the inputs `b` in memory.

    Byte ranges are compared, so partial overlaps (slices of one storage) are caught too.
    """
    spans = []  # (start, end, written, name, index)
    for written, name, items in ((True, a_name, a), (False, b_name, b)):
        for i, t in enumerate(items):
            if t.numel():
                start = t.data_ptr()
                spans.append((start, start + t.numel() * t.element_size(), written, name, i))
    spans.sort()
    # Sweep by start address, remembering the open span that reaches furthest.
    reach: tuple[int, int, bool, str, int] | None = None
    for span in spans:
        if reach is not None and span[0] < reach[1] and (span[2] or reach[2]):
            w, o = (span, reach) if span[2] else (reach, span)
            raise ValueError(
                f"{op}: '{o[3]}[{o[4]}]' overlaps in memory with '{w[3]}[{w[4]}]', and"
                f" '{w[3]}' is written in place; pass separate tensors (e.g. .clone())"
            )
        if reach is None or span[1] > reach[1] or (span[1] == reach[1] and span[2]):
            reach = span
