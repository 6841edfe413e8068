"""fedng.federated.checkpoint: round trip, atomic writes, and clear errors on bad files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from fedng.federated.checkpoint import (
    MAGIC,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    save_model,
    server_state_from_dict,
    server_state_to_dict,
)
from fedng.federated.config import make_configs
from fedng.federated.round import server_init
from hypothesis import given
from hypothesis import strategies as st
from torch import nn


def _state() -> dict[str, object]:
    return {
        "round": 3,
        "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "rng": torch.get_rng_state(),
        "nested": {"a": [1, 2.5, None, "x"], "t": (1, 2), "big": 2**100, "nan": float("nan")},
        "blob": b"\x00\x01",
    }


def test_round_trip(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.pt", _state(), note="hello")
    ck = load_checkpoint(path)
    assert ck.version == 1 and ck.extra == {"note": "hello"}
    assert torch.equal(ck.state["w"], _state()["w"])  # type: ignore[arg-type]
    assert torch.equal(ck.state["rng"], torch.get_rng_state())
    nested = ck.state["nested"]
    assert nested["a"] == [1, 2.5, None, "x"] and nested["t"] == (1, 2)
    assert nested["big"] == 2**100 and nested["nan"] != nested["nan"]
    assert ck.state["blob"] == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind


def test_server_state_round_trip(tmp_path: Path) -> None:
    _, sc = make_configs("fedadam", {"server_lr": 0.3, "beta1": 0.5})
    state, _ = server_init({"w": torch.randn(3, 2), "b": torch.randn(2)}, sc)
    state.meta["reference"] = {"delta_norm": 0.25}
    save_checkpoint(tmp_path / "s.pt", {"server": server_state_to_dict(state)})
    back = server_state_from_dict(load_checkpoint(tmp_path / "s.pt").state["server"])
    assert back.config == state.config and back.round == state.round and back.meta == state.meta
    for a, b in ((back.params, state.params), (back.buffers, state.buffers)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="missing \\['buffers'"):
        server_state_from_dict({"round": 0, "params": {}, "meta": {}, "log": {}, "config": {}})
    bad = {**server_state_to_dict(state), "config": {"algorithm": "nope"}}
    with pytest.raises(CheckpointError, match="bad config"):
        server_state_from_dict(bad)


def test_save_model_loads_into_a_fresh_model(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    save_model(tmp_path / "m.pt", model)
    fresh = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True)
    )


@given(cut=st.integers(0, 10_000))
def test_truncated_file_is_a_one_line_error(
    tmp_path_factory: pytest.TempPathFactory, cut: int
) -> None:
    path = save_checkpoint(tmp_path_factory.mktemp("t") / "c.pt", _state())
    data = path.read_bytes()
    path.write_bytes(data[: cut % len(data)])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


@given(pos=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_any_flipped_bit_is_caught(
    tmp_path_factory: pytest.TempPathFactory, pos: int, bit: int
) -> None:
    path = save_checkpoint(tmp_path_factory.mktemp("f") / "c.pt", _state())
    data = bytearray(path.read_bytes())
    data[pos % len(data)] ^= 1 << bit
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


def test_foreign_version_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "x.pt").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match="not a fedng checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    data = bytearray(save_checkpoint(tmp_path / "v.pt", _state()).read_bytes())
    data[len(MAGIC)] = 9  # the version field
    (tmp_path / "v.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="format version 9"):
        load_checkpoint(tmp_path / "v.pt")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "absent.pt")


def test_a_crash_mid_write_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_checkpoint(tmp_path / "c.pt", {"round": 1})

    def crash(src: object, dst: object) -> None:
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        save_checkpoint(path, {"round": 2, "w": torch.ones(1000)})
    monkeypatch.undo()
    assert load_checkpoint(path).state == {"round": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]

    real_open = open

    class Dying:
        def __init__(self, f: object) -> None:
            self.f = f

        def __enter__(self) -> Dying:
            return self

        def __exit__(self, *a: object) -> None:
            self.f.close()  # type: ignore[attr-defined]

        def write(self, data: bytes) -> int:
            self.f.write(data[: len(data) // 2])  # type: ignore[attr-defined]
            raise KeyboardInterrupt

    def dying_open(p: object, mode: str = "r", *a: object, **k: object) -> object:
        f = real_open(p, mode, *a, **k)  # type: ignore[call-overload]
        return Dying(f) if "w" in mode else f

    monkeypatch.setattr("builtins.open", dying_open)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"round": 3})
    monkeypatch.undo()
    assert load_checkpoint(path).state == {"round": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
