"""Kernel speed of two builds of fedng._C in ONE process, call by call: this interpreter's fedng
(e.g. the editable GCC build) against the `_C` of another install (e.g. the manylinux wheel in a
venv), on the same inputs, alternated, so load from other processes hits both alike.

    .venv/bin/python scripts/ab_native.py /tmp/wv [--threads 1]

Prints the median time of each case through both builds and their quotient (other / this).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import fedng._backend as B
import torch
import workloads as W
from fedng import ops

Case = tuple[str, Callable[[], object]]


def cases() -> Iterator[Case]:
    """The compiled-code paths: small SPD kernels, SYRK + mirror, the RNG, Nystrom."""
    for name in ("tiny", "resnet", "mlp"):
        (wl,) = W.select([name], True)
        mats = W.spd_factors(wl, torch.float32)
        damping = W.damping_for(mats)
        yield (
            f"damped_cholesky_inverse {name}",
            lambda m=mats, d=damping: ops.damped_cholesky_inverse(m, d),
        )
        xs = [torch.randn(64, m.shape[0]) for m in mats]
        fs = [torch.zeros_like(m) for m in mats]
        yield f"kron_accumulate {name}", lambda f=fs, x=xs: ops.kron_accumulate(f, x, decay=0.9)
    yield "gaussian_sketch_matrix 8192x64", lambda: ops.gaussian_sketch_matrix(8192, 64, seed=3)
    omegas = [torch.randn(512, 16) for _ in range(32)]
    factors = [torch.randn(512, 40) for _ in range(32)]
    ys = [f @ (f.T @ o) for f, o in zip(factors, omegas, strict=True)]
    yield "nystrom 32 x [512, 16]", lambda: ops.nystrom(ys, omegas)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("other_venv", type=Path, help="venv whose fedng/_C*.so is compared")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    (so,) = args.other_venv.glob("lib/python3*/site-packages/fedng/_C*.so")
    spec = importlib.util.spec_from_file_location("other_build._C", so)  # PyInit__C
    assert spec is not None and spec.loader is not None
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)
    builds = {"this": B.native, "other": other}
    for label, mod in builds.items():
        print(f"{label:5s} {mod.__file__} ({mod.small_kernel_isa()})")
    for label, fn in cases():
        times: dict[str, list[float]] = {k: [] for k in builds}
        for r in range(args.rounds):
            for k in list(builds) if r % 2 == 0 else list(builds)[::-1]:
                B.native = builds[k]
                fn()
                t0, n = time.perf_counter(), 0
                while n < 3 or time.perf_counter() - t0 < 0.05:
                    fn()
                    n += 1
                times[k].append((time.perf_counter() - t0) / n)
        a, b = (statistics.median(times[k]) for k in builds)
        print(f"{label:32s} this {a * 1e3:8.3f} ms  other {b * 1e3:8.3f} ms  ratio {b / a:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
