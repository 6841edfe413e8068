"""Client-level differential privacy benchmark: final accuracy of FedNG and FedAvg at a target ε.

Protocol (issue 14): digits and MNIST-1D, 20 clients (Dirichlet alpha 0.1 digits, the task's
default for MNIST-1D), 20 rounds, full participation; ε in {1, 4, 8} at δ = 1e-5, central
Gaussian noise calibrated by dp-accounting's RDP accountant for the run; the ε the accountant
reports for the rounds actually run is recorded. Each method's clip C is the median L2 norm of
its own clients' round-0 updates (a non-private choice of the clip, stated as such: a
deployment would fix C beforehand or spend budget on choosing it). FedNG keeps its curvature on
the client (`dp_curvature_clip` 0: it preconditions with its own curvature; no curvature is
released, so the noise is the same as FedAvg's); `--share-curvature` adds FedNG with its
curvature clipped to the median payload norm and released under the same ε (the noise then
grows by sqrt(2)); method "fedng+avgclip" is FedNG with FedAvg's clip (so FedAvg's noise).
Reported: the final test accuracy (median [min, max] over seeds), beside the non-private run.
Target: FedNG at ε = 4 at least matches FedAvg at ε = 4.

Finished runs are appended to the JSON at once; a rerun skips them.

Usage: python bench/bench_dp.py [--quick] [--tasks digits,mnist1d] [--seeds 0] [--epsilons 1,4,8]
Writes bench/results/bench_dp.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _resumable import Runs
from fedng.federated.aggregation.dp import noise_multiplier_for
from fedng.federated.client import get_params
from fedng.federated.config import make_configs
from fedng.federated.report.threats import record_threats
from fedng.federated.round import client_step, server_init
from fedng.federated.simulator import simulate
from fedng.federated.tasks.registry import make_task
from fedng.federated.validate import delta_norm

RESULTS = Path(__file__).resolve().parent / "results"


def _list(cast: Any) -> Any:
    return lambda text: [cast(t) for t in text.split(",") if t.strip()]


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The benchmark's arguments."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=_list(str), default=["digits", "mnist1d"])
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seeds", type=_list(int), default=[0, 1, 2])
    p.add_argument("--epsilons", type=_list(float), default=[1.0, 4.0, 8.0])
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--methods", type=_list(str), default=["fedng", "fedavg"])
    p.add_argument("--share-curvature", action="store_true", help="also FedNG releasing curvature")
    p.add_argument(
        "--scopes",
        type=_list(str),
        default=["joint"],
        help="clip scopes to run (dp_clip_scope: joint, layer); each is a config of every method",
    )
    p.add_argument(
        "--clip-mults",
        type=_list(float),
        default=[1.0],
        help="clip C as these multiples of the method's median round-0 norm (configs)",
    )
    p.add_argument("--out", default=str(RESULTS / "bench_dp.json"))
    p.add_argument("--no-clean", action="store_true", help="skip the runs without DP")
    p.add_argument(
        "--merge",
        default="",
        help="comma-separated JSON files of other pieces of the grid to fold in (parallel runs)",
    )
    p.add_argument("--quick", action="store_true", help="digits, 5 rounds, seed 0, ε 4 (smoke)")
    args = p.parse_args(argv)
    if args.quick:
        args.tasks, args.rounds, args.seeds, args.epsilons = ["digits"], 5, [0], [4.0]
    if args.share_curvature and "fedng+curv" not in args.methods:
        args.methods.append("fedng+curv")
    return args


def clips(task_name: str, algo: str, clients: int, seed: int) -> tuple[float, float]:
    """The median round-0 delta norm and packed-curvature norm of the method's clients."""
    task = make_task(task_name, num_clients=clients, seed=seed)
    cc, sc = make_configs(algo, {})
    cc = cc.replace(loss=task.loss)
    torch.manual_seed(seed)
    model = task.model_fn(seed)
    _, msg = server_init(get_params(model), sc)
    ups = [client_step(model, c, msg, cc) for c in task.clients]
    curv = [
        math.sqrt(sum(float((v.double() ** 2).sum()) for v in u.curvature.values()))
        for u in ups
        if u.curvature
    ]
    return statistics.median(delta_norm(u) for u in ups), statistics.median(curv or [0.0])


def label(method: str, scope: str, mult: float) -> str:
    """The table's name of a method's DP config ("fedng", "fedng layer 0.1x")."""
    return method if (scope, mult) == ("joint", 1.0) else f"{method} {scope} {mult:g}x"


def run_one(
    args: argparse.Namespace,
    task_name: str,
    method: str,
    eps: float,
    seed: int,
    scope: str = "joint",
    mult: float = 1.0,
) -> dict[str, Any]:
    """One run at ε (inf: without DP) with clip scope `scope` and clip `mult` x the median."""
    algo = method.split("+")[0]
    task = make_task(task_name, num_clients=args.clients, seed=seed)
    cc, sc = make_configs(algo, {})
    dp = None
    if math.isfinite(eps):
        c, cf = clips(task_name, algo, args.clients, seed)
        if method.endswith("+avgclip"):  # the same clip, so the same noise, as FedAvg
            c = clips(task_name, "fedavg", args.clients, seed)[0]
        c, cf = c * mult, (cf if method.endswith("+curv") else 0.0)
        z = noise_multiplier_for(eps, args.delta, args.rounds, 1.0)
        knobs: dict[str, Any] = {
            "dp_clip": c,
            "dp_curvature_clip": cf,
            "dp_noise_multiplier": z,
            "dp_clients": len(task.clients),
            "dp_seed": seed,
            "dp_clip_scope": scope,
        }
        cc, sc = cc.replace(**knobs), sc.replace(**knobs)
        dp = {
            "target_epsilon": eps,
            "delta": args.delta,
            "noise_multiplier": z,
            "sampling_rate": 1.0,
            "clip": c,
            "curvature_clip": cf,
            "mode": "central",
            "scope": scope,
            "clip_mult": mult,
        }
    t0 = time.perf_counter()
    h = simulate(task, cc, sc, rounds=args.rounds, seed=seed)
    record_threats(h, None, dp)
    return {
        "task": task_name,
        "method": label(method, scope, mult) if math.isfinite(eps) else method,
        "target_epsilon": eps if math.isfinite(eps) else None,
        "seed": seed,
        "final": h.final(),
        "dp": h.sim.get("dp"),
        "seconds": time.perf_counter() - t0,
    }


def _key(r: dict[str, Any]) -> tuple[str, str, float, int]:
    eps = r["target_epsilon"]
    return (r["task"], r["method"], math.inf if eps is None else float(eps), int(r["seed"]))


def rows_of(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, ε, method): final accuracy over seeds and the ε the accountant reported."""
    groups: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    for r in runs:
        t, m, e, _ = _key(r)
        groups.setdefault((t, e, m), []).append(r)
    out = []
    for (task, eps, method), g in sorted(groups.items()):
        finals = [x["final"] for x in g]
        spent = [x["dp"]["epsilon"] for x in g if x["dp"]]
        out.append(
            {
                "task": task,
                "target_epsilon": None if math.isinf(eps) else eps,
                "method": method,
                "seeds": len(g),
                "final_median": statistics.median(finals),
                "final_min": min(finals),
                "final_max": max(finals),
                "epsilon_spent": max(spent) if spent else None,
                "noise_multiplier": g[0]["dp"]["noise_multiplier"] if g[0]["dp"] else None,
                "clip": g[0]["dp"]["clip"] if g[0]["dp"] else None,
            }
        )
    return out


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """FedNG vs FedAvg at ε = 4, per task: each method's best DP config (same config grid for
    both: clip scopes x clip multiples)."""
    out = []
    for task in sorted({r["task"] for r in rows}):
        best: dict[str, tuple[float, str]] = {}
        for r in rows:
            if r["task"] != task or r["target_epsilon"] != 4.0:
                continue
            family = r["method"].split(" ")[0]
            if family in ("fedng", "fedavg"):
                best[family] = max(best.get(family, (-1.0, "")), (r["final_median"], r["method"]))
        if "fedng" in best and "fedavg" in best:
            (ng, ng_name), (avg, avg_name) = best["fedng"], best["fedavg"]
            out.append(
                f"{task} ε=4: FedNG ({ng_name}) {ng:.4f} vs FedAvg ({avg_name}) {avg:.4f} ->"
                f" {'MET' if ng >= avg else 'MISSED'}"
            )
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table in markdown."""
    lines = [
        "| task | target ε | method | final acc. median [min, max] | ε spent (RDP) | noise mult."
        " | clip |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eps = "∞ (no DP)" if r["target_epsilon"] is None else f"{r['target_epsilon']:g}"
        spent = "-" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.3f}"
        z = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3f}"
        c = "-" if r["clip"] is None else f"{r['clip']:.3f}"
        lines.append(
            f"| {r['task']} | {eps} | {r['method']} | {r['final_median']:.4f}"
            f" [{r['final_min']:.4f}, {r['final_max']:.4f}] | {spent} | {z} | {c} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Runs the grid (skipping finished runs), writes JSON and markdown, prints the table."""
    args = parse(argv)
    torch.set_num_threads(1)
    store = Runs(Path(args.out), args.merge, _key)
    protocol = {k: v for k, v in vars(args).items() if k not in ("out", "merge")}
    for task in args.tasks:
        for eps in [*([] if args.no_clean else [math.inf]), *args.epsilons]:
            for method in args.methods:
                grid = [("joint", 1.0)]
                if math.isfinite(eps):
                    grid = [(sc, m) for sc in args.scopes for m in args.clip_mults]
                for scope, mult in grid:
                    name = label(method, scope, mult) if math.isfinite(eps) else method
                    for seed in args.seeds:
                        if (task, name, eps, seed) in store.done:
                            continue
                        r = run_one(args, task, method, eps, seed, scope, mult)
                        print(f"{task} ε={eps:g} {name} seed {seed}: {r['final']:.4f}", flush=True)
                        store.add(r, protocol)
    rows = rows_of(store.runs)
    text = store.finish(rows, verdicts(rows), markdown(rows))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
