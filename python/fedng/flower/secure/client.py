"""The ClientApp of a secure-aggregation run: fedng's client step behind Flower's `secaggplus_mod`.

The mod runs the SecAgg+ stages and calls this app's `train` only in its "collect masked
vectors" stage, with the legacy FitIns records (`fitins.config`) the server chose; the app
answers a legacy FitRes whose parameters the mod quantizes, masks and sends. Three kinds of
pass per round (`fedng.phase`):

- "range": decode the broadcast, run the client step (DP clipping and distributed noise
  included), keep the update in `Context.state`, send the per-segment exponent histogram; the
  template (names, shapes, curvature metadata: structure, no data) goes in the clear; the
  training loss is summed with the payload (not under DP: it is not noised);
- "main": send the kept update as the scaled vector (scales from the server);
- "probe-range" / "probe": the line-search answers from the kept update, as a histogram (when
  the server has no bound for them) or scaled.

`num_examples` travels in the clear (SecAgg+ weights by it); under distributed DP every client
reports 1 (DP's uniform average).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Scalar, Status, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat

from fedng.federated.algorithms.registry import get_algorithm
from fedng.federated.messages import ClientUpdate, ServerMessage
from fedng.federated.round import client_step
from fedng.flower.client_app import (
    SENT_RECORD,
    TaskFn,
    add_query,
    default_task,
    load_client_state,
    partition_of,
    save_client_state,
    task_setup,
)
from fedng.flower.codec import record_bytes, wire_record
from fedng.flower.secure.vector import (
    ANSWER,
    answer_template,
    main_vector,
    payload_parts,
    range_vector,
)

PHASE = "fedng.phase"
WIRE = "fedng.wire"
SCALES = "fedng.scales"
UNIT_WEIGHT = "fedng.unit-weight"
TEMPLATE = "fedng.template"
RANGE, MAIN, PROBE_RANGE, PROBE = "range", "main", "probe-range", "probe"


def _reply(msg: Message, vector: np.ndarray, n: int, metrics: dict[str, Scalar]) -> Message:
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([vector]), n, metrics)
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


def _scales(config: dict[str, Scalar]) -> list[float]:
    raw = config.get(SCALES)
    if not isinstance(raw, bytes):
        raise ValueError(f"secure pass: '{SCALES}' must be bytes (float64 scales)")
    return [float(x) for x in np.frombuffer(raw, dtype=np.float64)]


def make_secure_client_app(task_fn: TaskFn = default_task) -> ClientApp:
    """A ClientApp (with `secaggplus_mod`) running the run config's algorithm under SecAgg+.

    Args:
        task_fn: builds the task from the run settings (as `make_client_app`).

    Returns:
        The ClientApp; pair it with `make_secure_server_app`.
    """
    app = ClientApp(mods=[secaggplus_mod])
    setup = task_setup(task_fn)
    add_query(app, setup)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        spec, task = setup(context)
        config = compat.recorddict_to_fitins(msg.content, keep_input=True).config
        phase = config.get(PHASE)
        client_config = spec.client_config(task)
        if phase == RANGE:
            cid = partition_of(context, len(task.clients))
            message = ServerMessage.from_bytes(bytes(config[WIRE]))  # type: ignore[arg-type]
            model = task.model_fn(spec.seed)
            update = client_step(
                model, task.clients[cid], message, client_config, load_client_state(context)
            )
            save_client_state(context, update.client_state)
            context.state[SENT_RECORD] = wire_record(update.to_bytes())
            template, arrays = payload_parts(update, metrics=not config.get(UNIT_WEIGHT))
            n = 1 if config.get(UNIT_WEIGHT) else update.num_examples
            return _reply(msg, range_vector(template, arrays), n, {TEMPLATE: template.to_json()})
        if SENT_RECORD not in context.state.array_records:
            raise ValueError(f"secure pass {phase!r}: this node sent no update this round")
        sent = ClientUpdate.from_bytes(record_bytes(context.state.array_records[SENT_RECORD]))
        n = 1 if config.get(UNIT_WEIGHT) else sent.num_examples
        if phase == MAIN:
            template, arrays = payload_parts(sent, metrics=not config.get(UNIT_WEIGHT))
            vec, _ = main_vector(template, arrays, _scales(config))
            return _reply(msg, vec, n, {})
        if phase in (PROBE_RANGE, PROBE):
            probe = ServerMessage.from_bytes(bytes(config[WIRE]))  # type: ignore[arg-type]
            answer = get_algorithm(client_config.algorithm).answer_probe(sent, probe)
            vals = next(iter(answer.extras.values())).reshape(-1, 2)
            tpl = answer_template(vals.shape[0])
            if phase == PROBE_RANGE:
                return _reply(msg, range_vector(tpl, {ANSWER: vals}), n, {})
            vec, _ = main_vector(tpl, {ANSWER: vals}, _scales(config))
            return _reply(msg, vec, n, {})
        raise ValueError(f"secure pass: unknown '{PHASE}' {phase!r}")

    return app
