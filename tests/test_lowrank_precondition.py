"""lowrank_precondition: (U diag(S) U^T + lambda I)^-1 V by Woodbury, against a dense solve."""

from __future__ import annotations

import pytest
import torch
from _tols import DTYPES, assert_close
from fedng import reference
from fedng.ops import lowrank_precondition
from hypothesis import given
from hypothesis import strategies as st

OP = "lowrank_precondition"

# (d_i, r_i, c_i) per matrix with r_i <= d_i; c_i = None means a 1-D V.
items = st.lists(
    st.tuples(st.integers(0, 12), st.integers(0, 12), st.one_of(st.none(), st.integers(0, 4))),
    max_size=4,
)


def _orthonormal(d: int, r: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, r, dtype=torch.float64, generator=gen))
    return q.to(dtype).contiguous()


def _problem(
    spec: list[tuple[int, int, int | None]], dtype: torch.dtype, seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    us, ss, vs = [], [], []
    for a, b, c in spec:
        d, r = max(a, b), min(a, b)
        us.append(_orthonormal(d, r, dtype, gen))
        ss.append((torch.rand(r, dtype=torch.float64, generator=gen) * 10).to(dtype))
        shape = (d,) if c is None else (d, c)
        vs.append(torch.randn(*shape, dtype=torch.float64, generator=gen).to(dtype))
    return us, ss, vs


def _check(
    out: list[torch.Tensor],
    us: list[torch.Tensor],
    ss: list[torch.Tensor],
    vs: list[torch.Tensor],
    damping: float | list[float],
    dtype: torch.dtype,
) -> None:
    lams = damping if isinstance(damping, list) else [damping] * len(us)
    expected = reference.lowrank_precondition_ref(us, ss, damping, vs)
    assert len(out) == len(vs)
    for o, e, v, lam in zip(out, expected, vs, lams, strict=True):
        assert tuple(o.shape) == tuple(v.shape)
        # Woodbury subtracts from V / lambda: errors scale with |V| / lambda.
        scale = float(v.abs().max()) / lam if v.numel() else 0.0
        assert_close(o, e, dtype, OP, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES)
@given(spec=items, seed=st.integers(0, 2**31 - 1), data=st.data())
def test_matches_dense_solve(
    dtype: torch.dtype, spec: list[tuple[int, int, int | None]], seed: int, data: st.DataObject
) -> None:
    """Ragged U, S, 1-D and 2-D V (incl. d=0, r=0, c=0), scalar or per-matrix damping."""
    us, ss, vs = _problem(spec, dtype, seed)
    damping: float | list[float]
    if data.draw(st.booleans()):
        damping = data.draw(
            st.lists(st.sampled_from([0.1, 1.0, 5.0]), min_size=len(spec), max_size=len(spec))
        )
    else:
        damping = data.draw(st.sampled_from([0.5, 2.0]))
    out = lowrank_precondition(us, ss, damping, vs)
    _check(out, us, ss, vs, damping, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("d", "r", "c"), [(1000, 32, None), (300, 64, 17), (65, 65, 3)])
def test_larger_sizes(dtype: torch.dtype, d: int, r: int, c: int | None) -> None:
    """Large d, r = d (full rank) and many right-hand sides, in one ragged call with a small one."""
    spec = [(d, r, c), (5, 2, None)]
    us, ss, vs = _problem(spec, dtype, d + r)
    out = lowrank_precondition(us, ss, [0.3, 1.0], vs)
    _check(out, us, ss, vs, [0.3, 1.0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_dim_equals_single_column(dtype: torch.dtype) -> None:
    """A 1-D V gives exactly the column a [d, 1] V gives."""
    us, ss, vs = _problem([(20, 4, None)], dtype, 1)
    one = lowrank_precondition(us, ss, 0.7, vs)[0]
    col = lowrank_precondition(us, ss, 0.7, [vs[0][:, None].contiguous()])[0]
    assert one.shape == (20,) and col.shape == (20, 1)
    assert torch.equal(one, col[:, 0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_inverts_the_damped_matrix(dtype: torch.dtype) -> None:
    """(U S U^T + lambda I) applied to the output gives V back."""
    us, ss, vs = _problem([(30, 5, 3)], dtype, 2)
    x = lowrank_precondition(us, ss, 0.5, vs)[0]
    u, s = us[0].double(), ss[0].double()
    back = (u * s) @ (u.T @ x.double()) + 0.5 * x.double()
    assert_close(back.to(dtype), vs[0].double(), dtype, OP)


def test_zero_rank_is_scaling() -> None:
    """r = 0: the result is V / lambda exactly."""
    v = torch.randn(6, 2, dtype=torch.float64)
    out = lowrank_precondition(
        [torch.empty(6, 0, dtype=torch.float64)], [torch.empty(0, dtype=torch.float64)], 4.0, [v]
    )[0]
    assert torch.equal(out, v / 4.0)


def test_inputs_not_modified() -> None:
    """U, S and V are read only; outputs are new tensors."""
    us, ss, vs = _problem([(10, 3, 2), (4, 4, None)], torch.float64, 3)
    copies = [[t.clone() for t in group] for group in (us, ss, vs)]
    out = lowrank_precondition(us, ss, 1.0, vs)
    for group, saved in zip((us, ss, vs), copies, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(group, saved, strict=True))
    assert all(o.data_ptr() != v.data_ptr() for o, v in zip(out, vs, strict=True))


def test_empty_list() -> None:
    """An empty list returns an empty list."""
    assert lowrank_precondition([], [], 1.0, []) == []
