"""fedng messages <-> Flower records, byte for byte the simulator's wire.

A `ServerMessage` or `ClientUpdate` travels as its exact `fedng.federated.wire` bytes (the FNGB
frame with its CRC-32) inside one Flower `Array` of `stype` "fedng.wire" in the `ArrayRecord`
"fedng". Flower chunks and deduplicates it like any array, and every byte count is
`len(wire bytes)`: the same number the in-process simulator logs for the same message. Next to it
go the records Flower's own tooling reads (never trusted by the server, which decodes only the
wire):

    down  {"fedng": ArrayRecord, "config": ConfigRecord{server-round, fedng.round, fedng.algorithm}}
    up    {"fedng": ArrayRecord, "metrics": MetricRecord{num-examples, <finite client metrics>}}

Every decoding failure is a `fedng.federated.wire.PayloadError` with a one-line reason.
"""

from __future__ import annotations

import math

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedng.federated.messages import ClientUpdate, ServerMessage
from fedng.federated.wire import PayloadError

WIRE_RECORD = "fedng"
"""The `ArrayRecord` holding the wire bytes."""
WIRE_ARRAY = "wire"
"""The one `Array` inside it."""
WIRE_STYPE = "fedng.wire"
"""Its serialization type: raw FNGB bytes (no numpy header)."""
CONFIG_RECORD = "config"
METRICS_RECORD = "metrics"
NUM_EXAMPLES = "num-examples"
"""Flower's weighting key (`FedAvg.weighted_by_key`), mirrored from the update for its tooling."""


def wire_record(blob: bytes) -> ArrayRecord:
    """One `ArrayRecord` carrying `blob` unchanged."""
    arr = Array(dtype="u8", shape=(len(blob),), stype=WIRE_STYPE, data=blob)
    return ArrayRecord({WIRE_ARRAY: arr})


def record_bytes(rec: ArrayRecord) -> bytes:
    """The wire bytes of a `wire_record`.

    Raises:
        PayloadError: not exactly one "fedng.wire" array.
    """
    if list(rec.keys()) != [WIRE_ARRAY]:
        raise PayloadError(f"'{WIRE_RECORD}' must hold exactly one array '{WIRE_ARRAY}'")
    arr = rec[WIRE_ARRAY]
    if arr.stype != WIRE_STYPE or not isinstance(arr.data, bytes):
        raise PayloadError(f"'{WIRE_RECORD}/{WIRE_ARRAY}' is not a {WIRE_STYPE} array")
    return arr.data


def wire_bytes(content: RecordDict) -> bytes:
    """The wire bytes a message's content carries.

    Raises:
        PayloadError: no "fedng" ArrayRecord holding exactly one "fedng.wire" array.
    """
    rec = content.array_records.get(WIRE_RECORD)
    if rec is None:
        raise PayloadError(f"no '{WIRE_RECORD}' ArrayRecord in the content")
    return record_bytes(rec)


def encode_message(message: ServerMessage) -> RecordDict:
    """The broadcast as Flower records (Flower numbers rounds from 1, fedng from 0)."""
    config = ConfigRecord(
        {
            "server-round": message.round + 1,
            "fedng.round": message.round,
            "fedng.algorithm": message.algorithm,
        }
    )
    return RecordDict({WIRE_RECORD: wire_record(message.to_bytes()), CONFIG_RECORD: config})


def decode_message(content: RecordDict) -> ServerMessage:
    """The client's side: the broadcast a record carries.

    Raises:
        PayloadError: not a well-formed fedng broadcast.
    """
    return ServerMessage.from_bytes(wire_bytes(content))


def encode_update(update: ClientUpdate) -> RecordDict:
    """A client update as Flower records: the wire bytes, and its metrics for Flower's tooling
    (non-finite ones left out: Flower's MetricRecord is for aggregation)."""
    metrics: dict[str, int | float | list[int] | list[float]] = {NUM_EXAMPLES: update.num_examples}
    metrics.update({k: v for k, v in update.metrics.items() if math.isfinite(v)})
    return RecordDict(
        {WIRE_RECORD: wire_record(update.to_bytes()), METRICS_RECORD: MetricRecord(metrics)}
    )


def decode_update(content: RecordDict) -> ClientUpdate:
    """The server's side: the update a reply carries (`nbytes` = its wire length).

    Raises:
        PayloadError: not a well-formed fedng client update.
    """
    return ClientUpdate.from_bytes(wire_bytes(content))


def payload_nbytes(content: RecordDict) -> int:
    """The wire bytes a record carries, 0 when it carries none (what byte counts report)."""
    try:
        return len(wire_bytes(content))
    except PayloadError:
        return 0
