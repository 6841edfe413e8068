"""sketch_accumulate: Y_i <- decay Y_i + scale_i J_i^T (J_i Omega_i), without forming J^T J."""

from __future__ import annotations

import pytest
import torch
from _tols import DTYPES, assert_close
from fedng import reference
from fedng.ops import gaussian_sketch_matrix, sketch_accumulate
from hypothesis import given
from hypothesis import strategies as st

OP = "sketch_accumulate"

# (d_i, r_i, B_i) per layer: empty lists, zero rows (B = 0), d = 0, r = 0 and size 1 all occur.
layers = st.lists(st.tuples(st.integers(0, 12), st.integers(0, 5), st.integers(0, 9)), max_size=4)
decays = st.sampled_from([0.0, 1.0, 0.9])


def _rand(gen: torch.Generator, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=gen).to(dtype)


def _problem(
    drb: list[tuple[int, int, int]], dtype: torch.dtype, seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    ys = [_rand(gen, dtype, d, r) for d, r, _ in drb]
    js = [_rand(gen, dtype, b, d) for d, _, b in drb]
    oms = [
        gaussian_sketch_matrix(d, r, seed=seed, stream_id=i, dtype=dtype)
        for i, (d, r, _) in enumerate(drb)
    ]
    return ys, js, oms


@pytest.mark.parametrize("dtype", DTYPES)
@given(drb=layers, decay=decays, seed=st.integers(0, 2**31 - 1), data=st.data())
def test_matches_reference(
    dtype: torch.dtype,
    drb: list[tuple[int, int, int]],
    decay: float,
    seed: int,
    data: st.DataObject,
) -> None:
    """Ragged sketches with scalar or per-matrix scale match the reference, updated in place."""
    ys, js, oms = _problem(drb, dtype, seed)
    scale: float | list[float]
    if data.draw(st.booleans()):
        scale = data.draw(
            st.lists(st.sampled_from([0.0, 1.0, 0.5, -2.0]), min_size=len(drb), max_size=len(drb))
        )
    else:
        scale = data.draw(st.sampled_from([1.0, 0.125]))
    expected = reference.sketch_accumulate_ref(ys, js, oms, decay, scale)
    ptrs = [y.data_ptr() for y in ys]
    out = sketch_accumulate(ys, js, oms, decay=decay, scale=scale)
    assert len(out) == len(drb)
    for i, (y, e) in enumerate(zip(out, expected, strict=True)):
        assert y is ys[i] and y.data_ptr() == ptrs[i], "sketches must be updated in place"
        assert_close(y, e, dtype, OP)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sketches_add_up_across_batches(dtype: torch.dtype) -> None:
    """Linearity: sketching two batches in turn equals sketching them stacked (F = F1 + F2)."""
    gen = torch.Generator().manual_seed(1)
    om = gaussian_sketch_matrix(30, 6, seed=5, dtype=dtype)
    j1, j2 = _rand(gen, dtype, 7, 30), _rand(gen, dtype, 11, 30)
    y_two = torch.zeros(30, 6, dtype=dtype)
    sketch_accumulate([y_two], [j1], [om])
    sketch_accumulate([y_two], [j2], [om])
    y_one = torch.zeros(30, 6, dtype=dtype)
    sketch_accumulate([y_one], [torch.cat([j1, j2])], [om])
    assert_close(y_two, y_one.double(), dtype, OP)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("d", "r", "b"), [(300, 16, 40), (1000, 32, 3), (65, 65, 129)])
def test_larger_sizes(dtype: torch.dtype, d: int, r: int, b: int) -> None:
    """Past BLAS block sizes, with several layers threaded in one call."""
    drb = [(d, r, b), (d // 2, r // 2, b), (7, 3, 0)]
    ys, js, oms = _problem(drb, dtype, d + r + b)
    expected = reference.sketch_accumulate_ref(ys, js, oms, 0.5, 1.0 / max(b, 1))
    sketch_accumulate(ys, js, oms, 0.5, 1.0 / max(b, 1))
    for y, e in zip(ys, expected, strict=True):
        assert_close(y, e, dtype, OP)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b", [0, 4])
def test_decay_zero_overwrites_old_contents(dtype: torch.dtype, b: int) -> None:
    """decay=0 overwrites: a NaN-filled (uninitialized) sketch is not read, whether B=0 or not."""
    y = torch.full((8, 3), float("nan"), dtype=dtype)
    j = _rand(torch.Generator().manual_seed(2), dtype, b, 8)
    om = gaussian_sketch_matrix(8, 3, seed=1, dtype=dtype)
    sketch_accumulate([y], [j], [om], decay=0.0)
    expected = (j.double().T @ j.double()) @ om.double()
    assert_close(y, expected, dtype, OP)


def test_inputs_not_modified() -> None:
    """Jacobians and omegas are read only."""
    ys, js, oms = _problem([(9, 3, 4), (5, 5, 2)], torch.float64, 3)
    js0, oms0 = [j.clone() for j in js], [o.clone() for o in oms]
    sketch_accumulate(ys, js, oms)
    assert all(torch.equal(a, b) for a, b in zip(js, js0, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(oms, oms0, strict=True))
