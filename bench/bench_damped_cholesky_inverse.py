"""Benchmark `damped_cholesky_inverse` against the per-matrix torch loop.

Torch way (what a user writes): per matrix `a = M.clone(); a.diagonal().add_(lam);
L, info = torch.linalg.cholesky_ex(a); torch.cholesky_inverse(L)` (info not checked: the leanest
loop). Work: n^3 flops per matrix (the effective count of Cholesky n^3/3 + inverse 2n^3/3).
Run: `python bench/bench_damped_cholesky_inverse.py [--quick] [--workloads mlp tiny]`.
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
from fedng.ops import CholeskyStatus, damped_cholesky_inverse

OP = "damped_cholesky_inverse"
TOL = {torch.float32: 2e-3, torch.float64: 1e-9}


def torch_way(mats: list[torch.Tensor], damping: list[float]) -> list[torch.Tensor]:
    """The plain torch loop: damp, `cholesky_ex`, `cholesky_inverse`, one matrix at a time."""
    outs = []
    for m, lam in zip(mats, damping, strict=True):
        a = m.clone()
        a.diagonal().add_(lam)
        low, _info = torch.linalg.cholesky_ex(a)
        outs.append(torch.cholesky_inverse(low))
    return outs


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Checks, times and reports every selected workload."""
    dtype = H.dtype_of(args)
    rep = H.Report(OP, args, flops_note="n^3 per matrix (Cholesky + inverse, effective)")
    for wl in W.select(args.workloads, args.quick):
        mats = W.spd_factors(wl, dtype)
        damping = W.damping_for(mats)
        res = damped_cholesky_inverse(mats, damping)
        bad = (res.status != CholeskyStatus.OK).nonzero().flatten().tolist()
        if bad:
            statuses = res.status[bad[:5]].tolist()
            raise H.CorrectnessError(
                f"{OP} on {wl.name}: statuses {[CholeskyStatus(s).name for s in statuses]}"
                f" (not OK) for matrices {bad[:5]} that are SPD with damping 1e-3 x mean(diag)"
            )
        base = torch_way(mats, damping)
        idx = H.spread(len(mats), 12)
        refs = reference.damped_cholesky_inverse_ref(
            [mats[i] for i in idx], [damping[i] for i in idx]
        )
        corr = H.check(
            OP,
            wl.name,
            [res.inverses[i] for i in idx],
            refs,
            TOL[dtype],
            baseline=[base[i] for i in idx],
        )
        # Every matrix, not just the subset: ours and the torch loop must agree.
        corr["max_rel_diff_vs_torch_all"] = H.max_rel_err(res.inverses, base)
        if not corr["max_rel_diff_vs_torch_all"] <= max(
            50 * TOL[dtype], 10 * corr["max_rel_err_torch"]
        ):
            raise H.CorrectnessError(
                f"{OP} on {wl.name}: fedng and torch differ by"
                f" {corr['max_rel_diff_vs_torch_all']:.2e} outside the reference subset"
            )
        del res, base, refs
        t = H.timeit(
            args,
            {
                "ours": partial(damped_cholesky_inverse, mats, damping),
                "torch": partial(torch_way, mats, damping),
            },
        )
        flops = float(sum(m.shape[0] ** 3 for m in mats))
        dims = wl.factor_dims
        rep.add(
            wl.name,
            f"{len(mats)} x {min(dims)}..{max(dims)}",
            flops,
            t["ours"],
            t["torch"],
            corr,
            extra={
                "items": len(mats),
                "sizes": dims if not wl.tiny else None,
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
