"""Federated benchmark: FedNG against tuned first-order baselines.

Protocol (summarized in docs/architecture.md, "Benchmark protocols"):
- Equal local work: every method runs the same `local_steps` minibatch steps of the same batch
  size per round (curvature work shows up as client time).
- Equal tuning budget: every method gets the same number of configurations (its grid below),
  each run once on a tuning seed whose data split and initialization differ from the evaluation
  seeds; the configuration with the best client-held validation metric wins (`--select auc`:
  the mean over all rounds; `--select final`: the mean of the last 3 rounds). Test data is never
  used for tuning.
- The winners run on `--seeds` evaluation seeds; we report the median and the spread.
- Target = the best tuned FedAvg's final test accuracy (median over seeds); when that is no
  better than the initial model (FedAvg did not learn the task: the regression task), the best
  tuned first-order method's final instead (`fedavg_target`). Reported per method:
  rounds-to-target and bytes-to-target (uplink + downlink, real serialized sizes), accuracy at
  fixed rounds and at fixed bytes, client and server time per round.
- Verdict of the issue's target: FedNG's median rounds-to-target <= 0.5 x that of the best
  first-order baseline.

Usage: python bench/bench_fl.py [--quick] [--tasks digits,synthetic] [--seeds 5] [--rounds 50]
(tasks: digits, mnist1d, synthetic, regression, digits-cnn, mnist1d-cnn; the default is
digits,synthetic; `--configs K` keeps the first K configurations of every method's grid).
Writes bench/results/bench_fl[_final].{json,md} and
bench/results/bench_fl[_final]_<task>/metric_vs_{rounds,bytes}.png.
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
from fedng.federated.config import make_configs
from fedng.federated.report import History, plot_histories, summarize, table
from fedng.federated.simulator import simulate
from fedng.federated.tasks.registry import make_task

RESULTS = Path(__file__).resolve().parent / "results"
TUNE_SEED = 100
FIRST_ORDER = ("fedavg", "fedavgm", "fedprox", "scaffold", "fedadam", "fedyogi")

TASKS: dict[str, dict[str, Any]] = {
    "digits": {"name": "digits", "alpha": 0.1, "num_clients": 20},
    "mnist1d": {"name": "mnist1d", "alpha": 0.1, "num_clients": 50},
    "synthetic": {"name": "synthetic", "alpha": 1.0, "beta": 1.0, "num_clients": 30},
    "regression": {"name": "regression", "num_clients": 10},
    # The bench zoo's CNNs (fedng.federated.tasks.models) on the same data and partitions.
    "digits-cnn": {"name": "digits-cnn", "alpha": 0.1, "num_clients": 20},
    "mnist1d-cnn": {"name": "mnist1d-cnn", "alpha": 0.1, "num_clients": 50},
}

# Same budget (4 configurations) for every method; `lr` is the local learning rate.
GRIDS: dict[str, list[dict[str, Any]]] = {
    "fedavg": [{"lr": lr} for lr in (0.03, 0.1, 0.3, 1.0)],
    "fedavgm": [{"lr": lr, "server_momentum": m} for lr in (0.03, 0.1) for m in (0.5, 0.9)],
    "fedprox": [{"lr": lr, "prox_mu": mu} for lr in (0.1, 0.3) for mu in (0.01, 0.1)],
    "scaffold": [{"lr": lr} for lr in (0.03, 0.1, 0.3, 1.0)],
    "fedadam": [{"lr": lr, "server_lr": s} for lr in (0.1, 0.3) for s in (0.01, 0.03)],
    "fedyogi": [{"lr": lr, "server_lr": s} for lr in (0.1, 0.3) for s in (0.01, 0.03)],
    # FedNG's defaults (relative damping 0.1, kl_clip 1e-3, int8 curvature "auto") first, then
    # one knob changed at a time.
    "fedng": [
        {"lr": 0.05},
        {"lr": 0.05, "kl_clip": 1e-2},
        {"lr": 0.05, "damping": 0.03},
        {"lr": 0.05, "aggregation": "mean"},
    ],
}
QUICK_GRIDS = {k: v[:2] for k, v in GRIDS.items()}


def budget(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """The grids run: `--quick` 2 configurations per method, `--configs K` the first K."""
    grids = QUICK_GRIDS if args.quick else GRIDS
    return {k: v[: args.configs] if args.configs else v for k, v in grids.items()}


def run(
    task_key: str,
    algo: str,
    settings: dict[str, Any],
    seed: int,
    rounds: int,
    participation: float,
    base: dict[str, Any],
) -> History:
    """One simulation."""
    t = TASKS[task_key]
    task = make_task(
        t["name"], num_clients=t["num_clients"], alpha=t.get("alpha"), beta=t.get("beta"), seed=seed
    )
    cc, sc = make_configs(algo, {**base, **settings})
    return simulate(task, cc, sc, rounds=rounds, participation=participation, seed=seed)


def val_score(h: History, select: str = "auc") -> float:
    """Tuning criterion on the clients' validation data (sign-adjusted: higher is better).

    "auc": the mean validation metric over all rounds (rewards getting there early and staying);
    "final": the mean of the last 3 rounds.
    """
    vals = [r.val_metric for r in (h.rounds[1:] if select == "auc" else h.rounds[-3:])]
    s = sum(vals) / len(vals)
    if not math.isfinite(s):
        return -math.inf
    return s if h.higher_is_better else -s


def metric_at(h: History, *, round_: int | None = None, nbytes: float | None = None) -> float:
    """Test metric after `round_` rounds, or at the last round within `nbytes` bytes."""
    if round_ is not None:
        return h.rounds[min(round_, len(h.rounds) - 1)].metric
    best = h.rounds[0].metric
    for r in h.rounds:
        if r.cum_bytes <= (nbytes or 0):
            best = r.metric
    return best


def fedavg_target(groups: dict[str, list[History]]) -> tuple[float, str]:
    """The target metric and where it comes from: tuned FedAvg's final (median over seeds) —
    unless that is no better than the initial model (median round 0; FedAvg did not learn the
    task, so every method would "reach" it in 0 rounds), then the best first-order final: the
    bar is what first-order methods achieve at all."""
    fa = groups["fedavg"]
    hib = fa[0].higher_is_better
    target = statistics.median(h.final() for h in fa)
    start = statistics.median(h.rounds[0].metric for h in fa)
    if (target > start) == hib and target != start:
        return target, "fedavg final"
    finals = [statistics.median(h.final() for h in groups[a]) for a in groups if a in FIRST_ORDER]
    finals = [f for f in finals if math.isfinite(f)]
    best = max(finals) if hib else min(finals)
    return best, "best first-order final (fedavg's final does not beat the initial model)"


def bench_task(task_key: str, args: argparse.Namespace) -> dict[str, Any]:
    """Tunes every method, evaluates the winners on the seeds, summarizes."""
    grids = budget(args)
    methods = [m for m in args.methods.split(",") if m]
    base = {"local_steps": args.local_steps, "batch_size": args.batch_size}
    tuned: dict[str, dict[str, Any]] = {}
    tuning_log: dict[str, list[dict[str, Any]]] = {}
    print(
        f"\n== {task_key}: tuning ({len(grids[methods[0]])} configs per method, seed"
        f" {TUNE_SEED}, {args.rounds} rounds, selection '{args.select}')",
        flush=True,
    )
    for algo in methods:
        scores = []
        for cfg in grids[algo]:
            t0 = time.perf_counter()
            h = run(task_key, algo, cfg, TUNE_SEED, args.rounds, args.participation, base)
            scores.append(
                {"config": cfg, "val": val_score(h, args.select), "s": time.perf_counter() - t0}
            )
        best = max(scores, key=lambda s: s["val"])
        tuned[algo] = best["config"]
        tuning_log[algo] = scores
        print(f"   {algo:<9} best {best['config']}  val {best['val']:.4f}", flush=True)
    groups: dict[str, list[History]] = {}
    for algo in methods:
        groups[algo] = [
            run(task_key, algo, tuned[algo], s, args.rounds, args.participation, base)
            for s in range(args.seeds)
        ]
        print(f"   eval {algo:<9} final {[round(h.final(), 4) for h in groups[algo]]}", flush=True)
    target, target_from = fedavg_target(groups)
    rows = [summarize(a, hs, target) for a, hs in groups.items()]
    r_fixed = [max(1, args.rounds // 4), max(1, args.rounds // 2), args.rounds]
    avg_bytes = statistics.median(h.rounds[-1].cum_bytes for h in groups["fedavg"])
    b_fixed = [avg_bytes / 4, avg_bytes]
    extra: dict[str, dict[str, Any]] = {}
    for a, hs in groups.items():
        extra[a] = {
            "tuned": tuned[a],
            "metric_at_rounds": {
                str(r): statistics.median(metric_at(h, round_=r) for h in hs) for r in r_fixed
            },
            "metric_at_bytes": {
                f"{b / 1e6:.2f}MB": statistics.median(metric_at(h, nbytes=b) for h in hs)
                for b in b_fixed
            },
        }
    first_order = [r for r in rows if r.label in FIRST_ORDER]
    best_fo = min(first_order, key=lambda r: r.rounds_to_target)
    fewest_bytes = min(r.bytes_to_target for r in first_order)
    ng = next((r for r in rows if r.label == "fedng"), None)
    verdict: dict[str, Any] = {
        "target_from": target_from,
        "best_first_order": best_fo.label,
        "best_first_order_rounds": best_fo.rounds_to_target,
        "best_first_order_bytes": fewest_bytes,
    }
    if ng is not None:
        ratio = (
            ng.rounds_to_target / best_fo.rounds_to_target
            if best_fo.rounds_to_target not in (0, math.inf)
            else math.nan
        )
        bytes_ratio = (
            ng.bytes_to_target / fewest_bytes
            if fewest_bytes not in (0, math.inf) and math.isfinite(fewest_bytes)
            else math.nan
        )
        verdict.update(
            {
                "fedng_rounds": ng.rounds_to_target,
                "ratio": ratio,
                "target_met": bool(ratio <= 0.5) if math.isfinite(ratio) else False,
                "fedng_bytes": ng.bytes_to_target,
                "bytes_ratio": bytes_ratio,
                "bytes_target_met": bool(bytes_ratio <= 1.0)
                if math.isfinite(bytes_ratio)
                else False,
            }
        )
    out_dir = Path(args.out).parent / f"{Path(args.out).name}_{task_key}"
    plot_histories(groups, out_dir, title=f"{groups['fedavg'][0].task}")
    print(table(rows, groups["fedavg"][0].metric, target))
    print(f"   verdict: {verdict}")
    return {
        "task": groups["fedavg"][0].task,
        "target": target,
        "rows": [r.to_dict() for r in rows],
        "extra": extra,
        "verdict": {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in verdict.items()
        },
        "tuning": tuning_log,
        "table_md": table(rows, groups["fedavg"][0].metric, target, markdown=True),
        "fixed_rounds": r_fixed,
    }


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The results as markdown."""
    lines = [
        f"# bench_fl ({'quick' if args.quick else 'full'}, tuning criterion"
        f" '{args.select}'): {args.rounds} rounds,"
        f" participation {args.participation}, {args.local_steps} local steps x batch"
        f" {args.batch_size}, {args.seeds} seeds, tuning budget"
        f" {len(budget(args)['fedavg'])} configs/method",
        "",
    ]
    for res in results:
        v = res["verdict"]
        lines += [
            f"## {res['task']}",
            "",
            res["table_md"],
            f"Target {res['target']:.4f}: {v.get('target_from')}.",
            "",
            f"Target check (FedNG rounds-to-target <= 0.5 x best first-order): best"
            f" first-order = {v['best_first_order']} ({v['best_first_order_rounds']}"
            f" rounds), FedNG = {v.get('fedng_rounds')} rounds, ratio ="
            f" {v.get('ratio')}, met = {v.get('target_met')}; bytes-to-target <= 1.0 x the"
            f" fewest first-order bytes ({v.get('best_first_order_bytes')}): FedNG"
            f" {v.get('fedng_bytes')}, ratio {v.get('bytes_ratio')}, met ="
            f" {v.get('bytes_target_met')}",
            "",
            "| method | tuned config | metric at rounds | metric at bytes |",
            "|---|---|---|---|",
        ]
        for a, e in res["extra"].items():
            at_r = ", ".join(f"r{k}: {x:.4f}" for k, x in e["metric_at_rounds"].items())
            at_b = ", ".join(f"{k}: {x:.4f}" for k, x in e["metric_at_bytes"].items())
            lines.append(f"| {a} | `{json.dumps(e['tuned'])}` | {at_r} | {at_b} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 configs/method, 2 seeds, 15 rounds")
    p.add_argument("--tasks", default="digits,synthetic", help=f"comma-separated, of {list(TASKS)}")
    p.add_argument("--methods", default="fedavg,fedavgm,fedprox,scaffold,fedadam,fedyogi,fedng")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--configs", type=int, default=None, help="first K configs of every grid")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--participation", type=float, default=0.5)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--select",
        choices=("auc", "final"),
        default="auc",
        help="tuning criterion on validation data: mean over rounds, or last rounds",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output stem (default bench/results/bench_fl, _final for --select final)",
    )
    args = p.parse_args(argv)
    args.seeds = args.seeds or (2 if args.quick else 5)
    args.rounds = args.rounds or (15 if args.quick else 50)
    if args.out is None:
        stem = (
            "bench_fl"
            + ("_quick" if args.quick else "")
            + ("" if args.select == "auc" else "_final")
        )
        args.out = str(RESULTS / stem)
    if "fedavg" not in args.methods.split(","):
        print("bench_fl: --methods must include fedavg (it defines the target)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results = [bench_task(t, args) for t in args.tasks.split(",") if t]
    payload = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "args": vars(args),
        "grids": budget(args),
        "wall_s": time.perf_counter() - t0,
        "torch": torch.__version__,
        "results": [{k: v for k, v in r.items() if k != "table_md"} for r in results],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    out.with_suffix(".md").write_text(markdown(results, args))
    print(
        f"\nwrote {out.with_suffix('.json')}, {out.with_suffix('.md')} ({payload['wall_s']:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
