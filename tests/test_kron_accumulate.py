"""kron_accumulate: F_i <- decay F_i + scale_i X_i^T X_i against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from _tols import DTYPES, assert_close
from fedng import reference
from fedng.ops import kron_accumulate
from hypothesis import given
from hypothesis import strategies as st

OP = "kron_accumulate"

# (k_i, n_i) per matrix: empty lists, single matrices, size 1 and k = 0 all occur.
shapes = st.lists(st.tuples(st.integers(0, 12), st.integers(0, 10)), max_size=5)
decays = st.sampled_from([0.0, 1.0, 0.95, 0.5])


def _symmetric(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(n, n, dtype=torch.float64, generator=gen)
    return ((a + a.T) / 2).to(dtype)


def _problem(
    kn: list[tuple[int, int]], dtype: torch.dtype, seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    factors = [_symmetric(n, dtype, gen) for _, n in kn]
    inputs = [torch.randn(k, n, dtype=torch.float64, generator=gen).to(dtype) for k, n in kn]
    return factors, inputs


@pytest.mark.parametrize("dtype", DTYPES)
@given(kn=shapes, decay=decays, seed=st.integers(0, 2**31 - 1))
def test_matches_reference_scalar_scale(
    dtype: torch.dtype, kn: list[tuple[int, int]], decay: float, seed: int
) -> None:
    """Ragged lists with a scalar scale match the reference, in place, exactly symmetric."""
    factors, inputs = _problem(kn, dtype, seed)
    expected = reference.kron_accumulate_ref(factors, inputs, decay, 0.25)
    ids = [f.data_ptr() for f in factors]
    out = kron_accumulate(factors, inputs, decay=decay, scale=0.25)
    assert out is not None and len(out) == len(kn)
    for i, (f, e) in enumerate(zip(out, expected, strict=True)):
        assert f is factors[i] and f.data_ptr() == ids[i], "factors must be updated in place"
        assert_close(f, e, dtype, OP)
        assert torch.equal(f, f.T), "the accumulated factor must be exactly symmetric"


@pytest.mark.parametrize("dtype", DTYPES)
@given(kn=shapes, decay=decays, seed=st.integers(0, 2**31 - 1), data=st.data())
def test_matches_reference_per_matrix_scale(
    dtype: torch.dtype, kn: list[tuple[int, int]], decay: float, seed: int, data: st.DataObject
) -> None:
    """A per-matrix scale list (e.g. 1/k_i) applies each scale to its own matrix."""
    scales = data.draw(
        st.lists(
            st.sampled_from([0.0, 1.0, 0.5, 2.0, -1.0, 1 / 3]), min_size=len(kn), max_size=len(kn)
        )
    )
    factors, inputs = _problem(kn, dtype, seed)
    expected = reference.kron_accumulate_ref(factors, inputs, decay, scales)
    kron_accumulate(factors, inputs, decay, scales)
    for f, e in zip(factors, expected, strict=True):
        assert_close(f, e, dtype, OP)
        assert torch.equal(f, f.T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 64, 65, 130, 300, 1025])
def test_large_and_odd_sizes(dtype: torch.dtype, n: int) -> None:
    """Sizes past BLAS block boundaries (and one threaded over several matrices) stay correct."""
    gen = torch.Generator().manual_seed(n)
    factors = [_symmetric(n, dtype, gen) for _ in range(3)]
    inputs = [torch.randn(k, n, generator=gen, dtype=torch.float64).to(dtype) for k in (1, 33, 257)]
    expected = reference.kron_accumulate_ref(factors, inputs, 0.9, [1.0, 0.5, 1 / 257])
    kron_accumulate(factors, inputs, 0.9, [1.0, 0.5, 1 / 257])
    for f, e in zip(factors, expected, strict=True):
        assert_close(f, e, dtype, OP)
        assert torch.equal(f, f.T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", [0.0, 1.0])
@pytest.mark.parametrize("k", [1, 2, 31])
@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 23, 24, 25, 31, 32, 33, 63, 64, 65, 96, 97])
def test_block_boundaries(dtype: torch.dtype, n: int, k: int, decay: float) -> None:
    """Ragged n around the mirror's 8-row groups, 16-row steps and 32-wide tiles, k = 1, decay 0
    and 1: both triangles are written.

    decay 0 starts from an all-NaN factor, so any entry the mirror missed (or any stale
    entry read) shows up as NaN; decay 1 keeps a random symmetric factor and adds to it.
    """
    gen = torch.Generator().manual_seed(1000 * n + k)
    f = _symmetric(n, dtype, gen) if decay else torch.full((n, n), float("nan"), dtype=dtype)
    x = torch.randn(k, n, generator=gen, dtype=torch.float64).to(dtype)
    start = f.clone() if decay else torch.zeros(n, n, dtype=dtype)
    expected = reference.kron_accumulate_ref([start], [x], decay, 1 / k)[0]
    kron_accumulate([f], [x], decay, 1 / k)
    assert bool(torch.isfinite(f).all()), "every entry, in both triangles, must be written"
    assert_close(f, expected, dtype, OP)
    assert torch.equal(f, f.T)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decay_one_and_zero_rows_is_identity(dtype: torch.dtype) -> None:
    """decay=1 with k=0 rows leaves the factor bit-for-bit unchanged."""
    f = _symmetric(6, dtype, torch.Generator().manual_seed(1))
    before = f.clone()
    kron_accumulate([f], [torch.empty(0, 6, dtype=dtype)], decay=1.0)
    assert torch.equal(f, before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulation_is_a_sum_over_batches(dtype: torch.dtype) -> None:
    """Two calls with decay=1 equal one call on the stacked batch (factors add up)."""
    gen = torch.Generator().manual_seed(2)
    x1 = torch.randn(5, 4, generator=gen, dtype=torch.float64).to(dtype)
    x2 = torch.randn(3, 4, generator=gen, dtype=torch.float64).to(dtype)
    f_two = torch.zeros(4, 4, dtype=dtype)
    kron_accumulate([f_two], [x1])
    kron_accumulate([f_two], [x2])
    f_one = torch.zeros(4, 4, dtype=dtype)
    kron_accumulate([f_one], [torch.cat([x1, x2])])
    assert_close(f_two, f_one.double(), dtype, OP)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [0, 3])
def test_decay_zero_overwrites_old_contents(dtype: torch.dtype, k: int) -> None:
    """decay=0 means overwrite (docstring): an uninitialized (NaN) factor is not read, k=0 or not.

    A factor allocated with torch.empty and filled with decay=0 must not depend on its garbage;
    the k>0 path (BLAS beta=0) already ignores it, and the k=0 path must agree.
    """
    f = torch.full((4, 4), float("nan"), dtype=dtype)
    x = torch.randn(k, 4, dtype=torch.float64).to(dtype)
    kron_accumulate([f], [x], decay=0.0)
    expected = x.double().T @ x.double()
    assert_close(f, expected, dtype, OP)


@pytest.mark.parametrize("dtype", DTYPES)
def test_input_overlapping_factor_memory_is_refused_or_correct(dtype: torch.dtype) -> None:
    """An input that is a view overlapping the factor being written must not silently corrupt it.

    `no_alias` promises that outputs written in place do not share memory with read-only inputs;
    a partially overlapping view (different data_ptr, same storage) must be refused with a
    ValueError, or else the op must still produce the reference result.
    """
    n = 200
    base = torch.randn(n + 2, n, dtype=torch.float64).to(dtype)
    f = base[:n]
    f.copy_((f + f.T) / 2)
    x = base[1:]
    expected = reference.kron_accumulate_ref([f.clone()], [x.clone()])[0]
    try:
        kron_accumulate([f], [x])
    except ValueError as exc:
        assert OP in str(exc) and "inputs" in str(exc)
        return
    assert_close(f, expected, dtype, OP)
