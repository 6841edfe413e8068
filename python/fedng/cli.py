"""`fedng simulate`: run federated algorithms on an offline task; table, JSON and PNG plots.

Example::

    fedng simulate --task digits --algorithms fedavg,fedprox,scaffold,fedadam,fedng \\
        --clients 20 --alpha 0.1 --rounds 30 --participation 0.5 --seeds 0,1 --out runs/digits

(`python -m fedng.cli simulate ...` does the same without the console script.)

The fedng imports are deferred into the functions that need them, so that `fedng --help` starts
without loading torch and the federated stack (the layering test allows this in cli.py only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: nothing federated is imported at start-up
    from fedng.federated.config import ClientConfig, ServerConfig


def _settings(pairs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`ALGO.key=value` (or `key=value` for every algorithm) -> {algo or "*": {key: value}}."""
    from fedng.federated.config import parse_value

    out: dict[str, dict[str, Any]] = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep:
            raise SystemExit(
                f"fedng simulate: --set expects KEY=VALUE or ALGO.KEY=VALUE, got {p!r}"
            )
        algo, dot, field = key.rpartition(".")
        out.setdefault(algo if dot else "*", {})[field] = parse_value(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The `fedng` argument parser."""
    from fedng.federated.tasks.registry import TASKS

    p = argparse.ArgumentParser(prog="fedng", description="Federated Natural Gradient tools")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("simulate", help="simulate federated training on an offline task")
    s.add_argument("--task", choices=TASKS, default="digits")
    s.add_argument(
        "--algorithms",
        default="fedavg,fedng",
        help="comma-separated: fedavg,fedavgm,fedprox,scaffold,fedadam,fedyogi,"
        "fedadagrad,fedng,fedfisher",
    )
    s.add_argument("--clients", type=int, default=None, help="number of clients (task default)")
    s.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="Dirichlet alpha (digits, mnist1d) or Synthetic alpha",
    )
    s.add_argument("--beta", type=float, default=None, help="Synthetic beta (default: alpha)")
    s.add_argument("--rounds", type=int, default=30)
    s.add_argument("--participation", type=float, default=1.0)
    s.add_argument("--seeds", default="0", help="comma-separated seeds")
    s.add_argument("--local-steps", type=int, default=10)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--lr", type=float, default=0.05, help="local learning rate")
    s.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="[ALGO.]KEY=VALUE",
        help="config overrides, e.g. fedng.curvature=diag fedprox.prox_mu=0.1",
    )
    s.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1)")
    s.add_argument("--out", default=None, help="folder for JSON histories, summary and plots")
    s.add_argument("--no-progress", action="store_true")
    return p


def _configs(
    algos: list[str], base: dict[str, Any], overrides: dict[str, dict[str, Any]]
) -> dict[str, tuple[ClientConfig, ServerConfig]]:
    """Each algorithm's configs: `base`, the `*` overrides it has a knob for, its own overrides.

    A `*` key (`--set damping=0.1`) applies to the algorithms that have it and is skipped by the
    others; an `ALGO.key` must be a setting of ALGO.

    Raises:
        ValueError: an unknown algorithm, an `ALGO.key` ALGO lacks, or a `*` key no algorithm has
            (one line, naming the valid keys).
    """
    from fedng.federated.config import ALGORITHMS, make_configs, setting_names

    shared = overrides.get("*", {})
    known = set().union(*(setting_names(a) for a in ALGORITHMS))
    unknown = sorted(set(shared) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; valid keys: {sorted(known)}")
    configs = {}
    for a in algos:
        mine = {k: v for k, v in shared.items() if a not in ALGORITHMS or k in setting_names(a)}
        configs[a] = make_configs(a, {**base, **mine, **overrides.get(a, {})})
    return configs


def simulate_command(args: argparse.Namespace) -> int:
    """Runs `fedng simulate`."""
    import torch

    from fedng.federated.report import History, plot_histories, summarize, table
    from fedng.federated.simulator import simulate
    from fedng.federated.tasks.registry import make_task

    torch.set_num_threads(max(1, args.threads))
    algos = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    base = {"lr": args.lr, "local_steps": args.local_steps, "batch_size": args.batch_size}
    try:
        configs = _configs(algos, base, _settings(args.set))
    except ValueError as err:
        print(f"fedng simulate: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[History]] = {a: [] for a in algos}
    t0 = time.perf_counter()
    for seed in seeds:
        task = make_task(
            args.task, num_clients=args.clients, alpha=args.alpha, beta=args.beta, seed=seed
        )
        for a in algos:
            cc, sc = configs[a]
            h = simulate(
                task,
                cc,
                sc,
                rounds=args.rounds,
                participation=args.participation,
                seed=seed,
                progress=not args.no_progress,
                desc=f"{a} seed {seed}",
            )
            groups[a].append(h)
            if out is not None:
                h.to_json(out / f"history_{a}_seed{seed}.json")
    ref = groups.get("fedavg")
    target = None
    if ref:
        target = statistics.median(h.final() for h in ref)
    rows = [summarize(a, hs, target) for a, hs in groups.items()]
    first = next(iter(groups.values()))[0]
    print(
        f"\n{first.task}: {len(task.clients)} clients, {args.rounds} rounds, participation"
        f" {args.participation}, seeds {seeds} ({time.perf_counter() - t0:.1f} s)"
    )
    print(table(rows, first.metric, target))
    if out is not None:
        summary = {
            "task": first.task,
            "args": vars(args),
            "target": target,
            "rows": [r.to_dict() for r in rows],
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        paths = plot_histories(groups, out, title=first.task)
        print(
            f"wrote {out}/summary.json, {len(seeds) * len(algos)} histories, "
            + ", ".join(p.name for p in paths)
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fedng` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "simulate":
        return simulate_command(args)
    return 2  # pragma: no cover - argparse rejects other commands


if __name__ == "__main__":
    sys.exit(main())
