"""Attack benchmark: final accuracy under Byzantine clients, with and without robust aggregation.

Protocol (issue 14): digits, 20 clients (Dirichlet alpha 0.1), 20 rounds, full participation,
seeds 0,1,2; a fraction (10%, 20%) of the clients, chosen by seed, run each attack of
`fedng.federated.attacks` on every upload. Methods: FedNG with `--robust` aggregation, FedNG and
FedAvg without it. Reported: the final test accuracy (median [min, max] over seeds), its drop
in points against the same method's clean run and against clean FedNG, and how many of the
attackers' updates validation rejected. Target: FedNG with robust aggregation loses <= 1 point
(10%) and <= 3 points (20%) against the clean run.

Every finished run is appended to the JSON at once, and a rerun skips the runs already there,
so the grid can be run in pieces (`--attacks`, `--fractions`, `--methods`).

Usage: python bench/bench_robust.py [--quick] [--seeds 0,1,2] [--rounds 20] [--robust trimmed-mean]
Writes bench/results/bench_robust.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _resumable import Runs
from fedng.federated.attacks import ATTACKS, make_attack
from fedng.federated.config import make_configs
from fedng.federated.report.threats import record_threats
from fedng.federated.simulator import simulate
from fedng.federated.tasks.registry import make_task

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("fedng-robust", "fedng", "fedavg")


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def _words(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The benchmark's arguments."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="digits")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    p.add_argument("--attacks", type=_words, default=list(ATTACKS))
    p.add_argument("--fractions", type=_floats, default=[0.1, 0.2])
    p.add_argument("--methods", type=_words, default=list(METHODS))
    p.add_argument("--robust", default="trimmed-mean", help="the robust mode of fedng-robust")
    p.add_argument(
        "--set",
        dest="settings",
        type=_words,
        default=[],
        help="comma-separated key=value config settings of fedng-robust (e.g. robust_trust=0)",
    )
    p.add_argument("--out", default=str(RESULTS / "bench_robust.json"))
    p.add_argument(
        "--merge",
        default="",
        help="comma-separated JSON files of other pieces of the grid to fold in (parallel runs)",
    )
    p.add_argument("--quick", action="store_true", help="5 rounds, seed 0, one attack (smoke)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.seeds, args.attacks, args.fractions = 5, [0], ["signflip"], [0.2]
    return args


def configs(method: str, robust: str, extra: list[str] | None = None) -> tuple[Any, Any]:
    """The client and server configs of a method (CLI defaults otherwise); `extra` are
    "key=value" settings of the robust method."""
    algo = method.split("-")[0]
    settings: dict[str, Any] = {}
    if method.endswith("-robust"):
        settings = {"robust": robust}
        for kv in extra or []:
            key, _, value = kv.partition("=")
            settings[key] = float(value)
    return make_configs(algo, settings)


def run_one(
    args: argparse.Namespace, method: str, attack: str, fraction: float, seed: int
) -> dict[str, Any]:
    """One run: final accuracy and what the attack did."""
    task = make_task(args.task, num_clients=args.clients, seed=seed)
    cc, sc = configs(method, args.robust, args.settings)
    tamper = make_attack(attack, fraction, len(task.clients), seed) if attack != "clean" else None
    t0 = time.perf_counter()
    h = simulate(task, cc, sc, rounds=args.rounds, seed=seed, tamper=tamper)
    record_threats(h, tamper, None)
    bad = set(tamper.attackers) if tamper is not None else set()
    out = [c for r in h.rounds[1:] for c in r.server_log.get("distrusted", [])]
    return {
        "method": method,
        "attack": attack,
        "fraction": fraction,
        "seed": seed,
        "final": h.final(),
        "attack_info": h.sim.get("attack"),
        "distrusted_attackers": sum(c in bad for c in out),
        "distrusted_honest": sum(c not in bad for c in out),
        "seconds": time.perf_counter() - t0,
    }


def _key(r: dict[str, Any]) -> tuple[str, str, float, int]:
    return (r["method"], r["attack"], float(r["fraction"]), int(r["seed"]))


def _paired_drop(clean: dict[int, float], runs: list[dict[str, Any]]) -> float | None:
    """Median over the seeds both have of (clean - attacked) final accuracy, in points."""
    drops = [100 * (clean[r["seed"]] - r["final"]) for r in runs if r["seed"] in clean]
    return statistics.median(drops) if drops else None


def rows_of(runs: list[dict[str, Any]], robust: str) -> list[dict[str, Any]]:
    """Per (attack, fraction, method): the final accuracy over seeds and the drops in points
    against the clean run of the same seed (own method, and plain FedNG)."""
    groups: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["attack"], float(r["fraction"]), r["method"]), []).append(r)
    clean: dict[str, dict[int, float]] = {}
    for (a, _, m), g in groups.items():
        if a == "clean":
            clean[m] = {x["seed"]: x["final"] for x in g}
    out = []
    for (attack, frac, method), g in sorted(groups.items()):
        finals = [x["final"] for x in g]
        info = [x["attack_info"] for x in g if x["attack_info"]]
        out.append(
            {
                "attack": attack,
                "fraction": frac,
                "method": method.replace("-robust", f" ({robust})"),
                "seeds": sorted(x["seed"] for x in g),
                "final_median": statistics.median(finals),
                "final_min": min(finals),
                "final_max": max(finals),
                "drop_vs_own_clean": _paired_drop(clean.get(method, {}), g),
                "drop_vs_clean_fedng": _paired_drop(clean.get("fedng", {}), g),
                "attacker_updates": sum(i["sent"] for i in info),
                "attacker_rejected": sum(i["rejected"] for i in info),
                "distrusted_attackers": sum(x.get("distrusted_attackers", 0) for x in g),
                "distrusted_honest": sum(x.get("distrusted_honest", 0) for x in g),
            }
        )
    return out


def verdicts(rows: list[dict[str, Any]], robust: str) -> list[str]:
    """The target per (attack, fraction) for FedNG with robust aggregation."""
    out = []
    for r in rows:
        if r["method"] != f"fedng ({robust})" or r["attack"] == "clean":
            continue
        limit = 1.0 if r["fraction"] <= 0.1 else 3.0
        drops = [d for d in (r["drop_vs_own_clean"], r["drop_vs_clean_fedng"]) if d is not None]
        ok = bool(drops) and max(drops) <= limit
        out.append(
            f"{r['attack']} {r['fraction']:.0%}: drop {', '.join(f'{d:.2f}' for d in drops)}"
            f" points (limit {limit:g}) -> {'MET' if ok else 'MISSED'}"
        )
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table in markdown."""
    head = "| attack | attackers | method | seeds | final acc. median [min, max]"
    head += " | drop vs own clean (pts)"
    head += " | drop vs clean FedNG (pts) | attacker updates rejected"
    head += " | updates left out by reputation: attackers / honest |"
    head += "\n|---|---|---|---|---|---|---|---|---|"
    lines = [head]
    for r in rows:

        def pts(x: float | None) -> str:
            return "-" if x is None else f"{x:+.2f}"

        lines.append(
            f"| {r['attack']} | {r['fraction']:.0%} | {r['method']} | {r['seeds']}"
            f" | {r['final_median']:.4f}"
            f" [{r['final_min']:.4f}, {r['final_max']:.4f}] | {pts(r['drop_vs_own_clean'])}"
            f" | {pts(r['drop_vs_clean_fedng'])}"
            f" | {r['attacker_rejected']}/{r['attacker_updates']}"
            f" | {r['distrusted_attackers']} / {r['distrusted_honest']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Runs the grid (skipping finished runs), writes JSON and markdown, prints the table."""
    args = parse(argv)
    torch.set_num_threads(1)
    store = Runs(Path(args.out), args.merge, _key)
    protocol = {k: v for k, v in vars(args).items() if k not in ("out", "merge")}
    grid = [("clean", 0.0)] + [(a, f) for a in args.attacks for f in args.fractions]
    for attack, frac in grid:
        for method in args.methods:
            for seed in args.seeds:
                if (method, attack, frac, seed) in store.done:
                    continue
                r = run_one(args, method, attack, frac, seed)
                print(f"{attack} {frac:.0%} {method} seed {seed}: {r['final']:.4f}", flush=True)
                store.add(r, protocol)
    rows = rows_of(store.runs, args.robust)
    text = store.finish(rows, verdicts(rows, args.robust), markdown(rows))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
