"""Federated stability table: FedNG and FedAvg with every default, on every task.

Protocol (issue 10's target): every task with its default clients (`make_task` defaults), the
CLI defaults (`fedng simulate`: lr 0.05, 10 local steps of batch 32, 30 rounds, every algorithm
setting at its default), full and 30% participation, 5 seeds. Per FedNG run: the drop of its final
test metric below its own best round (in points: accuracy x 100, or relative L2 x 100 for the
regression task, where lower is better). Targets: no FedNG run ends more than 2 points below its
own best round, and FedNG's final >= FedAvg's (median over seeds, and seed by seed).

Usage: python bench/bench_stability.py [--tasks digits,...] [--seeds 5] [--rounds 30]
[--participations 1.0,0.3] [--fedng-set KEY=VALUE ...] [--out bench/results/bench_stability]
(`--fedng-set` changes FedNG's settings only, e.g. `sample_shrink=true`; FedAvg keeps its defaults.)
Writes <out>.json (every run's per-round test metric, bytes and flags) and <out>.md (the table).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _harness import CpuMonitor, busy_warning
from fedng.federated.config import make_configs
from fedng.federated.config.make import parse_value
from fedng.federated.report import History
from fedng.federated.report.flags import flags_of
from fedng.federated.simulator import simulate
from fedng.federated.tasks.registry import make_task

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("digits", "mnist1d", "synthetic", "regression", "digits-cnn", "mnist1d-cnn")
METHODS = ("fedavg", "fedng")
CLI_BASE = {"lr": 0.05, "local_steps": 10, "batch_size": 32}
"""`fedng simulate`'s defaults (its --lr, --local-steps, --batch-size)."""
MAX_DROP_POINTS = 2.0


def points(h: History, value: float) -> float:
    """A metric value in points, oriented so that higher is better."""
    return 100.0 * (value if h.higher_is_better else -value)


def run_one(
    task: str,
    algo: str,
    seed: int,
    rounds: int,
    participation: float,
    settings: dict[str, Any] | None = None,
) -> History:
    """One simulation with every default (and `settings` on top)."""
    cc, sc = make_configs(algo, {**CLI_BASE, **(settings or {})})
    return simulate(
        make_task(task, seed=seed), cc, sc, rounds=rounds, participation=participation, seed=seed
    )


def run_record(h: History, seconds: float) -> dict[str, Any]:
    """What the JSON keeps of one run."""
    pts = [points(h, r.metric) for r in h.rounds]
    finite = [p for p in pts if math.isfinite(p)]
    best = max(finite) if finite else -math.inf
    final = pts[-1]
    flags = flags_of(h)
    return {
        "seed": h.seed,
        "final_points": final,
        "best_points": best,
        "drop_points": best - final if math.isfinite(final) else math.inf,
        "metric": [r.metric for r in h.rounds],
        "cum_bytes": h.rounds[-1].cum_bytes,
        "rejected": sum(len(r.rejected) for r in h.rounds),
        "flags": {k: v for k, v in vars(flags).items() if v},
        "seconds": seconds,
    }


def cell(task: str, participation: float, args: argparse.Namespace) -> dict[str, Any]:
    """Both methods on every seed of one (task, participation)."""
    out: dict[str, Any] = {"task": task, "participation": participation, "runs": {}}
    for algo in METHODS:
        runs = []
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            extra = fedng_settings(args) if algo == "fedng" else {}
            h = run_one(task, algo, seed, args.rounds, participation, extra)
            runs.append(run_record(h, time.perf_counter() - t0))
            r = runs[-1]
            print(
                f"  {task} p={participation:g} {algo} seed {seed}: final {r['final_points']:.2f},"
                f" best {r['best_points']:.2f}, {r['seconds']:.0f} s",
                flush=True,
            )
        out["runs"][algo] = runs
        out["metric"] = h.metric
    ng, avg = out["runs"]["fedng"], out["runs"]["fedavg"]
    out["fedng_max_drop"] = max(r["drop_points"] for r in ng)
    out["fedng_final_median"] = statistics.median(r["final_points"] for r in ng)
    out["fedavg_final_median"] = statistics.median(r["final_points"] for r in avg)
    out["seeds_fedng_ge_fedavg"] = sum(
        a["final_points"] <= b["final_points"] for a, b in zip(avg, ng, strict=True)
    )
    out["stable"] = out["fedng_max_drop"] <= MAX_DROP_POINTS
    out["beats_fedavg"] = out["fedng_final_median"] >= out["fedavg_final_median"]
    print(
        f"{task:<12} p={participation:<4} FedNG final {out['fedng_final_median']:.2f}"
        f" (max drop {out['fedng_max_drop']:.2f}), FedAvg {out['fedavg_final_median']:.2f},"
        f" seeds FedNG>=FedAvg {out['seeds_fedng_ge_fedavg']}/{args.seeds}",
        flush=True,
    )
    return out


def fedng_settings(args: argparse.Namespace) -> dict[str, Any]:
    """`--fedng-set KEY=VALUE` as a settings dict."""
    out: dict[str, Any] = {}
    for item in args.fedng_set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--fedng-set: expected KEY=VALUE, got {item!r}")
        out[key] = parse_value(value)
    return out


def markdown(cells: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The table."""
    lines = [
        f"# Federated stability ({args.rounds} rounds, {args.seeds} seeds, every default:"
        f" lr {CLI_BASE['lr']}, {CLI_BASE['local_steps']} local steps x batch"
        f" {CLI_BASE['batch_size']}, task default clients"
        + (f"; FedNG with {fedng_settings(args)}" if args.fedng_set else "")
        + ")",
        "",
        "Points: accuracy x 100 (regression: -relative L2 x 100, higher is better). Drop: best"
        " round minus final, per FedNG run; the column is its maximum over seeds.",
        "",
        "| task | participation | FedNG final (median) | FedNG max drop | FedAvg final (median)"
        " | seeds FedNG >= FedAvg | FedNG rejected | stable (drop <= 2) | FedNG >= FedAvg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        rej = sum(r["rejected"] for r in c["runs"]["fedng"])
        lines.append(
            f"| {c['task']} | {c['participation']:g} | {c['fedng_final_median']:.2f}"
            f" | {c['fedng_max_drop']:.2f} | {c['fedavg_final_median']:.2f}"
            f" | {c['seeds_fedng_ge_fedavg']}/{args.seeds} | {rej}"
            f" | {'yes' if c['stable'] else 'NO'} | {'yes' if c['beats_fedavg'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Runs the grid."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--participations", default="1.0,0.3")
    p.add_argument("--fedng-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=str(RESULTS / "bench_stability"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    mon = CpuMonitor()
    t0 = time.perf_counter()
    parts = [float(x) for x in args.participations.split(",") if x]
    cells: list[dict[str, Any]] = []
    for t in [t for t in args.tasks.split(",") if t]:
        for q in parts:
            cells.append(cell(t, q, args))
            write(cells, args, mon.stop(), time.perf_counter() - t0, complete=False)
    usage = mon.stop()
    payload = write(cells, args, usage, time.perf_counter() - t0, complete=True)
    print(markdown(cells, args))
    print("targets:", payload["targets"])
    warn = busy_warning(usage)
    if warn:
        print(warn)
    return 0


def write(
    cells: list[dict[str, Any]],
    args: argparse.Namespace,
    usage: dict[str, float] | None,
    wall_s: float,
    complete: bool,
) -> dict[str, Any]:
    """Writes <out>.json and <out>.md with the cells done so far (after every cell, so that an
    interrupted grid keeps what ran)."""
    payload = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "args": vars(args),
        "defaults": CLI_BASE,
        "fedng_settings": fedng_settings(args),
        "wall_s": wall_s,
        "cpu_usage": usage,
        "complete": complete,
        "targets": {
            "all_stable": all(c["stable"] for c in cells),
            "all_fedng_ge_fedavg": all(c["beats_fedavg"] for c in cells),
        },
        "cells": cells,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=1, default=lambda x: None)
    out.with_suffix(".json").write_text(text.replace("Infinity", "null").replace("NaN", "null"))
    out.with_suffix(".md").write_text(markdown(cells, args))
    return payload


if __name__ == "__main__":
    sys.exit(main())
