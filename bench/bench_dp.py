"""Client-level differential privacy benchmark: final accuracy of FedNG and FedAvg at a target ε.

Protocol (issue 14): digits and MNIST-1D, 20 clients (Dirichlet alpha 0.1 digits, the task's
default for MNIST-1D), full participation; ε in {1, 4, 8} at δ = 1e-5, central Gaussian noise
calibrated by dp-accounting's RDP accountant for the run's own number of rounds T; the ε the
accountant reports for the rounds actually run is recorded.

The number of rounds is a DP hyperparameter: the accountant composes T releases, so for a fixed
ε fewer rounds buy a smaller noise multiplier z (recalibrated for every T). Every method gets
the same configuration grid: T in `--rounds` x clip scope in `--scopes` x clip multiple in
`--clip-mults` x server momentum in `--server-momenta`. With more than one configuration, each
is run once on a tuning seed (`--tune-seed`, whose data split, initialization and noise differ
from the evaluation seeds) and the one with the best final client-held validation accuracy wins
(the released model is the last one, so the last round's validation metric is the criterion);
the winner runs on the evaluation `--seeds`. Test data is never used for selection. As usual in
DP benchmarks the tuning itself is not charged to ε (the same for every method, stated).

Each method's clip C is a multiple of the median L2 norm of its own clients' round-0 updates (a
non-private choice of the clip, stated as such: a deployment would fix C beforehand or spend
budget on choosing it). FedNG keeps its curvature on the client (`dp_curvature_clip` 0: it
preconditions its local steps with its own curvature; only the clipped delta is released, so
the noise is the same mechanism as FedAvg's); `--share-curvature` adds FedNG with its
curvature clipped to the median payload norm and released under the same ε (the noise then
grows by sqrt(2)); method "fedng+avgclip" is FedNG with FedAvg's clip (so FedAvg's noise);
method "fedng+metric" is FedNG with `cli.DP_METRIC_FEDNG` (clip and noise in the metric of its
private input curvature, `aggregation.dp_metric`): its curvature clip is the median norm of the
released input shapes, its clip C the median round-0 norm with the identity metric and no
preconditioner (no curvature is public in round 0; from round 1 on the public metric sets the
delta's scale).
Reported: the final test accuracy (median [min, max] over seeds) and the chosen configuration,
beside the non-private run (`--clean-rounds` rounds).
Target: FedNG at ε = 4 at least matches FedAvg at ε = 4.

Scale: `--clients K` (20 by default), `--participation q` (the simulator samples round(qK)
clients a round and the accountant composes T Poisson-subsampled Gaussian mechanisms at that
rate, m/K; the server divides the noised sum by m), and for MNIST-1D `--samples N` generated
examples and `--alpha` (at hundreds of clients the default Dirichlet 0.1 leaves clients without
examples). Under DP plain "fedng" runs what `fedng simulate --dp-epsilon` runs
(`cli.dp_overrides`: `cli.DP_FEDNG`, absolute λ 10 in SGD units without the KL clip, unless a
damping key is set; no server-step decay), so its lr means FedAvg's.

Finished runs are appended to the JSON at once; a rerun skips them. One JSON holds one scale
(clients, participation, samples, alpha): a different one needs another `--out`.

Usage: python bench/bench_dp.py [--quick] [--tasks digits,mnist1d] [--seeds 0,1,2]
[--epsilons 1,4,8] [--rounds 5,10,20] [--knob METHOD:KEY=V1,V2 ...]. The issue-14 table:
`--methods fedng+metric,fedavg --knob all:lr=0.01,0.02,0.05,0.1,0.2,0.5 --seeds 5,6,7,8,9`;
at 200 clients: `--tasks mnist1d --clients 200 --samples 20000 --alpha 0.3 --methods
fedng,fedavg --rounds 10,20 --knob all:lr=0.05,0.2,0.5 --seeds 5,6,7,8,9`
(docs/results/bench_dp.md).
Writes bench/results/bench_dp.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _resumable import Runs
from fedng.cli import DP_METRIC_FEDNG, dp_overrides
from fedng.curvature import CurvatureSet
from fedng.curvature.quantize import float_payload
from fedng.federated.aggregation.dp import noise_multiplier_for
from fedng.federated.aggregation.dp_metric import input_shapes
from fedng.federated.client import get_params
from fedng.federated.config import make_configs
from fedng.federated.report.threats import record_threats
from fedng.federated.round import client_step, server_init
from fedng.federated.simulator import sample_size, sampled_fraction, simulate
from fedng.federated.tasks.base import FederatedTask
from fedng.federated.tasks.mnist1d import mnist1d_task
from fedng.federated.tasks.registry import make_task
from fedng.federated.validate import delta_norm

RESULTS = Path(__file__).resolve().parent / "results"
TUNE_SEED = 100
INT_KNOBS = frozenset({"local_steps", "batch_size", "dp_curvature_rank"})


@dataclass(frozen=True)
class DpConfig:
    """One point of the DP configuration grid (the same grid for every method)."""

    rounds: int
    scope: str = "joint"
    mult: float = 1.0
    server_momentum: float = 0.0
    knobs: tuple[tuple[str, float | str], ...] = ()

    def settings(self) -> dict[str, Any]:
        """The method settings this config overrides (`make_configs` keys)."""
        return {k: (int(v) if k in INT_KNOBS else v) for k, v in self.knobs}

    def label(self) -> str:
        """A short name ("T5", "T20 layer 0.3x m0.5")."""
        out = f"T{self.rounds}"
        if self.scope != "joint":
            out += f" {self.scope}"
        if self.mult != 1.0:
            out += f" {self.mult:g}x"
        if self.server_momentum:
            out += f" m{self.server_momentum:g}"
        for k, v in self.knobs:
            out += f" {k}={v:g}" if isinstance(v, float) else f" {k}={v}"
        return out


def _list(cast: Any) -> Any:
    return lambda text: [cast(t) for t in text.split(",") if t.strip()]


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The benchmark's arguments."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=_list(str), default=["digits", "mnist1d"])
    p.add_argument("--clients", type=int, default=20)
    p.add_argument(
        "--participation",
        type=float,
        default=1.0,
        help="fraction q of the clients sampled per round; the accountant composes T"
        " Poisson-subsampled Gaussian mechanisms at the rate the simulator samples",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="Dirichlet label-skew concentration (default: the task's, 0.1); at hundreds of"
        " clients 0.1 leaves some clients without examples",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=0,
        help="MNIST-1D examples generated (80%% train, 20%% test; 0: the task's 5000)",
    )
    p.add_argument(
        "--rounds",
        type=_list(int),
        default=[5, 10, 20],
        help="numbers of rounds T (configs; z is recalibrated for each)",
    )
    p.add_argument("--clean-rounds", type=int, default=20, help="rounds of the run without DP")
    p.add_argument("--seeds", type=_list(int), default=[0, 1, 2])
    p.add_argument("--tune-seed", type=int, default=TUNE_SEED)
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
    p.add_argument(
        "--server-momenta",
        type=_list(float),
        default=[0.0],
        help="server momentum values (configs; averages the noise over rounds)",
    )
    p.add_argument(
        "--knob",
        action="append",
        default=[],
        metavar="METHOD:KEY=V1,V2",
        help="a method setting to tune over (configs; METHOD 'all' for every method), e.g."
        " fedng:damping=0.1,1 fedavg:lr=0.05,0.2; give each method as many values",
    )
    p.add_argument("--out", default=str(RESULTS / "bench_dp.json"))
    p.add_argument("--no-clean", action="store_true", help="skip the runs without DP")
    p.add_argument(
        "--merge",
        default="",
        help="comma-separated JSON files of other pieces of the grid to fold in (parallel runs)",
    )
    p.add_argument("--quick", action="store_true", help="digits, T 3, seed 0, ε 4 (smoke)")
    args = p.parse_args(argv)
    if not 0 < args.participation <= 1:
        p.error(f"--participation must be in (0, 1], got {args.participation}")
    if args.samples < 0:
        p.error(f"--samples must be >= 0, got {args.samples}")
    if args.samples and not all(t.startswith("mnist1d") for t in args.tasks):
        p.error("--samples applies only to the mnist1d tasks (the others' data is fixed)")
    if args.quick:
        args.tasks, args.rounds, args.seeds, args.epsilons = ["digits"], [3], [0], [4.0]
        args.clean_rounds = 3
    if args.share_curvature and "fedng+curv" not in args.methods:
        args.methods.append("fedng+curv")
    return args


def _value(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text.strip()


def method_knobs(specs: list[str], method: str) -> list[tuple[tuple[str, float | str], ...]]:
    """The product of the `--knob` values that apply to `method` ([()] when none).

    Raises:
        ValueError: a spec is not METHOD:KEY=V1,V2.
    """
    axes: list[list[tuple[str, float | str]]] = []
    for spec in specs:
        who, sep, rest = spec.partition(":")
        key, eq, values = rest.partition("=")
        if not (sep and eq and key and values):
            raise ValueError(f"--knob must be METHOD:KEY=V1,V2, got {spec!r}")
        if who in ("all", method, method.split("+")[0]):
            axes.append([(key, _value(v)) for v in values.split(",") if v.strip()])
    return list(itertools.product(*axes))


def grid(args: argparse.Namespace, method: str) -> list[DpConfig]:
    """The method's DP configurations: rounds x clip scopes x clip multiples x server momenta
    (the same for every method) x its `--knob` values."""
    return [
        DpConfig(t, s, m, b, k)
        for t, s, m, b, k in itertools.product(
            args.rounds,
            args.scopes,
            args.clip_mults,
            args.server_momenta,
            method_knobs(args.knob, method),
        )
    ]


def _released_norm(u: Any, release: str) -> float:
    """The norm of an update's curvature as the DP clip sees it: the float payload (int8 kinds
    dequantized; the raw int8 payload's norm is ~400x larger), transformed as `release` says."""
    arrays, meta = float_payload(u.curvature, u.meta["curv"])
    if release == "input":
        cs = CurvatureSet.from_arrays({k: v.float() for k, v in arrays.items()}, meta)
        input_shapes(cs)
        arrays = cs.to_arrays(torch.float32)[0]
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in arrays.values()))


def task_of(
    name: str, clients: int, seed: int, samples: int = 0, alpha: float | None = None
) -> FederatedTask:
    """The task `name` with `clients` clients (Dirichlet `alpha`, None: the task's default); an
    MNIST-1D task from `samples` generated examples when `samples` > 0 (the other tasks' data
    is fixed).

    Raises:
        ValueError: `samples` > 0 for a task that is not MNIST-1D.
    """
    if not samples:
        return make_task(name, num_clients=clients, alpha=alpha, seed=seed)
    if name not in ("mnist1d", "mnist1d-cnn"):
        raise ValueError(f"--samples applies only to the mnist1d tasks, not {name!r}")
    return mnist1d_task(
        num_clients=clients,
        alpha=0.1 if alpha is None else alpha,
        seed=seed,
        num_samples=samples,
        model="cnn" if name == "mnist1d-cnn" else "mlp",
    )


def clips(
    task_name: str,
    algo: str,
    clients: int,
    seed: int,
    settings: dict[str, Any] | None = None,
    samples: int = 0,
    alpha: float | None = None,
) -> tuple[float, float]:
    """The median round-0 delta norm and packed-curvature norm of the method's clients (under
    `settings`; all clients, whatever the participation)."""
    task = task_of(task_name, clients, seed, samples, alpha)
    cc, sc = make_configs(algo, settings or {})
    cc = cc.replace(loss=task.loss)
    torch.manual_seed(seed)
    model = task.model_fn(seed)
    _, msg = server_init(get_params(model), sc)
    ups = [client_step(model, c, msg, cc) for c in task.clients]
    release = (settings or {}).get("dp_curvature_release", "full")
    curv = [_released_norm(u, release) for u in ups if u.curvature]
    return statistics.median(delta_norm(u) for u in ups), statistics.median(curv or [0.0])


def run_one(
    args: argparse.Namespace,
    task_name: str,
    method: str,
    eps: float,
    seed: int,
    cfg: DpConfig,
    role: str = "eval",
) -> dict[str, Any]:
    """One run of `cfg` at ε (inf: without DP, `cfg.rounds` rounds, no clip)."""
    algo = method.split("+")[0]
    metric = method.endswith("+metric")  # curvature released, deltas clipped in its metric
    task = task_of(task_name, args.clients, seed, args.samples, args.alpha)
    k = len(task.clients)
    settings = cfg.settings()
    if metric and math.isfinite(eps):
        settings = {**DP_METRIC_FEDNG, **settings}
    elif math.isfinite(eps):  # what `fedng simulate --dp-epsilon` runs (plain FedNG: absolute
        # damping, no server-step decay; FedAvg unchanged)
        settings = dp_overrides([algo], {algo: settings}).get(algo, settings)
    cc, sc = make_configs(algo, settings)
    dp = None
    if math.isfinite(eps):
        data = (args.samples, args.alpha)
        c, cf = clips(task_name, algo, args.clients, seed, settings, *data)
        if method.endswith("+metric"):  # C: the update in the identity metric (no curvature
            # is public in round 0), which from round 1 on sets the delta's scale
            plain = {**settings, "precond": "none"}
            c = clips(task_name, algo, args.clients, seed, plain, *data)[0]
        if method.endswith("+avgclip"):  # the same clip, so the same noise, as FedAvg
            c = clips(task_name, "fedavg", args.clients, seed, None, *data)[0]
        c, cf = c * cfg.mult, (cf if method.endswith("+curv") or metric else 0.0)
        # the rate the simulator actually samples at (a fixed-size set of m clients a round;
        # the accountant's Poisson sampling at that rate is the usual DP-FedAvg approximation)
        q = sampled_fraction(k, args.participation)
        z = noise_multiplier_for(eps, args.delta, cfg.rounds, q)
        knobs: dict[str, Any] = {
            "dp_clip": c,
            "dp_curvature_clip": cf,
            "dp_noise_multiplier": z,
            "dp_clients": sample_size(k, args.participation),
            "dp_seed": seed,
            "dp_clip_scope": cfg.scope,
        }
        cc, sc = cc.replace(**knobs), sc.replace(**knobs, server_momentum=cfg.server_momentum)
        dp = {
            "target_epsilon": eps,
            "delta": args.delta,
            "noise_multiplier": z,
            "sampling_rate": q,
            "clip": c,
            "curvature_clip": cf,
            "mode": "central",
            "scope": cfg.scope,
            "clip_mult": cfg.mult,
        }
    t0 = time.perf_counter()
    h = simulate(task, cc, sc, rounds=cfg.rounds, seed=seed, participation=args.participation)
    record_threats(h, None, dp)
    return {
        "task": task_name,
        "method": method,
        "config": cfg.label() if math.isfinite(eps) else f"T{cfg.rounds}",
        "role": role,
        "target_epsilon": eps if math.isfinite(eps) else None,
        "seed": seed,
        "clients": k,
        "participation": args.participation,
        "samples": args.samples,
        "alpha": args.alpha,
        "final": h.final(),
        "val": h.rounds[-1].val_metric,
        "curve": [r.metric for r in h.rounds],
        "dp": h.sim.get("dp"),
        "seconds": time.perf_counter() - t0,
    }


def _key(r: dict[str, Any]) -> tuple[str, str, str, str, float, int]:
    eps = r["target_epsilon"]
    return (
        r["task"],
        r["method"],
        r["config"],
        r["role"],
        math.inf if eps is None else float(eps),
        int(r["seed"]),
    )


def chosen(
    runs: list[dict[str, Any]], task: str, method: str, eps: float, labels: list[str]
) -> str | None:
    """Of the configurations `labels`, the one with the best final validation accuracy on the
    tuning seed (ties: the first run), or None when none was tuned."""
    tuned = [
        r
        for r in runs
        if r["role"] == "tune"
        and _key(r)[:2] == (task, method)
        and _key(r)[4] == eps
        and r["config"] in labels
    ]
    if not tuned:
        return None
    vals = [r["val"] if math.isfinite(r["val"]) else -math.inf for r in tuned]
    return str(tuned[vals.index(max(vals))]["config"])


def rows_of(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, ε, method): the evaluated configuration's final accuracy over seeds, and the
    ε the accountant reported."""
    groups: dict[tuple[str, float, str, str], list[dict[str, Any]]] = {}
    for r in runs:
        if r["role"] != "eval":
            continue
        t, m, c, _, e, _ = _key(r)
        groups.setdefault((t, e, m, c), []).append(r)
    out = []
    for (task, eps, method, _), g in sorted(groups.items()):
        finals = [x["final"] for x in g]
        spent = [x["dp"]["epsilon"] for x in g if x["dp"]]
        out.append(
            {
                "task": task,
                "target_epsilon": None if math.isinf(eps) else eps,
                "method": method,
                "config": g[0]["config"],
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
    """Each FedNG variant ("fedng", "fedng+metric", ...) vs FedAvg at ε = 4, per task (each
    with its selected configuration)."""
    out = []
    for task in sorted({r["task"] for r in rows}):
        at4 = [r for r in rows if r["task"] == task and r["target_epsilon"] == 4.0]
        avg = [r for r in at4 if r["method"] == "fedavg"]
        ngs = [r for r in at4 if r["method"].split("+")[0] == "fedng"]
        if len(avg) != 1 or not ngs or len({r["method"] for r in ngs}) != len(ngs):
            if at4:
                out.append(f"{task} ε=4: not one evaluated configuration per method, no verdict")
            continue
        a = avg[0]
        for ng in sorted(ngs, key=lambda r: str(r["method"])):
            out.append(
                f"{task} ε=4: {ng['method']} ({ng['config']}) {ng['final_median']:.4f} vs FedAvg"
                f" ({a['config']}) {a['final_median']:.4f} over {ng['seeds']}/{a['seeds']}"
                f" seeds -> {'MET' if ng['final_median'] >= a['final_median'] else 'MISSED'}"
            )
    return out


def paired(runs: list[dict[str, Any]], eps: float = 4.0) -> list[str]:
    """Each FedNG variant vs FedAvg at `eps`, per task, seed by seed on the evaluation seeds both
    ran (the runs of one seed share the data split, the initialization and the noise seed): the
    per-seed differences, how many seeds each method leads, and the mean difference with its
    standard error. A gap within about two standard errors is a tie at this number of seeds."""
    finals: dict[tuple[str, str], dict[int, float]] = {}
    for r in runs:
        if r["role"] == "eval" and r["target_epsilon"] == eps:
            finals.setdefault((r["task"], r["method"]), {})[int(r["seed"])] = float(r["final"])
    out = []
    for task, method in sorted(finals):
        avg = finals.get((task, "fedavg"))
        if method.split("+")[0] != "fedng" or not avg:
            continue
        ng = finals[(task, method)]
        seeds = sorted(set(ng) & set(avg))
        if not seeds:
            continue
        diffs = [ng[s] - avg[s] for s in seeds]
        mean = statistics.mean(diffs)
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
        wins = sum(d > 0 for d in diffs)
        losses = sum(d < 0 for d in diffs)
        per = " / ".join(f"{d:+.3f}" for d in diffs)
        out.append(
            f"{task} ε={eps:g} paired, {method} - FedAvg per seed {seeds}: {per}; leads on"
            f" {wins}, behind on {losses} of {len(seeds)}; mean {mean:+.4f} ± {se:.4f} (s.e.)"
        )
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table in markdown."""
    lines = [
        "| task | target ε | method | config | seeds | final acc. median [min, max] |"
        " ε spent (RDP) | noise mult. | clip |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eps = "∞ (no DP)" if r["target_epsilon"] is None else f"{r['target_epsilon']:g}"
        spent = "-" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.3f}"
        z = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3f}"
        c = "-" if r["clip"] is None else f"{r['clip']:.3f}"
        lines.append(
            f"| {r['task']} | {eps} | {r['method']} | {r['config']} | {r['seeds']} |"
            f" {r['final_median']:.4f} [{r['final_min']:.4f}, {r['final_max']:.4f}] | {spent}"
            f" | {z} | {c} |"
        )
    return "\n".join(lines)


SCALE: dict[str, Any] = {"clients": 20, "participation": 1.0, "samples": 0, "alpha": None}
"""The protocol keys that set the scale of a run (with the defaults of files that predate them):
the run keys leave them out, so one result file holds one scale."""


def scale_clash(protocol: dict[str, Any] | None, args: argparse.Namespace) -> str | None:
    """Why the runs recorded under `protocol` (a result file's) cannot be mixed with `args`'s
    (another number of clients, participation or sample count), or None."""
    if not protocol:
        return None
    for key, default in SCALE.items():
        have, want = protocol.get(key, default), getattr(args, key)
        if have != want:
            return f"{key}: the file has {have}, this run {want}: give another --out"
    return None


def main(argv: list[str] | None = None) -> int:
    """Tunes (when the grid has more than one configuration), evaluates the winners on the
    seeds (skipping finished runs), writes JSON and markdown, prints the table."""
    args = parse(argv)
    torch.set_num_threads(1)
    store = Runs(Path(args.out), args.merge, _key)
    clash = scale_clash(store.doc.get("protocol"), args)
    if clash:
        print(f"bench_dp: {args.out} holds runs of another scale ({clash})", file=sys.stderr)
        return 2
    protocol = {k: v for k, v in vars(args).items() if k not in ("out", "merge")}

    def go(task: str, method: str, eps: float, seed: int, cfg: DpConfig, role: str) -> None:
        name = cfg.label() if math.isfinite(eps) else f"T{cfg.rounds}"
        if (task, method, name, role, eps, seed) in store.done:
            return
        r = run_one(args, task, method, eps, seed, cfg, role)
        print(
            f"{task} ε={eps:g} {method} {name} {role} seed {seed}: final {r['final']:.4f}"
            f" val {r['val']:.4f} ({r['seconds']:.0f} s)",
            flush=True,
        )
        store.add(r, protocol)

    for task in args.tasks:
        for eps in [*([] if args.no_clean else [math.inf]), *args.epsilons]:
            for method in args.methods:
                configs = grid(args, method)
                if not math.isfinite(eps):
                    best = DpConfig(args.clean_rounds)
                elif len(configs) == 1:
                    best = configs[0]
                else:
                    for cfg in configs:
                        go(task, method, eps, args.tune_seed, cfg, "tune")
                    labels = [c.label() for c in configs]
                    label = chosen(store.runs, task, method, eps, labels)
                    best = configs[labels.index(str(label))]
                for seed in args.seeds:
                    go(task, method, eps, seed, best, "eval")
    rows = rows_of(store.runs)
    text = store.finish(rows, verdicts(rows) + paired(store.runs), markdown(rows))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
