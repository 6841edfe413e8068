"""Benchmark `gaussian_sketch_matrix` (counter-based shared-seed Omega) against `torch.randn`.

Torch way (the throughput reference, not reproducible across machines/threads): per layer
`torch.randn(d, r, generator=g)`. Ours: per layer `gaussian_sketch_matrix(d, r, seed, layer)`
(the op makes one matrix per call). Workloads: the (d, r) of every layer's low-rank sketch
(d = parameter count, r = min(32, d // 4); tiny: each matrix size). Unit: Gsample/s.
Run: `python bench/bench_gaussian_sketch_matrix.py [--quick]`.
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
from fedng.ops import gaussian_sketch_matrix

OP = "gaussian_sketch_matrix"
SEED = 20240607


def ours_way(dims: list[tuple[int, int]], dtype: torch.dtype) -> list[torch.Tensor]:
    """One shared-seed Omega per layer, stream id = layer index."""
    return [gaussian_sketch_matrix(d, r, SEED, i, dtype=dtype) for i, (d, r) in enumerate(dims)]


def torch_way(
    dims: list[tuple[int, int]], dtype: torch.dtype, gen: torch.Generator
) -> list[torch.Tensor]:
    """`torch.randn` per layer."""
    return [torch.randn(d, r, generator=gen, dtype=dtype) for d, r in dims]


def check_bits(dtype: torch.dtype) -> dict[str, float]:
    """Bit-exact against the reference on a block, prefix-stable in r, deterministic per call."""
    d, r = 300, 12
    ref = reference.gaussian_sketch_matrix_ref(d, r, SEED, 3).to(dtype)
    got = gaussian_sketch_matrix(d, r, SEED, 3, dtype=dtype)
    if not torch.equal(got, ref):
        bad = (got != ref).sum().item()
        raise H.CorrectnessError(
            f"{OP}: {bad} of {d * r} entries differ from the bit-exact"
            " reference gaussian_sketch_matrix_ref"
        )
    wide = gaussian_sketch_matrix(2 * d, 3 * r, SEED, 3, dtype=dtype)
    if not torch.equal(wide[:d, :r], got):
        raise H.CorrectnessError(f"{OP}: entries change when d or r grows")
    if not torch.equal(gaussian_sketch_matrix(d, r, SEED, 3, dtype=dtype), got):
        raise H.CorrectnessError(f"{OP}: two identical calls gave different bits")
    return {"bit_exact_entries": float(d * r)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Checks, times and reports every selected workload."""
    dtype = H.dtype_of(args)
    corr0 = check_bits(dtype)
    rep = H.Report(OP, args, unit="Gsample/s", flops_note="samples generated (d r per layer)")
    rep.notes.append(
        "torch.randn is the throughput reference; it is not reproducible across "
        "machines or thread counts, ours is bit-identical everywhere"
    )
    gen = torch.Generator().manual_seed(SEED)
    for wl in W.select(args.workloads, args.quick):
        dims = W.lowrank_dims(wl, max_d=H.max_d_of(args))
        om = ours_way(dims, dtype)
        flat = torch.cat([o.reshape(-1) for o in om]).double()
        mean, std = flat.mean().item(), flat.std().item()
        n = flat.numel()
        if not (abs(mean) < 6 / n**0.5 and abs(std - 1) < 6 / n**0.5 + 1e-3):
            raise H.CorrectnessError(
                f"{OP} on {wl.name}: mean {mean:.2e}, std {std:.4f} over"
                f" {n} samples: not standard normal"
            )
        corr = dict(corr0, mean=mean, std=std)
        del om, flat
        t = H.timeit(
            args,
            {"ours": partial(ours_way, dims, dtype), "torch": partial(torch_way, dims, dtype, gen)},
        )
        d_all = [d for d, _ in dims]
        rep.add(
            wl.name,
            f"{len(dims)} x d {min(d_all)}..{max(d_all)}",
            float(n),
            t["ours"],
            t["torch"],
            corr,
            extra={"items": len(dims), "description": wl.description},
        )
    return rep.finish()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    args = H.parser(__doc__.splitlines()[0], default_repeats=5).parse_args(argv)
    return H.run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
