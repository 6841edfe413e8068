"""`fedng simulate`: run federated algorithms on an offline task; table, JSON and PNG plots.

Example::

    fedng simulate --task digits --algorithms fedavg,fedprox,scaffold,fedadam,fedng \\
        --clients 20 --alpha 0.1 --rounds 30 --participation 0.5 --seeds 0,1 --out runs/digits

(`python -m fedng.cli simulate ...` does the same without the console script.)
`fedng settings [ALGO ...]` lists every `--set` key of each algorithm with its default.

Every bad argument is one line on stderr naming the argument, and exit code 2 (never a
traceback).

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
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:  # annotations only: nothing federated is imported at start-up
    from fedng.federated.attacks import Attack
    from fedng.federated.config import ClientConfig, ServerConfig
    from fedng.federated.tasks.base import FederatedTask

ALPHA_TASKS = {
    "digits": "> 0",
    "digits-cnn": "> 0",
    "mnist1d": "> 0",
    "mnist1d-cnn": "> 0",
    "lora-digits": "> 0",
    "synthetic": ">= 0",
}
"""The tasks `--alpha` applies to, and what it must be there."""
BETA_TASKS = ("synthetic",)
"""The tasks `--beta` applies to."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`fedng simulate: error: ...`), exit code 2."""

    def error(self, message: str) -> NoReturn:
        """Prints one line and exits with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    """The installed fedng version (without importing the native module)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedng")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def _number(kind: type[int] | type[float], low: float, *, strict: bool) -> Any:
    """An argparse type: a `kind` > `low` (`strict`) or >= `low`, with a one-line error."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if not (value > low if strict else value >= low) or value != value:
            op = ">" if strict else ">="
            raise argparse.ArgumentTypeError(f"must be {op} {low:g}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _fraction(text: str) -> float:
    """An argparse type: a float in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a float in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _attacker_fraction(text: str) -> float:
    """An argparse type: a float in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a float in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _seeds(text: str) -> list[int]:
    """An argparse type: comma-separated integers >= 0, at least one."""
    parts = [t.strip() for t in text.split(",") if t.strip()]
    try:
        seeds = [int(t) for t in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected integers >= 0, got {text!r}")
    return seeds


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

    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = _Parser(prog="fedng", description="Federated Natural Gradient tools")
    p.add_argument("--version", action="version", version=f"fedng {_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    s = sub.add_parser(
        "simulate",
        help="simulate federated training on an offline task",
        formatter_class=fmt,
        epilog="`fedng settings [ALGO ...]` lists every --set key with its default.",
    )
    s.add_argument("--task", choices=TASKS, default="digits", help="the offline task")
    s.add_argument(
        "--algorithms",
        default="fedavg,fedng",
        help="comma-separated: fedavg,fedavgm,fedprox,scaffold,fedadam,fedyogi,"
        "fedadagrad,fedng,fedfisher",
    )
    s.add_argument(
        "--clients",
        type=_number(int, 1, strict=False),
        default=None,
        help="number of clients (None: the task's default)",
    )
    s.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="Dirichlet alpha > 0 (digits, mnist1d and their -cnn variants) or Synthetic alpha"
        " >= 0 (None: task default)",
    )
    s.add_argument(
        "--beta", type=float, default=None, help="Synthetic beta >= 0 (None: equal to alpha)"
    )
    s.add_argument(
        "--rounds", type=_number(int, 1, strict=False), default=30, help="communication rounds"
    )
    s.add_argument(
        "--participation",
        type=_fraction,
        default=1.0,
        help="fraction of clients per round, in (0, 1]",
    )
    s.add_argument("--seeds", type=_seeds, default="0", help="comma-separated seeds")
    s.add_argument(
        "--local-steps", type=_number(int, 1, strict=False), default=10, help="local steps"
    )
    s.add_argument(
        "--batch-size", type=_number(int, 1, strict=False), default=32, help="local batch size"
    )
    s.add_argument(
        "--lr",
        type=_number(float, 0, strict=True),
        default=argparse.SUPPRESS,
        help=f"local learning rate (default {DEFAULT_LR}; FedNG's --dp-epsilon metric preset"
        " has its own unless --lr is given)",
    )
    s.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="[ALGO.]KEY=VALUE",
        help="config overrides, e.g. fedng.curvature=diag fedprox.prox_mu=0.1 (keys: fedng"
        " settings ALGO)",
    )
    s.add_argument(
        "--threads",
        type=_number(int, 1, strict=False),
        default=1,
        help="torch threads (tiny models: 1)",
    )
    s.add_argument(
        "--robust",
        choices=("none", "norm-clip", "trimmed-mean", "median"),
        default="none",
        help="robust aggregation of each round's updates (ServerConfig.robust; --set"
        " robust_trim=, robust_clip_ratio=, robust_trust= (0: no reputation), robust_memory=)",
    )
    s.add_argument(
        "--attack",
        choices=("signflip", "scale", "kron-rescale", "noise"),
        default=None,
        help="a fraction --attackers of the clients (chosen by seed) alter every upload",
    )
    s.add_argument(
        "--attackers",
        type=_attacker_fraction,
        default=None,
        help="fraction of attacking clients, in [0, 1) (with --attack; default 0.1)",
    )
    s.add_argument(
        "--dp-epsilon",
        type=_number(float, 0, strict=True),
        default=None,
        help="client-level DP: calibrate the noise so the run spends at most this epsilon"
        " (for --rounds: fewer rounds, less noise per round); FedNG then defaults to absolute"
        " damping 0.03",
    )
    s.add_argument(
        "--dp-delta", type=_fraction, default=1e-5, help="client-level DP: delta, in (0, 1)"
    )
    s.add_argument(
        "--dp-clip",
        type=_number(float, 0, strict=True),
        default=1.0,
        help="client-level DP: L2 bound on each client's delta",
    )
    s.add_argument(
        "--dp-curvature-clip",
        type=_number(float, 0, strict=False),
        default=0.0,
        help="client-level DP: L2 bound on each client's packed curvature (0: curvature stays"
        " on the client)",
    )
    s.add_argument(
        "--dp-mode",
        choices=("central", "distributed"),
        default="central",
        help="DP noise added by the server, or split across the clients",
    )
    s.add_argument(
        "--out",
        default=None,
        help="folder for JSON histories, summary and plots; each run's final model"
        " (runs/ALGO_seedS/model.pt) and per-round checkpoint (checkpoint.pt) go there too",
    )
    s.add_argument(
        "--resume",
        action="store_true",
        help="continue every run from its last complete round in --out (runs without a"
        " checkpoint start from round 0)",
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    st = sub.add_parser(
        "settings",
        help="list each algorithm's --set keys with their defaults",
        formatter_class=fmt,
    )
    st.add_argument("algorithms", nargs="*", help="algorithms (none: all)")
    return p


def settings_command(args: argparse.Namespace) -> int:
    """Runs `fedng settings`: every key `--set` takes, per algorithm, with its default."""
    from fedng.federated.config import ALGORITHMS, make_configs

    algos = args.algorithms or list(ALGORITHMS)
    unknown = [a for a in algos if a not in ALGORITHMS]
    if unknown:
        print(
            f"fedng settings: unknown algorithm(s) {unknown}; one of {list(ALGORITHMS)}",
            file=sys.stderr,
        )
        return 2
    for a in algos:
        cc, sc = make_configs(a, {})
        values = {**sc.to_dict(), **cc.to_dict()}
        print(f"{a}:")
        for key in sorted(values):
            if key != "algorithm":
                print(f"  {key} = {values[key]!r}")
    return 0


def _check_task_args(args: argparse.Namespace) -> str | None:
    """Why `--alpha` / `--beta` / `--out` do not fit (one line, naming the argument), or None."""
    if args.alpha is not None:
        need = ALPHA_TASKS.get(args.task)
        if need is None:
            return f"--alpha does not apply to --task {args.task} (only {sorted(ALPHA_TASKS)})"
        ok = args.alpha > 0 if need == "> 0" else args.alpha >= 0
        if not ok or args.alpha != args.alpha or args.alpha == float("inf"):
            return f"--alpha must be {need} for --task {args.task}, got {args.alpha}"
    if args.beta is not None:
        if args.task not in BETA_TASKS:
            return f"--beta does not apply to --task {args.task} (only {list(BETA_TASKS)})"
        if not 0 <= args.beta < float("inf"):
            return f"--beta must be >= 0, got {args.beta}"
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        return f"--out {args.out!r} is a file, not a folder"
    if args.resume and args.out is None:
        return "--resume needs --out (the folder of the runs to continue)"
    return None


DEFAULT_LR = 0.05
"""`fedng simulate --lr`'s default."""

DP_FEDNG: dict[str, Any] = {
    "damping_scale": "absolute",
    "damping": 10.0,
    "lr_units": "sgd",
    "kl_clip": 0.0,
}
"""FedNG's client step under --dp-epsilon (the keys --set leaves unset; none under relative
damping): `lr (F/λ + I)^-1 g` with absolute λ 10 and no KL clip (`FedNGConfig.lr_units="sgd"`),
so `--lr` means what it means for FedAvg. Under a Euclidean clip and isotropic noise a
gradient-like release is the best per unit of clip, and each client's natural gradient stretches
its own low-curvature directions, which the clip charges and the mean cancels; K-FAC's Tikhonov
damping gives each factor sqrt(λ) ~ 3: far above the output factors' eigenvalues (<= 0.14 on
MNIST-1D), near the input factors' largest (3-9), so the step keeps only the input-side
whitening of the shared top directions. λ was tuned on bench_dp's tuning seed (MNIST-1D, 200
clients, ε=4, T=20; docs/robustness_privacy.md, "Damping as the interpolation between NG and
SGD"). Relative damping with the KL clip keeps every local step's size in KL, so once the noise
saturates the model the steps follow the noise (same section, "Tuning under DP")."""


DP_METRIC_FEDNG: dict[str, Any] = {
    "dp_metric": "curvature",
    "dp_curvature_release": "input",
    "dp_curvature_rank": 2,
    "dp_curvature_share": 0.05,
    "dp_curvature_pool": "mean",
    "dp_metric_damping": 10.0,
    "aggregation": "mean",
    "curvature_ema": 0.0,
    "kl_clip": 0.0,
    "damping_scale": "relative",
    "damping": 0.03,
    "lr": 0.2,
    "server_decay": 0.0,
}
"""FedNG with its DP clip and noise in the metric of its private input curvature
(`aggregation.dp_metric`): each round the clients also release their K-FAC input factors' shapes
(5% of the round's budget), the server averages every noised release so far and denoises the
mean to its top 2 directions (`dp_curvature_pool="mean"`, post-processing); the deltas are
clipped in that metric and the noise is shaped by its inverse, and every client preconditions
with the same public curvature (relative damping: the released shapes carry no scale), which
pairs its step with the metric (docs/robustness_privacy.md, "Clipping in the curvature metric").
The server step does not decay (`server_decay` 0, as for every FedNG run under --dp-epsilon):
under DP the rounds are few and tuned, and the decay cost digits at ε=4 three points.
It needs a curvature clip (`dp_curvature_clip`; the shapes' norm is at most sqrt(number of K-FAC
blocks))."""


def dp_overrides(
    algos: Sequence[str], overrides: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """`overrides` with `DP_FEDNG` under FedNG's own keys the user left unset (for every
    algorithm, "*", or FedNG's own), unless the user asked for relative damping (`lr_units`
    "sgd" needs absolute damping), so `--set fedng.damping=3` is λ 3 in the preset; where the
    user asked FedNG for `dp_metric=curvature`, with the rest of `DP_METRIC_FEDNG` under the
    keys the user left unset instead; and FedNG's server step without its decay
    (`server_decay` 0) unless the user set one."""
    out = {k: dict(v) for k, v in overrides.items()}
    if "fedng" in algos:
        given = {**out.get("*", {}), **out.get("fedng", {})}
        if given.get("dp_metric") == "curvature":
            rest = {k: v for k, v in DP_METRIC_FEDNG.items() if k not in given}
            out["fedng"] = {**rest, **out.get("fedng", {})}
        elif given.get("damping_scale", "absolute") == "absolute":
            rest = {k: v for k, v in DP_FEDNG.items() if k not in given}
            out["fedng"] = {**rest, **out.get("fedng", {})}
        if "server_decay" not in given:  # under DP the rounds are few and tuned
            out["fedng"] = {"server_decay": 0.0, **out.get("fedng", {})}
    return out


DP_DEFAULTS = {"dp_delta": 1e-5, "dp_clip": 1.0, "dp_curvature_clip": 0.0, "dp_mode": "central"}
"""The --dp-* flags that only apply with --dp-epsilon, at their defaults."""


def _check_threat_args(args: argparse.Namespace) -> str | None:
    """Why --attack / --attackers / --robust / --dp-* do not fit together, or None."""
    if args.attackers is not None and args.attack is None:
        return "--attackers applies only with --attack"
    if args.dp_epsilon is None:
        given = [k for k, v in DP_DEFAULTS.items() if getattr(args, k) != v]
        if given:
            return f"--{given[0].replace('_', '-')} applies only with --dp-epsilon"
        return None
    if args.robust != "none":
        return "--robust does not combine with --dp-epsilon (DP clipping bounds every update)"
    if not 0 < args.dp_delta < 1:
        return f"--dp-delta must be in (0, 1), got {args.dp_delta}"
    return None


def _private(
    args: argparse.Namespace, configs: dict[str, tuple[ClientConfig, ServerConfig]], k: int
) -> dict[str, dict[str, Any]]:
    """Calibrates each algorithm's DP noise for the run (rounds, sampling rate) and sets its
    `dp_*` knobs in `configs`; returns what was calibrated, per algorithm.

    Raises:
        ImportError: dp-accounting is missing.
    """
    from fedng.federated.aggregation.dp import noise_multiplier_for
    from fedng.federated.algorithms.registry import get_algorithm
    from fedng.federated.config.curvature import CurvatureConfig

    m = max(1, min(k, round(args.participation * k)))
    q = m / k
    info = {}
    for a, (cc, sc) in configs.items():
        limit = get_algorithm(a).max_rounds
        rounds = args.rounds if limit is None else min(args.rounds, limit)
        z = noise_multiplier_for(args.dp_epsilon, args.dp_delta, rounds, q)
        curv = args.dp_curvature_clip if isinstance(cc.options, CurvatureConfig) else 0.0
        knobs: dict[str, Any] = {
            "dp_clip": args.dp_clip,
            "dp_curvature_clip": curv,
            "dp_noise_multiplier": z,
            "dp_mode": args.dp_mode,
            "dp_clients": m,
        }
        configs[a] = (cc.replace(**knobs), sc.replace(**knobs))
        info[a] = {
            "target_epsilon": args.dp_epsilon,
            "delta": args.dp_delta,
            "noise_multiplier": z,
            "sampling_rate": q,
            "clip": args.dp_clip,
            "curvature_clip": curv,
            "mode": args.dp_mode,
        }
    return info


def _tasks(args: argparse.Namespace) -> dict[int, FederatedTask] | str:
    """The task of every seed, or why it cannot be built (e.g. more clients than examples)."""
    from fedng.federated.tasks.registry import make_task

    out = {}
    for seed in args.seeds:
        try:
            out[seed] = make_task(
                args.task, num_clients=args.clients, alpha=args.alpha, beta=args.beta, seed=seed
            )
        except ValueError as err:
            return f"cannot build --task {args.task} with --clients {args.clients}: {err}"
    return out


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


def _attack(args: argparse.Namespace, k: int, seed: int) -> Attack | None:
    """The run's attack (None without --attack)."""
    from fedng.federated.attacks import make_attack

    if args.attack is None:
        return None
    fraction = 0.1 if args.attackers is None else args.attackers
    return make_attack(args.attack, fraction, k, seed)


def run_dir(out: Path, algorithm: str, seed: int) -> Path:
    """Where one run's checkpoint and final model live inside `--out`."""
    return out / "runs" / f"{algorithm}_seed{seed}"


def simulate_command(args: argparse.Namespace) -> int:
    """Runs `fedng simulate`."""
    import torch

    from fedng.federated.checkpoint import CheckpointError
    from fedng.federated.report import FLAG_DEFINITIONS, History, plot_histories, summarize, table
    from fedng.federated.report.threats import record_threats
    from fedng.federated.resume import MODEL_FILE
    from fedng.federated.simulator import simulate

    algos = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    seeds: list[int] = args.seeds
    lr_given = getattr(args, "lr", None)
    lr = DEFAULT_LR if lr_given is None else lr_given
    base = {"lr": lr, "local_steps": args.local_steps, "batch_size": args.batch_size}
    if args.robust != "none":
        base["robust"] = args.robust
    problem = (
        _check_task_args(args)
        or _check_threat_args(args)
        or (None if algos else "--algorithms is empty")
    )
    if problem:
        print(f"fedng simulate: error: {problem}", file=sys.stderr)
        return 2
    try:
        overrides = _settings(args.set)
        if args.dp_epsilon is not None:
            user = overrides
            overrides = dp_overrides(algos, overrides)
            set_lr = "lr" in {**user.get("*", {}), **user.get("fedng", {})}
            if lr_given is not None and not set_lr:  # --lr wins over a preset's lr
                overrides.get("fedng", {}).pop("lr", None)
            if "fedng" in algos:
                picked = {"lr": lr, **overrides.get("fedng", {})}
                print(f"fedng simulate: FedNG under DP runs with {picked}", file=sys.stderr)
        configs = _configs(algos, base, overrides)
    except (ValueError, TypeError) as err:
        print(f"fedng simulate: {err}", file=sys.stderr)
        return 2
    tasks = _tasks(args)
    if isinstance(tasks, str):
        print(f"fedng simulate: error: {tasks}", file=sys.stderr)
        return 2
    k = len(next(iter(tasks.values())).clients)
    try:
        dp_info = _private(args, configs, k) if args.dp_epsilon is not None else {}
    except ImportError as err:
        print(f"fedng simulate: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else None
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            print(f"fedng simulate: error: --out {args.out!r}: {err.strerror}", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    groups: dict[str, list[History]] = {a: [] for a in algos}
    t0 = time.perf_counter()
    for seed in seeds:
        task = tasks[seed]
        for a in algos:
            cc, sc = configs[a]
            if dp_info:
                cc, sc = cc.replace(dp_seed=seed), sc.replace(dp_seed=seed)
            attack = _attack(args, len(task.clients), seed)
            try:
                h = simulate(
                    task,
                    cc,
                    sc,
                    rounds=args.rounds,
                    participation=args.participation,
                    seed=seed,
                    progress=not args.no_progress,
                    desc=f"{a} seed {seed}",
                    checkpoint_dir=None if out is None else run_dir(out, a, seed),
                    resume=args.resume,
                    tamper=attack,
                )
            except CheckpointError as err:
                print(f"fedng simulate: error: --resume: {err}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                hint = " rerun with --resume to continue" if out is not None else ""
                print(f"fedng simulate: interrupted ({a} seed {seed});{hint}", file=sys.stderr)
                return 130
            record_threats(h, attack, dp_info.get(a))
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
            "flag_definitions": FLAG_DEFINITIONS,
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        paths = plot_histories(groups, out, title=first.task)
        print(
            f"wrote {out}/summary.json, {len(seeds) * len(algos)} histories, "
            + ", ".join(p.name for p in paths)
            + f"; final models in {out}/runs/ALGO_seedS/{MODEL_FILE}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fedng` console script.

    Returns:
        The exit status: 0, or 2 for a bad argument (one line on stderr); `--help` and
        `--version` return 0.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse: --help, --version, or a one-line error
        return stop.code if isinstance(stop.code, int) else 2
    if args.command == "simulate":
        return simulate_command(args)
    if args.command == "settings":
        return settings_command(args)
    return 2  # pragma: no cover - argparse rejects other commands


if __name__ == "__main__":
    sys.exit(main())
