"""gaussian_sketch_matrix: the shared-seed Omega, bit-identical everywhere and standard normal."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch
from _tols import DTYPES
from fedng import reference
from fedng.ops import gaussian_sketch_matrix
from hypothesis import given
from hypothesis import strategies as st

OP = "gaussian_sketch_matrix"
U64 = 2**64


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


@given(
    d=st.integers(0, 40),
    r=st.integers(0, 12),
    seed=st.integers(0, U64 - 1),
    stream=st.integers(0, U64 - 1),
)
def test_bit_identical_to_reference(d: int, r: int, seed: int, stream: int) -> None:
    """float64 equals the reference bit for bit; float32 equals the reference cast to float32."""
    expected = reference.gaussian_sketch_matrix_ref(d, r, seed, stream)
    got64 = gaussian_sketch_matrix(d, r, seed, stream, dtype=torch.float64)
    got32 = gaussian_sketch_matrix(d, r, seed, stream, dtype=torch.float32)
    assert got64.shape == (d, r) and got64.dtype == torch.float64
    assert got32.shape == (d, r) and got32.dtype == torch.float32
    assert torch.equal(got64, expected)
    assert torch.equal(got32, expected.to(torch.float32))


def test_bit_identical_to_reference_large_and_tails() -> None:
    """A large threaded draw matches the reference, deep into the |q| > 0.425 tail branch."""
    d, r = 2048, 64
    expected = reference.gaussian_sketch_matrix_ref(d, r, seed=12345, stream_id=7)
    got = gaussian_sketch_matrix(d, r, seed=12345, stream_id=7, dtype=torch.float64)
    assert torch.equal(got, expected)
    assert float(got.abs().max()) > 4.0  # the |q| > 0.425 tail branch was exercised


@pytest.mark.parametrize("dtype", DTYPES)
def test_identical_across_calls(dtype: torch.dtype) -> None:
    """Two calls with the same (seed, stream) give identical bits."""
    a = gaussian_sketch_matrix(300, 17, seed=3, stream_id=2, dtype=dtype)
    b = gaussian_sketch_matrix(300, 17, seed=3, stream_id=2, dtype=dtype)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_identical_across_thread_counts(dtype: torch.dtype) -> None:
    """One thread and two threads give identical bits (the draw is large enough to be split)."""
    torch.set_num_threads(1)
    one = gaussian_sketch_matrix(1500, 64, seed=99, stream_id=1, dtype=dtype)
    torch.set_num_threads(2)
    two = gaussian_sketch_matrix(1500, 64, seed=99, stream_id=1, dtype=dtype)
    assert torch.equal(one, two)


def test_identical_in_a_fresh_process() -> None:
    """A new interpreter (new thread pool, fresh library state) gives the same bits."""
    here64 = gaussian_sketch_matrix(700, 40, seed=2**63 + 5, stream_id=11, dtype=torch.float64)
    here32 = gaussian_sketch_matrix(700, 40, seed=2**63 + 5, stream_id=11, dtype=torch.float32)
    code = (
        "import hashlib, torch\n"
        "from fedng.ops import gaussian_sketch_matrix as g\n"
        "for dt in (torch.float64, torch.float32):\n"
        "    t = g(700, 40, seed=2**63 + 5, stream_id=11, dtype=dt)\n"
        "    print(hashlib.sha256(t.numpy().tobytes()).hexdigest())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert proc.stdout.split() == [_digest(here64), _digest(here32)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_leading_columns_unchanged_when_r_grows(dtype: torch.dtype) -> None:
    """Omega(d, r) is the first r columns of Omega(d, r') for r' > r (and rows likewise)."""
    small = gaussian_sketch_matrix(50, 4, seed=8, dtype=dtype)
    big = gaussian_sketch_matrix(80, 20, seed=8, dtype=dtype)
    assert torch.equal(big[:50, :4], small)


@pytest.mark.parametrize("dtype", DTYPES)
def test_streams_and_seeds_differ(dtype: torch.dtype) -> None:
    """Different seeds, streams (incl. the high 32 bits of each) give unrelated matrices."""
    base = gaussian_sketch_matrix(64, 8, seed=1, stream_id=0, dtype=dtype)
    others = [
        gaussian_sketch_matrix(64, 8, seed=2, stream_id=0, dtype=dtype),
        gaussian_sketch_matrix(64, 8, seed=1, stream_id=1, dtype=dtype),
        gaussian_sketch_matrix(64, 8, seed=1 + 2**32, stream_id=0, dtype=dtype),
        gaussian_sketch_matrix(64, 8, seed=1, stream_id=2**32, dtype=dtype),
    ]
    for other in others:
        assert not torch.equal(base, other)
        corr = torch.corrcoef(torch.stack([base.flatten(), other.flatten()]).double())[0, 1]
        assert abs(float(corr)) < 0.2
    # Distinct entries within one matrix: no repeated values across rows or columns.
    assert torch.unique(base).numel() == base.numel()


def test_standard_normal_moments() -> None:
    """A large draw has mean ~0, std ~1, ~68.3% within one sigma and symmetric tails."""
    x = gaussian_sketch_matrix(1000, 500, seed=2024, dtype=torch.float64).flatten()
    n = x.numel()
    assert abs(float(x.mean())) < 5 / n**0.5
    assert abs(float(x.std()) - 1.0) < 5 / (2 * n) ** 0.5
    assert abs(float((x.abs() < 1).double().mean()) - 0.682689) < 0.003
    assert abs(float((x > 2).double().mean()) - float((x < -2).double().mean())) < 0.002
    skew = float(((x - x.mean()) ** 3).mean())
    kurt = float(((x - x.mean()) ** 4).mean())
    assert abs(skew) < 0.02 and abs(kurt - 3.0) < 0.05


@pytest.mark.parametrize(("d", "r"), [(0, 0), (0, 5), (5, 0)])
def test_empty_shapes(d: int, r: int) -> None:
    """Zero rows or columns give an empty [d, r] tensor."""
    out = gaussian_sketch_matrix(d, r, seed=1)
    assert out.shape == (d, r) and out.dtype == torch.float32


@pytest.mark.parametrize("seed", [-1, U64, U64 + 7, 1.0, True, "1", None])
def test_bad_seed_raises(seed: object) -> None:
    """Seeds outside [0, 2**64) or not ints raise ValueError naming the op and 'seed'."""
    with pytest.raises(ValueError, match=rf"{OP}.*'seed'"):
        gaussian_sketch_matrix(4, 2, seed)  # type: ignore[arg-type]


@pytest.mark.parametrize("stream", [-1, U64, 0.5])
def test_bad_stream_raises(stream: object) -> None:
    """Stream ids outside [0, 2**64) raise ValueError naming 'stream_id'."""
    with pytest.raises(ValueError, match=rf"{OP}.*'stream_id'"):
        gaussian_sketch_matrix(4, 2, 0, stream)  # type: ignore[arg-type]


@pytest.mark.parametrize(("d", "r"), [(-1, 2), (2, -1), (2.0, 2), (2, True)])
def test_bad_sizes_raise(d: object, r: object) -> None:
    """Negative or non-int sizes raise ValueError."""
    with pytest.raises(ValueError, match=OP):
        gaussian_sketch_matrix(d, r, 0)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64])
def test_bad_dtype_raises(dtype: torch.dtype) -> None:
    """Only float32 and float64 are produced."""
    with pytest.raises(TypeError, match=rf"{OP}.*'dtype'"):
        gaussian_sketch_matrix(3, 3, 0, dtype=dtype)


def test_extreme_seeds_accepted() -> None:
    """0 and 2**64 - 1 are valid seeds and streams, and match the reference."""
    for seed, stream in ((0, 0), (U64 - 1, U64 - 1)):
        got = gaussian_sketch_matrix(5, 3, seed, stream, dtype=torch.float64)
        assert torch.equal(got, reference.gaussian_sketch_matrix_ref(5, 3, seed, stream))


def _builds() -> list[str]:
    """The builds of the row kernel this CPU runs (baseline always)."""
    from fedng import _backend

    native = _backend.native
    before = native.gaussian_isa()
    usable = []
    try:
        for isa in ("baseline", "avx2", "avx512"):
            try:
                native.set_gaussian_isa(isa)
            except ValueError:
                continue
            usable.append(isa)
    finally:
        native.set_gaussian_isa(before)
    return usable


# Shapes around the kernel's blocking: one pair per row (r = 1, 2), fewer pairs per row than the
# widest vector has lanes (r < 16), odd r (each row drops its last odd column), chunks of 128
# pairs crossing rows (d r / 2 > 128) and one row wider than a chunk (r > 256).
SHAPES = [(1, 1), (300, 1), (97, 2), (33, 3), (40, 15), (21, 16), (19, 17), (9, 33), (3, 257)]


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_build_bit_identical_to_reference(isa: str) -> None:
    """Each SIMD build (2, 4 or 8 double lanes) gives the reference's bits, float64 and float32,
    on shapes that cross every blocking boundary; and the same bits on every thread count."""
    from fedng import _backend

    if isa not in _builds():
        pytest.skip(f"this CPU does not run the {isa} build")
    native = _backend.native
    before = native.set_gaussian_isa(isa)
    try:
        assert native.gaussian_isa() == isa
        for d, r in SHAPES:
            expected = reference.gaussian_sketch_matrix_ref(d, r, seed=2**40 + 3, stream_id=d)
            got64 = gaussian_sketch_matrix(d, r, 2**40 + 3, d, dtype=torch.float64)
            got32 = gaussian_sketch_matrix(d, r, 2**40 + 3, d, dtype=torch.float32)
            assert torch.equal(got64, expected), (isa, d, r)
            assert torch.equal(got32, expected.to(torch.float32)), (isa, d, r)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = gaussian_sketch_matrix(1100, 61, seed=5, stream_id=9, dtype=torch.float64)
            torch.set_num_threads(2)
            two = gaussian_sketch_matrix(1100, 61, seed=5, stream_id=9, dtype=torch.float64)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one, two)
        assert _digest(one) == _digest(_by_build("baseline", 1100, 61))
    finally:
        native.set_gaussian_isa(before)


def _by_build(isa: str, d: int, r: int) -> torch.Tensor:
    """Omega(d, r) for (seed 5, stream 9) from one build, float64."""
    from fedng import _backend

    before = _backend.native.set_gaussian_isa(isa)
    try:
        return gaussian_sketch_matrix(d, r, seed=5, stream_id=9, dtype=torch.float64)
    finally:
        _backend.native.set_gaussian_isa(before)


def test_unknown_build_raises() -> None:
    """A build name other than baseline/avx2/avx512 is a ValueError; the build in use stays."""
    from fedng import _backend

    before = _backend.native.gaussian_isa()
    with pytest.raises(ValueError, match="set_gaussian_isa"):
        _backend.native.set_gaussian_isa("sse9")
    assert _backend.native.gaussian_isa() == before
