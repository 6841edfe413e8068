"""Benchmark `lowrank_precondition` (Woodbury `(U S U^T + lambda I)^-1 v`) against a torch loop.

Torch way: per layer `(v - u @ ((s / (s + lam)) * (u.T @ v))) / lam` (the same Woodbury formula).
Workloads: one low-rank Fisher per layer, d = the layer's parameter count (tiny: each matrix size),
r = min(32, d // 4), one gradient vector per layer (`--cols` > 1 preconditions a block). Work:
4 d r c flops per layer; at c = 1 the op is memory-bound, so % of GEMM peak is low by nature.
Run: `python bench/bench_lowrank_precondition.py [--quick] [--cols 8]`.
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
from fedng.ops import lowrank_precondition

OP = "lowrank_precondition"
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
REF_MAX_D = 4096  # the reference solves a dense d x d system


def torch_way(
    us: list[torch.Tensor], ss: list[torch.Tensor], lams: list[float], vs: list[torch.Tensor]
) -> list[torch.Tensor]:
    """The plain torch loop (Woodbury with orthonormal U)."""
    out = []
    for u, s, lam, v in zip(us, ss, lams, vs, strict=True):
        w = u.T @ v
        w = (s / (s + lam)).unsqueeze(-1) * w if v.dim() == 2 else (s / (s + lam)) * w
        out.append((v - u @ w) / lam)
    return out


def residual(
    u: torch.Tensor, s: torch.Tensor, lam: float, x: torch.Tensor, v: torch.Tensor
) -> float:
    """`||(U S U^T + lam I) x - v|| / ||v||` in float64, O(d r)."""
    u64, x64 = u.double(), x.double()
    sx = u64.T @ x64
    sx = s.double().unsqueeze(-1) * sx if x.dim() == 2 else s.double() * sx
    return H.rel_err(u64 @ sx + lam * x64, v)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Checks, times and reports every selected workload."""
    dtype = H.dtype_of(args)
    rep = H.Report(OP, args, flops_note="4 d r c per layer")
    for wl in W.select(args.workloads, args.quick):
        dims = W.lowrank_dims(wl, max_d=H.max_d_of(args))
        us, ss, vs = W.lowrank_factors(dims, dtype, cols=args.cols)
        lams = [1e-2 * float(s[0]) for s in ss]
        ours = lowrank_precondition(us, ss, lams, vs)
        base = torch_way(us, ss, lams, vs)
        idx = [i for i in H.spread(len(us), 64) if dims[i][0] <= REF_MAX_D][:8]
        refs = reference.lowrank_precondition_ref(
            [us[i] for i in idx], [ss[i] for i in idx], [lams[i] for i in idx], [vs[i] for i in idx]
        )
        corr = H.check(
            OP, wl.name, [ours[i] for i in idx], refs, TOL[dtype], baseline=[base[i] for i in idx]
        )
        corr["max_residual_all"] = max(
            residual(u, s, lam, x, v)
            for u, s, lam, x, v in zip(us, ss, lams, ours, vs, strict=True)
        )
        if not corr["max_residual_all"] <= 100 * TOL[dtype]:
            raise H.CorrectnessError(f"{OP} on {wl.name}: residual {corr['max_residual_all']:.2e}")
        del ours, base, refs
        t = H.timeit(
            args,
            {
                "ours": partial(lowrank_precondition, us, ss, lams, vs),
                "torch": partial(torch_way, us, ss, lams, vs),
            },
        )
        flops = float(sum(4 * d * r * args.cols for d, r in dims))
        d_all = [d for d, _ in dims]
        rep.add(
            wl.name,
            f"{len(dims)} x d {min(d_all)}..{max(d_all)}",
            flops,
            t["ours"],
            t["torch"],
            corr,
            extra={"items": len(dims), "cols": args.cols, "description": wl.description},
        )
    return rep.finish()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = H.parser(__doc__.splitlines()[0])
    p.add_argument("--cols", type=int, default=1, help="vectors per layer (default 1)")
    return H.run_main(run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
