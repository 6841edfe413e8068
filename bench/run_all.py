"""Runs every kernel benchmark (each in its own process) and prints one combined summary table.

`python bench/run_all.py` (full, ~5-10 min on 2 cores) or `python bench/run_all.py --quick`
(smoke, ~1 min). Writes `bench/results/<op>.json` per op and `bench/results/summary.json`.
Exit status: 2 if a benchmark failed (e.g. a correctness check), else 0; missed targets are
reported, never turned into a failure.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _harness as H

BENCH_DIR = Path(__file__).resolve().parent
OPS: tuple[str, ...] = (
    "kron_accumulate",
    "damped_cholesky_inverse",
    "kron_precondition",
    "sketch_accumulate",
    "nystrom",
    "lowrank_precondition",
    "gaussian_sketch_matrix",
)


def run_one(op: str, flags: list[str]) -> dict[str, Any]:
    """Runs `bench_<op>.py` with `flags` (output streamed), returns rc, wall time and its JSON."""
    script = BENCH_DIR / f"bench_{op}.py"
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(script), *flags], check=False)
    wall = time.time() - t0
    result: dict[str, Any] = {"rc": proc.returncode, "wall_s": wall, "json": None}
    path = H.RESULTS_DIR / f"{op}.json"
    if proc.returncode == 0 and path.exists() and path.stat().st_mtime >= t0:
        result["json"] = json.loads(path.read_text())
    return result


def _num(x: Any, fmt: str, suffix: str = "") -> str:
    return (
        "-"
        if x is None or (isinstance(x, float) and not math.isfinite(x))
        else f"{x:{fmt}}{suffix}"
    )


def summary_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per (op, workload)."""
    rows = []
    for op, res in results.items():
        data = res["json"]
        if data is None:
            rows.append(
                {"op": op, "workload": "FAILED" if res["rc"] else "no result", "targets": []}
            )
            continue
        peak = data["gemm_peak"]["gflops"]
        others = (data.get("cpu_share") or {}).get("others")
        for r in data["rows"]:
            rows.append(
                {
                    "op": op,
                    "workload": r["workload"],
                    "unit": r["unit"],
                    "ours_s": r["ours"]["median"],
                    "torch_s": r["torch"]["median"],
                    "ratio": r["ratio"],
                    "rate_ours": r["rate_ours"],
                    "rate_torch": r["rate_torch"],
                    "pct_peak_ours": r.get("pct_peak_ours"),
                    "pct_peak_torch": r.get("pct_peak_torch"),
                    "gemm_peak": peak,
                    "others_cpu": others,
                    "targets": r["targets"],
                    **{k: r[k] for k in ("mem_ratio", "err_ratio") if k in r},
                }
            )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The combined summary table."""
    head = (
        f"{'op':<24} {'workload':<15} {'ours':>10} {'torch':>10} {'ratio':>7}"
        f" {'rate ours':>10} {'torch':>8} {'%peak':>6} {'torch':>6} {'busy':>5}  target"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if "ratio" not in r:
            lines.append(f"{r['op']:<24} {r['workload']:<15}")
            continue
        unit = "" if r["unit"] == "GFLOP/s" else " Gs/s"
        lines.append(
            f"{r['op']:<24} {r['workload']:<15} {H.fmt_time(r['ours_s']):>10}"
            f" {H.fmt_time(r['torch_s']):>10} {r['ratio']:6.2f}x"
            f" {_num(r['rate_ours'], '10.2f')} {_num(r['rate_torch'], '8.2f')}"
            f" {_num(r['pct_peak_ours'], '5.1f', '%'):>6}"
            f" {_num(r['pct_peak_torch'], '5.1f', '%'):>6}"
            f" {_num(None if r['others_cpu'] is None else 100 * r['others_cpu'], '4.0f', '%'):>5}"
            f"  {H.verdicts(r['targets'])}{unit}"
        )
    peaks = [r["gemm_peak"] for r in rows if r.get("gemm_peak")]
    if peaks:
        lines.append(
            f"float32 GEMM peak in the runs: {min(peaks):.1f}..{max(peaks):.1f} GFLOP/s"
            " (faster of torch.mm and OpenBLAS sgemm 2048^3)"
        )
    lines.append(
        "rate: GFLOP/s (Gs/s: Gsample/s); ratio = torch time / ours; %peak = of that"
        " same-run peak; busy = CPU share other processes took during that benchmark"
        " (>10%: timings disturbed)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke mode for every benchmark")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--repeats", type=int, default=None, help="override every benchmark's repeats")
    p.add_argument("--threads", type=int, default=None, help="torch (and fedng) threads")
    p.add_argument(
        "--only",
        nargs="*",
        choices=OPS,
        default=None,
        metavar="OP",
        help=f"subset of {', '.join(OPS)}",
    )
    p.add_argument(
        "--summary-only",
        action="store_true",
        help="run nothing: rebuild the summary from the existing bench/results/*.json",
    )
    args = p.parse_args(argv)
    flags = ["--dtype", args.dtype] + (["--quick"] if args.quick else [])
    if args.repeats is not None:
        flags += ["--repeats", str(args.repeats)]
    if args.threads is not None:
        flags += ["--threads", str(args.threads)]
    t0 = time.time()
    cpu = H.CpuMonitor()
    results = {}
    for op in args.only or OPS:
        if args.summary_only:
            path = H.RESULTS_DIR / f"{op}.json"
            data = json.loads(path.read_text()) if path.exists() else None
            results[op] = {"rc": 0, "wall_s": data["wall_s"] if data else 0.0, "json": data}
            continue
        print(f"\n##### bench_{op}.py {' '.join(flags)}", flush=True)
        results[op] = run_one(op, flags)
    rows = summary_rows(results)
    usage = cpu.stop()
    print("\n" + "=" * 40 + " SUMMARY " + "=" * 40)
    print(table(rows))
    busy = H.busy_warning(usage)
    if busy:
        print(f"note: {busy}")
    checked = [t for r in rows for t in r["targets"] if t["pass"] is not None]
    passed = sum(bool(t["pass"]) for t in checked)
    failed_ops = [op for op, res in results.items() if res["rc"] != 0]
    print(
        f"targets: {passed}/{len(checked)} met; benchmarks failed: {failed_ops or 'none'};"
        f" total {time.time() - t0:.0f} s"
    )
    summary = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "dtype": args.dtype,
        "wall_s": time.time() - t0,
        "cpu_share": usage,
        "machine": H.machine_info(),
        "scripts": {op: {"rc": res["rc"], "wall_s": res["wall_s"]} for op, res in results.items()},
        "targets_met": passed,
        "targets_checked": len(checked),
        "rows": rows,
    }
    print(f"wrote {H.write_json('summary', summary)}")
    return 2 if failed_ops else 0


if __name__ == "__main__":
    sys.exit(main())
