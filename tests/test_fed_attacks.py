"""Attack simulation (`federated.attacks`), its report (`report.threats`) and the CLI's --robust,
--attack, --attackers and --dp-* flags."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _fed import blobs_task
from fedng.cli import main
from fedng.curvature import KFAC
from fedng.federated.aggregation.stage import decode
from fedng.federated.aggregation.summable import CONTRIB_PREFIX
from fedng.federated.attacks import KRON_RESCALE, NOISE, SCALE, SIGNFLIP, Attack, choose_attackers
from fedng.federated.client import get_params
from fedng.federated.config import make_configs
from fedng.federated.messages import ClientUpdate
from fedng.federated.report import summarize
from fedng.federated.report.threats import record_threats
from fedng.federated.round import client_step, server_init
from fedng.federated.simulator import simulate


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_attackers_are_chosen_by_seed() -> None:
    a = choose_attackers(20, 0.1, 0)
    assert len(a) == 2 and a == choose_attackers(20, 0.1, 0) and a == sorted(set(a))
    assert len(choose_attackers(20, 0.2, 0)) == 4
    assert {tuple(choose_attackers(20, 0.2, s)) for s in range(5)} != {tuple(a)}
    assert choose_attackers(20, 0.0, 0) == [] and len(choose_attackers(3, 0.01, 0)) == 1
    with pytest.raises(ValueError, match="'fraction' must be in"):
        choose_attackers(20, 1.5, 0)
    with pytest.raises(ValueError, match="'kind' must be one of"):
        Attack("flip", frozenset())


def updates() -> list[ClientUpdate]:
    task = blobs_task(num_clients=3, n=30)
    cc, sc = make_configs("fedng", {"local_steps": 3})
    model = task.model_fn(0)
    _, msg = server_init(get_params(model), sc)
    return [client_step(model, c, msg, cc) for c in task.clients]


def norm(x: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in x.values()))


@pytest.mark.parametrize("kind", ["signflip", "scale", "noise", "kron-rescale"])
def test_each_attack_alters_only_the_attackers_uploads(kind: str) -> None:
    honest = updates()
    sent = updates()
    attack = Attack(kind, frozenset({1}), seed=0)
    out = [attack(0, u) for u in sent]
    assert attack.sent == 1
    for j in (0, 2):
        assert all(torch.equal(out[j].delta[k], honest[j].delta[k]) for k in honest[j].delta)
    h, a = honest[1], out[1]
    contrib = [k for k in h.extras if k.startswith(CONTRIB_PREFIX)]
    assert contrib  # FedNG's summable default: the attack alters c_k with the delta
    if kind in ("signflip", "scale"):
        f = SIGNFLIP if kind == "signflip" else SCALE
        for k in h.delta:
            assert torch.allclose(a.delta[k], f * h.delta[k], rtol=1e-6, atol=0)
        for k in contrib:
            assert torch.allclose(a.extras[k], f * h.extras[k], rtol=1e-6, atol=0)
    elif kind == "noise":
        assert norm(a.delta) == pytest.approx(NOISE * norm(h.delta), rel=1e-5)
        fd = {k: a.extras[k] for k in contrib}
        # c_k travels in bf16 (FedNGConfig.contrib_dtype): the attacked one is rounded again
        want = NOISE * norm({k: h.extras[k] for k in contrib})
        assert norm(fd) == pytest.approx(want, rel=2.0**-7)
    else:
        assert all(torch.equal(a.delta[k], h.delta[k]) for k in h.delta)
        assert all(torch.equal(a.extras[k], h.extras[k]) for k in h.extras)
        ch, ca = decode(h), decode(a)
        assert ch is not None and ca is not None
        rh, ra = ch.reps["kfac"], ca.reps["kfac"]
        assert isinstance(rh, KFAC) and isinstance(ra, KFAC)
        for x, y in zip(rh.A, ra.A, strict=True):
            assert torch.allclose(y, KRON_RESCALE * x, rtol=1e-5)
        for x, y in zip(rh.G, ra.G, strict=True):
            assert torch.allclose(y, x / KRON_RESCALE, rtol=1e-5, atol=1e-12)


def test_attack_is_recorded_in_history_and_summary() -> None:
    task = blobs_task(num_clients=4, n=30)
    cc, sc = make_configs("fedavg", {"local_steps": 2, "robust": "median"})
    attack = Attack("scale", frozenset({0, 3}), seed=0)
    h = simulate(task, cc, sc, rounds=2, seed=0, tamper=attack)
    record_threats(h, attack, None)
    assert h.sim["attack"] == {"kind": "scale", "attackers": [0, 3], "sent": 4, "rejected": 0}
    row = summarize("fedavg", [h], None)
    assert row.attack is not None and row.attack["sent"] == 4
    assert any("attack scale by 2 client(s)" in line for line in row.notes())


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--attackers", "0.1"], "--attackers applies only with --attack"),
        (["--attack", "scale", "--attackers", "1"], "must be in [0, 1)"),
        (["--dp-clip", "2"], "--dp-clip applies only with --dp-epsilon"),
        (["--dp-epsilon", "4", "--robust", "median"], "--robust does not combine"),
        (["--dp-epsilon", "0"], "must be > 0"),
        (["--dp-epsilon", "4", "--dp-delta", "1"], "--dp-delta must be in (0, 1)"),
        (["--robust", "mean"], "invalid choice"),
    ],
)
def test_bad_threat_flags_are_one_line_exit_2(
    args: list[str], match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", "--task", "regression", "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err


def test_cli_attack_robust_and_dp_end_to_end(tmp_path: Path) -> None:
    base = ["simulate", "--task", "synthetic", "--clients", "5", "--rounds", "2", "--no-progress"]
    base += ["--algorithms", "fedavg", "--local-steps", "2"]
    assert main([*base, "--robust", "trimmed-mean", "--attack", "signflip", "--attackers",
                 "0.2", "--out", str(tmp_path / "a")]) == 0  # fmt: skip
    row = json.loads((tmp_path / "a" / "summary.json").read_text())["rows"][0]
    assert row["attack"]["kind"] == "signflip" and row["attack"]["sent"] == 2
    assert row["privacy"] is None
    assert main([*base, "--dp-epsilon", "8", "--out", str(tmp_path / "d")]) == 0
    row = json.loads((tmp_path / "d" / "summary.json").read_text())["rows"][0]
    priv = row["privacy"]
    assert priv["rounds"] == 2 and 7.9 < priv["epsilon"] <= 8.0 + 1e-6
    assert priv["noise_multiplier"] > 0 and priv["mode"] == "central"


@pytest.mark.parametrize("given", [[], ["--lr", "0.07"]])
def test_cli_dp_metric_preset_lr_yields_to_an_explicit_lr(
    given: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The metric preset's lr (0.2) applies unless --lr is given; the CLI says what FedNG runs."""
    pytest.importorskip("dp_accounting")
    args = ["simulate", "--task", "synthetic", "--clients", "5", "--rounds", "1", "--no-progress"]
    args += ["--algorithms", "fedng", "--local-steps", "1", "--dp-epsilon", "8"]
    args += ["--dp-curvature-clip", "1", "--set", "fedng.dp_metric=curvature", *given]
    assert main([*args, "--out", str(tmp_path)]) == 0
    hist = json.loads((tmp_path / "history_fedng_seed0.json").read_text())
    want = 0.07 if given else 0.2
    assert hist["client_config"]["lr"] == want
    assert f"FedNG under DP runs with {{'lr': {want}," in capsys.readouterr().err
