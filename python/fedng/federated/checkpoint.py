"""Checkpoints that survive a crash: atomic, versioned and verified on load.

File format, version 1 (little-endian)::

    b"FNGCKPT\\n" | version: u32 | payload length: u64 | sha256(payload): 32 bytes | payload

The payload is `torch.save({"state": ..., "extra": ...})`, read back with
`torch.load(weights_only=True)` (tensors, numbers, strings, lists, tuples and dicts only: loading a
checkpoint runs no pickled code). A file that is truncated, bit-flipped, of another version or not
a checkpoint at all raises `CheckpointError` with a one-line reason.

Every write goes to a temporary file in the same folder, is flushed and fsync'ed, and only then
`os.replace`d over the target (atomic on POSIX and Windows): a crash at any point leaves either the
previous checkpoint or the new one, never a mix. The folder is fsync'ed too (where the OS allows),
so the rename itself survives a power loss.

`server_state_to_dict` / `server_state_from_dict` turn the federated server's whole state
(`ServerState`: round, parameters, algorithm buffers and meta, config) into checkpointable plain
data; the simulator and the Flower strategy both store it this way.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedng._typing import Arrays
from fedng.federated.config.common import ServerConfig
from fedng.federated.messages import ServerState

MAGIC = b"FNGCKPT\n"
VERSION = 1
_HEAD = struct.Struct("<8sIQ32s")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message is the one-line reason."""


@dataclass
class Checkpoint:
    """A verified checkpoint.

    Attributes:
        path: where it was read from.
        version: its format version.
        state: the `state` mapping given to `save_checkpoint`.
        extra: the keyword arguments given to `save_checkpoint`.
    """

    path: Path
    version: int
    state: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


def atomic_write(path: str | Path, data: bytes) -> Path:
    """Writes `data` to `path` atomically: temp file in the same folder, fsync, `os.replace`.

    Args:
        path: the target file (its folder is created if missing).
        data: the bytes.

    Returns:
        The target path.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves the previous file as it was
        raise
    _fsync_dir(target.parent)
    return target


def _fsync_dir(folder: Path) -> None:
    """fsyncs a folder so a rename inside it is durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    with contextlib.suppress(OSError):
        os.fsync(fd)
    os.close(fd)


def encode_checkpoint(state: Mapping[str, Any], **extra: Any) -> bytes:
    """The bytes `save_checkpoint` writes (header + payload)."""
    buf = io.BytesIO()
    torch.save({"state": dict(state), "extra": extra}, buf)
    payload = buf.getvalue()
    return _HEAD.pack(MAGIC, VERSION, len(payload), hashlib.sha256(payload).digest()) + payload


def decode_checkpoint(
    data: bytes, where: str = "checkpoint"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Inverse of `encode_checkpoint`: (state, extra), verified.

    Raises:
        CheckpointError: bad magic, another version, truncated or corrupt payload.
    """
    if len(data) < _HEAD.size:
        raise CheckpointError(
            f"{where}: truncated ({len(data)} bytes, shorter than the {_HEAD.size}-byte header)"
        )
    magic, version, length, digest = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise CheckpointError(f"{where}: not a fedng checkpoint (bad magic {magic!r})")
    if version != VERSION:
        raise CheckpointError(
            f"{where}: format version {version}, this fedng reads version {VERSION}"
        )
    payload = data[_HEAD.size :]
    if len(payload) != length:
        raise CheckpointError(
            f"{where}: truncated or padded (payload {len(payload)} bytes, header says {length})"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{where}: checksum mismatch (the file is corrupt)")
    try:
        obj = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except Exception as err:  # a verified payload that still does not load: say why, one line
        raise CheckpointError(
            f"{where}: payload does not load ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("state"), dict):
        raise CheckpointError(f"{where}: payload is not a checkpoint dict")
    return obj["state"], dict(obj.get("extra") or {})


def save_checkpoint(path: str | Path, state: Mapping[str, Any], **extra: Any) -> Path:
    """Writes a checkpoint atomically (see the module docstring).

    Args:
        path: the checkpoint file.
        state: plain data: tensors, numbers, strings, bytes, and lists / tuples / dicts of them.
        **extra: more plain data stored beside `state` (e.g. a description of the run).

    Returns:
        The path written.
    """
    return atomic_write(path, encode_checkpoint(state, **extra))


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Reads and verifies a checkpoint written by `save_checkpoint`.

    Raises:
        CheckpointError: a missing, truncated, corrupt or foreign file (one line, with the path).
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as err:
        raise CheckpointError(f"checkpoint {str(p)!r}: cannot read ({err.strerror})") from None
    state, extra = decode_checkpoint(data, f"checkpoint {str(p)!r}")
    return Checkpoint(p, VERSION, state, extra)


def save_model(path: str | Path, model: nn.Module) -> Path:
    """Writes `model.state_dict()` atomically with `torch.save`; read it back with
    `model.load_state_dict(torch.load(path))`."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return atomic_write(path, buf.getvalue())


def _clone(arrays: Arrays) -> Arrays:
    return {k: v.detach().clone() for k, v in arrays.items()}


def server_state_to_dict(state: ServerState[ServerConfig]) -> dict[str, Any]:
    """The server's whole state as checkpointable plain data (tensors cloned)."""
    return {
        "round": state.round,
        "params": _clone(state.params),
        "buffers": _clone(state.buffers),
        "meta": state.meta,
        "log": state.log,
        "config": state.config.to_dict(),
    }


def server_state_from_dict(d: Mapping[str, Any]) -> ServerState[ServerConfig]:
    """Inverse of `server_state_to_dict`.

    Raises:
        CheckpointError: a missing key or a config this fedng does not accept.
    """
    missing = sorted({"round", "params", "buffers", "meta", "log", "config"} - set(d))
    if missing:
        raise CheckpointError(f"server state: missing {missing}")
    try:
        config = ServerConfig.from_dict(dict(d["config"]))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"server state: bad config ({err})") from None
    return ServerState(
        round=int(d["round"]),
        params=dict(d["params"]),
        config=config,
        buffers=dict(d["buffers"]),
        meta=dict(d["meta"]),
        log=dict(d["log"]),
    )
