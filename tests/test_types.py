"""The package type-checks under `mypy --strict` (configured in pyproject.toml), with no blanket
ignores: no `ignore_errors`, no file-level `# mypy: ignore-errors`, and every line-level ignore
names its error code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "fedng"


def test_mypy_strict_passes() -> None:
    """`mypy` over python/fedng (strict, from pyproject) reports no error."""
    api = pytest.importorskip("mypy.api", reason="mypy is in the test extra")
    stdout, stderr, status = api.run(["--config-file", str(ROOT / "pyproject.toml")])
    assert status == 0, f"mypy --strict failed:\n{stdout}{stderr}"


def test_mypy_config_is_strict_without_blanket_ignores() -> None:
    """Strict mode is on and no override switches errors off for fedng modules."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert cfg.get("strict") is True
    for override in cfg.get("overrides", []):
        modules = (
            override["module"] if isinstance(override["module"], list) else [override["module"]]
        )
        assert not any(m.startswith("fedng") for m in modules), f"override for fedng: {override}"
        assert "ignore_errors" not in override, f"blanket ignore_errors: {override}"


BARE_IGNORE = re.compile(r"#\s*type:\s*ignore(?!\[)")
FILE_IGNORE = re.compile(r"#\s*mypy:\s*ignore-errors")


def test_no_bare_or_file_level_ignores() -> None:
    """Every `# type: ignore` names its code; no module switches mypy off."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py*")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if BARE_IGNORE.search(line) or FILE_IGNORE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "blanket type ignores:\n" + "\n".join(offenders)


def test_ignore_patterns_catch_what_they_must() -> None:
    """The scans above recognise bare and file-level ignores, and accept coded ones."""
    assert BARE_IGNORE.search("x = f()  # type: ignore")
    assert not BARE_IGNORE.search("x = f()  # type: ignore[arg-type]")
    assert FILE_IGNORE.search("# mypy: ignore-errors")
