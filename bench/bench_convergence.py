"""Steps and wall time to a test-accuracy target: NaturalGradient (K-FAC) vs tuned SGD and Adam.

Data (offline): MNIST-1D generated procedurally by the `mnist1d` package (`make_dataset` with
`get_dataset_args()`: 4000 train / 1000 test; the last 500 training samples are held out for
validation), MLP 40-100-100-10; scikit-learn's digits (1797 images, 8x8, 1257 train / 180
validation / 360 test), MLP 64-64-10. Batch 128, cross-entropy.

Protocol: every method has the same tuning budget, its learning rate from a grid of 5 (3 with
--quick), picked by the final validation accuracy of seed 0; the picked learning rate then runs
3 seeds. SGD and the natural-gradient runs use SGD with momentum 0.9 (the natural gradient with
K-FAC, damping 1e-3, factors every step, inverses every 10 steps, KL clip 1e-3); Adam uses its
defaults otherwise. Target per data set: 97% of the better baseline's (SGD or Adam) median final
test accuracy. Reported per method: median (over seeds) steps and training wall time until the
test accuracy first reaches the target, and the median final test accuracy; a table and a PNG.

Threads: fedng's native ops are much slower with 2 torch threads than with 1 on small layers
(thread hand-offs; see the report), which distorts wall times: `--threads 1` compares the
methods without that effect.

Run: `python bench/bench_convergence.py [--quick] [--datasets mnist1d digits] [--threads 1]`.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # as bench_step.py: see its docstring

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import _harness as H
import torch
import torch.nn.functional as F
from fedng.optim.natural_gradient import NaturalGradient
from torch import nn

BATCH = 128
EVAL_EVERY = 20
SEEDS = (0, 1, 2)
TARGET_FRACTION = 0.97
GRIDS = {
    "sgd": [0.003, 0.01, 0.03, 0.1, 0.3],
    "adam": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
    "ng-kfac": [0.003, 0.01, 0.03, 0.1, 0.3],
}


@dataclass
class Data:
    """A classification data set split three ways (float32 inputs, int64 labels)."""

    name: str
    widths: list[int]
    epochs: int
    x: torch.Tensor
    y: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def mnist1d(epochs: int) -> Data:
    """MNIST-1D regenerated from its templates (no download)."""
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())
    x = torch.tensor(d["x"], dtype=torch.float32)
    y = torch.tensor(d["y"], dtype=torch.int64)
    return Data(
        "mnist1d",
        [40, 100, 100, 10],
        epochs,
        x[:3500],
        y[:3500],
        x[3500:],
        y[3500:],
        torch.tensor(d["x_test"], dtype=torch.float32),
        torch.tensor(d["y_test"], dtype=torch.int64),
    )


def digits(epochs: int) -> Data:
    """scikit-learn's bundled 8x8 digits, scaled to [0, 1], split with a fixed permutation."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return Data(
        "digits",
        [64, 64, 10],
        epochs,
        x[:1257],
        y[:1257],
        x[1257:1437],
        y[1257:1437],
        x[1437:],
        y[1437:],
    )


def mlp(widths: list[int]) -> nn.Module:
    """Linear layers with ReLU between them."""
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@dataclass
class Curve:
    """One training run: evaluations at steps, and the training wall time up to each."""

    method: str
    lr: float
    seed: int
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    test: list[float] = field(default_factory=list)
    val: list[float] = field(default_factory=list)

    def first(self, target: float) -> tuple[float, float]:
        """(step, seconds) when the test accuracy first reaches `target` (inf if never)."""
        for s, t, a in zip(self.steps, self.seconds, self.test, strict=True):
            if a >= target:
                return float(s), t
        return math.inf, math.inf


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction classified correctly."""
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train(data: Data, method: str, lr: float, seed: int) -> Curve:
    """One run; evaluation time is excluded from the wall time."""
    torch.manual_seed(seed)
    model = mlp(data.widths)
    if method == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    ng = None
    if method == "ng-kfac":
        ng = NaturalGradient(
            model,
            curvature="kfac",
            damping=1e-3,
            inverse_every=10,
            kl_clip=1e-3,
            lr=lambda: opt.param_groups[0]["lr"],
        )
    curve = Curve(method, lr, seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    n, step, clock = len(data.x), 0, 0.0
    for _ in range(data.epochs):
        perm = torch.randperm(n, generator=gen)
        for lo in range(0, n - BATCH + 1, BATCH):
            idx = perm[lo : lo + BATCH]
            t0 = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(data.x[idx]), data.y[idx]).backward()
            if ng is not None:
                ng.step()
            opt.step()
            clock += time.perf_counter() - t0
            step += 1
            if step % EVAL_EVERY == 0:
                curve.steps.append(step)
                curve.seconds.append(clock)
                curve.test.append(accuracy(model, data.x_test, data.y_test))
                curve.val.append(accuracy(model, data.x_val, data.y_val))
    return curve


def final(curve: Curve, which: str = "val") -> float:
    """Mean of the last three evaluations (NaN-safe: a diverged run scores 0)."""
    vals = (curve.val if which == "val" else curve.test)[-3:]
    v = sum(vals) / len(vals) if vals else 0.0
    return v if math.isfinite(v) else 0.0


def tune_and_run(
    data: Data, grid_size: int, log: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    """Per method: the tuning sweep (seed 0) and the chosen learning rate's runs over SEEDS."""
    out: dict[str, dict[str, Any]] = {}
    for method, grid in GRIDS.items():
        lrs = grid if grid_size >= len(grid) else grid[1 : 1 + grid_size]
        sweep = {lr: train(data, method, lr, SEEDS[0]) for lr in lrs}
        best = max(lrs, key=lambda lr: final(sweep[lr]))
        runs = [sweep[best]] + [train(data, method, best, s) for s in SEEDS[1:]]
        log(
            f"   {data.name:<8} {method:<8} lr grid {lrs} -> {best}"
            f" (val {final(sweep[best]):.3f}); test {[round(final(r, 'test'), 3) for r in runs]}"
        )
        out[method] = {
            "lr": best,
            "sweep": {str(k): final(v) for k, v in sweep.items()},
            "runs": runs,
        }
    return out


def summarize(data: Data, res: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Target, and per method the medians of steps/seconds to it and of the final accuracy."""
    base = max(statistics.median(final(r, "test") for r in res[m]["runs"]) for m in ("sgd", "adam"))
    target = TARGET_FRACTION * base
    rows = []
    for method, r in res.items():
        hits = [run.first(target) for run in r["runs"]]
        steps = statistics.median(h[0] for h in hits)
        secs = statistics.median(h[1] for h in hits)
        per_step = statistics.median(run.seconds[-1] / run.steps[-1] for run in r["runs"])
        rows.append(
            {
                "dataset": data.name,
                "method": method,
                "lr": r["lr"],
                "steps_to_target": steps,
                "seconds_to_target": secs,
                "reached": sum(math.isfinite(h[0]) for h in hits),
                "final_test_acc": statistics.median(final(x, "test") for x in r["runs"]),
                "step_ms": 1e3 * per_step,
                "sweep_val_acc": r["sweep"],
            }
        )
    return {"dataset": data.name, "target": target, "rows": rows}


def render(summaries: list[dict[str, Any]]) -> str:
    """The results table."""
    head = (
        f"{'dataset':<8} {'method':<8} {'lr':>7} {'target':>7} {'steps':>7} {'time':>9}"
        f" {'reached':>7} {'final acc':>9} {'ms/step':>8}"
    )
    lines = [
        f"bench_convergence: medians over {len(SEEDS)} seeds; target ="
        f" {TARGET_FRACTION:.0%} of the best baseline's final test accuracy",
        head,
        "-" * len(head),
    ]
    for s in summaries:
        for r in s["rows"]:
            steps = f"{r['steps_to_target']:.0f}" if math.isfinite(r["steps_to_target"]) else "-"
            lines.append(
                f"{r['dataset']:<8} {r['method']:<8} {r['lr']:>7g} {s['target']:7.3f} {steps:>7}"
                f" {H.fmt_time(r['seconds_to_target']):>9} {r['reached']:>5}/{len(SEEDS)}"
                f" {r['final_test_acc']:9.3f} {r['step_ms']:8.2f}"
            )
    return "\n".join(lines)


def plot(
    summaries: list[dict[str, Any]], results: dict[str, dict[str, dict[str, Any]]], path: str
) -> None:
    """Test accuracy vs steps (top) and vs training seconds (bottom), median over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(summaries), figsize=(6 * len(summaries), 8), squeeze=False)
    for col, s in enumerate(summaries):
        for method, r in results[s["dataset"]].items():
            runs = r["runs"]
            k = min(len(run.test) for run in runs)
            med = [statistics.median(run.test[i] for run in runs) for i in range(k)]
            lo = [min(run.test[i] for run in runs) for i in range(k)]
            hi = [max(run.test[i] for run in runs) for i in range(k)]
            steps = runs[0].steps[:k]
            secs = [statistics.median(run.seconds[i] for run in runs) for i in range(k)]
            for row, xs in enumerate((steps, secs)):
                ax = axes[row][col]
                ax.plot(xs, med, label=f"{method} (lr {r['lr']:g})")
                ax.fill_between(xs, lo, hi, alpha=0.2)
        for row, xlabel in enumerate(("training steps", "training wall time [s]")):
            ax = axes[row][col]
            ax.axhline(s["target"], color="gray", linestyle="--", linewidth=1, label="target")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy")
            ax.set_title(f"{s['dataset']}: median of {len(SEEDS)} seeds (band: min-max)")
            ax.set_ylim(max(0.0, s["target"] - 0.35), 1.0)
            ax.grid(alpha=0.3)
            ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Tunes, trains and reports every selected data set."""
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = H.CpuMonitor()
    grid = 3 if args.quick else 5
    print(
        f"== bench_convergence (torch threads {torch.get_num_threads()}"
        f"{', quick' if args.quick else ''})",
        flush=True,
    )
    makers = {
        "mnist1d": lambda: mnist1d(8 if args.quick else 30),
        "digits": lambda: digits(10 if args.quick else 40),
    }
    summaries, results = [], {}
    for name in args.datasets:
        data = makers[name]()
        results[name] = tune_and_run(data, grid, lambda s: print(s, flush=True))
        summaries.append(summarize(data, results[name]))
    table = render(summaries)
    notes = [n for n in [H.busy_warning(cpu.stop())] if n]
    print("\n" + table + "".join(f"\nnote: {n}" for n in notes))
    payload = {
        "benchmark": "bench_convergence",
        "quick": args.quick,
        "seeds": list(SEEDS),
        "batch": BATCH,
        "eval_every": EVAL_EVERY,
        "target_fraction": TARGET_FRACTION,
        "grids": GRIDS,
        "summaries": summaries,
        "notes": notes,
        "curves": {
            d: {m: [vars(c) for c in r["runs"]] for m, r in res.items()}
            for d, res in results.items()
        },
        "machine": H.machine_info(),
        "table": table,
    }
    if not args.no_json:
        png = str(H.RESULTS_DIR / f"{args.json_name}.png")
        H.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        plot(summaries, results, png)
        payload["plot"] = png
        payload["wall_s"] = time.perf_counter() - started
        print(f"wrote {H.write_json(args.json_name, payload)} and {png}")
    print(f"({time.perf_counter() - started:.1f} s)")
    return payload


def main() -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--datasets", nargs="*", default=["mnist1d", "digits"], choices=["mnist1d", "digits"]
    )
    p.add_argument("--quick", action="store_true", help="fewer epochs, 3 learning rates each")
    p.add_argument(
        "--json-name",
        default="bench_convergence",
        help="results file name under bench/results/ (.json and .png)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (fedng's ops use the same count); default: torch's",
    )
    p.add_argument(
        "--no-json",
        action="store_true",
        help="do not write bench/results/bench_convergence.{json,png}",
    )
    return H.run_main(run, p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
