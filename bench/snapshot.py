"""Copies the latest benchmark results into a small, committed snapshot: `docs/results/`.

Run the benchmarks first (they write `bench/results/`), then this script:

    python bench/run_all.py              # kernels  -> bench/results/summary.json
    python bench/bench_step.py           # NG step  -> bench/results/bench_step.json
    python bench/bench_fl.py --quick --out bench/results/bench_fl  # federated -> bench_fl.{json,md}
    python bench/snapshot.py             # -> docs/results/README.md + compact JSON copies

The snapshot keeps what the docs cite — tables, ratios, the machine they ran on, the load from
other processes — and drops raw timing samples, so it stays a few tens of kB.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import run_all

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
ROOT = BENCH_DIR.parent

SOURCES: dict[str, str] = {
    "summary": "kernels",
    "bench_step": "step",
    "bench_fl": "federated",
}
"""bench/results/<name>.json -> docs/results/<snapshot name>.json."""

DROP = {"samples", "histories", "curves"}
"""Keys holding raw samples or per-round curves: left out of the snapshot."""


def compact(x: Any) -> Any:
    """`x` without raw timing samples (lists under the keys of `DROP`)."""
    if isinstance(x, dict):
        return {k: compact(v) for k, v in x.items() if k not in DROP}
    if isinstance(x, list):
        return [compact(v) for v in x]
    return x


def git_commit() -> str:
    """The commit the results were measured at (with '+dirty' for uncommitted changes)."""
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def machine_lines(machine: dict[str, Any]) -> list[str]:
    """The machine description as a markdown table."""
    rows = [
        ("CPU", machine.get("cpu")),
        ("cores", machine.get("cpu_count")),
        ("memory", memory()),
        (
            "torch / fedng threads",
            f"{machine.get('torch_threads')} / {machine.get('fedng_threads')}",
        ),
        ("platform", machine.get("platform")),
        ("Python", machine.get("python")),
        ("torch", machine.get("torch")),
        ("numpy", machine.get("numpy")),
        ("BLAS (fedng)", machine.get("blas")),
        ("environment", ", ".join(f"{k}={v}" for k, v in machine.get("env", {}).items()) or "-"),
    ]
    return ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]


def memory() -> str:
    """Physical memory of this machine (the snapshot is taken where the benchmarks ran)."""
    try:
        return f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (ValueError, OSError):
        return "unknown"


def load_share(data: dict[str, Any]) -> str:
    """Other processes' CPU share during a run, as the harness recorded it."""
    share = data.get("cpu_share") or data.get("cpu_usage")
    if isinstance(share, dict) and "others" in share:
        return f"{100 * share['others']:.0f}% of the CPU used by other processes"
    notes = data.get("notes")
    if notes is None:
        return "not recorded"
    # The harness adds a note only when other processes took more than 10% of the CPU.
    return "; ".join(notes) if notes else "other processes under 10% of the CPU"


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = p.parse_args(argv)
    found = {
        n: json.loads((RESULTS / f"{n}.json").read_text())
        for n in SOURCES
        if (RESULTS / f"{n}.json").exists()
    }
    if not found:
        print(f"no results in {RESULTS}: run the benchmarks first", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    machine = next((d["machine"] for d in found.values() if "machine" in d), {})
    lines = [
        "# Benchmark snapshot",
        "",
        f"Measured at commit `{git_commit()}`, snapshot taken"
        f" {_dt.datetime.now(_dt.timezone.utc).date().isoformat()} by `python bench/snapshot.py`.",
        "Every ratio compares fedng with the plain-torch way (or FedAvg) **measured in the same",
        "run**; absolute times depend on the machine and its load, ratios much less.",
        "",
        "## Machine",
        "",
        *machine_lines(machine),
        "",
    ]
    if "summary" in found:
        s = found["summary"]
        lines += [
            "## Kernels (`python bench/run_all.py" + (" --quick" if s.get("quick") else "") + "`)",
            "",
            f"Load: {load_share(s)}. Ratio = torch time / fedng time; % peak = share of a float32",
            "GEMM measured in the same run.",
            "",
            "```",
            run_all.table(s["rows"]),
            "```",
            "",
        ]
    if "bench_step" in found:
        s = found["bench_step"]
        lines += [
            "## NaturalGradient step (`python bench/bench_step.py`)",
            "",
            f"Load: {load_share(s)}.",
            "",
            "```",
            s["table"],
            "```",
            "",
        ]
    fl_md = RESULTS / "bench_fl.md"
    if "bench_fl" in found and fl_md.exists():
        lines += ["## Federated (`python bench/bench_fl.py`)", "", fl_md.read_text().strip(), ""]
    for name, data in found.items():
        (args.out / f"{SOURCES[name]}.json").write_text(json.dumps(compact(data), indent=1) + "\n")
    (args.out / "README.md").write_text("\n".join(lines))
    print(f"wrote {args.out / 'README.md'} and {len(found)} JSON files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
