"""Int8 curvature compression: round trips within its stated bound, PSD by construction, and the
server still validates (and rejects) what travels as int8."""

from __future__ import annotations

import math

import pytest
import torch
from _fed import blobs_task
from fedng.curvature import KFAC, CurvatureSet, pack_triangle, unpack_triangle
from fedng.curvature.quantize import (
    SCALE_SUFFIX,
    VEC_CHUNK,
    dequantize,
    dequantize_arrays,
    dequantize_vector,
    quantize,
    quantize_arrays,
    quantize_vector,
)
from fedng.federated.algorithms.curvature_payload import wants_int8
from fedng.federated.client import get_params
from fedng.federated.config import make_configs
from fedng.federated.messages import ClientUpdate
from fedng.federated.round import client_step, server_init
from fedng.federated.simulator import simulate
from hypothesis import given, settings
from hypothesis import strategies as st

F64 = torch.float64


def covariance(n: int, rank: int, spread: float, seed: int) -> torch.Tensor:
    """A PSD n x n matrix of the given rank with column scales spread over `spread` decades."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(max(rank, 1), n, generator=g, dtype=F64) if rank else torch.zeros(1, n)
    x = x.to(F64) * torch.logspace(-spread, 0, n, dtype=F64)
    return x.T @ x / max(rank, 1)


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 24), min_size=1, max_size=3),
    vec=st.integers(1, 3 * VEC_CHUNK),
    rank_frac=st.floats(0.0, 1.0),
    spread=st.floats(0.0, 4.0),
    seed=st.integers(0, 1000),
)
def test_round_trip_within_the_stated_bound(
    sizes: list[int], vec: int, rank_frac: float, spread: float, seed: int
) -> None:
    """Triangles: |M~_ij - M_ij| <= sqrt(M_ii M_jj) / 254 off the diagonal, and
    M <= M^ <= M + 2 delta D (so M^ is PSD); vectors: off by <= half their chunk's scale."""
    mats = [covariance(n, int(rank_frac * n), spread, seed + i) for i, n in enumerate(sizes)]
    v = torch.rand(vec, generator=torch.Generator().manual_seed(seed), dtype=F64)
    v[:: max(1, vec // 3)] *= 1e-3
    data = torch.cat([*(pack_triangle(m) for m in mats), v]).float()
    segs = [*(("tri", n) for n in sizes), ("vec", vec)]
    q, side = quantize(data, segs)
    assert q.dtype == torch.int8 and q.numel() == data.numel()
    back = dequantize(q, side, segs).double()
    at, sat = 0, 0
    for m, n in zip(mats, sizes, strict=True):
        m = m.float().double()  # what was quantized
        size = n * (n + 1) // 2
        got = unpack_triangle(back[at : at + size], n)
        delta = float(side[sat + n])
        d = m.diagonal()
        bound = (d[:, None] * d[None, :]).sqrt() / 254
        off = ~torch.eye(n, dtype=torch.bool)
        assert ((got - m).abs()[off] <= bound[off] * (1 + 1e-5) + 1e-30).all()
        assert delta <= 1.0 + 1e-3  # ||C~ - C||_2 of a correlation error <= 1/254 per entry
        scale = float(d.max()) if n else 0.0
        lo = torch.linalg.eigvalsh(got - m).min()
        hi = torch.linalg.eigvalsh(m + 2 * delta * torch.diag(d) - got).min()
        assert lo >= -1e-6 * scale and hi >= -1e-6 * scale
        assert torch.linalg.eigvalsh(got).min() >= -1e-6 * scale
        at, sat = at + size, sat + n + 1
    chunk_max = torch.nn.functional.pad(v.float().double(), (0, -vec % VEC_CHUNK))
    chunk_max = chunk_max.reshape(-1, VEC_CHUNK).amax(1).repeat_interleave(VEC_CHUNK)[:vec]
    assert ((back[at:] - v).abs() <= chunk_max / 254 * (1 + 1e-5) + 1e-7).all()
    assert (back[at:] >= 0).all()


def test_bad_sizes_and_dtypes_are_one_line_errors() -> None:
    q, side = quantize(torch.ones(6), [("tri", 3)])
    with pytest.raises(ValueError, match="int8 values"):
        dequantize(q[:-1], side, [("tri", 3)])
    with pytest.raises(ValueError, match="float32 scales"):
        dequantize(q, side.double(), [("tri", 3)])
    with pytest.raises(ValueError, match="expected 6 values"):
        quantize(torch.ones(5), [("tri", 3)])


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 70), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_signed_vectors_round_trip_within_half_a_step(shape: list[int], seed: int) -> None:
    """`quantize_vector` (the line-search probe's int8): any shape and sign, one scale per
    VEC_CHUNK flattened entries, every entry within half its chunk's step."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, scale = quantize_vector(x)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert scale.numel() == math.ceil(x.numel() / VEC_CHUNK)
    back = dequantize_vector(q, scale)
    assert back.dtype == torch.float32 and back.shape == x.shape
    step = scale.double().repeat_interleave(VEC_CHUNK)[: x.numel()]
    assert bool(((back.double() - x).reshape(-1).abs() <= 0.5 * step + 1e-6 * step).all())
    with pytest.raises(ValueError, match="float32 scales"):
        dequantize_vector(q, scale[:-1] if scale.numel() > 1 else scale.double())


def _kfac_set() -> CurvatureSet:
    task = blobs_task(num_clients=2, n=30)
    cc, sc = make_configs("fedng", {"local_steps": 3, "compression": "none"})
    model = task.model_fn(0)
    _, msg = server_init(get_params(model), sc)
    upd = client_step(model, task.clients[0], msg, cc)
    return CurvatureSet.from_arrays(upd.curvature, upd.meta["curv"])


def test_arrays_round_trip_and_auto_policy() -> None:
    cs = _kfac_set()
    arrays, meta = cs.to_arrays(torch.float32)
    q, qmeta = quantize_arrays(arrays, meta)
    assert q["kfac"].dtype == torch.int8 and qmeta["int8"] == ["kfac"]
    assert sum(v.numel() * v.element_size() for v in q.values()) < 0.6 * sum(
        v.numel() * 4 for v in arrays.values()
    )
    back = CurvatureSet.from_arrays(dequantize_arrays(q, qmeta), qmeta)
    back.validate(1e-3, torch.finfo(torch.float32).eps)
    rep, ref = back.reps["kfac"], cs.reps["kfac"]
    assert isinstance(rep, KFAC) and isinstance(ref, KFAC)
    for a, b in zip(rep.G, ref.G, strict=True):
        assert torch.allclose(a, b, rtol=0.05, atol=0.05 * float(b.abs().max()))
    with pytest.raises(ValueError, match="scales"):
        dequantize_arrays({**q, "diag" + SCALE_SUFFIX: q["kfac" + SCALE_SUFFIX]}, qmeta)
    # the blobs MLP's K-FAC factors outweigh its parameters: "auto" sends int8
    assert wants_int8(cs, "auto") and not wants_int8(cs, "none") and wants_int8(cs, "int8")


def test_server_accepts_int8_uploads_and_rejects_tampered_ones() -> None:
    task = blobs_task(num_clients=3, n=30)
    sizes = {}
    for comp in ("none", "int8"):
        cc, sc = make_configs("fedng", {"local_steps": 5, "compression": comp})
        h = simulate(task, cc, sc, rounds=3, seed=0)
        assert all(not r.rejected for r in h.rounds), [r.rejected for r in h.rounds]
        assert h.final() > 0.7 and math.isfinite(h.rounds[-1].train_loss)
        sizes[comp] = h.rounds[-1].bytes_up
    assert sizes["int8"] < sizes["none"]

    def rejected(mode: str) -> dict[str, str]:
        cc, sc = make_configs("fedng", {"local_steps": 3, "compression": "int8"})
        h = simulate(task, cc, sc, rounds=1, seed=0, tamper=lambda r, u: _tampered(u, mode))
        return h.rounds[1].rejected

    assert any("PSD" in r or "definite" in r or "NaN" in r for r in rejected("indefinite").values())
    assert any("dtype" in r for r in rejected("dtype").values())


def _tampered(u: ClientUpdate, mode: str) -> ClientUpdate:
    if u.client_id != 0 or not u.curvature:
        return u
    if mode == "indefinite":
        side = u.curvature["kfac" + SCALE_SUFFIX].clone()
        side[0] = -1.0
        u.curvature["kfac" + SCALE_SUFFIX] = side
    else:
        u.curvature["kfac"] = u.curvature["kfac"].float()
    return u
