"""Time per training step: SGD, Adam and NaturalGradient (diagonal, K-FAC, low-rank), in one run.

Models: the MNIST-1D MLP 40-100-100-10 (batch 128), the MLP 784-1024-1024-1024-10 (batch 256) and
a small CNN (three 3x3 convolutions on 28x28 images, batch 128). NaturalGradient updates factors
every step and inverses every 10 steps; each timed sample is 10 consecutive steps (one inverse
included), reported per step. Also timed: the same K-FAC step written the way existing PyTorch
K-FAC libraries do it (module hooks, then a Python loop of per-layer torch ops, no
eigendecomposition: `cholesky` + `cholesky_inverse` per factor, `G^-1 dW A^-1` per layer).

FLOP bound of a step: the SGD step's time plus the extra flops of the method at the same-run
float32 GEMM peak (K-FAC: SYRK rows*n(n+1) per factor, the cheaper of the dense and batch
preconditioning forms, and n^3 per factor inverse / 10). It counts every GEMM at the float32
rate: the bf16 GEMMs of the opt-in `-bf16` (`bf16="factors"`) and `-bf16all` methods run ~4x
faster on CPUs with bf16 instructions, so "x bound" can read below 1 for those parts.

Targets (issue 11): our K-FAC step <= 1.5x the SGD step on the MNIST-1D MLP and <= 1.8x on the
1024-wide MLP (`ng-kfac`, kl_clip=None like the torch loop); `ng-kfac-klclip` is the same step
with the default KL clip (and its finiteness checks), reported alongside; `ng-kfac-general` is
`ng-kfac` without the fused K-FAC step (`fedng.optim.fused_kfac`), the before/after in one run;
`ng-kfac-f10` is `ng-kfac` with `factor_every=10` (factors updated on every 10th step, the setting
KAISA's examples use; not the default), `ng-kfac-nowg` is `ng-kfac` with `NaturalGradient.backward`
instead of `loss.backward()` (wide layers get their natural gradient from the batch rows, autograd
forms no weight gradient for them), `ng-kfac-nowg-f10` both. Every `ng-` method runs with the
default `bf16="off"` (float32) except the opt-in `ng-kfac-bf16` (`bf16="factors"`: wide blocks'
factor Grams from bf16-rounded rows, float32 accumulation, where the CPU has bf16 GEMM
instructions; `fedng.ops.bf16_gemm`; no effect elsewhere) and `-bf16all` (`bf16="all"`: also the
batch-form products `g G^-1` and `P^T Q` in bf16).

Threads: OpenBLAS worker threads busy-wait after every BLAS call for 2^28 cycles by default and
then compete with torch's own threads for the two cores; unless the environment already says
otherwise this script sets OPENBLAS_THREAD_TIMEOUT=4 before fedng loads OpenBLAS (`--keep-env`
keeps the default, to measure the difference).

Also, for `ng-kfac`, its floor at the real shapes: `sgd-capture` (the SGD step with only the hooks
that keep each layer's input and output gradient) plus the step's own arithmetic, each kind of op
warm and alone, the faster of a torch loop and fedng's one ragged call (`op_floor_s`).

Run: `python bench/bench_step.py [--quick] [--models mnist1d mlp1024 cnn] [--repeats N]`.
"""

from __future__ import annotations

import os
import sys

if "--keep-env" not in sys.argv:
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import argparse
import copy
import itertools
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import _harness as H
import torch
import torch.nn.functional as F
from fedng.curvature.capture import CurvatureCapture
from fedng.optim.natural_gradient import NaturalGradient
from torch import nn

warnings.filterwarnings("ignore", message="Full backward hook is firing")  # the torch loop's
# hooks on the first layer, whose input needs no gradient: expected, harmless

STEPS = 10  # steps per timed sample = inverse_every
FACTOR_EVERY = 10  # ng-kfac-f10's factor_every
SLOW_S = 5.0  # a method whose warm-up sample takes longer is timed with a single sample
DAMPING = 1e-3
DECAY = 0.95
LR = 1e-4  # small: 40 steps on 4 random batches must stay finite for every method
TARGETS = {
    ("mnist1d", "ng-kfac"): ("x_sgd", 1.5, "<=1.5x SGD"),
    ("mlp1024", "ng-kfac"): ("x_sgd", 1.8, "<=1.8x SGD"),
}


# --- models ---------------------------------------------------------------------------------


@dataclass
class Workload:
    """A model factory, its batch and its description."""

    name: str
    detail: str
    make: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    rank: int


def mlp(widths: list[int]) -> nn.Module:
    """Linear layers with ReLU between them (not in-place: torch loop uses full backward hooks)."""
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def cnn() -> nn.Module:
    """Three 3x3 convolutions (16, 32, 32 channels), two max-pools, global average, Linear."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def _batch(
    shape: tuple[int, ...], classes: int
) -> Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    def make(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(*shape, generator=g), torch.randint(0, classes, (shape[0],), generator=g)

    return make


WORKLOADS = {
    "mnist1d": Workload(
        "mnist1d",
        "MLP 40-100-100-10, B=128",
        lambda: mlp([40, 100, 100, 10]),
        _batch((128, 40), 10),
        rank=16,
    ),
    "mlp1024": Workload(
        "mlp1024",
        "MLP 784-1024x3-10, B=256",
        lambda: mlp([784, 1024, 1024, 1024, 10]),
        _batch((256, 784), 10),
        rank=8,
    ),
    "cnn": Workload("cnn", "CNN 3 conv 28x28, B=128", cnn, _batch((128, 1, 28, 28), 10), rank=16),
}


# --- the per-layer torch loop (how existing PyTorch K-FAC libraries do it) ----------------------


class TorchLoopKFAC:
    """K-FAC with module hooks and a Python loop of per-layer torch ops (Linear and Conv2d).

    Same math as `NaturalGradient(curvature="kfac", damping_mode="tikhonov")`: A and G as EMAs,
    `(A + sqrt(λ) I)^-1` and `(G + sqrt(λ) I)^-1` by Cholesky every `inverse_every` steps,
    `G^-1 dW A^-1` per layer every step.
    """

    def __init__(self, model: nn.Module, damping: float, decay: float, inverse_every: int) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        self.root, self.decay, self.every, self.steps = math.sqrt(damping), decay, inverse_every, 0
        self.inputs: dict[nn.Module, torch.Tensor] = {}
        self.grads: dict[nn.Module, torch.Tensor] = {}
        self.state: dict[nn.Module, dict[str, torch.Tensor]] = {}
        for m in self.layers:
            m.register_forward_pre_hook(self._save_input)
            m.register_full_backward_hook(self._save_grad)

    def _save_input(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if torch.is_grad_enabled():
            self.inputs[module] = args[0].detach()

    def _save_grad(
        self, module: nn.Module, grad_in: object, grad_out: tuple[torch.Tensor, ...]
    ) -> None:
        self.grads[module] = grad_out[0].detach()

    def _rows(self, m: nn.Module) -> tuple[torch.Tensor, torch.Tensor, int]:
        x, g = self.inputs[m], self.grads[m]
        if isinstance(m, nn.Conv2d):
            x = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)
            g = g.flatten(2).transpose(1, 2)
        a = x.reshape(-1, x.shape[-1])
        if m.bias is not None:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
        return a, g.reshape(-1, g.shape[-1]) * x.shape[0], x.shape[0]

    def step(self) -> None:
        """Updates factors, inverts every `inverse_every` steps, preconditions `.grad`."""
        for m in self.layers:
            a, g, batch = self._rows(m)
            st = self.state.get(m)
            # KFC scaling (Grosse & Martens 2016): A averages over rows, G sums a sample's rows
            new_a, new_g = a.T @ a / a.shape[0], g.T @ g / batch
            if st is None:
                st = self.state[m] = {"A": new_a, "G": new_g}
            else:
                st["A"].mul_(self.decay).add_(new_a, alpha=1 - self.decay)
                st["G"].mul_(self.decay).add_(new_g, alpha=1 - self.decay)
            if self.steps % self.every == 0:
                for k in ("A", "G"):
                    damped = st[k] + self.root * torch.eye(len(st[k]))
                    st[k + "_inv"] = torch.cholesky_inverse(torch.linalg.cholesky(damped))
            w = m.weight.grad.reshape(m.weight.shape[0], -1)
            grad = torch.cat([w, m.bias.grad[:, None]], 1) if m.bias is not None else w
            p = st["G_inv"] @ grad @ st["A_inv"]
            m.weight.grad.copy_(p[:, : w.shape[1]].reshape(m.weight.shape))
            if m.bias is not None:
                m.bias.grad.copy_(p[:, -1])
        self.steps += 1
        self.inputs.clear()
        self.grads.clear()


# --- methods and their FLOP models -------------------------------------------------------------


def block_shapes(wl: Workload) -> list[tuple[int, int, int, int]]:
    """(m, n, rows, batch) of every curvature block, from one recorded batch."""
    model = wl.make()
    cap = CurvatureCapture(model)
    cap.recording = True
    x, y = wl.batch(torch.Generator().manual_seed(0))
    F.cross_entropy(model(x), y).backward()
    stats = cap.collect()
    cap.remove()
    return [
        (b.spec.m, b.spec.n, s.rows, s.batch_size) for b, s in zip(cap.blocks, stats, strict=True)
    ]


METHODS = (
    "sgd",
    "sgd-capture",
    "adam",
    "ng-diag",
    "ng-kfac",
    "ng-kfac-klclip",
    "ng-kfac-general",
    "ng-kfac-f10",
    "ng-kfac-nowg",
    "ng-kfac-nowg-f10",
    "ng-kfac-bf16",
    "ng-kfac-bf16all",
    "ng-kfac-nowg-f10-bf16all",
    "ng-lowrank",
    "kfac-torch-loop",
)
KFAC_METHODS = tuple(m for m in METHODS if "kfac" in m)


def extra_flops(method: str, shapes: list[tuple[int, int, int, int]], rank: int) -> float:
    """Flops a method adds to an SGD step (per step, inverses amortized over STEPS)."""
    total = 0.0
    for m, n, rows, b in shapes:
        d = m * n
        if method in KFAC_METHODS:
            every = FACTOR_EVERY if "-f10" in method else 1
            total += rows * (n * (n + 1) + m * (m + 1)) / every
            dense, batch = 2 * m * n * (m + n), 2 * rows * (m * m + n * n + m * n)
            total += dense if method == "kfac-torch-loop" else min(dense, batch)
            if "-nowg" in method and batch < dense:  # autograd's weight gradient not formed
                total -= 2 * rows * m * (n - 1)
            total += (n**3 + m**3) / STEPS
        elif method == "ng-diag":
            total += 2 * rows * d + 2 * d
        elif method == "ng-lowrank":
            r = min(rank, d)
            total += 2 * rows * d + 4 * b * d * r + 4 * d * r + (4 * d * r * r + r**3) / STEPS
    return total


def runner(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    extra: Callable[[], None] | None,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> Callable[[], None]:
    """STEPS training steps per call, cycling over pre-made batches."""
    cycle = itertools.cycle(batches)

    def run() -> None:
        for _ in range(STEPS):
            x, y = next(cycle)
            opt.zero_grad()
            backward(F.cross_entropy(model(x), y))
            if extra is not None:
                extra()
            opt.step()

    return run


def methods(
    wl: Workload, batches: list[tuple[torch.Tensor, torch.Tensor]], only: list[str] | None
) -> dict[str, Callable[[], None]]:
    """One runner per method, each on its own copy of the same initial model."""
    torch.manual_seed(0)
    base = wl.make()
    out: dict[str, Callable[[], None]] = {}
    for name in METHODS:
        if only and name not in only and name != "sgd":
            continue
        model = copy.deepcopy(base)
        opt: torch.optim.Optimizer = (
            torch.optim.Adam(model.parameters(), lr=LR)
            if name == "adam"
            else torch.optim.SGD(model.parameters(), lr=LR)
        )
        extra: Callable[[], None] | None = None
        backward: Callable[[torch.Tensor], None] = torch.Tensor.backward
        if name.startswith("ng-"):
            clip = name.endswith("-klclip")  # the default KL clip and its finiteness checks
            ng = NaturalGradient(
                model,
                curvature=name[3:].split("-")[0],
                factor_every=FACTOR_EVERY if "-f10" in name else 1,
                bf16=(
                    "all" if "-bf16all" in name else "factors" if name.endswith("-bf16") else "off"
                ),
                damping=DAMPING,
                curvature_decay=DECAY,
                inverse_every=STEPS,
                rank=wl.rank,
                lr=LR,
                # None: the same math as the torch loop (the default clips the step)
                **({} if clip else {"kl_clip": None}),
            )
            if name.endswith("-general"):  # ng-kfac without the fused step (before/after)
                ng._fused = None
            if "-nowg" in name:  # NaturalGradient.backward: no weight gradients it can do without
                backward = ng.backward
            extra = ng.step
        elif name == "kfac-torch-loop":
            extra = TorchLoopKFAC(model, DAMPING, DECAY, STEPS).step
        elif name == "sgd-capture":
            extra = CaptureOnly(model).clear
        out[name] = runner(model, opt, extra, batches, backward)
    return out


def check_same_step(wl: Workload, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Our K-FAC and the torch loop must precondition the same first step identically."""
    torch.manual_seed(0)
    base = wl.make()
    got = []
    for name in ("ours", "loop"):
        model = copy.deepcopy(base)
        pre: Any = (
            NaturalGradient(
                model,
                damping=DAMPING,
                curvature_decay=DECAY,
                inverse_every=STEPS,
                kl_clip=None,
                bf16="off",  # the torch loop's float32 math
            )
            if name == "ours"
            else TorchLoopKFAC(model, DAMPING, DECAY, STEPS)
        )
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        pre.step()
        got.append([p.grad.detach().clone() for p in model.parameters()])
    err = H.max_rel_err(got[0], got[1])
    if not err <= 2e-3:
        raise H.CorrectnessError(
            f"bench_step on {wl.name}: our K-FAC step and the torch loop"
            f" differ by {err:.2e} (relative); not timing different things"
        )
    return err


# --- the arithmetic floor of the K-FAC step at its real shapes ----------------------------------


class CaptureOnly:
    """The least a K-FAC step must add to an SGD step to see its rows: a forward hook per layer
    that keeps the input and a pre-hook on the output's autograd node that keeps its gradient
    (what `CurvatureCapture` registers), doing nothing else."""

    def __init__(self, model: nn.Module) -> None:
        self.kept: list[torch.Tensor] = []
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.register_forward_hook(self._forward)

    def _forward(
        self, module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor
    ) -> None:
        self.kept.append(args[0])
        if out.grad_fn is not None:
            out.grad_fn.register_prehook(self._grad)

    def _grad(self, grads: tuple[torch.Tensor | None, ...]) -> None:
        if grads[0] is not None:
            self.kept.append(grads[0])

    def clear(self) -> None:
        self.kept.clear()


def op_floor_s(shapes: list[tuple[int, int, int, int]], repeats: int) -> dict[str, float]:
    """Per step, the K-FAC step's own arithmetic at the model's real shapes, each kind of op warm
    and alone, the faster of torch's way (a loop of per-block ops) and fedng's (one ragged call
    over every block, as the fused step makes): both factor updates per block
    (`F.mul_(decay).addmm_(X^T X)` / `fedng.ops.kron_accumulate`), the preconditioning
    (`G^-1 dW A^-1` or `(g G^-1)^T ([x 1] A^-1)`, whichever is cheaper / `kron_precondition`
    choosing per block), the inverses (Cholesky and `cholesky_inverse` /
    `damped_cholesky_inverse`) / STEPS. Nothing else the step does (gathering and writing back
    gradients, its Python, checks) is counted."""
    from fedng.curvature.kfac import batch_form_cheaper
    from fedng.ops import damped_cholesky_inverse, kron_accumulate, kron_precondition

    gen = torch.Generator().manual_seed(3)
    xs, gs, facs, inv_a, inv_g, ws, spds = [], [], [], [], [], [], []
    for m, n, rows, _ in shapes:
        x, g = torch.randn(rows, n, generator=gen), torch.randn(rows, m, generator=gen)
        xs.append(x)
        gs.append(g)
        facs += [torch.eye(n), torch.eye(m)]
        inv_a.append(torch.eye(n))
        inv_g.append(torch.eye(m))
        ws.append(torch.randn(m, n, generator=gen))
        spds += [x.T @ x / rows + torch.eye(n), g.T @ g / rows + torch.eye(m)]
    rows_in = [r for x, g in zip(xs, gs, strict=True) for r in (x, g)]

    def upd_torch() -> None:
        for f, r in zip(facs, rows_in, strict=True):
            f.mul_(DECAY).addmm_(r.T, r, alpha=0.05)

    def pre_torch() -> None:
        for x, g, ai, gi, w in zip(xs, gs, inv_a, inv_g, ws, strict=True):
            if batch_form_cheaper(x.shape[0], w.shape[0], w.shape[1]):
                (g @ gi).T @ (x @ ai)
            else:
                gi @ w @ ai

    fns: dict[str, Callable[[], object]] = {
        "upd:torch": upd_torch,
        "upd:fedng": lambda: kron_accumulate(facs, rows_in, DECAY),
        "pre:torch": pre_torch,
        "pre:fedng": lambda: kron_precondition(ws, inv_a, inv_g, inputs=xs, output_grads=gs),
        "inv:torch": lambda: [torch.cholesky_inverse(torch.linalg.cholesky(s)) for s in spds],
        "inv:fedng": lambda: damped_cholesky_inverse(spds, [DAMPING**0.5] * len(spds)),
    }
    t = {k: v.median for k, v in H.measure(fns, repeats=repeats, min_sample_s=0.01).items()}
    return {
        "update_s": min(t["upd:torch"], t["upd:fedng"]),
        "precondition_s": min(t["pre:torch"], t["pre:fedng"]),
        "inverse_s": min(t["inv:torch"], t["inv:fedng"]) / STEPS,
    }


# --- the run ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Checks, times and reports every selected model."""
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = H.CpuMonitor()
    peak = H.gemm_peak(2048, 3 if args.quick else 5)
    print(
        f"== bench_step (torch threads {torch.get_num_threads()}, OPENBLAS_THREAD_TIMEOUT="
        f"{os.environ.get('OPENBLAS_THREAD_TIMEOUT', 'unset')}, float32 GEMM peak"
        f" {peak['gflops']:.1f} GFLOP/s)",
        flush=True,
    )
    repeats = args.repeats or (3 if args.quick else 7)
    rows: list[dict[str, Any]] = []
    for key in args.models:
        wl = WORKLOADS[key]
        g = torch.Generator().manual_seed(1)
        batches = [wl.batch(g) for _ in range(4)]
        corr = check_same_step(wl, batches[0])
        fns = methods(wl, batches, args.methods)
        slow = {}
        for name, fn in fns.items():  # warm-up: allocations, first inverse
            t0 = time.perf_counter()
            fn()
            if time.perf_counter() - t0 > SLOW_S:
                slow[name] = fns[name]
        times = H.measure(
            {k: f for k, f in fns.items() if k not in slow},
            repeats=repeats,
            warmup=0,
            min_sample_s=0.0,
        )
        if slow:  # seconds per step: one more sample each keeps the run within minutes
            times.update(H.measure(slow, repeats=1, warmup=0, min_sample_s=0.0))
        times = {k: times[k] for k in fns}
        shapes = block_shapes(wl)
        sgd = times["sgd"].median / STEPS
        for name, t in times.items():
            step = t.median / STEPS
            flops = extra_flops(name, shapes, wl.rank)
            row = {
                "model": key,
                "detail": wl.detail,
                "method": name,
                "step_s": step,
                "q1_s": t.q1 / STEPS,
                "q3_s": t.q3 / STEPS,
                "x_sgd": step / sgd,
                "extra_flops": flops,
                "flop_bound_s": sgd + flops / (peak["gflops"] * 1e9),
                "max_rel_diff_kfac_vs_loop": corr,
            }
            row["x_bound"] = step / row["flop_bound_s"]
            rows.append(row)
        loop = next(
            (r for r in rows if r["model"] == key and r["method"] == "kfac-torch-loop"), None
        )
        for r in rows:
            if r["model"] == key:
                r["speedup_vs_loop"] = loop["step_s"] / r["step_s"] if loop else math.nan
                tgt = TARGETS.get((key, r["method"]))
                if tgt:
                    value = r[tgt[0]]
                    ok = value <= tgt[1] if tgt[0] == "x_sgd" else value >= tgt[1]
                    r["target"] = {
                        "metric": tgt[0],
                        "threshold": tgt[1],
                        "label": tgt[2],
                        "value": value,
                        "pass": bool(ok),
                    }
        if "sgd-capture" in times and "ng-kfac" in times:
            parts = op_floor_s(shapes, repeats)
            capture = times["sgd-capture"].median / STEPS
            for r in rows:
                if r["model"] == key and r["method"] == "ng-kfac":
                    r["floor_parts_s"] = {"capture_s": capture - sgd, **parts}
                    r["floor_s"] = capture + sum(parts.values())
                    r["x_floor"] = r["floor_s"] / sgd
        print_rows([r for r in rows if r["model"] == key])
    end_peak = H.gemm_peak(2048, 3 if args.quick else 5)
    best = max(peak["gflops"], end_peak["gflops"])  # the less disturbed of the two
    for r in rows:
        sgd = next(x["step_s"] for x in rows if x["model"] == r["model"] and x["method"] == "sgd")
        r["flop_bound_s"] = sgd + r["extra_flops"] / (best * 1e9)
        r["x_bound"] = r["step_s"] / r["flop_bound_s"]
    notes = [n for n in [H.busy_warning(cpu.stop())] if n]
    table = render(rows, best, notes)
    print("\n" + table)
    payload = {
        "benchmark": "bench_step",
        "quick": args.quick,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "steps_per_sample": STEPS,
        "damping": DAMPING,
        "curvature_decay": DECAY,
        "openblas_thread_timeout": os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
        "gemm_peak": {"start": peak, "end": end_peak},
        "machine": H.machine_info(),
        "notes": notes,
        "rows": rows,
        "wall_s": time.perf_counter() - started,
        "table": table,
    }
    print(f"({payload['wall_s']:.1f} s)")
    if not args.no_json:
        print(f"wrote {H.write_json(args.json_name, payload)}")
    return payload


def print_rows(rows: list[dict[str, Any]]) -> None:
    """Progress lines for one model."""
    for r in rows:
        print(
            f"   {r['model']:<8} {r['method']:<16} {H.fmt_time(r['step_s']):>10}"
            f"  {r['x_sgd']:5.2f}x SGD",
            flush=True,
        )


def render(rows: list[dict[str, Any]], peak: float, notes: list[str]) -> str:
    """The results table."""
    head = (
        f"{'model':<8} {'method':<16} {'step':>10} {'IQR':>9} {'x SGD':>6} {'FLOP bound':>10}"
        f" {'x bound':>7} {'vs loop':>7}  target"
    )
    lines = [
        f"bench_step: per training step, median of samples of {STEPS} steps; float32 GEMM"
        f" peak {peak:.1f} GFLOP/s; torch threads {torch.get_num_threads()}",
        head,
        "-" * len(head),
    ]
    for r in rows:
        tgt = r.get("target")
        verdict = f"{tgt['label']} {'PASS' if tgt['pass'] else 'MISS'}" if tgt else "-"
        lines.append(
            f"{r['model']:<8} {r['method']:<16} {H.fmt_time(r['step_s']):>10}"
            f" {H.fmt_time(r['q3_s'] - r['q1_s']):>9} {r['x_sgd']:5.2f}x"
            f" {H.fmt_time(r['flop_bound_s']) if r['extra_flops'] else '-':>10}"
            f" {r['x_bound'] if r['extra_flops'] else math.nan:6.2f}x"
            f" {r['speedup_vs_loop']:6.2f}x  {verdict}"
        )
    lines.append(
        "FLOP bound = SGD step + the method's extra flops at the GEMM peak;"
        " 'vs loop' = torch-loop K-FAC time / this time"
    )
    for r in rows:
        if "x_floor" in r:
            p = {k: v / (r["step_s"] / r["x_sgd"]) for k, v in r["floor_parts_s"].items()}
            lines.append(
                f"{r['model']} {r['method']}: floor at the real shapes {r['x_floor']:.2f}x SGD"
                f" (capture hooks +{p['capture_s']:.2f}, factor updates +{p['update_s']:.2f},"
                f" preconditioning +{p['precondition_s']:.2f}, inverses/{STEPS}"
                f" +{p['inverse_s']:.2f}: each op warm and alone, the faster of torch's and"
                " fedng's way)"
            )
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def main() -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument(
        "--methods",
        nargs="*",
        default=None,
        help="subset of " + " ".join(METHODS),
    )
    p.add_argument("--repeats", type=int, default=None, help="timed samples (7; 3 with --quick)")
    p.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (fedng's ops use the same count); default: torch's",
    )
    p.add_argument(
        "--json-name",
        default="bench_step",
        help="results file name under bench/results/ (without .json)",
    )
    p.add_argument(
        "--keep-env",
        action="store_true",
        help="do not set OPENBLAS_THREAD_TIMEOUT (measure OpenBLAS's default spinning)",
    )
    p.add_argument("--no-json", action="store_true", help="do not write the JSON results file")
    args = p.parse_args()
    return H.run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
