"""nystrom: stable Nystrom F ~ U diag(S) U^T from a sketch Y = F Omega (with sketch_accumulate)."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from _tols import DTYPES, assert_close
from fedng import reference
from fedng.ops import gaussian_sketch_matrix, nystrom, sketch_accumulate
from hypothesis import given
from hypothesis import strategies as st

OP = "nystrom"
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}


def _rand(gen: torch.Generator, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=gen).to(dtype)


def _recon(u: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """U diag(S) U^T in the dtype of U."""
    return (u * s) @ u.T


def _check_structure(u: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> None:
    """U has orthonormal columns; S is finite, >= 0 and non-increasing."""
    r = u.shape[1]
    assert u.dtype == dtype and s.dtype == dtype and tuple(s.shape) == (r,)
    assert torch.isfinite(u).all() and torch.isfinite(s).all()
    assert_close(u.T @ u, torch.eye(r, dtype=torch.float64), dtype, "orthonormal")
    assert (s >= 0).all()
    assert (s[:-1] >= s[1:]).all(), f"S must be non-increasing, got {s.tolist()}"


def _sketch_of_rank(
    d: int, k: int, r: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A PSD F = J^T J of exact rank k (J [k, d]), its Omega [d, r] and Y = F Omega by streaming."""
    gen = torch.Generator().manual_seed(seed)
    j = _rand(gen, dtype, k, d)
    om = gaussian_sketch_matrix(d, r, seed=seed, stream_id=0, dtype=dtype)
    y = torch.zeros(d, r, dtype=dtype)
    half = k // 2
    sketch_accumulate([y], [j[:half]], [om])  # two batches: the sketch adds up
    sketch_accumulate([y], [j[half:]], [om])
    f = j.double().T @ j.double()
    return f, om, y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("d", "k", "r"), [(20, 3, 5), (50, 8, 8), (200, 10, 16), (64, 1, 4), (7, 7, 7), (500, 20, 32)]
)
def test_recovers_exact_low_rank(dtype: torch.dtype, d: int, k: int, r: int) -> None:
    """A PSD matrix of exact rank k <= r is recovered: U S U^T = F, orthonormal U, sorted S."""
    f, om, y = _sketch_of_rank(d, k, r, dtype, seed=d + k + r)
    (u,), (s,), shift = nystrom([y], [om])
    _check_structure(u, s, dtype)
    assert_close(_recon(u, s), f, dtype, f"{OP}[recovery]")
    # The top-k eigenvalues are F's; the rest vanish up to the shift's error.
    true = torch.linalg.eigvalsh(f).flip(0)[:r]
    assert_close(s, true, dtype, f"{OP}[recovery]")
    assert shift.dtype == torch.float64 and shift.shape == (1,)
    assert shift.item() > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_shift_is_reported(dtype: torch.dtype) -> None:
    """The automatic shift is sqrt(d) * eps(float64) * ||Y||_F for every dtype (escalated x10
    only if float32 rounding needs it; not for this well-conditioned sketch), returned as used."""
    _, om, y = _sketch_of_rank(40, 10, 10, dtype, seed=1)
    _, _, shift = nystrom([y], [om])
    expected = math.sqrt(40) * EPS[torch.float64] * float(torch.linalg.norm(y.double()))
    assert shift.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@given(
    shapes=st.lists(st.tuples(st.integers(0, 12), st.integers(0, 12)), max_size=4),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_ragged_matches_reference_with_explicit_shift(
    dtype: torch.dtype, shapes: list[tuple[int, int]], seed: int, data: st.DataObject
) -> None:
    """Ragged (d_i, r_i <= d_i, incl. 0 and 1) with a given shift: reported as given, and
    U S U^T and S equal the float64 reference made with the same shift.
    """
    gen = torch.Generator().manual_seed(seed)
    dr = [(max(a, b), min(a, b)) for a, b in shapes]
    shifts = data.draw(
        st.one_of(
            st.sampled_from([0.5, 1.0]),
            st.lists(st.sampled_from([0.25, 0.5, 2.0]), min_size=len(dr), max_size=len(dr)),
        )
    )
    ys, oms = [], []
    for i, (d, r) in enumerate(dr):
        a = torch.randn(d, d, dtype=torch.float64, generator=gen)
        f = a @ a.T / max(d, 1)
        om = gaussian_sketch_matrix(d, r, seed=seed, stream_id=i, dtype=dtype)
        oms.append(om)
        ys.append((f @ om.double()).to(dtype))
    us, ss, used = nystrom(ys, oms, shift=shifts)
    shift_list = shifts if isinstance(shifts, list) else [shifts] * len(dr)
    nonempty = [s if d * r else 0.0 for s, (d, r) in zip(shift_list, dr, strict=True)]
    assert used.tolist() == nonempty
    expected = reference.nystrom_ref(ys, oms, shift_list)
    for (d, r), u, s, (u_ref, s_ref) in zip(dr, us, ss, expected, strict=True):
        assert tuple(u.shape) == (d, r) and tuple(s.shape) == (r,)
        if d * r == 0:
            continue
        _check_structure(u, s, dtype)
        assert_close(s, s_ref, dtype, OP)
        assert_close(_recon(u, s), _recon(u_ref, s_ref), dtype, OP)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_sketch_gives_zero_eigenvalues(dtype: torch.dtype) -> None:
    """The sketch of F = 0 is handled (the shift keeps Omega^T Y_nu invertible): S = 0."""
    om = gaussian_sketch_matrix(10, 3, seed=2, dtype=dtype)
    (u,), (s,), shift = nystrom([torch.zeros(10, 3, dtype=dtype)], [om])
    _check_structure(u, s, dtype)
    assert float(s.abs().max()) <= 10 * EPS[dtype]
    assert shift.item() > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", ["sketches", "omegas"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_raises(dtype: torch.dtype, where: str, value: float) -> None:
    """A NaN/Inf sketch or omega raises ValueError naming the op and the bad index."""
    _, om, y = _sketch_of_rank(12, 3, 4, dtype, seed=3)
    _, om2, y2 = _sketch_of_rank(12, 3, 4, dtype, seed=4)
    (y2 if where == "sketches" else om2)[5, 1] = value
    with pytest.raises(ValueError, match=rf"{OP}.*sketches \[1\]"):
        nystrom([y, y2], [om, om2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sketch_of_negative_definite_raises(dtype: torch.dtype) -> None:
    """Y = -Omega (the sketch of -I, not PSD) raises ValueError instead of returning garbage."""
    om = gaussian_sketch_matrix(10, 3, seed=5, dtype=dtype)
    with pytest.raises(ValueError, match=OP):
        nystrom([-om], [om])


def test_inputs_not_modified() -> None:
    """Sketches and omegas are read only."""
    _, om, y = _sketch_of_rank(30, 5, 6, torch.float64, seed=6)
    y0, om0 = y.clone(), om.clone()
    nystrom([y], [om])
    assert torch.equal(y, y0) and torch.equal(om, om0)


def test_empty_list() -> None:
    """An empty list gives empty results."""
    u, s, shift = nystrom([], [])
    assert u == [] and s == [] and shift.shape == (0,) and shift.dtype == torch.float64


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_dispatch_matches_the_kernel(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """Large matrices go through the same algorithm in torch ops (`TORCH_MIN_DRR`): same shift,
    same approximation, same structure, and a ragged call mixes both paths; a non-finite
    sketch fails on either path with the same error."""
    mod = sys.modules["fedng.ops.nystrom"]  # the attribute `fedng.ops.nystrom` is the function
    cases = [_sketch_of_rank(d, k, r, dtype, seed=d) for d, k, r in [(30, 4, 6), (300, 12, 16)]]
    ys, oms = [c[2] for c in cases], [c[1] for c in cases]
    results = {}
    for name, limit in (("kernel", 1 << 62), ("torch", 0), ("mixed", 30 * 6 * 6 + 1)):
        monkeypatch.setattr(mod, "TORCH_MIN_DRR", limit)
        results[name] = nystrom(ys, oms)
    for name in ("torch", "mixed"):
        torch.testing.assert_close(results[name].shift, results["kernel"].shift)
        for i, (f, _, _) in enumerate(cases):
            u, s = results[name].U[i], results[name].S[i]
            _check_structure(u, s, dtype)
            assert_close(_recon(u, s), f, dtype, f"{OP}[recovery]")
            assert_close(s, results["kernel"].S[i], dtype, f"{OP}[recovery]")
    monkeypatch.setattr(mod, "TORCH_MIN_DRR", 0)
    bad = ys[1].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        nystrom([ys[0], bad], oms)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("k", "gram"), [(64, True), (6, False)])
def test_torch_path_gram_and_svd_match_reference(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, k: int, gram: bool
) -> None:
    """The torch path factors B through its Gram matrix when B is well conditioned (full-rank F,
    k > r) and through the thin SVD otherwise (exact rank k < r leaves sigma_min^2 ~ the shift):
    both give an orthonormal U and the float64 reference's U S U^T and S."""
    mod = sys.modules["fedng.ops.nystrom"]
    monkeypatch.setattr(mod, "TORCH_MIN_DRR", 0)
    took: list[bool] = []
    gram_svd = mod._gram_svd

    def spy(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        res = gram_svd(b)
        took.append(res is not None)
        return res

    monkeypatch.setattr(mod, "_gram_svd", spy)
    d, r = 300, 16
    gen = torch.Generator().manual_seed(k)
    j = _rand(gen, torch.float64, k, d) / torch.arange(1, k + 1, dtype=torch.float64)[:, None]
    om = gaussian_sketch_matrix(d, r, seed=k, dtype=dtype)
    y = (j.T @ (j @ om.double())).to(dtype)
    (u,), (s,), shift = nystrom([y], [om])
    assert took == [gram]
    _check_structure(u, s, dtype)
    ((u_ref, s_ref),) = reference.nystrom_ref([y], [om], [shift.item()])
    assert_close(s, s_ref, dtype, OP)
    assert_close(_recon(u, s), _recon(u_ref, s_ref), dtype, OP)


@pytest.mark.parametrize("where", ["sketches", "omegas"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("shift", [None, 0.0])
def test_torch_path_non_finite_raises(
    monkeypatch: pytest.MonkeyPatch, where: str, value: float, shift: float | None
) -> None:
    """The torch path has no finiteness pass of its own: a NaN/Inf sketch shows in its norm, a
    NaN/Inf omega in Omega^T Y_nu (also with shift 0 and a zero row of Y); both raise."""
    monkeypatch.setattr(sys.modules["fedng.ops.nystrom"], "TORCH_MIN_DRR", 0)
    _, om, y = _sketch_of_rank(40, 6, 8, torch.float32, seed=9)
    y[7] = 0.0
    (y if where == "sketches" else om)[7, 3] = value
    with pytest.raises(ValueError, match=rf"{OP}.*sketches \[0\]"):
        nystrom([y], [om], shift=shift)
