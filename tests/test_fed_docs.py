"""docs/federated.md: its complete example runs as written (with fewer rounds)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "federated.md"


def _example() -> str:
    text = DOC.read_text()
    section = text.split("## A complete example", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "the example's code block is missing"
    return match.group(1)


def test_the_complete_example_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _example()
    assert len(code.splitlines()) <= 50 and "rounds=10" in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("rounds=10", "rounds=2"), str(DOC), "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out.startswith("test accuracy: ")
    assert (tmp_path / "runs/squares/model.pt").exists()
    assert (tmp_path / "runs/squares/checkpoint.pt").exists()
