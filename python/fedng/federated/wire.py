"""A real byte serialization of named arrays: what a client or server would put on the wire.

Wire format, version 3 (little-endian):

    b"FNGB" | version: u8 | header length: u32 | header: UTF-8 JSON | blob | crc32: u32

The trailing CRC-32 covers every byte before it (prefix, header and blob): any 1-, 2- or 3-bit
error and any burst of up to 32 bits is detected on decode. It guards against corruption, not
against a malicious sender (who can recompute it); `fedng.federated.validate` handles those.
Versions 1 (no checksum) and 2 (no writer) are no longer accepted.

The header holds `writer`, `meta` (JSON scalars, lists and dicts of scalars) and one entry per
array: `[name, dtype, layout, shape, nbytes]`. The blob is the arrays' raw bytes in header order.
`writer` is `[protocol, fedng version]` of the fedng that wrote the bytes: `PROTOCOL` numbers
what payloads mean (array names, metadata, curvature layouts, shared-seed draws) and changes
whenever two fedng builds would disagree on it, so a payload from a peer that speaks another
protocol, or names none, is refused with one reason naming both sides, instead of being
misread; the version string is only reported.
`dtype` is one of `fp32`, `fp64`, `bf16`, `fp16`, `i64`, `i8`; `layout` is `dense`, or `sym` for a
symmetric matrix [n, n] stored as its packed lower triangle (n (n + 1) / 2 values, row by row;
`fedng.curvature.spec.pack_triangle`).

Byte accounting everywhere in `fedng.federated` is `len(pack(...))`: the real size of these bytes.

Every decoding failure, whatever its cause, is raised as one exception type, `PayloadError`
(a `ValueError`), with a one-line reason.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedng._backend import native as _native
from fedng._typing import Arrays
from fedng.curvature.spec import pack_triangle, unpack_triangle

MAGIC = b"FNGB"
VERSION = 3
"""The frame's format version (the prefix byte)."""
PROTOCOL = 1
"""The message protocol this fedng speaks (the header's `writer`): bump it with any change that
makes payloads of one fedng build mean something else to another."""
WRITER: tuple[int, str] = (PROTOCOL, _native.__version__)
"""(protocol, fedng version) stamped on every payload this process writes."""
_PREFIX = struct.Struct("<4sBI")
_CRC = struct.Struct("<I")
MAX_HEADER_BYTES = 1 << 24
"""The largest JSON header a payload may declare (16 MiB)."""


class PayloadError(ValueError):
    """Bytes that do not decode to a valid payload; the message is the one-line reason."""


WIRE_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp64": torch.float64,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "i64": torch.int64,
    "i8": torch.int8,
}
"""Wire dtype names and the torch dtype each decodes to."""

FLOAT_WIRE: tuple[str, ...] = ("fp32", "bf16", "fp16")
"""The float wire dtypes a payload may be sent in (configs choose among these)."""

FLOAT_DTYPES: tuple[torch.dtype, ...] = tuple(WIRE_DTYPES[n] for n in FLOAT_WIRE)
"""The torch dtypes of `FLOAT_WIRE` (what a received float payload may hold)."""

_NAME_OF = {v: k for k, v in WIRE_DTYPES.items()}


def wire_dtype(name: str, arg: str = "dtype") -> torch.dtype:
    """Maps a wire dtype name (`fp32`, `bf16`, `fp16`, `fp64`, `i64`, `i8`) to a torch dtype.

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
        arrays: name -> tensor (float32/64, bfloat16, float16, int64 or int8; any shape).
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
    header = _header(meta, entries)
    body = b"".join([_PREFIX.pack(MAGIC, VERSION, len(header)), header, *chunks])
    return body + _CRC.pack(zlib.crc32(body))


def _header(meta: Mapping[str, Any] | None, entries: list[list[Any]]) -> bytes:
    return json.dumps(
        {"writer": list(WRITER), "meta": dict(meta or {}), "arrays": entries},
        separators=(",", ":"),
        allow_nan=True,
    ).encode("utf-8")


def packed_size(
    arrays: Iterable[tuple[str, torch.dtype, Sequence[int]]],
    *,
    meta: Mapping[str, Any] | None = None,
    symmetric: Iterable[str] = (),
) -> int:
    """`len(pack(...))` of arrays given by name, wire dtype and shape, without serializing them
    (a server sizes every message it sends: its bytes are counted, not copied).

    Args:
        arrays: (name, the dtype it travels in, shape), in `pack`'s order.
        meta: the JSON metadata.
        symmetric: names of square matrices that travel as packed triangles.

    Returns:
        The exact byte count `pack` gives the same arrays (in those dtypes) and metadata.

    Raises:
        TypeError: a dtype that is not a wire dtype.
    """
    sym = set(symmetric)
    entries: list[list[Any]] = []
    blob = 0
    for name, dt, shape in arrays:
        if dt not in _NAME_OF:
            raise TypeError(f"packed_size: array {name!r} has dtype {dt}, not a wire dtype")
        dims = [int(x) for x in shape]
        n = dims[0] * (dims[0] + 1) // 2 if name in sym else math.prod(dims)
        nbytes = n * dt.itemsize
        entries.append([name, _NAME_OF[dt], "sym" if name in sym else "dense", dims, nbytes])
        blob += nbytes
    return _PREFIX.size + len(_header(meta, entries)) + blob + _CRC.size


def unpack(data: bytes) -> Packed:
    """Decodes bytes made by `pack`, checking the checksum and every size before reading.

    Args:
        data: the bytes.

    Returns:
        `Packed(arrays, meta, symmetric)`; arrays keep their wire dtype.

    Raises:
        PayloadError: the bytes are truncated, corrupt, or not a fedng payload (the only
            exception this raises).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"unpack: 'data' must be bytes, got {type(data).__name__}")
    buf = bytes(data)
    if len(buf) < _PREFIX.size + _CRC.size:
        raise PayloadError(
            f"unpack: {len(buf)} bytes is shorter than the {_PREFIX.size + _CRC.size}-byte frame"
        )
    magic, version, hlen = _PREFIX.unpack_from(buf)
    if magic != MAGIC:
        raise PayloadError(f"unpack: not a fedng payload (magic {magic!r})")
    body = buf[: -_CRC.size]
    (crc,) = _CRC.unpack_from(buf, len(body))
    intact = zlib.crc32(body) == crc
    if version != VERSION and intact:  # a flipped version byte is corruption, said below
        who = "an older" if version < VERSION else "a newer"
        raise PayloadError(
            f"unpack: wire format version {version} (written by {who} fedng), this fedng"
            f" {WRITER[1]} reads version {VERSION}"
        )
    if not intact:
        other = "" if version == VERSION else f", or of wire format version {version}"
        raise PayloadError(f"unpack: checksum mismatch (corrupt or truncated payload{other})")
    try:
        return _decode(body, hlen)
    except PayloadError:
        raise
    except Exception as err:  # any other failure is a malformed payload
        raise PayloadError(f"unpack: malformed payload ({type(err).__name__}: {err})") from err


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(entry: object) -> tuple[str, torch.dtype, str, list[int], int]:
    """One header entry `[name, dtype, layout, shape, nbytes]`, type-checked."""
    if not isinstance(entry, list) or len(entry) != 5:
        raise PayloadError(f"unpack: array entry must be a list of 5 items, got {entry!r:.80}")
    name, dname, layout, shape, nbytes = entry
    if not isinstance(name, str) or not isinstance(dname, str) or dname not in WIRE_DTYPES:
        raise PayloadError(f"unpack: bad array name or dtype in entry {entry!r:.80}")
    if layout not in ("dense", "sym"):
        raise PayloadError(f"unpack: {name!r} has unknown layout {layout!r:.40}")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise PayloadError(f"unpack: {name!r} has a bad shape {shape!r:.80}")
    if not _is_int(nbytes) or nbytes < 0:
        raise PayloadError(f"unpack: {name!r} has a bad byte count {nbytes!r:.40}")
    if layout == "sym" and (len(shape) != 2 or shape[0] != shape[1]):
        raise PayloadError(f"unpack: symmetric {name!r} has non-square shape {shape}")
    return name, WIRE_DTYPES[dname], layout, shape, nbytes


def _check_writer(writer: object) -> None:
    """Refuses a payload whose writer speaks another protocol than `PROTOCOL`, or names none."""
    here = f"this fedng {WRITER[1]} speaks protocol {PROTOCOL}"
    if writer is None:
        raise PayloadError(f"unpack: the payload names no writer (fedng protocol); {here}")
    if (
        not isinstance(writer, list)
        or len(writer) != 2
        or not _is_int(writer[0])
        or not isinstance(writer[1], str)
    ):
        raise PayloadError(f"unpack: bad writer {writer!r:.80}; {here}")
    protocol, version = writer
    if protocol != PROTOCOL:
        raise PayloadError(
            f"unpack: written by fedng {version:.40} speaking protocol {protocol!r:.20}; {here}"
        )


def _decode(buf: bytes, hlen: int) -> Packed:
    """The header and arrays of a checksummed frame (without its checksum)."""
    start = _PREFIX.size + hlen
    if hlen > MAX_HEADER_BYTES or start > len(buf):
        raise PayloadError(f"unpack: header of {hlen} bytes runs past the end ({len(buf)} bytes)")
    try:
        header = json.loads(buf[_PREFIX.size : start].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise PayloadError(f"unpack: corrupt header ({type(err).__name__})") from err
    if not isinstance(header, dict):
        raise PayloadError("unpack: the header must be a JSON object")
    _check_writer(header.get("writer"))
    if set(header) != {"writer", "meta", "arrays"}:
        raise PayloadError(
            "unpack: the header must be an object with 'writer', 'meta' and 'arrays'"
        )
    entries, meta = header["arrays"], header["meta"]
    if not isinstance(entries, list) or not isinstance(meta, dict):
        raise PayloadError("unpack: header 'arrays' must be a list and 'meta' an object")
    arrays: Arrays = {}
    sym: set[str] = set()
    pos = start
    for entry in entries:
        name, dt, layout, shape, nbytes = _entry(entry)
        if name in arrays:
            raise PayloadError(f"unpack: array {name!r} appears twice")
        n_items = shape[0] * (shape[0] + 1) // 2 if layout == "sym" else 1
        if layout == "dense":
            for s in shape:
                n_items *= s
        want = n_items * torch.empty((), dtype=dt).element_size()
        if nbytes != want or pos + nbytes > len(buf):
            raise PayloadError(
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
        raise PayloadError(f"unpack: {len(buf) - pos} trailing bytes after the last array")
    return Packed(arrays, meta, frozenset(sym))
