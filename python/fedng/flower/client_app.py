"""A Flower ClientApp that runs a fedng algorithm's client step on the user's model and data.

The app answers two message types:

- `query`: which fedng client (partition) this node serves, and how many there are, so that the
  server samples clients exactly as `fedng.federated.simulate` does;
- `train`: decodes the broadcast (`codec.decode_message`), runs `fedng.federated.round.client_step`
  on the node's partition, keeps the client's persistent state (FedNG's running curvature,
  SCAFFOLD's control variate) in `Context.state`, and replies with the encoded update;
- `train.probe`: the second summable phase of an algorithm that has one (FedNG's summable
  aggregation: a line search): answers the server's probe from the update this node sent in
  the round (kept in `Context.state` for that purpose, only by such algorithms).

The node's partition is `node_config["partition-id"]` (set by Flower's simulation engine, and by
`flower-supernode --node-config "partition-id=i num-partitions=n"` in deployment). Everything
else comes from the run config (`fedng.flower.runconfig.RunSpec`), so every node and the server
agree on the algorithm, its settings and the seed.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedng._typing import Arrays
from fedng.federated import wire
from fedng.federated.algorithms.base import Algorithm
from fedng.federated.algorithms.registry import get_algorithm
from fedng.federated.messages import ClientUpdate
from fedng.federated.round import client_step
from fedng.federated.tasks.base import FederatedTask
from fedng.flower.codec import decode_message, encode_update, record_bytes, wire_record
from fedng.flower.runconfig import RunSpec

TaskFn = Callable[[RunSpec], FederatedTask]
"""Builds the federated task (the user's model and partitioned data) from the run settings; every
node and the server must get the same task for the same settings."""

STATE_RECORD = "fedng.client_state"
"""The `Context.state` record holding the client's persistent arrays (as fedng wire bytes, so
bf16/fp16 and packed arrays round-trip exactly)."""
QUERY_RECORD = "fedng.client"
"""The record of a `query` reply: {"client-id", "num-clients"}."""
SENT_RECORD = "fedng.sent_update"
"""The `Context.state` record holding the update this node sent in its last round (wire bytes),
kept only by algorithms with a second phase, which answer the server's probe from it."""
PROBE_ACTION = "probe"
"""The ClientApp action of the second phase: message type `train.probe`."""


def has_second_phase(algorithm: str) -> bool:
    """Whether an algorithm answers a second-phase probe (overrides `answer_probe`)."""
    return type(get_algorithm(algorithm)).answer_probe is not Algorithm.answer_probe


def default_task(spec: RunSpec) -> FederatedTask:
    """The fedng task named in the run config (`task`, `task-args`)."""
    return spec.make_task()


def partition_of(context: Context, num_clients: int) -> int:
    """The node's client id, `node_config["partition-id"]`.

    Raises:
        ValueError: missing, not an int, or not in [0, num_clients).
    """
    pid = context.node_config.get("partition-id")
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < num_clients:
        raise ValueError(
            f"node_config 'partition-id' must be an int in [0, {num_clients}), got {pid!r}"
            ' (flower-supernode --node-config "partition-id=<i> num-partitions=<n>")'
        )
    return pid


def load_client_state(context: Context) -> Arrays | None:
    """The client's persistent arrays from `Context.state` (None before its first round)."""
    if STATE_RECORD not in context.state.array_records:
        return None
    return wire.unpack(record_bytes(context.state.array_records[STATE_RECORD])).arrays


def save_client_state(context: Context, arrays: Arrays) -> None:
    """Stores the client's persistent arrays in `Context.state`."""
    context.state[STATE_RECORD] = wire_record(wire.pack(arrays))


Setup = Callable[[Context], tuple[RunSpec, FederatedTask]]
"""(node context) -> the run settings and the task, built once per process and settings."""


def task_setup(task_fn: TaskFn) -> Setup:
    """The run settings and `task_fn`'s task for a node, cached per run config."""
    cache: dict[str, tuple[RunSpec, FederatedTask]] = {}

    def setup(context: Context) -> tuple[RunSpec, FederatedTask]:
        key = repr(sorted(context.run_config.items()))
        if key not in cache:
            spec = RunSpec.from_run_config(context.run_config)
            cache.clear()
            cache[key] = (spec, task_fn(spec))
        return cache[key]

    return setup


def add_query(app: ClientApp, setup: Setup) -> None:
    """Registers the `query` handler: which client (partition) this node serves, of how many."""

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        _, task = setup(context)
        cid = partition_of(context, len(task.clients))
        record = ConfigRecord({"client-id": cid, "num-clients": len(task.clients)})
        return Message(RecordDict({QUERY_RECORD: record}), reply_to=msg)


def make_client_app(task_fn: TaskFn = default_task) -> ClientApp:
    """A ClientApp running the run config's algorithm on `task_fn`'s model and data.

    Args:
        task_fn: builds the task from the run settings (default: the fedng task the run config
            names). It is called once per process and settings (the simulation engine keeps the
            process; a SuperNode starts one per message).

    Returns:
        The ClientApp (assign it at module level, `app = make_client_app(...)`, for a FAB).
    """
    app = ClientApp()
    setup = task_setup(task_fn)
    add_query(app, setup)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        spec, task = setup(context)
        cid = partition_of(context, len(task.clients))
        client_config = spec.client_config(task)
        message = decode_message(msg.content)
        model = task.model_fn(spec.seed)
        update = client_step(
            model, task.clients[cid], message, client_config, load_client_state(context)
        )
        save_client_state(context, update.client_state)
        if has_second_phase(client_config.algorithm):
            context.state[SENT_RECORD] = wire_record(update.to_bytes())
        return Message(encode_update(update), reply_to=msg)

    @app.train(PROBE_ACTION)
    def probe(msg: Message, context: Context) -> Message:
        spec, task = setup(context)
        if SENT_RECORD not in context.state.array_records:
            raise ValueError("train.probe: this node sent no update to answer from")
        sent = ClientUpdate.from_bytes(record_bytes(context.state.array_records[SENT_RECORD]))
        message = decode_message(msg.content)
        reply = get_algorithm(spec.client_config(task).algorithm).answer_probe(sent, message)
        return Message(encode_update(reply), reply_to=msg)

    return app
