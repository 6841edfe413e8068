"""Benchmark `kron_precondition` (K-FAC step `G^-1 dW A^-1`) against the per-layer torch loop.

Torch way: per layer `g_inv @ grad @ a_inv`; for the batch form (row `mlp:batch`, batch 256 below
the layer widths) `(gb @ g_inv).T @ (ab @ a_inv)`. Work: 2 m n (m + n) flops per layer (dense form),
2 B (m^2 + n^2 + m n) (batch form). The inverse factors are SPD stand-ins (timing does not depend on
their values). Run: `python bench/bench_kron_precondition.py [--quick] [--workloads mlp lora]`.
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
from fedng.ops import kron_precondition

OP = "kron_precondition"
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
BATCH_FORM = ("mlp",)  # workloads whose batch (256) is below the layer widths


def torch_way(
    grads: list[torch.Tensor], a_inv: list[torch.Tensor], g_inv: list[torch.Tensor]
) -> list[torch.Tensor]:
    """The plain torch loop, dense form."""
    return [g @ w @ a for w, a, g in zip(grads, a_inv, g_inv, strict=True)]


def torch_way_batch(
    inputs: list[torch.Tensor],
    output_grads: list[torch.Tensor],
    a_inv: list[torch.Tensor],
    g_inv: list[torch.Tensor],
) -> list[torch.Tensor]:
    """The plain torch loop, batch form (g_inv symmetric)."""
    return [
        (gb @ g).T @ (ab @ a)
        for ab, gb, a, g in zip(inputs, output_grads, a_inv, g_inv, strict=True)
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Checks, times and reports every selected workload (dense form, then the batch form)."""
    dtype = H.dtype_of(args)
    rep = H.Report(OP, args, flops_note="dense 2mn(m+n) per layer; batch form 2B(m^2+n^2+mn)")
    for wl in W.select(args.workloads, args.quick):
        factors = W.spd_factors(wl, dtype)
        a_inv, g_inv = factors[0::2], factors[1::2]
        grads = W.gradients(wl, dtype)
        ours = kron_precondition(grads, a_inv, g_inv)
        base = torch_way(grads, a_inv, g_inv)
        idx = H.spread(len(grads), 16)
        refs = reference.kron_precondition_ref(
            [grads[i] for i in idx], [a_inv[i] for i in idx], [g_inv[i] for i in idx]
        )
        corr = H.check(
            OP, wl.name, [ours[i] for i in idx], refs, TOL[dtype], baseline=[base[i] for i in idx]
        )
        corr["max_rel_diff_vs_torch_all"] = H.max_rel_err(ours, base)
        del ours, base, refs
        t = H.timeit(
            args,
            {
                "ours": partial(kron_precondition, grads, a_inv, g_inv),
                "torch": partial(torch_way, grads, a_inv, g_inv),
            },
        )
        flops = float(sum(2 * la.n_out * la.n_in * (la.n_out + la.n_in) for la in wl.layers))
        ms = [la.n_out for la in wl.layers]
        ns = [la.n_in for la in wl.layers]
        detail = f"{len(grads)} x [{min(ms)}..{max(ms)}, {min(ns)}..{max(ns)}]"
        rep.add(
            wl.name,
            detail,
            flops,
            t["ours"],
            t["torch"],
            corr,
            extra={"form": "dense", "items": len(grads), "description": wl.description},
        )

        if wl.name not in BATCH_FORM:
            continue
        xs, gbs = W.batch_factors(wl, dtype)
        ours = kron_precondition(None, a_inv, g_inv, inputs=xs, output_grads=gbs)
        base = torch_way_batch(xs, gbs, a_inv, g_inv)
        refs = reference.kron_precondition_ref(None, a_inv, g_inv, inputs=xs, output_grads=gbs)
        corr = H.check(OP, wl.name + ":batch", ours, refs, TOL[dtype], baseline=base)
        del ours, base, refs
        t = H.timeit(
            args,
            {
                "ours": partial(kron_precondition, None, a_inv, g_inv, inputs=xs, output_grads=gbs),
                "torch": partial(torch_way_batch, xs, gbs, a_inv, g_inv),
            },
        )
        flops = float(
            sum(2 * la.rows * (la.n_out**2 + la.n_in**2 + la.n_out * la.n_in) for la in wl.layers)
        )
        rep.add(
            wl.name + ":batch",
            f"B={wl.layers[0].rows}, " + detail,
            flops,
            t["ours"],
            t["torch"],
            corr,
            extra={"form": "batch", "items": len(grads), "description": wl.description},
        )
    return rep.finish()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    args = H.parser(__doc__.splitlines()[0]).parse_args(argv)
    return H.run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
