"""Benchmark `nystrom` (stable Nystrom from a sketch) against the same algorithm in a torch loop.

Baseline choice: `torch.linalg.eigh` of the dense Fisher is out of reach at these sizes (one
d x d matrix per layer, d up to ~1M parameters), so the torch way is the same stable Nystrom a user
would write per layer: `C = cholesky(Omega^T (Y + nu Omega))` (nu x10 until it succeeds),
`B = solve_triangular(C, Y + nu Omega)`, `U, s = svd(B)`, `S = max(s^2 - nu, 0)`, starting from the
shift our op reports having used (so both compute the same approximation). The op itself takes
B's SVD from its r x r Gram matrix plus one CholeskyQR pass where B is well conditioned (five
[d, r] GEMMs instead of LAPACK's thin SVD; the thin SVD otherwise), and B = Y_nu L^-T by a GEMM:
same result within the float64 reference's tolerance, checked below, not the same operations.
Workloads: one low-rank Fisher per layer, d = the layer's parameter count (tiny: each matrix size),
rank r = min(32, d // 4); d is capped at 2^18 in full mode to bound the run (`--max-d 0`: no cap).
Work: 8 d r^2 flops per matrix (Omega^T Y 2dr^2, triangular solve dr^2, thin SVD ~5dr^2, an
effective count).
Run: `python bench/bench_nystrom.py [--quick] [--workloads mlp lora]`.
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
from fedng.ops import nystrom

OP = "nystrom"
TOL = {torch.float32: 1e-3, torch.float64: 1e-9}
REF_MAX_D = 100_000  # float64 reference SVDs only up to this size
FULL_MAX_D = 262_144  # d cap in full mode (MLP/ResNet layers are larger), to bound the run time


def torch_way(
    ys: list[torch.Tensor], oms: list[torch.Tensor], shifts: list[float]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Stable Nystrom per matrix in plain torch (the op's algorithm, from the given shifts)."""
    out = []
    for y, om, nu in zip(ys, oms, shifts, strict=True):
        for _ in range(16):
            y_nu = y + nu * om
            small = om.T @ y_nu
            c, info = torch.linalg.cholesky_ex((small + small.T) / 2, upper=True)
            if info.item() == 0:
                break
            nu *= 10.0
        b = torch.linalg.solve_triangular(c, y_nu, upper=True, left=False)
        u, sv, _ = torch.linalg.svd(b, full_matrices=False)
        out.append((u, (sv * sv - nu).clamp_(min=0.0)))
    return out


def _applied(u: torch.Tensor, s: torch.Tensor, om: torch.Tensor) -> torch.Tensor:
    """`U diag(S) U^T Omega` in float64: compares approximations independently of eigenvector
    signs and rotations within clusters."""
    u64 = u.double()
    return u64 @ (s.double()[:, None] * (u64.T @ om.double()))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Checks, times and reports every selected workload."""
    dtype = H.dtype_of(args)
    rep = H.Report(OP, args, flops_note="8 d r^2 per matrix (effective)")
    rep.notes.append(
        "torch baseline = the same stable Nystrom per layer in torch (dense eigh of "
        "the d x d Fisher does not fit at these sizes)"
    )
    rep.notes.append(
        "ours factors B = Y_nu L^-T through its Gram matrix + CholeskyQR where B is well"
        " conditioned (thin SVD otherwise); the torch way calls torch.linalg.svd"
    )
    for wl in W.select(args.workloads, args.quick):
        dims = W.lowrank_dims(wl, max_d=H.max_d_of(args, FULL_MAX_D))
        ys, oms = W.psd_sketches(dims, dtype)
        res = nystrom(ys, oms)
        shifts = res.shift.tolist()
        base = torch_way(ys, oms, shifts)
        idx = [i for i in H.spread(len(ys), 64) if dims[i][0] <= REF_MAX_D][:4]
        refs = reference.nystrom_ref(
            [ys[i] for i in idx], [oms[i] for i in idx], [float(res.shift[i]) for i in idx]
        )
        corr = H.check(
            OP,
            wl.name,
            [_applied(res.U[i], res.S[i], oms[i]) for i in idx],
            [_applied(u, s, oms[i]) for i, (u, s) in zip(idx, refs, strict=True)],
            TOL[dtype],
            baseline=[_applied(base[i][0], base[i][1], oms[i]) for i in idx],
        )
        corr["max_rel_err_eigenvalues"] = H.max_rel_err(
            [res.S[i] for i in idx], [s for _, s in refs]
        )
        orth = max(
            H.rel_err(
                res.U[i].double().T @ res.U[i].double(), torch.eye(dims[i][1], dtype=torch.float64)
            )
            for i in idx
        )
        corr["max_orthonormality_err"] = orth
        if not orth <= 100 * TOL[dtype]:
            raise H.CorrectnessError(f"{OP} on {wl.name}: U is not orthonormal ({orth:.2e})")
        del res, base, refs
        t = H.timeit(
            args, {"ours": partial(nystrom, ys, oms), "torch": partial(torch_way, ys, oms, shifts)}
        )
        flops = float(sum(8 * d * r * r for d, r in dims))
        d_all = [d for d, _ in dims]
        rep.add(
            wl.name,
            f"{len(dims)} x d {min(d_all)}..{max(d_all)}",
            flops,
            t["ours"],
            t["torch"],
            corr,
            extra={
                "items": len(dims),
                "ranks": sorted({r for _, r in dims}),
                "description": wl.description,
            },
        )
    return rep.finish()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    args = H.parser(__doc__.splitlines()[0], default_repeats=3).parse_args(argv)
    return H.run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
