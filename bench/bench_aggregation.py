"""FedNG's server aggregations against tuned first-order methods: does the summable
aggregation keep FedNG's round advantage, and how does it compare with the exact merge?

Uses bench_fl's machinery (tasks, tuning on a separate seed with client-held validation data,
summaries): the first-order methods are tuned on bench_fl's grids (`--budget` configurations
each), FedNG runs its bench_fl-tuned preset with each aggregation ("summable", "fisher" = the
exact merge, "mean") untuned. Target = the tuned FedAvg's median final test accuracy; verdict per
aggregation: FedNG rounds-to-target <= 0.5 x the best first-order method's.

Usage: python bench/bench_aggregation.py [--tasks digits,mnist1d] [--seeds 3] [--rounds 30]
Writes bench/results/bench_aggregation.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from fedng.federated.report import History, summarize, table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fl

AGGREGATIONS = ("summable", "fisher", "mean")
FEDNG_PRESET = {
    "lr": 0.05,
    "precond": "global_local",
    "curvature": "kfac",
    "damping": 0.01,
    "fisher_center": "mean",
    "fisher_damping": 0.1,
}
TASKS: dict[str, dict[str, Any]] = {
    "digits": {"name": "digits", "alpha": 0.1, "num_clients": 20, "participation": 0.5},
    "mnist1d": {"name": "mnist1d", "alpha": 0.1, "num_clients": 50, "participation": 0.2},
}


def bench_task(key: str, args: argparse.Namespace) -> dict[str, Any]:
    """Tunes the first-order methods, runs them and FedNG's aggregations on the seeds."""
    bench_fl.TASKS[key] = {k: v for k, v in TASKS[key].items() if k != "participation"}
    part = TASKS[key]["participation"]
    base = {"local_steps": args.local_steps, "batch_size": args.batch_size}
    groups: dict[str, list[History]] = {}
    tuned: dict[str, Any] = {}
    for algo in [m for m in args.first_order.split(",") if m]:
        scores = []
        for cfg in bench_fl.GRIDS[algo][: args.budget]:
            h = bench_fl.run(key, algo, cfg, bench_fl.TUNE_SEED, args.rounds, part, base)
            scores.append((bench_fl.val_score(h), cfg))
        best = max(scores, key=lambda s: s[0])[1]
        tuned[algo] = best
        groups[algo] = [
            bench_fl.run(key, algo, best, s, args.rounds, part, base) for s in range(args.seeds)
        ]
        print(f"  {key} {algo:<9} {best} final {[round(h.final(), 4) for h in groups[algo]]}")
    for agg in AGGREGATIONS:
        cfg = {**FEDNG_PRESET, "aggregation": agg}
        label = f"fedng-{agg}"
        tuned[label] = cfg
        groups[label] = [
            bench_fl.run(key, "fedng", cfg, s, args.rounds, part, base) for s in range(args.seeds)
        ]
        print(f"  {key} {label:<14} final {[round(h.final(), 4) for h in groups[label]]}")
    target = statistics.median(h.final() for h in groups["fedavg"])
    rows = [summarize(a, hs, target) for a, hs in groups.items()]
    fo = [r for r in rows if r.label in bench_fl.FIRST_ORDER]
    best_fo = min(fo, key=lambda r: r.rounds_to_target)
    verdicts = {}
    for r in rows:
        if r.label.startswith("fedng-"):
            ratio = (
                r.rounds_to_target / best_fo.rounds_to_target
                if best_fo.rounds_to_target not in (0, math.inf)
                else math.nan
            )
            verdicts[r.label] = {
                "rounds": r.rounds_to_target,
                "ratio": ratio,
                "met": bool(math.isfinite(ratio) and ratio <= 0.5),
            }
    print(table(rows, groups["fedavg"][0].metric, target))
    print(f"  best first-order {best_fo.label} ({best_fo.rounds_to_target}); {verdicts}")
    return {
        "task": key,
        "participation": part,
        "target": target,
        "tuned": tuned,
        "best_first_order": [best_fo.label, best_fo.rounds_to_target],
        "verdicts": verdicts,
        "rows": [r.to_dict() for r in rows],
        "table_md": table(rows, groups["fedavg"][0].metric, target, markdown=True),
        "server_log_sample": {
            a: hs[0].rounds[-1].server_log for a, hs in groups.items() if a.startswith("fedng")
        },
    }


def main(argv: list[str] | None = None) -> int:
    """Runs the comparison."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="digits,mnist1d")
    p.add_argument("--first-order", default=",".join(bench_fl.FIRST_ORDER))
    p.add_argument("--budget", type=int, default=2, help="configurations per first-order method")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=str(bench_fl.RESULTS / "bench_aggregation"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results = [bench_task(t, args) for t in args.tasks.split(",") if t]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"args": vars(args), "results": results, "wall_s": time.perf_counter() - t0}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    lines = [
        f"# FedNG aggregations vs tuned first-order ({args.rounds} rounds, {args.seeds} seeds,"
        f" {args.budget} configs per first-order method, {args.local_steps} local steps x batch"
        f" {args.batch_size})",
        "",
    ]
    for r in results:
        lines += [
            f"## {r['task']} (participation {r['participation']})",
            "",
            r["table_md"],
            f"Best first-order: {r['best_first_order'][0]} ({r['best_first_order'][1]} rounds)."
            f" FedNG verdicts (rounds-to-target <= 0.5 x): {json.dumps(r['verdicts'])}",
            "",
        ]
    out.with_suffix(".md").write_text("\n".join(lines))
    print(f"wrote {out.with_suffix('.md')} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
