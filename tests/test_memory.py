"""10,000 calls of each op leave the process RSS flat (no per-call leak in the bindings/kernels)."""

from __future__ import annotations

import gc
import mmap
import os
from collections.abc import Callable

import pytest
import torch
from fedng import ops

CALLS = 10_000
WARMUP = 1_000
SLACK_BYTES = 8 * 2**20  # a leak of >= ~840 bytes per call would exceed this
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm (second field, in pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _kron_accumulate() -> Callable[[], object]:
    fs = [torch.zeros(3, 3), torch.zeros(2, 2, dtype=torch.float32)]
    xs = [torch.randn(4, 3), torch.randn(0, 2)]
    return lambda: ops.kron_accumulate(fs, xs, decay=0.5, scale=[1.0, 2.0])


def _damped_cholesky_inverse() -> Callable[[], object]:
    # One OK, one JITTER (singular) and one FAILED (NaN) matrix: every status path runs.
    mats = [
        torch.eye(3, dtype=torch.float64),
        torch.ones(2, 2, dtype=torch.float64),
        torch.full((2, 2), float("nan"), dtype=torch.float64),
    ]
    return lambda: ops.damped_cholesky_inverse(mats, [0.1, 0.0, 0.1])


def _kron_precondition() -> Callable[[], object]:
    a, g = torch.eye(3), torch.eye(2)
    grads, ab, gb = torch.randn(2, 3), torch.randn(1, 3), torch.randn(1, 2)
    return lambda: ops.kron_precondition(
        [grads, grads], [a, a], [g, g], inputs=[ab, ab], output_grads=[gb, gb]
    )


def _sketch_accumulate() -> Callable[[], object]:
    y, om = torch.zeros(5, 2), ops.gaussian_sketch_matrix(5, 2, seed=1)
    j = torch.randn(3, 5)
    return lambda: ops.sketch_accumulate([y], [j], [om], decay=0.5)


def _nystrom() -> Callable[[], object]:
    om = ops.gaussian_sketch_matrix(6, 2, seed=2, dtype=torch.float64)
    j = torch.randn(3, 6, dtype=torch.float64)
    y = (j.T @ j) @ om
    bad = torch.full_like(y, float("nan"))

    def call() -> object:
        ops.nystrom([y], [om])
        with pytest.raises(ValueError):  # the failure path (status from C++) leaks nothing either
            ops.nystrom([bad], [om])
        return None

    return call


def _lowrank_precondition() -> Callable[[], object]:
    u, _ = torch.linalg.qr(torch.randn(6, 2))
    u = u.contiguous()
    s, v = torch.rand(2), torch.randn(6, 3)
    return lambda: ops.lowrank_precondition([u, u], [s, s], 0.5, [v, v[:, 0].contiguous()])


def _gaussian_sketch_matrix() -> Callable[[], object]:
    return lambda: ops.gaussian_sketch_matrix(8, 4, seed=3, stream_id=1)


FACTORIES = {
    "kron_accumulate": _kron_accumulate,
    "damped_cholesky_inverse": _damped_cholesky_inverse,
    "kron_precondition": _kron_precondition,
    "sketch_accumulate": _sketch_accumulate,
    "nystrom": _nystrom,
    "lowrank_precondition": _lowrank_precondition,
    "gaussian_sketch_matrix": _gaussian_sketch_matrix,
}


@pytest.mark.parametrize("op", list(FACTORIES))
def test_rss_flat_over_10000_calls(op: str) -> None:
    """After a warm-up, 10,000 more calls grow the RSS by less than 8 MiB."""
    call = FACTORIES[op]()
    for _ in range(WARMUP):
        call()
    gc.collect()
    before = rss_bytes()
    for _ in range(CALLS):
        call()
    gc.collect()
    growth = rss_bytes() - before
    assert growth < SLACK_BYTES, f"{op}: RSS grew by {growth / 2**20:.1f} MiB over {CALLS} calls"


def test_rss_probe_sees_a_leak() -> None:
    """The RSS probe itself works: 16 MiB of freshly mapped, touched pages show up as growth."""
    before = rss_bytes()
    # A new anonymous mapping: the allocator cannot satisfy it with pages already resident.
    hold = mmap.mmap(-1, 16 * 2**20)
    for offset in range(0, len(hold), 4096):
        hold[offset] = 1
    grown = rss_bytes() - before
    hold.close()
    assert grown >= 12 * 2**20, f"probe saw only {grown / 2**20:.1f} MiB"
