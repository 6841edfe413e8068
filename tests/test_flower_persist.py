"""The Flower server checkpoint (`fedng.flower.persist`): what a checkpoint it cannot use raises."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from _fed import blobs_task
from fedng.federated.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fedng.federated.client.params import get_params
from fedng.federated.config import make_configs
from fedng.federated.report.history import History, RoundRecord
from fedng.federated.round import server_init

pytest.importorskip("flwr", reason="needs the flower extra (Python >= 3.11)")
from fedng.flower.persist import ServerCheckpoint


def _history() -> History:
    return History("blobs", "fedavg", "accuracy", True, 0, {}, {}, {})


def test_a_broadcast_of_an_older_wire_format_is_a_checkpoint_error(tmp_path: Path) -> None:
    """A checkpoint whose stored broadcast is a format-2 frame (an older fedng: no writer) is
    refused as the documented CheckpointError, naming the format, and leaves the caller's
    sampler and history untouched."""
    _, sc = make_configs("fedavg", {})
    state, msg = server_init(get_params(blobs_task(3).model_fn(0)), sc)
    hist = _history()
    hist.rounds.append(RoundRecord(1, 0.5, 1.0, 0.5, 1.0))
    ck = ServerCheckpoint(tmp_path)
    ck.save(state, msg, np.random.default_rng(0), hist, {"x": 1})
    run = load_checkpoint(ck.path).state
    frame = bytes(run["message"])
    _, _, hlen = struct.unpack_from("<4sBI", frame)
    header = json.loads(frame[9 : 9 + hlen])
    header.pop("writer")
    h = json.dumps(header, separators=(",", ":")).encode()
    body = struct.pack("<4sBI", b"FNGB", 2, len(h)) + h + frame[9 + hlen : -4]
    run["message"] = body + struct.pack("<I", zlib.crc32(body))
    save_checkpoint(ck.path, run)
    rng, fresh = np.random.default_rng(7), _history()
    before = rng.bit_generator.state
    with pytest.raises(CheckpointError, match="version 2"):
        ck.restore(rng, fresh, {"x": 1}, 5)
    assert rng.bit_generator.state == before and fresh.rounds == []
