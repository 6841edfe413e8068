"""pytest-benchmark smoke set: one small benchmark per op; asserts correctness, never timings.

`pytest bench/test_bench_smoke.py` runs them once each as plain tests (the project's default
`--benchmark-disable`); `pytest bench/test_bench_smoke.py --benchmark-enable` times them.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import workloads as W
from fedng import reference
from fedng.ops import (
    damped_cholesky_inverse,
    gaussian_sketch_matrix,
    kron_accumulate,
    kron_precondition,
    lowrank_precondition,
    nystrom,
    sketch_accumulate,
)

SMALL = W.Workload(
    "small", "two small layers", (W.Layer("fc0", 65, 48, 32), W.Layer("fc1", 49, 10, 32))
)
TINY = W.tiny(count=64)


def close(outs: list[torch.Tensor], refs: list[torch.Tensor], tol: float) -> None:
    """Every output within `tol` relative (Frobenius) error of its float64 reference."""
    assert len(outs) == len(refs)
    for i, (o, r) in enumerate(zip(outs, refs, strict=True)):
        err = (o.double() - r).norm() / r.norm().clamp_min(1e-300)
        assert err <= tol, f"item {i}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("wl", [SMALL, TINY], ids=["small", "tiny"])
def test_kron_accumulate(benchmark: Any, wl: W.Workload) -> None:
    xs = W.kfac_inputs(wl)
    init = [torch.eye(n) for n in wl.factor_dims]

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return ([f.clone() for f in init], xs, 0.9, 0.5), {}

    out = benchmark.pedantic(kron_accumulate, setup=setup, rounds=20)
    close(out, reference.kron_accumulate_ref(init, xs, 0.9, 0.5), 1e-5)


@pytest.mark.parametrize("wl", [SMALL, TINY], ids=["small", "tiny"])
def test_damped_cholesky_inverse(benchmark: Any, wl: W.Workload) -> None:
    mats = W.spd_factors(wl)
    damping = W.damping_for(mats)
    res = benchmark(damped_cholesky_inverse, mats, damping)
    assert (res.status == 0).all()
    close(res.inverses, reference.damped_cholesky_inverse_ref(mats, damping), 2e-3)


def test_kron_precondition(benchmark: Any) -> None:
    factors = W.spd_factors(SMALL)
    a_inv, g_inv = factors[0::2], factors[1::2]
    grads = W.gradients(SMALL)
    out = benchmark(kron_precondition, grads, a_inv, g_inv)
    close(out, reference.kron_precondition_ref(grads, a_inv, g_inv), 1e-5)


def test_kron_precondition_batch_form(benchmark: Any) -> None:
    factors = W.spd_factors(SMALL)
    a_inv, g_inv = factors[0::2], factors[1::2]
    xs, gbs = W.batch_factors(SMALL)
    out = benchmark(kron_precondition, None, a_inv, g_inv, inputs=xs, output_grads=gbs)
    close(
        out, reference.kron_precondition_ref(None, a_inv, g_inv, inputs=xs, output_grads=gbs), 1e-5
    )


def test_sketch_accumulate(benchmark: Any) -> None:
    gen = W.LowRankJacobian(2000, latent=32)
    j = gen.batch(0, 64)
    om = gaussian_sketch_matrix(2000, 12, 3, 0)
    y0 = torch.randn(2000, 12)

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return ([y0.clone()], [j], [om], 0.5, 2.0), {}

    out = benchmark.pedantic(sketch_accumulate, setup=setup, rounds=20)
    close(out, reference.sketch_accumulate_ref([y0], [j], [om], 0.5, 2.0), 1e-5)


def test_nystrom(benchmark: Any) -> None:
    dims = [(3000, 16), (500, 8), (64, 4)]
    ys, oms = W.psd_sketches(dims)
    res = benchmark(nystrom, ys, oms)
    refs = reference.nystrom_ref(ys, oms, res.shift.tolist())
    for u, s, om, (u_ref, s_ref) in zip(res.U, res.S, oms, refs, strict=True):
        applied = u.double() @ (s.double()[:, None] * (u.double().T @ om.double()))
        applied_ref = u_ref @ (s_ref[:, None] * (u_ref.T @ om.double()))
        close([applied], [applied_ref], 1e-3)


def test_lowrank_precondition(benchmark: Any) -> None:
    dims = [(3000, 16), (500, 8), (64, 4)]
    us, ss, vs = W.lowrank_factors(dims)
    lams = [1e-2 * float(s[0]) for s in ss]
    out = benchmark(lowrank_precondition, us, ss, lams, vs)
    close(out, reference.lowrank_precondition_ref(us, ss, lams, vs), 1e-4)


def test_gaussian_sketch_matrix(benchmark: Any) -> None:
    out = benchmark(gaussian_sketch_matrix, 4096, 32, 11, 2)
    ref = reference.gaussian_sketch_matrix_ref(128, 32, 11, 2).float()
    assert torch.equal(out[:128], ref)
    assert torch.equal(gaussian_sketch_matrix(4096, 32, 11, 2), out)
