"""Wire format: exact round trips, packed triangles, byte accounting = len(actual bytes)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from _fed import blobs_task
from fedng.curvature.spec import pack_triangle, unpack_triangle
from fedng.federated.config import make_configs
from fedng.federated.messages import ClientUpdate, ServerMessage
from fedng.federated.simulator import simulate
from fedng.federated.wire import pack, unpack


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_round_trip_dtypes_and_triangles() -> None:
    a = torch.randn(4, 3)
    s = torch.randn(5, 5)
    s = s + s.T
    arrays = {"a": a, "s": s, "i": torch.arange(7), "e": torch.zeros(0, 2)}
    for dt, tdt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        data = pack(arrays, meta={"x": 1, "name": "n"}, dtype=dt, symmetric=["s"])
        got = unpack(data)
        assert got.meta == {"x": 1, "name": "n"}
        assert got.symmetric == frozenset({"s"})
        assert got.arrays["a"].dtype == tdt
        assert torch.equal(got.arrays["a"], a.to(tdt))
        assert torch.equal(got.arrays["s"], s.to(tdt))
        assert torch.equal(got.arrays["i"], torch.arange(7))
        assert got.arrays["e"].shape == (0, 2)


def test_sizes_are_exact() -> None:
    s = torch.randn(6, 6)
    s = s + s.T
    data = pack({"s": s, "v": torch.randn(10)}, dtype="bf16", symmetric=["s"])
    hlen = struct.unpack_from("<I", data, 5)[0]
    header = json.loads(data[9 : 9 + hlen])
    assert [e[4] for e in header["arrays"]] == [21 * 2, 10 * 2]  # triangle of 6x6, bf16
    assert len(data) == 9 + hlen + 21 * 2 + 10 * 2


def test_triangle_layout_is_the_curvature_one() -> None:
    """`sym` arrays travel as `fedng.curvature.spec.pack_triangle` (row by row) and come back
    whole."""
    s = torch.randn(4, 4)
    s = s + s.T
    v = pack_triangle(s)
    assert v.shape == (10,)
    assert torch.equal(unpack_triangle(v, 4, v.dtype), s)
    data = pack({"s": s}, symmetric=["s"])
    assert data.endswith(v.numpy().tobytes())
    assert torch.equal(unpack(data).arrays["s"], s)


@pytest.mark.parametrize("cut", [3, 20, -1])
def test_corrupt_bytes_raise(cut: int) -> None:
    data = pack({"a": torch.randn(3, 3)})
    with pytest.raises(ValueError):
        unpack(data[:cut])
    with pytest.raises(ValueError):
        unpack(b"XXXX" + data[4:])


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="square"):
        pack({"a": torch.randn(2, 3)}, symmetric=["a"])
    with pytest.raises(ValueError, match="not in"):
        pack({"a": torch.randn(2, 2)}, symmetric=["b"])
    with pytest.raises(ValueError, match="dtype"):
        pack({"a": torch.randn(2)}, dtype="fp8")


def test_update_and_message_round_trip() -> None:
    upd = ClientUpdate(
        3,
        1,
        {"w": torch.randn(2, 2)},
        17,
        curvature={"kfac": torch.randn(5)},
        extras={"dc/w": torch.randn(2, 2)},
        metrics={"loss": 0.5},
        meta={"curv": {"k": 1}},
    ).seal()
    wire = upd.to_bytes()
    assert upd.nbytes == len(wire)
    back = ClientUpdate.from_bytes(wire)
    assert back.nbytes == len(wire)
    assert (back.client_id, back.round, back.num_examples) == (3, 1, 17)
    assert torch.equal(back.delta["w"], upd.delta["w"])
    assert torch.equal(back.extras["dc/w"], upd.extras["dc/w"])
    assert back.meta == {"curv": {"k": 1}}
    s = torch.randn(3, 3)
    msg = ServerMessage(
        2,
        "fedng",
        {"w": torch.randn(2)},
        {"inv/x": s + s.T},
        symmetric=frozenset({"inv/x"}),
        dtype="bf16",
    ).seal()
    got = ServerMessage.from_bytes(msg.to_bytes())
    assert msg.nbytes == len(msg.to_bytes())
    assert torch.equal(got.extras["inv/x"], msg.extras["inv/x"])  # sealed = what clients see
    assert got.extras["inv/x"].dtype == torch.float32


@pytest.mark.parametrize(
    "algo,extra", [("fedavg", {}), ("scaffold", {}), ("fedng", {"payload_dtype": "bf16"})]
)
def test_simulator_bytes_equal_serialized_lengths(algo: str, extra: dict) -> None:
    task = blobs_task()
    sent: dict[int, list[int]] = {}

    def spy(r: int, u: ClientUpdate) -> ClientUpdate:
        sent.setdefault(r, []).append(len(u.to_bytes()))
        return u

    cc, sc = make_configs(algo, {"local_steps": 3, **extra})
    h = simulate(
        task,
        cc,
        sc,
        rounds=3,
        participation=0.5,
        seed=1,
        tamper=spy,
    )
    cum = 0
    for rec in h.rounds[1:]:
        assert rec.bytes_up == sum(sent[rec.round - 1])
        assert rec.bytes_down % len(rec.participants) == 0
        cum += rec.bytes_up + rec.bytes_down
        assert rec.cum_bytes == cum
    if algo == "fedng":
        assert h.rounds[2].bytes_down > h.rounds[1].bytes_down  # the preconditioner after round 0
