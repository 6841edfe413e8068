"""docs/federated.md, "LoRA and FIPA": its runnable example runs as written (with fewer rounds)
and the fine-tuning improves on the pre-trained model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "federated.md"


def _example() -> str:
    section = DOC.read_text().split("## LoRA and FIPA", 1)[1]
    section = section.split("#### Runnable example", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "the LoRA/FIPA example's code block is missing"
    return match.group(1)


def test_the_lora_fipa_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    code = _example()
    assert "rounds=10" in code and '"fipa"' in code
    exec(compile(code.replace("rounds=10", "rounds=3"), str(DOC), "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out.strip().splitlines()[-1]
    metrics = [float(x) for x in re.findall(r"\d+\.\d+", out.split("]")[0])]
    assert len(metrics) == 4 and metrics[-1] > metrics[0]
