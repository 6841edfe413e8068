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
