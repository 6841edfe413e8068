"""The result file of an accuracy benchmark (bench_robust, bench_dp) that survives interruption:
each finished run is appended and written at once, a rerun skips the runs already there, and
pieces of a grid run in parallel (each to its own file) are folded in with `merge`."""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

Run = dict[str, Any]


class Runs:
    """The runs of one result file.

    Args:
        out: the JSON file (created with its folder if missing).
        merge: comma-separated JSON files of other pieces of the grid to fold in.
        key: what identifies a run (method, setting, seed ...).
    """

    def __init__(self, out: Path, merge: str, key: Callable[[Run], Hashable]) -> None:
        self.out = out
        self.key = key
        out.parent.mkdir(parents=True, exist_ok=True)
        self.doc: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"runs": []}
        for extra in [m for m in merge.split(",") if m]:
            have = {key(r) for r in self.doc["runs"]}
            runs = json.loads(Path(extra).read_text())["runs"]
            self.doc["runs"] += [r for r in runs if key(r) not in have]
        self.done = {key(r) for r in self.doc["runs"]}

    @property
    def runs(self) -> list[Run]:
        """Every run so far."""
        return list(self.doc["runs"])

    def add(self, run: Run, protocol: dict[str, Any]) -> None:
        """Appends a finished run and writes the file."""
        self.doc["runs"].append(run)
        self.done.add(self.key(run))
        self.doc["protocol"] = protocol
        self.out.write_text(json.dumps(self.doc, indent=1))

    def finish(self, rows: list[dict[str, Any]], verdicts: list[str], table: str) -> str:
        """Writes the rows and verdicts into the JSON and the table + verdicts as markdown next
        to it; returns that text."""
        self.doc["rows"] = rows
        self.doc["verdicts"] = verdicts
        self.out.write_text(json.dumps(self.doc, indent=1))
        text = table + "\n\n" + "\n".join(verdicts) + "\n"
        self.out.with_suffix(".md").write_text(text)
        return text
