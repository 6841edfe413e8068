"""A real byte serialization of named arrays: what a client or server would put on the wire.

Wire format (little-endian):

    b"FNGB" | version: u8 | header length: u32 | header: UTF-8 JSON | blob

The header holds `meta` (JSON scalars, lists and dicts of scalars) and one entry per array:
`[name, dtype, layout, shape, nbytes]`. The blob is the arrays' raw bytes in header order.
`dtype` is one of `fp32`, `fp64`, `bf16`, `fp16`, `i64`; `layout` is `dense`, or `sym` for a
symmetric matrix [n, n] stored as its packed lower triangle (n (n + 1) / 2 values, row by row;
`fedng.curvature.spec.pack_triangle`).

Byte accounting everywhere in `fedng.federated` is `len(pack(...))`: the real size of these bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedng._typing import Arrays
from fedng.curvature.spec import pack_triangle, unpack_triangle

MAGIC = b"FNGB"
VERSION = 1
_PREFIX = struct.Struct("<4sBI")

WIRE_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp64": torch.float64,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "i64": torch.int64,
}
"""Wire dtype names and the torch dtype each decodes to."""

FLOAT_WIRE: tuple[str, ...] = ("fp32", "bf16", "fp16")
"""The float wire dtypes a payload may be sent in (configs choose among these)."""

FLOAT_DTYPES: tuple[torch.dtype, ...] = tuple(WIRE_DTYPES[n] for n in FLOAT_WIRE)
"""The torch dtypes of `FLOAT_WIRE` (what a received float payload may hold)."""

_NAME_OF = {v: k for k, v in WIRE_DTYPES.items()}


def wire_dtype(name: str, arg: str = "dtype") -> torch.dtype:
    """Maps a wire dtype name (`fp32`, `bf16`, `fp16`, `fp64`, `i64`) to a torch dtype.

    Raises:
        ValueError: naming `arg` when `name` is not a wire dtype.
    """
    if name not in WIRE_DTYPES:
        raise ValueError(f"'{arg}' must be one of {sorted(WIRE_DTYPES)}, got {name!r}")
    return WIRE_DTYPES[name]


@dataclass(frozen=True)
class Packed:
    """Decoded bytes.

    Attributes:
        arrays: name -> tensor in its wire dtype; `sym` entries are returned as full [n, n].
        meta: the JSON metadata.
        symmetric: names that travelled as packed triangles.
    """

    arrays: Arrays
    meta: dict[str, Any]
    symmetric: frozenset[str]


def _to_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()


def pack(
    arrays: Mapping[str, torch.Tensor],
    *,
    meta: Mapping[str, Any] | None = None,
    dtype: str | None = None,
    symmetric: Iterable[str] = (),
) -> bytes:
    """Serializes named arrays (and JSON metadata) to bytes.

    Args:
        arrays: name -> tensor (float32/64, bfloat16, float16 or int64; any shape).
        meta: JSON-serializable metadata (scalars, strings, lists, dicts).
        dtype: cast every float array to this wire dtype (`fp32`, `bf16`, `fp16`, `fp64`);
            None keeps each array's own dtype. Integer arrays are never cast.
        symmetric: names of square matrices [n, n] to send as their packed lower triangle.

    Returns:
        The bytes; `len()` of them is the exact payload size.

    Raises:
        TypeError: an array is not a tensor or has an unsupported dtype.
        ValueError: a `symmetric` name is missing or not a square matrix.
    """
    sym = set(symmetric)
    missing = sym - set(arrays)
    if missing:
        raise ValueError(f"pack: 'symmetric' names {sorted(missing)} are not in 'arrays'")
    cast = wire_dtype(dtype) if dtype is not None else None
    entries: list[list[Any]] = []
    chunks: list[bytes] = []
    for name, t in arrays.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"pack: array {name!r} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _NAME_OF:
            raise TypeError(
                f"pack: array {name!r} has dtype {t.dtype}; expected one of"
                f" {sorted(str(d) for d in _NAME_OF)}"
            )
        if cast is not None and t.is_floating_point():
            t = t.to(cast)
        layout = "dense"
        shape = list(t.shape)
        if name in sym:
            if t.dim() != 2 or t.shape[0] != t.shape[1]:
                raise ValueError(
                    f"pack: symmetric array {name!r} must be square [n, n], got {shape}"
                )
            t = pack_triangle(t)
            layout = "sym"
        raw = _to_bytes(t)
        entries.append([name, _NAME_OF[t.dtype], layout, shape, len(raw)])
        chunks.append(raw)
    header = json.dumps(
        {"meta": dict(meta or {}), "arrays": entries}, separators=(",", ":"), allow_nan=True
    ).encode("utf-8")
    return b"".join([_PREFIX.pack(MAGIC, VERSION, len(header)), header, *chunks])


def unpack(data: bytes) -> Packed:
    """Decodes bytes made by `pack`, checking every size before reading.

    Args:
        data: the bytes.

    Returns:
        `Packed(arrays, meta, symmetric)`; arrays keep their wire dtype.

    Raises:
        ValueError: the bytes are truncated, corrupt, or not a fedng payload.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"unpack: 'data' must be bytes, got {type(data).__name__}")
    buf = bytes(data)
    if len(buf) < _PREFIX.size:
        raise ValueError(f"unpack: {len(buf)} bytes is shorter than the {_PREFIX.size}-byte prefix")
    magic, version, hlen = _PREFIX.unpack_from(buf)
    if magic != MAGIC or version != VERSION:
        raise ValueError(f"unpack: not a fedng payload (magic {magic!r}, version {version})")
    start = _PREFIX.size + hlen
    if start > len(buf):
        raise ValueError(f"unpack: header of {hlen} bytes runs past the end ({len(buf)} bytes)")
    try:
        header = json.loads(buf[_PREFIX.size : start].decode("utf-8"))
        entries = header["arrays"]
        meta = header["meta"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"unpack: corrupt header ({err})") from err
    arrays: Arrays = {}
    sym: set[str] = set()
    pos = start
    for entry in entries:
        name, dname, layout, shape, nbytes = entry
        dt = wire_dtype(dname, f"dtype of {name!r}")
        n_items = 1
        for s in shape:
            n_items *= int(s)
        if layout == "sym":
            if len(shape) != 2 or shape[0] != shape[1]:
                raise ValueError(f"unpack: symmetric {name!r} has non-square shape {shape}")
            n_items = shape[0] * (shape[0] + 1) // 2
        elif layout != "dense":
            raise ValueError(f"unpack: {name!r} has unknown layout {layout!r}")
        want = n_items * torch.empty((), dtype=dt).element_size()
        if nbytes != want or pos + nbytes > len(buf):
            raise ValueError(
                f"unpack: {name!r} declares {nbytes} bytes, expected {want}, with"
                f" {len(buf) - pos} bytes left"
            )
        raw = bytearray(buf[pos : pos + nbytes])
        pos += nbytes
        flat = (
            torch.frombuffer(raw, dtype=torch.uint8).view(dt)
            if nbytes
            else torch.empty(0, dtype=dt)
        )
        if layout == "sym":
            arrays[name] = unpack_triangle(flat, shape[0], dt)
            sym.add(name)
        else:
            arrays[name] = flat.reshape(shape)
    if pos != len(buf):
        raise ValueError(f"unpack: {len(buf) - pos} trailing bytes after the last array")
    return Packed(arrays, meta, frozenset(sym))
