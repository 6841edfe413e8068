"""docs/federated.md: the Flower example runs as written (one round) on the in-process grid and
gives the simulator's result for the same settings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="needs the flower extra (Python >= 3.11)")

DOC = Path(__file__).resolve().parents[1] / "docs" / "federated.md"


def _block(after: str) -> str:
    section = DOC.read_text().split(after, 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, f"no code block after {after!r}"
    return match.group(1)


def test_the_flower_example_gives_the_simulators_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    simulated = _block("## A complete example")
    flower = _block("### Your CNN and Dataset on Flower")
    assert "rounds=10" in simulated and "rounds=10" in flower
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {"__name__": "__main__"}
    exec(compile(simulated.replace("rounds=10", "rounds=1"), str(DOC), "exec"), scope)
    exec(compile(flower.replace("rounds=10", "rounds=1"), str(DOC), "exec"), scope)
    hist, strategy = scope["hist"], scope["strategy"]
    assert strategy.history.final() == hist.final()  # type: ignore[attr-defined]
    assert [r.metric for r in strategy.history.rounds] == [r.metric for r in hist.rounds]  # type: ignore[attr-defined]
