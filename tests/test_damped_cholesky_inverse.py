"""damped_cholesky_inverse: (M_i + lambda_i I)^-1 with per-matrix status and the damping used."""

from __future__ import annotations

import math

import pytest
import torch
from _tols import DTYPES, assert_close
from fedng import reference
from fedng.errors import NumericalError
from fedng.ops import CholeskyStatus, damped_cholesky_inverse
from hypothesis import given
from hypothesis import strategies as st

OP = "damped_cholesky_inverse"
OK, JITTER, FAILED = CholeskyStatus.OK, CholeskyStatus.JITTER, CholeskyStatus.FAILED


def _spd(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A well-conditioned SPD matrix: eigenvalues in about [0, 4] (damped by >= 0.1 in tests)."""
    a = torch.randn(n, max(n, 1), dtype=torch.float64, generator=gen)
    m = a @ a.T / max(n, 1)
    return ((m + m.T) / 2).to(dtype)


def _spd_with_spectrum(spectrum: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Q diag(spectrum) Q^T in float64 for a random orthogonal Q."""
    n = spectrum.numel()
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    m = (q * spectrum) @ q.T
    return (m + m.T) / 2


def _check_ok(
    result: object, mats: list[torch.Tensor], damping: list[float], dtype: torch.dtype, op: str = OP
) -> None:
    inverses, status, used = result  # type: ignore[misc]
    expected = reference.damped_cholesky_inverse_ref(mats, damping)
    assert status.dtype == torch.int8 and used.dtype == torch.float64
    assert status.tolist() == [OK] * len(mats)
    assert used.tolist() == damping
    for inv, e in zip(inverses, expected, strict=True):
        assert_close(inv, e, dtype, op)
        assert torch.equal(inv, inv.T), "the inverse must be exactly symmetric"


@pytest.mark.parametrize("dtype", DTYPES)
@given(
    sizes=st.lists(st.integers(0, 12), max_size=5), seed=st.integers(0, 2**31 - 1), data=st.data()
)
def test_ragged_spd_matches_reference(
    dtype: torch.dtype, sizes: list[int], seed: int, data: st.DataObject
) -> None:
    """Ragged SPD lists (empty, n=0, n=1, mixed) with scalar or per-matrix damping: status OK."""
    gen = torch.Generator().manual_seed(seed)
    mats = [_spd(n, dtype, gen) for n in sizes]
    per_matrix = data.draw(st.booleans())
    damping: float | list[float]
    if per_matrix:
        damping = data.draw(
            st.lists(
                st.sampled_from([0.1, 0.5, 1.0, 3.0]), min_size=len(sizes), max_size=len(sizes)
            )
        )
    else:
        damping = data.draw(st.sampled_from([0.1, 1.0]))
    result = damped_cholesky_inverse(mats, damping)
    damping_list = damping if isinstance(damping, list) else [damping] * len(sizes)
    _check_ok(result, mats, damping_list, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_size_across_kernel_switches(dtype: torch.dtype) -> None:
    """n = 1..130 in one ragged call (crossing the small-kernel / blocked switches at 64 and 96)."""
    gen = torch.Generator().manual_seed(3)
    mats = [_spd(n, dtype, gen) for n in range(1, 131)]
    _check_ok(damped_cholesky_inverse(mats, 0.1), mats, [0.1] * len(mats), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [64, 65, 96, 97, 200, 333])
def test_single_matrix_at_kernel_boundaries(dtype: torch.dtype, n: int) -> None:
    """One matrix alone (threaded BLAS path) at each side of the kernel switches; 333 takes the
    recursive solve (`solve_right_lower`) three levels down, with ragged halves."""
    mats = [_spd(n, dtype, torch.Generator().manual_seed(n))]
    _check_ok(damped_cholesky_inverse(mats, [0.2]), mats, [0.2], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_only_lower_triangle_is_read(dtype: torch.dtype) -> None:
    """Garbage (even NaN) in the strict upper triangle changes nothing: the lower one is used."""
    gen = torch.Generator().manual_seed(4)
    for n in (5, 64, 80, 130):
        m = _spd(n, dtype, gen)
        dirty = m.clone()
        rows, cols = torch.triu_indices(n, n, 1)
        dirty[rows, cols] = float("nan")
        clean = damped_cholesky_inverse([m], 0.1)
        got = damped_cholesky_inverse([dirty], 0.1)
        assert got.status.tolist() == [OK]
        assert torch.equal(got.inverses[0], clean.inverses[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_only_lower_triangle_is_read_batched_and_escalated(dtype: torch.dtype) -> None:
    """The fused K-FAC step leaves the factors' upper triangles stale and inverts them as they
    are: the batched small-matrix path (many of one size) and the damping escalation (a
    singular matrix at tiny damping) read the lower triangle only, too."""
    gen = torch.Generator().manual_seed(14)
    mats = [_spd(n, dtype, gen) for n in [4] * 9 + [7] * 5 + [33, 33]]
    mats += [torch.ones(6, 6, dtype=dtype), torch.ones(70, 70, dtype=dtype)]  # escalate
    damping = [0.1] * 16 + [1e-20, 1e-20]
    dirty = []
    for m in mats:
        d = m.clone()
        rows, cols = torch.triu_indices(m.shape[0], m.shape[0], 1)
        d[rows, cols] = float("nan")
        dirty.append(d)
    clean = damped_cholesky_inverse(mats, damping, jitter_factor=1e20)
    got = damped_cholesky_inverse(dirty, damping, jitter_factor=1e20)
    assert got.status.tolist() == clean.status.tolist()
    assert clean.status.tolist()[-2:] != [OK, OK]  # the escalation ran
    assert torch.equal(got.damping, clean.damping)
    assert all(torch.equal(a, b) for a, b in zip(got.inverses, clean.inverses, strict=True))


@pytest.mark.parametrize("dtype", DTYPES)
def test_inputs_are_not_modified(dtype: torch.dtype) -> None:
    """The op reads `mats` without writing to them."""
    gen = torch.Generator().manual_seed(5)
    mats = [_spd(n, dtype, gen) for n in (3, 70, 120)]
    before = [m.clone() for m in mats]
    damped_cholesky_inverse(mats, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(mats, before, strict=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 64, 65, 100, 130])
def test_singular_psd_with_tiny_damping_gets_jitter(dtype: torch.dtype, n: int) -> None:
    """A PSD-singular matrix (all ones) at damping 1e-20 escalates: status JITTER, damping grows."""
    ones = torch.ones(n, n, dtype=dtype)
    requested = 1e-20
    inverses, status, used = damped_cholesky_inverse([ones], requested, jitter_factor=1e20)
    if n == 1:  # [[1]] is positive definite: no escalation needed.
        assert status.tolist() == [OK] and used.tolist() == [requested]
        return
    assert status.tolist() == [JITTER]
    assert used.item() > requested
    assert used.item() == pytest.approx(1.0)
    assert torch.isfinite(inverses[0]).all()
    assert torch.equal(inverses[0], inverses[0].T)
    assert_close(
        inverses[0], reference.damped_cholesky_inverse_ref([ones], used.item())[0], dtype, OP
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_damping_escalates_from_scaled_jitter(dtype: torch.dtype) -> None:
    """With lambda = 0 on a singular matrix the first escalation is 1e-6 x mean(diag)."""
    m = 4.0 * torch.ones(8, 8, dtype=dtype)
    _, status, used = damped_cholesky_inverse([m], 0.0)
    assert status.tolist() == [JITTER]
    assert used.item() == pytest.approx(4e-6, rel=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(
            lambda m: m.index_put_(
                (torch.tensor([2]), torch.tensor([1])), torch.tensor(float("nan"), dtype=m.dtype)
            ),
            id="nan",
        ),
        pytest.param(lambda m: m.fill_diagonal_(float("inf")), id="inf"),
        pytest.param(
            lambda m: m.copy_(-1e10 * torch.eye(m.shape[0], dtype=m.dtype)), id="negative-definite"
        ),
    ],
)
@pytest.mark.parametrize("n", [4, 100])
def test_failed_is_nan_with_nan_damping(dtype: torch.dtype, bad: object, n: int) -> None:
    """NaN/Inf or hopelessly indefinite input: FAILED, all-NaN output, NaN damping; others OK."""
    gen = torch.Generator().manual_seed(6)
    good = _spd(n, dtype, gen)
    broken = _spd(n, dtype, gen)
    bad(broken)  # type: ignore[operator]
    inverses, status, used = damped_cholesky_inverse([good, broken, good], 0.1)
    assert status.tolist() == [OK, FAILED, OK]
    assert torch.isnan(inverses[1]).all()
    assert math.isnan(used[1].item())
    assert used[0].item() == 0.1 and used[2].item() == 0.1
    expected = reference.damped_cholesky_inverse_ref([good], 0.1)[0]
    assert_close(inverses[0], expected, dtype, OP)
    assert_close(inverses[2], expected, dtype, OP)


@pytest.mark.parametrize("dtype", DTYPES)
def test_errors_raise(dtype: torch.dtype) -> None:
    """errors='raise' raises NumericalError naming the op and the failed index; none if all OK."""
    bad = -1e10 * torch.eye(3, dtype=dtype)
    good = torch.eye(3, dtype=dtype)
    with pytest.raises(NumericalError, match=rf"{OP}.*1 of 2.*\[1\]"):
        damped_cholesky_inverse([good, bad], 0.1, errors="raise")
    out = damped_cholesky_inverse([good], 0.1, errors="raise")
    assert out.status.tolist() == [OK]


@pytest.mark.parametrize("dtype", DTYPES)
@given(
    sizes=st.lists(st.integers(1, 10), min_size=1, max_size=4),
    seed=st.integers(0, 2**31 - 1),
    damping=st.sampled_from([0.0, 1e-8, 1e-3, 0.1, 1.0]),
    max_tries=st.integers(1, 6),
)
def test_never_nan_unless_failed(
    dtype: torch.dtype, sizes: list[int], seed: int, damping: float, max_tries: int
) -> None:
    """Random symmetric (often indefinite) matrices: a non-FAILED status never comes with NaN."""
    gen = torch.Generator().manual_seed(seed)
    mats = []
    for n in sizes:
        a = torch.randn(n, n, dtype=torch.float64, generator=gen)
        mats.append(((a + a.T) / 2).to(dtype))
    inverses, status, used = damped_cholesky_inverse(mats, damping, max_tries=max_tries)
    for inv, s, lam in zip(inverses, status.tolist(), used.tolist(), strict=True):
        if s == FAILED:
            assert torch.isnan(inv).all() and math.isnan(lam)
        else:
            assert torch.isfinite(inv).all() and math.isfinite(lam) and lam >= damping
            assert torch.equal(inv, inv.T)
            assert (s == OK) == (lam == damping)


@pytest.mark.parametrize("n", [8, 32, 64, 65, 80, 96, 97, 130, 333])
def test_ill_conditioned_float64_is_accurate(n: int) -> None:
    """Condition number 1e8 in float64: status OK and a Cholesky-grade inverse at every size.

    A backward-stable Cholesky inverse errs by about cond * n * eps64 (~1e-6 normwise here);
    an algorithm that squares the conditioning (inverting blocks explicitly) does not.
    """
    gen = torch.Generator().manual_seed(n)
    m = _spd_with_spectrum(torch.logspace(0, -8, n, dtype=torch.float64), gen)
    inverses, status, used = damped_cholesky_inverse([m], 0.0)
    assert status.tolist() == [OK] and used.tolist() == [0.0]
    expected = reference.damped_cholesky_inverse_ref([m], 0.0)[0]
    assert_close(inverses[0], expected, torch.float64, f"{OP}[ill]")


@pytest.mark.parametrize("n", [2, 8, 64, 65, 96, 97, 130])
def test_float32_uses_float64_retry(n: int) -> None:
    """float32 all-ones + 5e-8 I: float32 rounds the damping away (singular), the float64 retry
    inverts it at the requested damping (status OK, not JITTER), to float32 accuracy.
    """
    lam = 5e-8
    ones = torch.ones(n, n, dtype=torch.float32)
    assert float(torch.tensor(1.0 + lam, dtype=torch.float32)) == 1.0  # float32 alone fails
    inverses, status, used = damped_cholesky_inverse([ones], lam)
    assert status.tolist() == [OK] and used.tolist() == [lam]
    # Exact inverse of J + lam I: (I - J / (n + lam)) / lam.
    eye = torch.eye(n, dtype=torch.float64)
    exact = (eye - torch.ones(n, n, dtype=torch.float64) / (n + lam)) / lam
    assert_close(inverses[0], exact, torch.float32, f"{OP}[ill]")
    assert torch.equal(inverses[0], inverses[0].T)


def test_max_tries_one_never_escalates() -> None:
    """max_tries=1 tries only the requested damping: a singular matrix is FAILED, not JITTER."""
    _, status, used = damped_cholesky_inverse(
        [torch.ones(3, 3, dtype=torch.float64)], 0.0, max_tries=1
    )
    assert status.tolist() == [FAILED] and math.isnan(used.item())


def test_empty_list() -> None:
    """An empty list returns empty results of the documented dtypes."""
    inverses, status, used = damped_cholesky_inverse([], 0.1)
    assert inverses == [] and status.shape == (0,) and used.shape == (0,)
    assert status.dtype == torch.int8 and used.dtype == torch.float64


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_is_written_and_returned(dtype: torch.dtype) -> None:
    """out= receives the inverses in place (the same tensors are returned), incl. a failed NaN."""
    gen = torch.Generator().manual_seed(12)
    mats = [_spd(n, dtype, gen) for n in (1, 5, 70)] + [-1e10 * torch.eye(3, dtype=dtype)]
    outs = [torch.zeros_like(m) for m in mats]
    ptrs = [o.data_ptr() for o in outs]
    inverses, status, _ = damped_cholesky_inverse(mats, 0.1, out=outs)
    assert [o.data_ptr() for o in inverses] == ptrs
    assert all(a is b for a, b in zip(inverses, outs, strict=True))
    assert status.tolist() == [OK, OK, OK, FAILED]
    expected = reference.damped_cholesky_inverse_ref(mats[:3], 0.1)
    for o, e in zip(outs[:3], expected, strict=True):
        assert_close(o, e, dtype, OP)
    assert torch.isnan(outs[3]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", [2, 7, 8, 9, 15, 16, 17, 33])
def test_same_size_groups_at_lane_boundaries(dtype: torch.dtype, count: int) -> None:
    """`count` matrices of each size: full and partial SIMD lane groups (4, 8 or 16 lanes by dtype
    and instruction set), sizes on both sides of every 4-wide blocked dot (n mod 4) up to 64."""
    gen = torch.Generator().manual_seed(count)
    mats = [_spd(n, dtype, gen) for n in (1, 2, 3, 4, 5, 7, 8, 9, 31, 64) for _ in range(count)]
    damping = [0.1 + 0.01 * (i % 5) for i in range(len(mats))]
    _check_ok(damped_cholesky_inverse(mats, damping), mats, damping, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", ["diag", "offdiag", "last"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_lane_fails_alone(dtype: torch.dtype, where: str, bad: float) -> None:
    """A NaN/Inf anywhere in one lower triangle fails that matrix only; its lane neighbours keep
    their inverses (the lane kernel has no finiteness pre-pass: the pivots catch it)."""
    gen = torch.Generator().manual_seed(5)
    mats = [_spd(12, dtype, gen) for _ in range(16)]
    i, j = {"diag": (3, 3), "offdiag": (7, 2), "last": (11, 10)}[where]
    mats[5][i, j] = bad
    res = damped_cholesky_inverse(mats, 0.1)
    assert res.status[5] == FAILED and math.isnan(res.damping[5].item())
    assert torch.isnan(res.inverses[5]).all()
    good = [k for k in range(16) if k != 5]
    _check_ok(
        ([res.inverses[k] for k in good], res.status[good], res.damping[good]),
        [mats[k] for k in good],
        [0.1] * 15,
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_lane_kernels_agree_across_instruction_sets(dtype: torch.dtype) -> None:
    """The 64-byte-lane (AVX-512) and 32-byte-lane builds both match the reference, at lane-group
    boundaries of both widths (on a CPU without AVX-512 both runs take the same path)."""
    from fedng import _backend

    gen = torch.Generator().manual_seed(11)
    mats = [_spd(n, dtype, gen) for n in (3, 17, 40) for _ in range(17)]
    before = _backend.native.set_avx512_lanes(False)
    try:
        for on in (False, True):
            _backend.native.set_avx512_lanes(on)
            _check_ok(damped_cholesky_inverse(mats, 0.1), mats, [0.1] * len(mats), dtype)
    finally:
        _backend.native.set_avx512_lanes(before)
    assert (_backend.native.small_kernel_isa() == "avx512") == before
