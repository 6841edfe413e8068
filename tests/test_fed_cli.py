"""`fedng simulate` end to end: table, JSON and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fedng.cli import main


def test_simulate_writes_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "simulate",
            "--task",
            "regression",
            "--algorithms",
            "fedavg,fedng",
            "--rounds",
            "2",
            "--seeds",
            "0,1",
            "--local-steps",
            "3",
            "--no-progress",
            "--set",
            "fedng.curvature=diag",
            "lr=0.02",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "fedavg" in out and "fedng" in out and "rel_l2" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["label"] for r in summary["rows"]] == ["fedavg", "fedng"]
    hist = json.loads((tmp_path / "history_fedng_seed1.json").read_text())
    assert hist["client_config"]["curvature"] == "diag"
    assert hist["client_config"]["lr"] == 0.02
    assert len(hist["rounds"]) == 3
    for name in ("metric_vs_rounds.png", "metric_vs_bytes.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_simulate_rejects_unknown_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["simulate", "--algorithms", "fedavg", "--set", "fedavg.nope=1", "--no-progress"]) == 2
    )
    assert "unknown setting" in capsys.readouterr().err


def test_shared_setting_goes_to_the_algorithms_that_have_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--set damping=...` configures FedNG and is skipped by FedAvg; `ALGO.key` is strict, and a
    shared key no algorithm has is an error naming the valid keys."""
    args = ["simulate", "--task", "regression", "--rounds", "1", "--no-progress"]
    rc = main(
        [*args, "--algorithms", "fedavg,fedng", "--set", "damping=0.2", "--out", str(tmp_path)]
    )
    assert rc == 0
    assert (
        json.loads((tmp_path / "history_fedng_seed0.json").read_text())["client_config"]["damping"]
        == 0.2
    )
    assert (
        "damping"
        not in json.loads((tmp_path / "history_fedavg_seed0.json").read_text())["client_config"]
    )
    capsys.readouterr()
    assert main([*args, "--algorithms", "fedavg", "--set", "fedavg.damping=0.2"]) == 2
    assert "'damping' is a setting of fedng" in capsys.readouterr().err
    assert main([*args, "--algorithms", "fedavg", "--set", "dampng=0.2"]) == 2
    assert "valid keys" in capsys.readouterr().err
