"""`gaussian_sketch_matrix`: the shared-seed Gaussian test matrix Omega, reproducible anywhere."""

from __future__ import annotations

import torch

from fedng import _backend
from fedng.ops import _validate as v

OP = "gaussian_sketch_matrix"
_U64 = 1 << 64
_SERIAL_BELOW = 65536  # entries: the kernel runs one thread below this anyway


def gaussian_sketch_matrix(
    d: int, r: int, seed: int, stream_id: int = 0, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Standard normal matrix from a counter-based RNG (Philox-4x32-10 + inverse normal CDF).

    Entry (i, j) depends only on (seed, stream_id, i, j): the same bits on every call, process,
    thread count and machine, so clients that share a seed build the same Omega without sending
    it, and the leading columns do not change when r grows. One Philox block serves columns 2k
    and 2k + 1 of a row (words 0-1 and 2-3); fedng builds before that change drew a different
    Omega, so every party of a federation must run the same fedng.

    Args:
        d: rows (>= 0).
        r: columns (>= 0).
        seed: 64-bit seed shared by all clients.
        stream_id: 64-bit stream (e.g. the layer index), so layers get independent matrices.
        dtype: float32 or float64.

    Returns:
        Tensor [d, r].
    """
    # One exact-type test per argument on the common path (this op is called once per layer).
    if not (
        type(d) is int
        and type(r) is int
        and type(seed) is int
        and type(stream_id) is int
        and d >= 0
        and r >= 0
        and 0 <= seed < _U64
        and 0 <= stream_id < _U64
    ):
        d, r, seed, stream_id = _checked_ints(d, r, seed, stream_id)
    code = v.FLOAT_DTYPES.get(dtype)
    if code is None:
        raise TypeError(f"{OP}: 'dtype' must be torch.float32 or torch.float64, got {dtype}")
    out = torch.empty(d, r, dtype=dtype)
    if d and r:
        threads = 1 if d * r < _SERIAL_BELOW else _backend.num_threads()
        _backend.native.gaussian_sketch_matrix(
            dtype=code,
            out=out.data_ptr(),
            d=d,
            r=r,
            seed=seed,
            stream_id=stream_id,
            nthreads=threads,
        )
    return out


def _checked_ints(
    d: object, r: object, seed: object, stream_id: object
) -> tuple[int, int, int, int]:
    """The four arguments as plain ints (int subclasses accepted), or the one-line error."""
    for name, val in (("d", d), ("r", r)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{OP}: '{name}' must be an int >= 0, got {val!r}")
    for name, val in (("seed", seed), ("stream_id", stream_id)):
        if isinstance(val, bool) or not isinstance(val, int) or not 0 <= val < _U64:
            raise ValueError(f"{OP}: '{name}' must be an int in [0, 2**64), got {val!r}")
    return int(d), int(r), int(seed), int(stream_id)  # type: ignore[call-overload]
