"""In-place diagonal scaling of packed symmetric triangles (LAPACK `slaqsp`), one pass.

Dequantizing an int8 K-FAC factor multiplies every entry (i, j) of its packed triangle by
`s_i s_j`. In torch that takes two gathers over index arrays as long as the payload (~5x the
cost of the fold that follows, on a 670k-parameter MLP); LAPACK's `slaqsp` does it in place in one
pass. It is called from the OpenBLAS library `fedng._backend` loads (scipy-openblas32).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import torch

from fedng._backend import openblas_symbol

_UPPER = ctypes.c_char(b"U")  # a row-major lower triangle is a column-major upper one
_SCOND = ctypes.c_float(0.0)  # below slaqsp's threshold: always scale
_AMAX = ctypes.c_float(1.0)


def _slaqsp() -> Any:
    fn = openblas_symbol("slaqsp_")
    fn.restype = None
    return fn


_FN = _slaqsp()


def scale_packed(vals: torch.Tensor, s: torch.Tensor, tris: Sequence[tuple[int, int, int]]) -> None:
    """`vals[at + p] *= s[sat + i] * s[sat + j]` for every entry p = (i, j) of the packed lower
    triangle (row by row) of each n x n matrix `(at, sat, n)` in `tris`, stored at `vals[at:]`
    with its scales at `s[sat:]`.

    Args:
        vals: contiguous float32 (written in place).
        s: contiguous float32, the scales.
        tris: per triangle (offset in `vals`, offset in `s`, n).

    Raises:
        ValueError: tensors that are not contiguous float32 CPU, or ranges out of bounds.
    """
    ok = all(
        t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu" for t in (vals, s)
    )
    if not ok:
        raise ValueError("scale_packed: expected contiguous float32 CPU tensors")
    nv, ns = vals.numel(), s.numel()
    if any(
        at < 0 or sat < 0 or n < 0 or at + n * (n + 1) // 2 > nv or sat + n > ns
        for at, sat, n in tris
    ):
        raise ValueError("scale_packed: a triangle runs past the arrays")
    vp, sp = vals.data_ptr(), s.data_ptr()
    equed = ctypes.create_string_buffer(2)
    for at, sat, n in tris:
        if n:
            _FN(
                ctypes.byref(_UPPER),
                ctypes.byref(ctypes.c_int(n)),
                ctypes.c_void_p(vp + 4 * at),
                ctypes.c_void_p(sp + 4 * sat),
                ctypes.byref(_SCOND),
                ctypes.byref(_AMAX),
                equed,
            )
