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
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
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


def configs(method: str, robust: str) -> tuple[Any, Any]:
    """The client and server configs of a method (CLI defaults otherwise)."""
    algo = method.split("-")[0]
    settings = {"robust": robust} if method.endswith("-robust") else {}
    return make_configs(algo, settings)


def run_one(
    args: argparse.Namespace, method: str, attack: str, fraction: float, seed: int
) -> dict[str, Any]:
    """One run: final accuracy and what the attack did."""
    task = make_task(args.task, num_clients=args.clients, seed=seed)
    cc, sc = configs(method, args.robust)
    tamper = make_attack(attack, fraction, len(task.clients), seed) if attack != "clean" else None
    t0 = time.perf_counter()
    h = simulate(task, cc, sc, rounds=args.rounds, seed=seed, tamper=tamper)
    record_threats(h, tamper, None)
    return {
        "method": method,
        "attack": attack,
        "fraction": fraction,
        "seed": seed,
        "final": h.final(),
        "attack_info": h.sim.get("attack"),
        "seconds": time.perf_counter() - t0,
    }


def _key(r: dict[str, Any]) -> tuple[str, str, float, int]:
    return (r["method"], r["attack"], float(r["fraction"]), int(r["seed"]))


def rows_of(runs: list[dict[str, Any]], robust: str) -> list[dict[str, Any]]:
    """Per (attack, fraction, method): the final accuracy over seeds and the drops in points."""
    groups: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["attack"], float(r["fraction"]), r["method"]), []).append(r)
    clean = {
        m: statistics.median(x["final"] for x in g)
        for (a, _, m), g in groups.items()
        if a == "clean"
    }
    out = []
    for (attack, frac, method), g in sorted(groups.items()):
        finals = [x["final"] for x in g]
        med = statistics.median(finals)
        info = [x["attack_info"] for x in g if x["attack_info"]]
        out.append(
            {
                "attack": attack,
                "fraction": frac,
                "method": method.replace("-robust", f" ({robust})"),
                "seeds": len(g),
                "final_median": med,
                "final_min": min(finals),
                "final_max": max(finals),
                "drop_vs_own_clean": 100 * (clean[method] - med) if method in clean else None,
                "drop_vs_clean_fedng": 100 * (clean["fedng"] - med) if "fedng" in clean else None,
                "attacker_updates": sum(i["sent"] for i in info),
                "attacker_rejected": sum(i["rejected"] for i in info),
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
    head = "| attack | attackers | method | final acc. median [min, max] | drop vs own clean (pts)"
    head += (
        " | drop vs clean FedNG (pts) | attacker updates rejected |\n|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:

        def pts(x: float | None) -> str:
            return "-" if x is None else f"{x:+.2f}"

        lines.append(
            f"| {r['attack']} | {r['fraction']:.0%} | {r['method']} | {r['final_median']:.4f}"
            f" [{r['final_min']:.4f}, {r['final_max']:.4f}] | {pts(r['drop_vs_own_clean'])}"
            f" | {pts(r['drop_vs_clean_fedng'])}"
            f" | {r['attacker_rejected']}/{r['attacker_updates']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Runs the grid (skipping finished runs), writes JSON and markdown, prints the table."""
    args = parse(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = json.loads(out.read_text()) if out.exists() else {"runs": []}
    for extra in [m for m in args.merge.split(",") if m]:
        have = {_key(r) for r in doc["runs"]}
        doc["runs"] += [
            r for r in json.loads(Path(extra).read_text())["runs"] if _key(r) not in have
        ]
    done = {_key(r) for r in doc["runs"]}
    grid = [("clean", 0.0)] + [(a, f) for a in args.attacks for f in args.fractions]
    for attack, frac in grid:
        for method in args.methods:
            for seed in args.seeds:
                if (method, attack, frac, seed) in done:
                    continue
                r = run_one(args, method, attack, frac, seed)
                doc["runs"].append(r)
                print(f"{attack} {frac:.0%} {method} seed {seed}: {r['final']:.4f}", flush=True)
                doc["protocol"] = {k: v for k, v in vars(args).items() if k != "out"}
                out.write_text(json.dumps(doc, indent=1))
    rows = rows_of(doc["runs"], args.robust)
    doc["rows"] = rows
    doc["verdicts"] = verdicts(rows, args.robust)
    out.write_text(json.dumps(doc, indent=1))
    text = markdown(rows) + "\n\n" + "\n".join(doc["verdicts"]) + "\n"
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
