"""Benchmark `kron_accumulate` (K-FAC factor EMA) against the per-layer torch loop.

Torch way: per factor `F.mul_(decay).addmm_(X.T, X, alpha=scale)` (a full GEMM). Work: n^2 k flops
per factor (SYRK's count) for both, so the GFLOP/s ratio is the time ratio; GEMM does 2x the
arithmetic, so torch's "% of peak" here understates its hardware efficiency by 2x.
Run: `python bench/bench_kron_accumulate.py [--quick] [--workloads mlp transformer]`.
"""

from __future__ import annotations

import argparse
import sys
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Checks, times and reports every selected workload."""
    dtype = H.dtype_of(args)
    rep = H.Report(OP, args, flops_note="n^2 k per factor (SYRK count, same for torch's GEMM)")
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
            },
        )
    return rep.finish()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    args = H.parser(__doc__.splitlines()[0]).parse_args(argv)
    return H.run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
