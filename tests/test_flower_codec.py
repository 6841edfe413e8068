"""fedng.flower's codec (fedng messages <-> Flower records), the run config, per-node state, and
the one-line error when the flower extra is missing."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

HAS_FLWR = importlib.util.find_spec("flwr") is not None


def test_missing_extra_is_one_line_naming_it() -> None:
    """Without flwr, importing fedng.flower says what to install, in one line."""
    code = (
        "import importlib.metadata as m\n"
        "def missing(name):\n"
        "    raise m.PackageNotFoundError(name)\n"
        "m.version = missing\n"
        "try:\n"
        "    import fedng.flower\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    msg = out.stdout.strip()
    assert "\n" not in msg
    assert "pip install 'fedng[flower]'" in msg and "flwr is not installed" in msg


pytestmark_flwr = pytest.mark.skipif(not HAS_FLWR, reason="needs the flower extra")


@pytestmark_flwr
def test_wrong_flwr_release_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedng.flower import _require

    monkeypatch.setattr(_require.importlib.metadata, "version", lambda name: "1.42.0")
    with pytest.raises(ImportError, match=r"found flwr 1\.42\.0"):
        _require.require_flwr()


def _update(dtype: str = "fp32"):  # type: ignore[no-untyped-def]
    from fedng.federated import ClientUpdate

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=gen)
    return ClientUpdate(
        client_id=3,
        round=2,
        delta={
            "w": torch.randn(4, 3, generator=gen).to(
                torch.bfloat16 if dtype == "bf16" else torch.float32
            )
        },
        num_examples=17,
        curvature={"A": a @ a.T},
        metrics={"train_loss": 0.5, "weird": float("nan")},
        meta={"kind": "x"},
        symmetric=frozenset({"A"}),
    ).seal()


@pytestmark_flwr
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_update_round_trip_keeps_the_simulators_bytes(dtype: str) -> None:
    """encode/decode is the wire format unchanged: same bytes, same nbytes as the simulator's
    `len(update.to_bytes())`; Flower's MetricRecord mirrors num-examples and finite metrics."""
    from fedng.flower.codec import decode_update, encode_update, payload_nbytes, wire_bytes

    upd = _update(dtype)
    content = encode_update(upd)
    assert wire_bytes(content) == upd.to_bytes()
    assert payload_nbytes(content) == upd.nbytes == len(upd.to_bytes())
    back = decode_update(content)
    assert back.nbytes == upd.nbytes and back.to_bytes() == upd.to_bytes()
    assert (
        torch.equal(back.delta["w"], upd.delta["w"])
        and back.delta["w"].dtype == upd.delta["w"].dtype
    )
    metrics = content.metric_records["metrics"]
    assert metrics["num-examples"] == 17 and "weird" not in metrics


@pytestmark_flwr
def test_message_round_trip_and_flower_round_numbers() -> None:
    from fedng.federated import ServerMessage
    from fedng.flower.codec import decode_message, encode_message, payload_nbytes

    msg = ServerMessage(4, "scaffold", {"w": torch.ones(2, 2)}, {"c/w": torch.zeros(2, 2)}).seal()
    content = encode_message(msg)
    assert payload_nbytes(content) == msg.nbytes
    assert content.config_records["config"]["server-round"] == 5
    back = decode_message(content)
    assert back.to_bytes() == msg.to_bytes()


@pytestmark_flwr
def test_records_survive_flowers_own_serialization() -> None:
    """The wire Array goes through Flower's protobuf conversion (what crosses the network)
    byte for byte."""
    from fedng.flower.codec import encode_update, wire_bytes
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

    upd = _update()
    content = encode_update(upd)
    again = recorddict_from_proto(recorddict_to_proto(content))
    assert wire_bytes(again) == upd.to_bytes()


@pytestmark_flwr
@pytest.mark.parametrize("kind", ["none", "two-arrays", "numpy-array", "garbage"])
def test_malformed_records_raise_payload_error(kind: str) -> None:
    import numpy as np
    from fedng.federated.wire import PayloadError
    from fedng.flower.codec import decode_update, wire_record
    from flwr.app import Array, ArrayRecord, RecordDict

    content = {
        "none": RecordDict(),
        "two-arrays": RecordDict(
            {"fedng": ArrayRecord({"wire": Array(np.zeros(2)), "x": Array(np.zeros(1))})}
        ),
        "numpy-array": RecordDict({"fedng": ArrayRecord({"wire": Array(np.zeros(3))})}),
        "garbage": RecordDict({"fedng": wire_record(b"not fedng at all")}),
    }[kind]
    with pytest.raises(PayloadError):
        decode_update(content)


@pytestmark_flwr
def test_client_state_round_trips_in_context_state() -> None:
    """Per-client arrays (any wire dtype, bf16 included) persist exactly in Context.state."""
    from fedng.flower.client_app import load_client_state, save_client_state
    from flwr.app import Context, RecordDict

    ctx = Context(1, 2, {}, RecordDict(), {})
    assert load_client_state(ctx) is None
    state = {"c/w": torch.randn(3, 2).to(torch.bfloat16), "m": torch.arange(4.0)}
    save_client_state(ctx, state)
    back = load_client_state(ctx)
    assert back is not None and set(back) == set(state)
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in state.items())


@pytestmark_flwr
def test_run_config_round_trip_and_errors() -> None:
    from fedng.flower import RunSpec

    spec = RunSpec(
        algorithm="fedprox",
        rounds=4,
        participation=0.5,
        seed=3,
        task_args={"num_clients": 5},
        settings={"prox_mu": 0.2, "lr": 0.1},
    )
    back = RunSpec.from_run_config(spec.to_run_config())
    assert back.settings == spec.settings and back.rounds == 4
    assert back.task_args == {"num_clients": 5, "seed": 3}  # the task seed follows the run's
    client, _ = back.configs()
    assert client.options.to_dict() == {"prox_mu": 0.2} and client.lr == 0.1
    with pytest.raises(ValueError, match="unknown run config key 'lr'"):
        RunSpec.from_run_config({"lr": 0.1})
    with pytest.raises(ValueError, match="participation"):
        RunSpec(participation=0.0)
    with pytest.raises(ValueError, match="unknown setting"):
        RunSpec(algorithm="fedavg", settings={"prox_mu": 0.1}).configs()


@pytestmark_flwr
def test_partition_id_is_checked() -> None:
    from fedng.flower.client_app import partition_of
    from flwr.app import Context, RecordDict

    assert partition_of(Context(1, 2, {"partition-id": 2}, RecordDict(), {}), 3) == 2
    for bad in ({}, {"partition-id": 3}, {"partition-id": "0"}):
        with pytest.raises(ValueError, match="partition-id"):
            partition_of(Context(1, 2, bad, RecordDict(), {}), 3)


@pytestmark_flwr
def test_example_app_config_is_a_valid_run_spec() -> None:
    """examples/flower-digits: its run config (flattened as Flower does) is a valid RunSpec whose
    task has one client per SuperNode the script starts, and its components are the ready-made
    apps (module-level names, as `flwr build` requires)."""
    from pathlib import Path

    import tomllib
    from fedng.flower import RunSpec, apps
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    root = Path(__file__).resolve().parents[1] / "examples" / "flower-digits" / "pyproject.toml"
    app = tomllib.loads(root.read_text())["tool"]["flwr"]["app"]

    def flat(d: dict[str, object], prefix: str = "") -> dict[str, object]:
        out: dict[str, object] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    spec = RunSpec.from_run_config(flat(app["config"]))  # type: ignore[arg-type]
    spec.configs()
    assert spec.task_args["num_clients"] == 3 and not spec.resume
    assert app["components"] == {
        "serverapp": "fedng.flower.apps:server_app",
        "clientapp": "fedng.flower.apps:client_app",
    }
    assert isinstance(apps.server_app, ServerApp) and isinstance(apps.client_app, ClientApp)
