"""Shared benchmark machinery: timing, the same-run GEMM peak, correctness gates, targets, output.

Protocol (docs/architecture.md, "Benchmark protocols"): correctness first (abort on a wrong
result), then our op and the plain torch way are timed interleaved in the same process
(`time.perf_counter`, warm-up, N repeats, median and IQR), next to a float32 `torch.mm` peak
measured in the same run (at its start and end; the higher median is the peak). Ratios are
torch time / our time.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fedng
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class CorrectnessError(RuntimeError):
    """An op (ours or the torch baseline) disagrees with `fedng.reference`."""


# --- timing -----------------------------------------------------------------------------------


@dataclass
class Timing:
    """Per-call seconds over repeats: median and interquartile range."""

    median: float
    q1: float
    q3: float
    min: float
    repeats: int
    number: int
    samples: list[float] = field(repr=False)

    @property
    def iqr(self) -> float:
        """q3 - q1."""
        return self.q3 - self.q1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["iqr"] = self.iqr
        return d


def _quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def measure(
    fns: dict[str, Callable[[], object]],
    repeats: int = 7,
    warmup: int = 1,
    min_sample_s: float = 0.02,
    budget_s: float | None = None,
) -> dict[str, Timing]:
    """Times every callable, interleaved (one sample of each per round, rotating the order).

    Each sample loops a callable `number` times (calibrated in the warm-up so one sample lasts at
    least `min_sample_s`) and records the mean per call; the reported figure is the median sample.
    With `budget_s`, slow cases get fewer rounds (never fewer than 3) to bound the total time.
    """
    names = list(fns)
    number: dict[str, int] = {}
    round_s = 0.0
    for name in names:
        t0 = time.perf_counter()
        fns[name]()
        one = time.perf_counter() - t0
        for _ in range(max(0, warmup - 1)):
            fns[name]()
        number[name] = max(1, math.ceil(min_sample_s / max(one, 1e-9))) if one < min_sample_s else 1
        round_s += one * number[name]
    if budget_s is not None:
        repeats = min(repeats, max(3, int(budget_s / max(round_s, 1e-9))))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn, k = fns[name], number[name]
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - t0) / k)
    out = {}
    for name in names:
        q1, med, q3 = _quartiles(samples[name])
        out[name] = Timing(med, q1, q3, min(samples[name]), repeats, number[name], samples[name])
    return out


def _openblas_sgemm() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None:
    """`C = A B` through the OpenBLAS fedng links (scipy-openblas32), or None if unavailable.

    The call runs with torch's thread count and restores OpenBLAS's previous one, which fedng
    caches (it sets OpenBLAS's threads itself around its calls).
    """
    try:
        import ctypes

        import scipy_openblas32

        lib = ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(), "libscipy_openblas.so"))
        gemm = lib.scipy_cblas_sgemm
        get_threads = lib.scipy_openblas_get_num_threads
        set_threads = lib.scipy_openblas_set_num_threads
    except (ImportError, OSError, AttributeError):
        return None
    gemm.restype = None
    gemm.argtypes = [ctypes.c_int] * 6 + [
        ctypes.c_float,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_float,
        ctypes.c_void_p,
        ctypes.c_int,
    ]

    def run(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> None:
        m, k = a.shape
        n = b.shape[1]
        before = get_threads()
        set_threads(torch.get_num_threads())
        try:  # row-major (101), no transposes (111)
            gemm(
                101, 111, 111, m, n, k, 1.0, a.data_ptr(), k, b.data_ptr(), n, 0.0, c.data_ptr(), n
            )
        finally:
            set_threads(before)

    return run


def gemm_peak(n: int = 2048, repeats: int = 10) -> dict[str, Any]:
    """Float32 n x n x n GEMM GFLOP/s (median of repeats) in this run: the machine's peak.

    Times `torch.mm` (torch's BLAS) and, when reachable, the OpenBLAS sgemm fedng links; `gflops`
    is the faster of the two medians, so "% of peak" is relative to the best GEMM this process has.
    """
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    c = torch.empty(n, n)
    fns: dict[str, Callable[[], object]] = {"torch_mm": lambda: torch.mm(a, b, out=c)}
    sgemm = _openblas_sgemm()
    if sgemm is not None:
        fns["openblas_sgemm"] = lambda: sgemm(a, b, c)
    times = measure(fns, repeats=repeats, warmup=2, min_sample_s=0.0)
    flop = 2.0 * n**3
    out: dict[str, Any] = {"n": n, "dtype": "float32", "repeats": repeats}
    for name, t in times.items():
        out[name] = {
            "median_s": t.median,
            "gflops": flop / t.median / 1e9,
            "gflops_q1": flop / t.q3 / 1e9,
            "gflops_q3": flop / t.q1 / 1e9,
            "gflops_best": flop / t.min / 1e9,
        }
    best = max(times, key=lambda k: flop / times[k].median)
    out["source"] = best
    out["gflops"] = out[best]["gflops"]
    return out


def peak_text(peak: dict[str, Any]) -> str:
    """E.g. `torch.mm 190.1, OpenBLAS 201.3 GFLOP/s`."""
    parts = [f"torch.mm {peak['torch_mm']['gflops']:.1f}"]
    if "openblas_sgemm" in peak:
        parts.append(f"OpenBLAS {peak['openblas_sgemm']['gflops']:.1f}")
    return ", ".join(parts) + " GFLOP/s"


# --- correctness ------------------------------------------------------------------------------


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref||_F / ||ref||_F in float64 (absolute when ref is zero)."""
    o, r = out.detach().double(), ref.detach().double()
    if not torch.isfinite(o).all():
        return math.inf
    den = torch.linalg.vector_norm(r).item()
    num = torch.linalg.vector_norm(o - r).item()
    return num / den if den > 0 else num


def max_rel_err(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> float:
    """Worst `rel_err` over a list (0 for an empty list)."""
    if len(outs) != len(refs):
        raise CorrectnessError(f"got {len(outs)} outputs for {len(refs)} references")
    return max((rel_err(o, r) for o, r in zip(outs, refs, strict=True)), default=0.0)


def check(
    op: str,
    workload: str,
    ours: Sequence[torch.Tensor],
    refs: Sequence[torch.Tensor],
    tol: float,
    baseline: Sequence[torch.Tensor] | None = None,
    slack: float = 4.0,
) -> dict[str, float]:
    """Gates a benchmark on correctness against `fedng.reference`.

    Ours passes when its worst relative error is <= `tol`, or (for ill-conditioned problems) within
    `slack` x the plain torch way's own error against the same reference. The torch way must itself
    pass the same gate, so both sides of the ratio compute the same thing.

    Raises:
        CorrectnessError: with the op, workload, errors and tolerance.
    """
    e_ours = max_rel_err(ours, refs)
    e_torch = max_rel_err(baseline, refs) if baseline is not None else math.nan
    limit = max(tol, slack * e_torch) if baseline is not None else tol
    if not e_ours <= limit:
        raise CorrectnessError(
            f"{op} on {workload}: fedng result is WRONG: max relative error {e_ours:.3e} against"
            f" fedng.reference exceeds {limit:.3e} (tol {tol:.1e}; torch way's error"
            f" {e_torch:.3e}). Not timing a wrong kernel."
        )
    if baseline is not None and not e_torch <= max(tol, slack * max(e_ours, tol)):
        raise CorrectnessError(
            f"{op} on {workload}: the torch baseline disagrees with fedng.reference (error"
            f" {e_torch:.3e}, ours {e_ours:.3e}): the benchmark compares different things."
        )
    return {"max_rel_err_ours": e_ours, "max_rel_err_torch": e_torch, "tol": tol}


def spread(n: int, k: int) -> list[int]:
    """Up to k indices spread evenly over range(n), first and last included."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def fail(err: Exception) -> None:
    """Prints a correctness failure plainly and exits with status 2."""
    print(f"\nCORRECTNESS CHECK FAILED\n  {err}\n", file=sys.stderr)
    raise SystemExit(2)


# --- targets (issue 2) ------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A threshold on one measured metric of one (op, workload)."""

    metric: str
    threshold: float
    higher_is_better: bool = True
    label: str = ""

    def passed(self, value: float) -> bool:
        """Whether `value` meets the target."""
        if not math.isfinite(value):
            return False
        return value >= self.threshold if self.higher_is_better else value <= self.threshold

    def describe(self) -> str:
        """E.g. `>=2.5x`, `>=45% peak`."""
        sign = ">=" if self.higher_is_better else "<="
        return self.label or f"{sign}{self.threshold:g}"


_RATIO = "ratio"
_PCT = "pct_peak_ours"
TARGETS: dict[tuple[str, str], tuple[Target, ...]] = {
    ("damped_cholesky_inverse", "mlp"): (
        Target(_RATIO, 2.5, label=">=2.5x"),
        Target(_PCT, 45.0, label=">=45% peak"),
    ),
    ("damped_cholesky_inverse", "transformer"): (
        Target(_RATIO, 2.5, label=">=2.5x"),
        Target(_PCT, 45.0, label=">=45% peak"),
    ),
    ("damped_cholesky_inverse", "tiny"): (Target(_RATIO, 10.0, label=">=10x"),),
    ("kron_accumulate", "mlp"): (Target(_RATIO, 1.5, label=">=1.5x"),),
    ("kron_accumulate", "transformer"): (Target(_RATIO, 1.5, label=">=1.5x"),),
    ("kron_precondition", "mlp"): (Target(_RATIO, 1.0, label=">=1.0x"),),
    ("kron_precondition", "lora"): (Target(_RATIO, 3.0, label=">=3x"),),
    ("sketch_accumulate", "d50k"): (
        Target("speedup", 3.0, label=">=3x faster"),
        Target("mem_ratio", 10.0, label=">=10x less mem"),
        Target("err_ratio", 2.0, higher_is_better=False, label="err <=2x svd_lowrank's"),
    ),
}


def evaluate(op: str, workload: str, values: dict[str, float], dtype: str) -> list[dict[str, Any]]:
    """Each target of (op, workload) with its measured value and pass/miss (float32 runs only)."""
    out = []
    for t in TARGETS.get((op, workload), ()):
        v = values.get(t.metric, math.nan)
        ok: bool | None = t.passed(v) if dtype == "float32" else None
        out.append(
            {
                "metric": t.metric,
                "target": t.describe(),
                "threshold": t.threshold,
                "value": v,
                "pass": ok,
            }
        )
    return out


def verdicts(targets: Sequence[dict[str, Any]]) -> str:
    """`>=2.5x PASS, >=45% peak MISS`, or `-` when there is no target."""
    if not targets:
        return "-"
    words = {True: "PASS", False: "MISS", None: "n/a"}
    return ", ".join(f"{t['target']} {words[t['pass']]}" for t in targets)


# --- machine info, CLI, output ----------------------------------------------------------------


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class CpuMonitor:
    """CPU time used by *other* processes between start and `stop()` (from /proc/stat)."""

    def __init__(self) -> None:
        self.start = self._snap()

    @staticmethod
    def _snap() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [float(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        total = sum(fields[:8]) / tick
        busy = total - (fields[3] + fields[4]) / tick  # minus idle and iowait
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        mine = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
        return total, busy, mine

    def stop(self) -> dict[str, float] | None:
        """Fractions of all cores' time: busy with other processes, and with this one."""
        end = self._snap()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return None
        total = end[0] - self.start[0]
        busy = end[1] - self.start[1]
        mine = end[2] - self.start[2]
        return {"others": max(0.0, (busy - mine) / total), "this_run": min(1.0, mine / total)}


def busy_warning(usage: dict[str, float] | None) -> str | None:
    """A warning when other processes used a noticeable share of the CPU during the run."""
    if usage and usage["others"] > 0.1:
        return (
            f"machine busy: other processes used {100 * usage['others']:.0f}% of the CPU"
            " during this run; absolute timings are unreliable, same-run ratios less so"
        )
    return None


def machine_info() -> dict[str, Any]:
    """CPU model, core count, thread settings and versions, for the JSON."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import numpy

    native = fedng._native
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "fedng_threads": fedng.num_threads(),
        "torch": torch.__version__,
        "fedng": fedng.__version__,
        "blas": native.blas_config().strip() if hasattr(native, "blas_config") else "unknown",
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "loadavg": _loadavg(),
        "env": {
            k: os.environ[k]
            for k in (
                "OMP_NUM_THREADS",
                "OPENBLAS_NUM_THREADS",
                "MKL_NUM_THREADS",
                "OPENBLAS_CORETYPE",
                "OPENBLAS_THREAD_TIMEOUT",
                "OMP_WAIT_POLICY",
                "GOMP_SPINCOUNT",
            )
            if k in os.environ
        },
    }


def parser(description: str, default_repeats: int = 7) -> argparse.ArgumentParser:
    """The common CLI: --workloads, --repeats, --dtype, --quick, --no-json."""
    from workloads import WORKLOAD_NAMES

    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--workloads",
        nargs="*",
        default=None,
        choices=WORKLOAD_NAMES,
        metavar="NAME",
        help=f"subset of {', '.join(WORKLOAD_NAMES)} (default: all)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed samples per method (default {default_repeats}; 3 with --quick)",
    )
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke mode: smaller workloads (MLP kept), fewer repeats",
    )
    p.add_argument("--no-json", action="store_true", help="do not write bench/results/<op>.json")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads(N) before running (fedng follows torch)",
    )
    p.add_argument(
        "--max-d",
        type=int,
        default=None,
        help="low-rank ops: cap on d per matrix (0 = no cap; default depends on mode)",
    )
    p.set_defaults(default_repeats=default_repeats)
    return p


def apply_threads(args: argparse.Namespace) -> None:
    """Applies --threads (torch's thread count, which fedng's kernels follow)."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def repeats_of(args: argparse.Namespace) -> int:
    """--repeats, or the default for the mode."""
    if args.repeats is not None:
        return max(1, args.repeats)
    return 3 if args.quick else args.default_repeats


def dtype_of(args: argparse.Namespace) -> torch.dtype:
    """torch dtype from --dtype."""
    return torch.float32 if args.dtype == "float32" else torch.float64


def timeit(args: argparse.Namespace, fns: dict[str, Callable[[], object]]) -> dict[str, Timing]:
    """`measure` with the mode's repeats, sample length and time budget per workload (unless
    --repeats was given explicitly)."""
    budget = None if args.repeats is not None else (1.5 if args.quick else 12.0)
    return measure(
        fns, repeats=repeats_of(args), min_sample_s=0.005 if args.quick else 0.02, budget_s=budget
    )


def max_d_of(args: argparse.Namespace, full_default: int | None = None) -> int | None:
    """Cap on the low-rank dimension d: --max-d (0 = none), else quick's cap or `full_default`."""
    from workloads import QUICK_MAX_D

    if args.max_d is not None:
        return args.max_d or None
    return QUICK_MAX_D if args.quick else full_default


def fmt_time(s: float) -> str:
    """Seconds with a readable unit."""
    if not math.isfinite(s):
        return "-"
    if s >= 1.0:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


class Report:
    """Collects one op's rows, prints its table and writes its JSON."""

    def __init__(
        self,
        op: str,
        args: argparse.Namespace,
        unit: str = "GFLOP/s",
        peak: dict[str, Any] | None = None,
        flops_note: str = "",
    ) -> None:
        self.op, self.args, self.unit, self.flops_note = op, args, unit, flops_note
        self.started = time.perf_counter()
        self.cpu = CpuMonitor()
        self.peak = peak if peak is not None else gemm_peak(2048, 5 if args.quick else 10)
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.appendix: list[str] = []
        print(
            f"== {op}  ({args.dtype}{', quick' if args.quick else ''}; torch threads"
            f" {torch.get_num_threads()}; float32 GEMM {peak_text(self.peak)})"
        )

    def add(
        self,
        workload: str,
        detail: str,
        work: float,
        ours: Timing,
        torch_t: Timing,
        correctness: dict[str, float],
        extra: dict[str, Any] | None = None,
        target_key: str | None = None,
    ) -> dict[str, Any]:
        """Adds a row; `work` is the flop count (or samples for a throughput unit) per call."""
        rate_ours = work / ours.median / 1e9
        rate_torch = work / torch_t.median / 1e9
        flops_unit = self.unit == "GFLOP/s"
        row: dict[str, Any] = {
            "workload": workload,
            "detail": detail,
            "work": work,
            "unit": self.unit,
            "ours": ours.to_dict(),
            "torch": torch_t.to_dict(),
            "ratio": torch_t.median / ours.median,
            "ratio_best": torch_t.min / ours.min,
            "rate_ours": rate_ours,
            "rate_torch": rate_torch,
            "pct_peak_ours": 100.0 * rate_ours / self.peak["gflops"] if flops_unit else math.nan,
            "pct_peak_torch": 100.0 * rate_torch / self.peak["gflops"] if flops_unit else math.nan,
            "correctness": correctness,
        }
        if extra:
            row.update(extra)
        row["target_key"] = target_key or workload
        row["targets"] = evaluate(self.op, row["target_key"], row, self.args.dtype)
        self.rows.append(row)
        print(
            f"   {workload:<14} ours {fmt_time(ours.median):>10}  torch"
            f" {fmt_time(torch_t.median):>10}  ratio {row['ratio']:6.2f}x"
            f"  {verdicts(row['targets'])}",
            flush=True,
        )
        return row

    def table(self) -> str:
        """The per-workload table."""
        peak = self.peak["gflops"]
        pct = self.unit == "GFLOP/s"
        head = (
            f"{'workload':<14} {'items':>22} {'ours':>10} {'(IQR)':>9} {'torch':>10}"
            f" {'(IQR)':>9} {'ratio':>7} {self.unit + ' ours':>15} {'torch':>8}"
            + (f" {'%peak ours':>10} {'torch':>6}" if pct else "")
            + "  target"
        )
        lines = [
            f"{self.op}: {self.args.dtype}, float32 GEMM peak {peak:.1f} GFLOP/s"
            f" (faster of torch.mm and OpenBLAS sgemm {self.peak['n']}^3; higher median of"
            " the run's start and end)",
            head,
            "-" * len(head),
        ]
        for r in self.rows:
            line = (
                f"{r['workload']:<14} {r['detail'][:22]:>22}"
                f" {fmt_time(r['ours']['median']):>10}"
                f" {fmt_time(r['ours']['iqr']):>9} {fmt_time(r['torch']['median']):>10}"
                f" {fmt_time(r['torch']['iqr']):>9} {r['ratio']:6.2f}x"
                f" {r['rate_ours']:15.2f} {r['rate_torch']:8.2f}"
            )
            if pct:
                line += f" {r['pct_peak_ours']:9.1f}% {r['pct_peak_torch']:5.1f}%"
            lines.append(line + "  " + verdicts(r["targets"]))
        lines += self.appendix
        if self.flops_note:
            lines.append(f"work: {self.flops_note}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def finish(self) -> dict[str, Any]:
        """Prints the table, writes `bench/results/<op>.json` (unless --no-json); returns it."""
        start_peak = self.peak
        end_peak = gemm_peak(start_peak["n"], 3 if self.args.quick else 5)
        self.peak = {
            "n": start_peak["n"],
            "dtype": "float32",
            "start": start_peak,
            "end": end_peak,
            "gflops": max(start_peak["gflops"], end_peak["gflops"]),
        }
        if end_peak["gflops"] > start_peak["gflops"]:  # the less disturbed of the two
            for r in self.rows:
                if r["unit"] == "GFLOP/s":
                    r["pct_peak_ours"] = 100.0 * r["rate_ours"] / end_peak["gflops"]
                    r["pct_peak_torch"] = 100.0 * r["rate_torch"] / end_peak["gflops"]
                    r["targets"] = evaluate(
                        self.op, r.get("target_key", r["workload"]), r, self.args.dtype
                    )
        usage = self.cpu.stop()
        busy = busy_warning(usage)
        if busy:
            self.notes.append(busy)
        payload = {
            "op": self.op,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "quick": bool(self.args.quick),
            "dtype": self.args.dtype,
            "repeats": repeats_of(self.args),
            "unit": self.unit,
            "work_note": self.flops_note,
            "notes": self.notes,
            "appendix": self.appendix,
            "gemm_peak": self.peak,
            "machine": machine_info(),
            "wall_s": time.perf_counter() - self.started,
            "cpu_share": usage,
            "rows": [{k: v for k, v in r.items()} for r in self.rows],
        }
        print()
        print(self.table())
        print(f"({payload['wall_s']:.1f} s)")
        if not self.args.no_json:
            path = write_json(self.op, payload)
            print(f"wrote {path}")
        return payload


def _clean(obj: Any) -> Any:
    """NaN/inf -> None so the JSON is strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """Writes `bench/results/<name>.json` (creating the folder)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(_clean(payload), indent=2) + "\n")
    return path


def run_main(run: Callable[[argparse.Namespace], dict[str, Any]], args: argparse.Namespace) -> int:
    """Runs a benchmark, turning a correctness failure into a clear message and exit status 2."""
    apply_threads(args)
    try:
        run(args)
    except CorrectnessError as err:
        fail(err)
    return 0
