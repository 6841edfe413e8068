"""`fedng simulate` end to end: table, JSON and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
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
    assert "flags" in out.splitlines()[2] and "DIVERGED =" in summary["flag_definitions"]
    for row in summary["rows"]:
        assert {
            "final_median",
            "best_median",
            "flags",
            "rejected_updates",
            "diverged_seeds",
        } <= set(row)
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


BAD_ARGS = {
    "alpha zero": (["--alpha", "0"], "--alpha"),
    "alpha not a number": (["--alpha", "x"], "--alpha"),
    "too many clients": (["--clients", "100000"], "--clients"),
    "zero clients": (["--clients", "0"], "--clients"),
    "zero rounds": (["--rounds", "0"], "--rounds"),
    "negative rounds": (["--rounds", "-3"], "--rounds"),
    "participation zero": (["--participation", "0"], "--participation"),
    "participation above one": (["--participation", "1.5"], "--participation"),
    "seeds not integers": (["--seeds", "0,1.5"], "--seeds"),
    "seeds empty": (["--seeds", ","], "--seeds"),
    "threads zero": (["--threads", "0"], "--threads"),
    "lr zero": (["--lr", "0"], "--lr"),
    "beta on digits": (["--beta", "0.5"], "--beta"),
    "alpha on regression": (["--task", "regression", "--alpha", "1"], "--alpha"),
    "unknown task": (["--task", "nope"], "--task"),
}


@pytest.mark.parametrize("name", list(BAD_ARGS))
def test_bad_argument_is_one_line_and_exit_2(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    args, word = BAD_ARGS[name]
    assert main(["simulate", "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert word in err


def test_out_that_is_a_file_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["simulate", "--task", "regression", "--rounds", "1", "--out", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out" in err and "file" in err


def test_synthetic_takes_alpha_zero_and_beta(tmp_path: Path) -> None:
    args = ["simulate", "--task", "synthetic", "--clients", "3", "--alpha", "0", "--beta", "0.5"]
    assert main([*args, "--rounds", "1", "--algorithms", "fedavg", "--no-progress"]) == 0


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("fedng ")


def test_help_shows_defaults_and_where_settings_are(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # no line wrapping inside the help texts
    assert main(["simulate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "(default: 30)" in out and "(default: fedavg,fedng)" in out
    assert "fedng settings" in out


def test_settings_lists_knobs_with_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["settings", "fedprox", "fedng"]) == 0
    out = capsys.readouterr().out
    assert "fedprox:" in out and "prox_mu = " in out
    assert "fedng:" in out and "damping = " in out and "max_num_examples = 1000000" in out
    assert main(["settings", "nope"]) == 2
    assert "unknown algorithm" in capsys.readouterr().err


def _cli_run(out: Path, rounds: int, *extra: str) -> int:
    return main(
        [
            "simulate",
            "--task",
            "regression",
            "--algorithms",
            "fedadam",
            "--rounds",
            str(rounds),
            "--local-steps",
            "2",
            "--participation",
            "0.5",
            "--no-progress",
            "--out",
            str(out),
            *extra,
        ]
    )


def test_resume_continues_and_saves_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli_run(tmp_path / "a", 4) == 0
    assert _cli_run(tmp_path / "b", 2) == 0
    assert _cli_run(tmp_path / "b", 4, "--resume") == 0
    assert "final models in" in capsys.readouterr().out

    def rounds(folder: Path) -> list[dict[str, object]]:
        hist = json.loads((folder / "history_fedadam_seed0.json").read_text())
        return [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in hist["rounds"]]

    assert rounds(tmp_path / "a") == rounds(tmp_path / "b") and len(rounds(tmp_path / "a")) == 5
    a, b = (torch.load(f / "runs/fedadam_seed0/model.pt") for f in (tmp_path / "a", tmp_path / "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _cli_run(tmp_path / "b", 4, "--resume", "--lr", "0.01") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "client_config differs" in err
    ckpt = tmp_path / "b/runs/fedadam_seed0/checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    assert _cli_run(tmp_path / "b", 4, "--resume") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "truncated" in err
    assert main(["simulate", "--task", "regression", "--rounds", "1", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


def test_an_interrupted_run_says_how_to_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedng.federated.simulator as simulator

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(simulator, "simulate", interrupted)
    assert _cli_run(tmp_path, 2) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted (fedadam seed 0); rerun with --resume" in err
