"""NaturalGradient with its defaults on the model zoo, against tuned SGD and tuned Adam.

Per zoo model (`bench/zoo.py`): NaturalGradient with every default (K-FAC, relative damping,
KL clip) composed with `torch.optim.SGD`, and plain SGD, each at every lr of {0.01, 0.03, 0.1,
0.3, 1.0}; Adam at every lr of {1e-4, 3e-4, 1e-3, 3e-3, 1e-2}; the same seeded minibatches for
all. Reported per model: the best-lr final training loss (mean over the whole training set after
the last step) of NG, SGD and Adam, NG's at the documented default lr (`DEFAULT_LR`), and the
number of non-finite losses / parameters per optimizer (over its lrs). Targets: zero non-finite
for NG on every model and lr;
NG's best <= tuned SGD's on every model and <= tuned Adam's on >= 3 of 6; NG at the default lr
within 2x of its own best.

Run: `python bench/bench_zoo.py [--steps 500] [--quick] [--models ...] [--threads 1]`
(`--quick`: 60 steps, three lrs per optimizer; `--float64`: the same runs in float64, to tell
float32 round-off from a real difference). Writes `bench/results/bench_zoo.json`.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from _harness import CpuMonitor, busy_warning, machine_info, write_json
from fedng.errors import CurvatureWarning
from fedng.optim import NaturalGradient
from fedng.optim.natural_gradient import DEFAULT_LR
from fedng.optim.trust import TRUST_MODES
from torch import nn
from zoo import ZOO, Run, StepHook, float64, train

SGD_LRS = [0.01, 0.03, 0.1, 0.3, 1.0]
ADAM_LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]

Maker = Callable[[nn.Module], tuple[torch.optim.Optimizer, StepHook | None]]


def makers(
    loss: str, kl_clip: float | None = None, trust: str | None = None
) -> dict[str, Callable[[float], Maker]]:
    """Optimizer name -> lr -> model -> (optimizer, hook); `kl_clip`, `trust` None: NG's
    defaults."""
    clip: dict[str, Any] = {} if kl_clip is None else {"kl_clip": kl_clip}
    if trust is not None:
        clip["trust"] = trust

    def ng(lr: float) -> Maker:
        def make(m: nn.Module) -> tuple[torch.optim.Optimizer, StepHook | None]:
            opt = NaturalGradient(m, loss=loss, **clip)
            return torch.optim.SGD(m.parameters(), lr=lr), opt.step

        return make

    def sgd(lr: float) -> Maker:
        return lambda m: (torch.optim.SGD(m.parameters(), lr=lr), None)

    def adam(lr: float) -> Maker:
        return lambda m: (torch.optim.Adam(m.parameters(), lr=lr), None)

    return {"ng": ng, "sgd": sgd, "adam": adam}


def grids(
    quick: bool, optimizers: list[str] | None = None, ng_lrs: list[float] | None = None
) -> dict[str, list[float]]:
    """Optimizer -> its lrs (`optimizers`: a subset; `ng_lrs`: NG's instead of the grid)."""
    if quick:
        ng = sorted({0.1, 0.3, 1.0, DEFAULT_LR})
        out = {"ng": ng, "sgd": [0.03, 0.1, 0.3], "adam": [1e-3, 3e-3, 1e-2]}
    else:
        out = {"ng": sorted(set(SGD_LRS) | {DEFAULT_LR}), "sgd": SGD_LRS, "adam": ADAM_LRS}
    if ng_lrs:
        out["ng"] = ng_lrs
    return {k: v for k, v in out.items() if optimizers is None or k in optimizers}


def run_model(
    name: str,
    steps: int,
    quick: bool,
    kl_clip: float | None = None,
    trust: str | None = None,
    optimizers: list[str] | None = None,
    ng_lrs: list[float] | None = None,
    double: bool = False,
) -> dict[str, Any]:
    entry = float64(ZOO[name]) if double else ZOO[name]
    entry.data()
    out: dict[str, Any] = {"runs": {}}
    fallbacks = 0
    grid = grids(quick, optimizers, ng_lrs)
    for opt, lrs in grid.items():
        make = makers(entry.loss, kl_clip, trust)[opt]
        for lr in lrs:
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", CurvatureWarning)
                r: Run = train(entry, make(lr), steps)
            fallbacks += sum(issubclass(w.category, CurvatureWarning) for w in caught)
            out["runs"][f"{opt}@{lr:g}"] = {
                "optimizer": opt,
                "lr": lr,
                "final_loss": r.final_loss,
                "test_metric": r.test_metric,
                "nonfinite_losses": r.nonfinite_losses,
                "nonfinite_params": r.nonfinite_params,
                "counters": r.extra,
                "seconds": time.perf_counter() - t0,
            }
    runs = list(out["runs"].values())
    for opt in grid:
        mine = [x for x in runs if x["optimizer"] == opt]
        best = min(mine, key=lambda x: x["final_loss"])
        out[f"best_{opt}"] = {"lr": best["lr"], "final_loss": best["final_loss"]}
    default = out["runs"].get(f"ng@{DEFAULT_LR:g}")
    out["ng_default"] = math.nan if default is None else default["final_loss"]
    out["nonfinite"] = {
        opt: sum(
            x["nonfinite_losses"] + x["nonfinite_params"] for x in runs if x["optimizer"] == opt
        )
        for opt in grid
    }
    out["curvature_warnings"] = fallbacks
    return out


def targets(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    n = len(models)
    beats_adam = sum(
        m["best_ng"]["final_loss"] <= m["best_adam"]["final_loss"] for m in models.values()
    )
    return {
        "ng_zero_nonfinite": all(m["nonfinite"]["ng"] == 0 for m in models.values()),
        "ng_best_le_sgd_everywhere": all(
            m["best_ng"]["final_loss"] <= m["best_sgd"]["final_loss"] for m in models.values()
        ),
        "ng_best_le_adam_count": f"{beats_adam}/{n}",
        "ng_best_le_adam_on_3_of_6": beats_adam >= min(3, n),
        "default_lr_within_2x_of_best": all(
            m["ng_default"] <= 2 * m["best_ng"]["final_loss"] for m in models.values()
        ),
    }


def table(models: dict[str, dict[str, Any]]) -> str:
    def f(v: float) -> str:
        return f"{v:.4g}" if math.isfinite(v) else "inf"

    head = (
        f"| model | NG best (lr) | SGD best (lr) | Adam best (lr) | NG @ {DEFAULT_LR:g} |"
        f" NG @ {DEFAULT_LR:g} / best | non-finite NG / SGD / Adam |\n|---|---|---|---|---|---|---|"
    )
    rows = [
        f"| {name} | {f(m['best_ng']['final_loss'])} ({m['best_ng']['lr']:g})"
        f" | {f(m['best_sgd']['final_loss'])} ({m['best_sgd']['lr']:g})"
        f" | {f(m['best_adam']['final_loss'])} ({m['best_adam']['lr']:g})"
        f" | {f(m['ng_default'])} | {m['ng_default'] / m['best_ng']['final_loss']:.3g}"
        f" | {m['nonfinite']['ng']} / {m['nonfinite']['sgd']} / {m['nonfinite']['adam']} |"
        for name, m in models.items()
    ]
    return "\n".join([head, *rows])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 500)")
    p.add_argument("--quick", action="store_true", help="60 steps, three lrs per optimizer")
    p.add_argument("--models", nargs="*", default=list(ZOO), choices=list(ZOO))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-json", action="store_true")
    p.add_argument("--kl-clip", type=float, default=None, help="NG's kl_clip (default: NG's)")
    p.add_argument("--trust", choices=TRUST_MODES, default=None, help="NG's trust (default: NG's)")
    p.add_argument(
        "--optimizers", nargs="*", default=None, choices=["ng", "sgd", "adam"], help="a subset"
    )
    p.add_argument("--ng-lrs", nargs="*", type=float, default=None, help="NG's lrs (a probe)")
    p.add_argument(
        "--float64", action="store_true", help="models and data in float64 (a round-off check)"
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (60 if args.quick else 500)
    mon = CpuMonitor()
    t0 = time.perf_counter()
    models = {}
    for name in args.models:
        models[name] = run_model(
            name,
            steps,
            args.quick,
            args.kl_clip,
            args.trust,
            args.optimizers,
            args.ng_lrs,
            args.float64,
        )
        runs = ", ".join(f"{k} {r['final_loss']:.4g}" for k, r in models[name]["runs"].items())
        print(f"{name}: {runs} ({time.perf_counter() - t0:.0f} s)", flush=True)
    usage = mon.stop()
    payload = {
        "benchmark": "bench_zoo",
        "steps": steps,
        "quick": args.quick,
        "default_lr": DEFAULT_LR,
        "kl_clip": args.kl_clip,
        "trust": args.trust,
        "float64": args.float64,
        "grids": grids(args.quick, args.optimizers, args.ng_lrs),
        "machine": machine_info(),
        "cpu_usage": usage,
        "wall_s": time.perf_counter() - t0,
        "models": models,
    }
    if args.optimizers is None and args.ng_lrs is None and not args.float64:
        payload["targets"] = targets(models)
        print(table(models))
        print("targets:", payload["targets"])
    warn = busy_warning(usage)
    if warn:
        print(warn)
    if not args.no_json:
        print(f"wrote {write_json('bench_zoo', payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
