"""Benchmark `kron_accumulate` (K-FAC factor EMA) against the per-layer torch loop.

Torch way: per factor `F.mul_(decay).addmm_(X.T, X, alpha=scale)` (a full GEMM). Work: n^2 k flops
per factor (SYRK's count) for both, so the GFLOP/s ratio is the time ratio; GEMM does 2x the
arithmetic, so torch's "% of peak" here understates its hardware efficiency by 2x.
Info (not a target): the bare SYRK floor, OpenBLAS SSYRK alone on copies of the factors (the
library fedng links, lower triangle, no mirror, no checks), timed in the same run; fedng's op
adds the mirror onto the upper triangle (exact symmetry) to it. At more than one thread the SYRKs
run one after another, threaded inside OpenBLAS: no floor for fedng's schedule there.
Run: `python bench/bench_kron_accumulate.py [--quick] [--workloads mlp transformer]`.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import _harness as H
import torch
import workloads as W
from fedng import reference
from fedng.ops import kron_accumulate

OP = "kron_accumulate"
DECAY = 0.95
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def torch_way(
    factors: list[torch.Tensor], inputs: list[torch.Tensor], decay: float, scales: list[float]
) -> list[torch.Tensor]:
    """The plain torch loop: in-place EMA plus a GEMM per factor."""
    for f, x, s in zip(factors, inputs, scales, strict=True):
        f.mul_(decay).addmm_(x.T, x, alpha=s)
    return factors


def bare_syrk() -> Callable[[list[torch.Tensor], list[torch.Tensor], float, list[float]], None]:
    """Per factor, the lower triangle of `F <- decay F + s X^T X` by the SYRK of the OpenBLAS
    fedng links (scipy-openblas32), nothing else: the op's floor. Runs with torch's thread count
    and restores OpenBLAS's previous one, which fedng caches."""
    import scipy_openblas32

    lib = ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(), "libscipy_openblas.so"))
    set_threads = lib.scipy_openblas_set_num_threads
    get_threads = lib.scipy_openblas_get_num_threads
    fns = {torch.float32: (lib.scipy_cblas_ssyrk, ctypes.c_float)}
    fns[torch.float64] = (lib.scipy_cblas_dsyrk, ctypes.c_double)
    for fn, real in fns.values():
        fn.restype = None
        fn.argtypes = [ctypes.c_int] * 5 + [real, ctypes.c_void_p, ctypes.c_int, real]
        fn.argtypes += [ctypes.c_void_p, ctypes.c_int]

    def run(
        factors: list[torch.Tensor], inputs: list[torch.Tensor], decay: float, scales: list[float]
    ) -> None:
        before = get_threads()
        set_threads(torch.get_num_threads())
        try:
            for f, x, s in zip(factors, inputs, scales, strict=True):
                (k, n), syrk = x.shape, fns[f.dtype][0]
                if n and k:  # row-major (101), lower (122), A^T A (112)
                    syrk(101, 122, 112, n, k, s, x.data_ptr(), n, decay, f.data_ptr(), n)
        finally:  # fedng caches OpenBLAS's thread count: leave it as found
            set_threads(before)

    return run


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Checks, times and reports every selected workload."""
    dtype = H.dtype_of(args)
    rep = H.Report(OP, args, flops_note="n^2 k per factor (SYRK count, same for torch's GEMM)")
    syrk = bare_syrk()
    for wl in W.select(args.workloads, args.quick):
        xs = W.kfac_inputs(wl, dtype)
        scales = [1.0 / max(x.shape[0], 1) for x in xs]
        init = (
            W.spd_factors(wl, dtype)
            if not wl.tiny
            else [torch.eye(n, dtype=dtype) for n in wl.factor_dims]
        )
        ours_f = [f.clone() for f in init]
        torch_f = [f.clone() for f in init]
        floor_f = [f.clone() for f in init]
        kron_accumulate(ours_f, xs, DECAY, scales)
        torch_way(torch_f, xs, DECAY, scales)
        refs = reference.kron_accumulate_ref(init, xs, DECAY, scales)
        corr = H.check(OP, wl.name, ours_f, refs, TOL[dtype], baseline=torch_f)
        asym = max((f - f.T).abs().max().item() for f in ours_f)
        if asym != 0.0:
            raise H.CorrectnessError(
                f"{OP} on {wl.name}: result not exactly symmetric ({asym:.2e})"
            )
        del refs, init
        # Timed calls keep updating the same factors: an EMA with decay < 1 stays bounded.
        t = H.timeit(
            args,
            {
                "ours": partial(kron_accumulate, ours_f, xs, DECAY, scales),
                "torch": partial(torch_way, torch_f, xs, DECAY, scales),
                "floor": partial(syrk, floor_f, xs, DECAY, scales),
            },
        )
        flops = float(sum(x.shape[1] ** 2 * x.shape[0] for x in xs))
        dims = wl.factor_dims
        rep.add(
            wl.name,
            f"{len(xs)} x {min(dims)}..{max(dims)}",
            flops,
            t["ours"],
            t["torch"],
            corr,
            extra={
                "items": len(xs),
                "rows": sorted(set(wl.factor_rows)),
                "description": wl.description,
                "syrk_floor_s": t["floor"].median,
                "ratio_torch_over_floor": t["torch"].median / t["floor"].median,
            },
        )
        print(
            f"   {'':<14} info: bare SYRK (no mirror) {H.fmt_time(t['floor'].median):>10}"
            f"  torch/SYRK {t['torch'].median / t['floor'].median:5.2f}x",
            flush=True,
        )
    return rep.finish()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    args = H.parser(__doc__.splitlines()[0]).parse_args(argv)
    return H.run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
