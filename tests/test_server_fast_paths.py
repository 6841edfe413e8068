"""The streaming server's shortcuts against the general code they replace: the pooled PSD checks
of unpacked triangles, message sizes counted without serializing, float64 block dots, and the
one-pass finiteness test of a new state."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from _fed import fed_round
from _tols import assert_close
from fedng.curvature import KFAC, CurvatureSet
from fedng.curvature.packed_fold import dots, unpack_into
from fedng.curvature.spec import _tril_flat, unpack_triangle
from fedng.federated import wire
from fedng.federated.aggregation import summable
from fedng.federated.aggregation.matvec import block_dots
from fedng.federated.aggregation.psd import unpacked_checks
from fedng.federated.aggregation.summable import CONTRIB_PREFIX
from fedng.federated.algorithms.curvature_payload import decoded_curvature
from fedng.federated.messages import ServerMessage
from fedng.federated.server_round import non_finite
from hypothesis import given, settings
from hypothesis import strategies as st


def _pooled(extra: dict[str, Any]) -> CurvatureSet:
    """A K-FAC curvature set decoded from packed payloads, as the server's pooled sum is."""
    _, ups = fed_round("fedng", {"aggregation": "summable", **extra}, 3, 0)
    cs = decoded_curvature(ups[0])
    assert cs is not None
    arrays, meta = cs.to_arrays(torch.float32)
    return CurvatureSet.from_arrays(arrays, meta)


def _general(cs: CurvatureSet, tol: float, eps: float) -> list[Any]:
    return [c for r in cs.reps.values() for c in r.psd_checks(tol, eps)]


@pytest.mark.parametrize("eps", [0.0, torch.finfo(torch.float32).eps, 2.0**-8, 0.5])
def test_unpacked_checks_equal_the_general_checks(eps: float) -> None:
    """Same labels, shifts (bit for bit) and matrices, whichever term sets the shift."""
    cs = _pooled({})
    got, ref = unpacked_checks(cs, 1e-3, eps), _general(cs, 1e-3, eps)
    assert [c.label for c in got] == [c.label for c in ref]
    assert [c.shift for c in got] == [c.shift for c in ref]
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a.matrix, b.matrix)
    rep = next(iter(cs.reps.values()))
    m = got[0].matrix
    m.add_(1.0)  # the checks own their matrices: the set is untouched
    assert not torch.equal(m, rep.A[0])


@pytest.mark.parametrize("val", [math.nan, math.inf, 1e20])
def test_unpacked_checks_raise_the_general_errors(val: float) -> None:
    cs = _pooled({})
    rep = next(iter(cs.reps.values()))
    rep.G[0][1, 1] = val
    with pytest.raises(ValueError) as ref:
        _general(cs, 1e-3, 0.0)
    with pytest.raises(ValueError) as got:
        unpacked_checks(cs, 1e-3, 0.0)
    assert str(got.value) == str(ref.value)


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3), max_size=4),
    dtype=st.sampled_from(["fp32", "bf16", "fp16"]),
    sym=st.booleans(),
)
def test_message_sizes_are_the_serialized_lengths(
    shapes: list[list[int]], dtype: str, sym: bool
) -> None:
    g = torch.Generator().manual_seed(len(shapes))
    params = {f"p{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    extras: dict[str, torch.Tensor] = {
        "x": torch.randn(3, 3, generator=g),
        "q": torch.zeros(4, dtype=torch.int8),
    }
    msg = ServerMessage(
        1,
        "fedng",
        params,
        extras,
        meta={"a": [1.5, "b"], "n": None},
        symmetric=frozenset({"x"} if sym else set()),
        dtype=dtype,
    ).seal()
    assert msg.nbytes == len(msg.to_bytes())
    with pytest.raises(TypeError, match="packed_size"):
        wire.packed_size([("u", torch.uint8, [2])])


def test_block_dots_are_float64_dots() -> None:
    g = torch.Generator().manual_seed(0)
    us = [torch.randn(40, 30, generator=g), None, torch.randn(7, generator=g), torch.zeros(0)]
    vs = [torch.randn(40, 30, generator=g), torch.randn(3, generator=g), None, torch.zeros(0)]
    got = block_dots(us, vs)
    assert got[1:] == [0.0, 0.0, 0.0]
    ref = float((us[0].double() * vs[0].double()).sum())  # type: ignore[union-attr]
    assert got[0] == pytest.approx(ref, rel=1e-14)
    half = torch.randn(5, generator=g).bfloat16()
    assert dots([half], [half])[0] == pytest.approx(float((half.double() ** 2).sum()), rel=1e-14)
    with pytest.raises(ValueError, match="sizes differ"):
        dots([torch.zeros(2)], [torch.zeros(3)])


def test_non_finite_names_every_bad_array() -> None:
    state, _ = fed_round("fedavg", {}, 3, 0)
    assert non_finite(state) == []
    bad = state.copy()
    names = list(bad.params)
    bad.params[names[0]] = bad.params[names[0]].clone()
    bad.params[names[0]].view(-1)[0] = math.inf
    bad.buffers["wide"] = torch.tensor([1e300, math.nan], dtype=torch.float64)
    bad.buffers["ok64"] = torch.tensor([1e300], dtype=torch.float64)  # finite in float64
    bad.buffers["half"] = torch.tensor([math.nan]).bfloat16()
    assert non_finite(bad) == [names[0], "wide", "half"]


def _direction_inputs() -> tuple[CurvatureSet, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    _, ups = fed_round("fedng", {"aggregation": "summable"}, 3, 0)
    cs = decoded_curvature(ups[0])
    assert cs is not None
    arrays, meta = cs.to_arrays(torch.float32)
    pooled = CurvatureSet.from_arrays(arrays, meta)
    delta = {k: v.float() for k, v in ups[1].delta.items()}
    contrib = {
        k[len(CONTRIB_PREFIX) :]: v.float()
        for k, v in ups[1].extras.items()
        if k.startswith(CONTRIB_PREFIX)
    }
    return pooled, delta, contrib


def test_pooled_direction_by_solves_equals_the_inverse_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cholesky solves without the product G (M A) give the direction the damped inverses give
    (float32 rounding apart): `[G~^-1 (R0 + a M A) + b M] A~^-1 - M` against a float64
    `G~^-1 (R0 - G M A) A~^-1`; a factor that does not factorize at its damping takes the
    inverse's path."""
    pooled, delta, contrib = _direction_inputs()
    fast = summable.pooled_direction(pooled, delta, contrib, 0.1, probe_dtype="fp32")
    with monkeypatch.context() as m:
        m.setattr(summable, "_kron_direction", lambda *a: None)
        slow = summable.pooled_direction(pooled, delta, contrib, 0.1, probe_dtype="fp32")
    assert fast.probed == slow.probed and fast.probed
    for a, b in zip(fast.blocks, slow.blocks, strict=True):
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert_close(a, b.double(), torch.float32, "kron_solve", scale=float(b.abs().max()))
    rep = pooled.reps["kfac"]
    assert isinstance(rep, KFAC)
    g = torch.Generator().manual_seed(0)
    ms = [torch.randn(s.m, s.n, generator=g) for s in rep.specs]
    r0: list[torch.Tensor | None] = [torch.randn(s.m, s.n, generator=g) for s in rep.specs]
    lams = [0.1 * (j + 1) for j in range(len(ms))]
    got = summable._kron_direction(pooled, lams, ms, r0)
    assert got is not None
    for j, (x, r, mj) in enumerate(zip(got, r0, ms, strict=True)):
        p, root = rep.pi(j), math.sqrt(lams[j])
        a64, g64 = rep.A[j].double(), rep.G[j].double()
        a = a64 + p * root * torch.eye(a64.shape[0], dtype=torch.float64)
        gg = g64 + root / p * torch.eye(g64.shape[0], dtype=torch.float64)
        res = r.double() - g64 @ mj.double() @ a64  # type: ignore[union-attr]
        ref = torch.linalg.solve(gg, res) @ torch.linalg.inv(a)
        assert x is not None
        assert_close(x, ref, torch.float32, "kron_solve")
    r0[1] = None
    part = summable._kron_direction(pooled, lams, ms, r0)
    assert part is not None and part[1] is None and part[0] is not None
    rep.A[0] = -torch.eye(rep.A[0].shape[0]) * 1e6  # not positive definite at any small damping
    assert summable._kron_direction(pooled, lams, ms, r0) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n", [0, 1, 7, 64, 65, 200])
def test_unpack_triangle_copies_every_entry_bit_for_bit(dtype: torch.dtype, n: int) -> None:
    """The native tiled unpack equals the index-copy reference bit for bit (signed zeros, NaN
    payloads); bf16 and non-contiguous inputs take the reference path."""
    g = torch.Generator().manual_seed(n)
    vec = torch.randn(n * (n + 1) // 2, generator=g).to(dtype)
    if vec.numel() > 2:
        vec[0], vec[-1] = -0.0, math.nan
    lower, upper = _tril_flat(n)
    ref = torch.empty(n * n, dtype=dtype)
    ref.index_copy_(0, upper, vec)
    ref.index_copy_(0, lower, vec)
    got = unpack_triangle(vec, n)
    bits = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}
    assert torch.equal(got.reshape(-1).view(bits[dtype]), ref.view(bits[dtype]))
    assert (unpack_into(vec, n) is None) == (dtype == torch.bfloat16)
    if n > 1:
        wide = torch.stack([vec, vec], 1)[:, 0]  # not contiguous
        assert unpack_into(wide, n) is None
        assert torch.equal(
            unpack_triangle(wide, n).reshape(-1).view(bits[dtype]),
            got.reshape(-1).view(bits[dtype]),
        )


def test_add_block_in_place_equals_gather_add_scatter() -> None:
    """The line search's in-place block update = `write_matrix(to_matrix + mat)` bit for bit,
    on every block of a fed model (weights with biases) and on the general path's layouts."""
    from fedng.curvature import to_matrix, write_matrix
    from fedng.curvature.layout import BlockLayout

    pooled, delta, _ = _direction_inputs()
    g = torch.Generator().manual_seed(1)
    lays = list(pooled.layouts)
    w = next(iter(delta))
    shape = delta[w].shape
    lays.append(BlockLayout("nob", "kron", shape[0], shape[1], w, None, None, None, False))
    for lay in lays:
        mat = torch.randn(lay.m, lay.n, generator=g) * 0.3
        fast = {k: v.clone() for k, v in delta.items()}
        slow = {k: v.clone() for k, v in delta.items()}
        summable._add_block(fast, lay, mat)
        write_matrix(slow, lay, to_matrix(slow, lay) + mat)
        assert all(torch.equal(fast[k], slow[k]) for k in delta)
