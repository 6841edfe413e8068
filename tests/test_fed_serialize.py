"""Wire format: exact round trips, packed triangles, byte accounting = len(actual bytes)."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import torch
from _fed import blobs_task
from fedng.curvature.spec import pack_triangle, unpack_triangle
from fedng.federated.config import make_configs
from fedng.federated.messages import ClientUpdate, ServerMessage
from fedng.federated.simulator import simulate
from fedng.federated.wire import PROTOCOL, VERSION, WRITER, PayloadError, pack, unpack


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
    assert len(data) == 9 + hlen + 21 * 2 + 10 * 2 + 4  # + the CRC-32 trailer


def test_triangle_layout_is_the_curvature_one() -> None:
    """`sym` arrays travel as `fedng.curvature.spec.pack_triangle` (row by row) and come back
    whole."""
    s = torch.randn(4, 4)
    s = s + s.T
    v = pack_triangle(s)
    assert v.shape == (10,)
    assert torch.equal(unpack_triangle(v, 4, v.dtype), s)
    data = pack({"s": s}, symmetric=["s"])
    assert data[:-4].endswith(v.numpy().tobytes())  # before the CRC-32 trailer
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
    blocks = sum(isinstance(m, torch.nn.Linear) for m in task.model_fn(0).modules())
    for rec in h.rounds[1:]:
        # the summable aggregation's second phase: two scalars per block from each client
        replies = [
            ClientUpdate(
                cid,
                rec.round - 1,
                {},
                task.clients[cid].num_examples,
                extras={"line_search": torch.zeros(blocks, 2)},
                meta={"phase": "line_search"},
            )
            for cid in rec.participants
        ]
        probed = bool(rec.server_log.get("probe_answered"))
        assert probed == (algo == "fedng" and rec.round > 0)
        extra_up = sum(len(r.to_bytes()) for r in replies) if probed else 0
        assert rec.bytes_up == sum(sent[rec.round - 1]) + extra_up
        assert rec.bytes_down % len(rec.participants) == 0
        cum += rec.bytes_up + rec.bytes_down
        assert rec.cum_bytes == cum
    if algo == "fedng":
        assert h.rounds[2].bytes_down > h.rounds[1].bytes_down  # the preconditioner after round 0


def _frame(header: bytes, body: bytes = b"", version: int = VERSION) -> bytes:
    """A frame with a valid checksum around any header and body."""
    data = struct.pack("<4sBI", b"FNGB", version, len(header)) + header + body
    return data + struct.pack("<I", zlib.crc32(data))


def _signed(header: bytes, writer: object = WRITER) -> bytes:
    """`header` (a JSON object starting with "meta") with a `writer` entry in front."""
    return header.replace(b'{"meta"', b'{"writer":' + json.dumps(writer).encode() + b',"meta"', 1)


@pytest.mark.parametrize(
    "header",
    [
        b"[]",
        b'{"meta":{},"arrays":{}}',
        b'{"meta":[],"arrays":[]}',
        b'{"meta":{},"arrays":[],"x":1}',
        b'{"meta":{},"arrays":[["a","fp32","dense",[2],8,9]]}',
        b'{"meta":{},"arrays":[[1,"fp32","dense",[2],8]]}',
        b'{"meta":{},"arrays":[["a","fp99","dense",[2],8]]}',
        b'{"meta":{},"arrays":[["a","fp32","weird",[2],8]]}',
        b'{"meta":{},"arrays":[["a","fp32","dense",[true],4]]}',
        b'{"meta":{},"arrays":[["a","fp32","dense",[2.0],8]]}',
        b'{"meta":{},"arrays":[["a","fp32","dense",[-2],-8]]}',
        b'{"meta":{},"arrays":[["a","fp32","dense",[2],"8"]]}',
        b'{"meta":{},"arrays":[["a","fp32","sym",[2,3],24]]}',
        b'{"meta":{},"arrays":[["a","fp32","dense",[100000000000],400000000000]]}',
        b'{"meta":{},"arrays":[["a","fp32","dense",[1],4],["a","fp32","dense",[1],4]]}',
        b"[" * 100000 + b"]" * 100000,
        b"\xff\xfe",
    ],
)
def test_malformed_header_raises_payload_error(header: bytes) -> None:
    with pytest.raises(PayloadError):
        unpack(_frame(_signed(header), bytes(8)))


def test_checksum_and_frame_errors_are_payload_errors() -> None:
    good = pack({"x": torch.arange(3.0)}, meta={"k": 1})
    assert unpack(good).meta == {"k": 1}
    with pytest.raises(PayloadError, match="checksum"):
        unpack(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(PayloadError, match="version"):
        unpack(_frame(b'{"meta":{},"arrays":[]}', version=1))
    with pytest.raises(PayloadError, match="bytes"):
        unpack(b"1234")
    with pytest.raises(PayloadError):
        unpack("not bytes")  # type: ignore[arg-type]
    short = struct.pack("<4sBI", b"FNGB", VERSION, 1000) + b"{}"
    with pytest.raises(PayloadError, match="header"):
        unpack(short + struct.pack("<I", zlib.crc32(short)))


def test_the_writer_is_stamped_and_checked() -> None:
    """Every payload names its writer (protocol, fedng version); one from another protocol
    (older or newer), with none (a version-2 writer's header), or with a malformed one is
    refused with a reason naming both sides, before anything else in the header is read."""
    good = _signed(b'{"meta":{"k":1},"arrays":[["x","fp32","dense",[2],8]]}')
    assert unpack(_frame(good, bytes(8))).meta == {"k": 1}
    data = pack({"x": torch.arange(3.0)}, meta={"k": 1})
    header = json.loads(data[9 : 9 + struct.unpack_from("<I", data, 5)[0]])
    assert header["writer"] == [PROTOCOL, WRITER[1]] and WRITER[1]
    here = f"this fedng {WRITER[1]} speaks protocol {PROTOCOL}"
    for protocol in (PROTOCOL - 1, PROTOCOL + 1):
        other = _signed(b'{"meta":{},"arrays":[]}', [protocol, "9.9.9"])
        with pytest.raises(PayloadError, match=f"fedng 9.9.9 speaking protocol {protocol}; {here}"):
            unpack(_frame(other))
    with pytest.raises(PayloadError, match=f"names no writer.*{here}"):
        unpack(_frame(b'{"meta":{},"arrays":[]}'))
    for bad in ([PROTOCOL], [str(PROTOCOL), "x"], [True, "x"], [float(PROTOCOL), "x"], {"p": 1}):
        with pytest.raises(PayloadError, match="bad writer"):
            unpack(_frame(_signed(b'{"meta":{},"arrays":[]}', bad)))
    # the writer is judged first: a newer protocol's unknown header keys are not the reason
    newer = _signed(b'{"meta":{},"arrays":[],"more":1}', [PROTOCOL + 1, "9.9.9"])
    with pytest.raises(PayloadError, match="protocol"):
        unpack(_frame(newer))


@pytest.mark.parametrize("version", [1, VERSION - 1, VERSION + 1, 255])
def test_other_frame_versions_are_refused(version: int) -> None:
    """An intact frame of another version names it; a flipped version byte (the checksum no
    longer holds) is reported as corruption that may be another version."""
    data = bytearray(pack({"x": torch.zeros(2)}))
    data[4] = version
    flipped = bytes(data)
    body = bytes(data[:-4])
    data[-4:] = struct.pack("<I", zlib.crc32(body))
    who = "older" if version < VERSION else "newer"
    with pytest.raises(PayloadError, match=f"version {version} \\(written by an? {who} fedng"):
        unpack(bytes(data))
    with pytest.raises(PayloadError, match=f"checksum mismatch .* wire format version {version}"):
        unpack(flipped)


def test_simulator_rejects_a_client_of_another_protocol_and_goes_on() -> None:
    """The server catches the refusal like any undecodable payload: logged with its reason, the
    round goes on with the other clients."""
    task = blobs_task(num_clients=4, n=40)
    cc, sc = make_configs("fedavg", {"local_steps": 4, "lr": 0.1})
    stamp = json.dumps(list(WRITER), separators=(",", ":")).encode()
    old = json.dumps([PROTOCOL + 1, "9.9.9"], separators=(",", ":")).encode()

    def other_writer(r: int, cid: int, data: bytes) -> bytes:
        if cid != 1:
            return data
        hlen = struct.unpack_from("<I", data, 5)[0]
        header = data[9 : 9 + hlen].replace(stamp, old, 1)
        body = struct.pack("<4sBI", b"FNGB", VERSION, len(header)) + header
        body += data[9 + hlen : -4]
        return body + struct.pack("<I", zlib.crc32(body))

    h = simulate(task, cc, sc, rounds=2, participation=1.0, seed=0, tamper_bytes=other_writer)
    for r in h.rounds[1:]:
        assert set(r.rejected) == {"1"}
        assert f"speaking protocol {PROTOCOL + 1}" in r.rejected["1"], r.rejected
