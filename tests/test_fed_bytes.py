"""FedNG's byte levers: the "auto" curvature policy (by layer shape), int8 "auto" whenever it is
the smaller payload, c_k and the line-search probe in bf16 (the probe on probed blocks only)."""

from __future__ import annotations

import pytest
import torch
from _fed import fed_round
from fedng.curvature import CurvatureSet, to_matrix
from fedng.curvature.quantize import (
    LOWRANK_MIN,
    LOWRANK_RANK,
    SCALE_SUFFIX,
    dequantize,
    dequantize_add,
    payload_sizes,
    quantize,
    segments,
    side_traces,
)
from fedng.curvature.spec import BlockSpec, pack_triangle, unpack_triangle
from fedng.federated.aggregation.matvec import block_vectors, fisher_matvecs
from fedng.federated.aggregation.summable import PROBE_D, PROBE_M
from fedng.federated.aggregation.sums import WeightedSum
from fedng.federated.algorithms.curvature_payload import decoded_curvature, wants_int8
from fedng.federated.algorithms.fedng_server import CONTRIB_PREFIX
from fedng.federated.algorithms.registry import get_algorithm
from fedng.federated.config import curvature_mapping, parse_curvature
from fedng.federated.config.curvature import FedNGConfig
from fedng.federated.config.policy import auto_curvature, factor_entries
from fedng.federated.server_round import ServerRound
from fedng.federated.tasks.base import mlp
from fedng.federated.tasks.models import cnn_digits
from torch import nn


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_auto_policy_switches_only_wide_input_heads_to_diag() -> None:
    # a 60 -> 10 softmax regression: K-FAC's triangles are 3.2x its 610 parameters (kept);
    # a 200 -> 10 one: 33x
    assert auto_curvature(nn.Linear(60, 10)) == {}
    assert auto_curvature(nn.Linear(200, 10)) == {"": "diag"}
    assert auto_curvature(nn.Linear(60, 10), ratio=2.0) == {"": "diag"}
    # the MNIST-1D MLP: 1.4x over the model: K-FAC everywhere
    assert auto_curvature(mlp([40, 100, 100, 10])) == {}
    # the digits CNN: only its 513 -> 10 head (26x) switches; the rest is within 4x
    cnn = cnn_digits()
    assert auto_curvature(cnn) == {"5": "diag"}
    kept = [m for n, m in cnn.named_modules() if n in ("0", "2")]
    assert all(isinstance(m, nn.Conv2d) for m in kept)
    # the threshold is the model-wide ratio: a tighter one switches more, a looser one none
    assert auto_curvature(cnn, ratio=1.5) == {"5": "diag", "2": "diag"}
    assert auto_curvature(cnn, ratio=100.0) == {}
    assert FedNGConfig(curvature="auto").curvature == "auto"


def test_auto_spec_parses_and_needs_the_model() -> None:
    model = mlp([200, 10])
    assert curvature_mapping("auto", model) == {"default": "kfac", "0": "diag"}
    assert curvature_mapping("auto,0=kfac", model) == {"default": "kfac", "0": "kfac"}
    assert parse_curvature("auto,0=diag") == ("auto", {"0": "diag"})
    with pytest.raises(ValueError, match="needs the model"):
        curvature_mapping("auto")
    with pytest.raises(ValueError, match="must start with a kind"):
        parse_curvature("bogus")
    with pytest.raises(ValueError, match="kinds must be in"):
        parse_curvature("kfac,0=auto")


def test_payload_sizes_are_the_exact_int8_bytes() -> None:
    segs = [("tri", 1), ("tri", 7), ("vec", 5), ("vec", 130), ("tri", 12)]
    entries, nbytes = payload_sizes(segs)
    q, side = quantize(torch.rand(entries), segs)
    assert q.numel() == entries and nbytes == q.numel() + side.numel() * side.element_size()
    assert payload_sizes([("tri", 61), ("tri", 10)]) == (1891 + 55, 1891 + 55 + 4 * 73)
    assert factor_entries(BlockSpec("head", "kron", 10, 61)) == 1891 + 55


def test_wide_factors_travel_low_rank_with_their_trace() -> None:
    """A factor >= LOWRANK_MIN wide travels as B~ B~^T + sigma I (sigma the discarded
    eigenvalues' mean): PSD, within lambda_{k+1} of M, trace tr M + k sigma; exact bytes;
    about 2x smaller at 257 wide (4x at 513)."""
    n, k = LOWRANK_MIN + 1, LOWRANK_RANK
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(400, n, generator=g, dtype=torch.float64) + 0.3)
    m = x.T @ x / 400
    eye = torch.eye(5, dtype=torch.float64)
    tail = torch.rand(9, generator=g, dtype=torch.float64)
    segs = [("lrtri", n), ("tri", 5), ("vec", 9)]
    data = torch.cat([pack_triangle(m), pack_triangle(eye), tail]).float()
    q, side = quantize(data, segs)
    entries, nbytes = payload_sizes(segs)
    assert entries == data.numel() and nbytes == q.numel() + 4 * side.numel()
    assert q.numel() == 2 * n * k + 15 + 9 and nbytes < 0.55 * entries
    back = dequantize(q, side, segs).double()
    tri = n * (n + 1) // 2
    sent = unpack_triangle(data[:tri].double(), n)
    got = unpack_triangle(back[:tri], n)
    lam = torch.linalg.eigvalsh(sent)
    scale = float(lam[-1])
    assert float(torch.linalg.eigvalsh(got)[0]) >= -1e-6 * scale  # PSD
    sigma = float(side[k])
    assert abs(sigma - float(lam[: n - k].mean())) <= 1e-4 * scale
    assert abs(float(got.trace() - sent.trace()) - k * sigma) <= 1e-5 * float(sent.trace())
    assert float(torch.linalg.eigvalsh(got - sent).abs().max()) <= float(lam[-k - 1]) + 1e-4 * scale
    # the narrow segments behind it decode as before
    rest, _ = quantize(data[tri:], segs[1:])
    assert torch.equal(q[2 * n * k :], rest)
    # a rank-k factor comes back almost exactly: sigma only holds the rounding of B~
    low = torch.zeros(n, n, dtype=torch.float64)
    low[:k, :k] = x[:, :k].T @ x[:, :k]
    _, side2 = quantize(pack_triangle(low).float(), [("lrtri", n)])
    assert abs(float(side2[-1])) <= 1e-4 * float(torch.linalg.eigvalsh(low)[-1])
    # only factors at least LOWRANK_MIN wide: the digits CNN's 513-wide head input
    forms = segments("kfac", [BlockSpec("a", "kron", 10, 513), BlockSpec("b", "kron", 32, 145)])
    assert forms == [("lrtri", 513), ("tri", 10), ("tri", 145), ("tri", 32)]
    # ... and larger than their block: a 785 -> 512 layer's factors (308k and 131k entries
    # against 402k weights) stay triangles, a 785 -> 100 layer's input factor does not
    wide = segments("kfac", [BlockSpec("c", "kron", 512, 785), BlockSpec("d", "kron", 100, 785)])
    assert wide == [("tri", 785), ("tri", 512), ("lrtri", 785), ("tri", 100)]


def test_low_rank_encoding_survives_a_failed_float32_eigensolver(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """float32 `eigh` can return NaN on a finite, nearly rank-deficient factor (a digits-cnn
    head factor did, and the client's upload was rejected) or raise: the encoder then solves in
    float64 and sends the same factor as when float32 succeeds, within the int8 rounding."""
    n = LOWRANK_MIN + 1
    g = torch.Generator().manual_seed(1)
    x = torch.relu(torch.randn(300, n, generator=g, dtype=torch.float64))
    data = pack_triangle(x.T @ x / 300).float()
    segs = [("lrtri", n)]
    want = dequantize(*quantize(data, segs), segs).double()
    eigh = torch.linalg.eigh

    def fails_in_float32(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, v = eigh(m)
        return (w * float("nan"), v) if m.dtype == torch.float32 else (w, v)

    def raises_in_float32(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("syevd: failed to converge")
        return eigh(m)

    for failing in (fails_in_float32, raises_in_float32):
        monkeypatch.setattr(torch.linalg, "eigh", failing)
        q, side = quantize(data, segs)
        got = dequantize(q, side, segs).double()
        assert bool(torch.isfinite(side).all()) and bool(torch.isfinite(got).all())
        assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_auto_int8_whenever_it_is_the_smaller_payload() -> None:
    _, ups = fed_round("fedng", {"curvature": "diag", "compression": "none"}, n=3)
    cs = decoded_curvature(ups[0])
    assert cs is not None
    # a diagonal has as many entries as parameters: int8 is still ~4x smaller than fp32
    assert wants_int8(cs, "auto") and wants_int8(cs, "auto", 2)
    assert not wants_int8(cs, "none") and wants_int8(cs, "int8")
    tiny = CurvatureSet.empty(cs.layouts[:0], [], 1, 0)  # nothing to compress
    assert not wants_int8(tiny, "auto")
    _, int8 = fed_round("fedng", {"curvature": "diag"}, n=3)
    assert int8[0].curvature["diag"].dtype == torch.int8
    assert len(int8[0].to_bytes()) < len(ups[0].to_bytes())


def test_contribution_in_bf16_is_f_delta_within_its_rounding() -> None:
    _, ups = fed_round("fedng", {"aggregation": "summable"}, n=3)
    u = ups[1]
    cs = decoded_curvature(u)
    assert cs is not None
    c = {k[len(CONTRIB_PREFIX) :]: v for k, v in u.extras.items()}
    assert sorted(c) == sorted(u.delta) and all(v.dtype == torch.bfloat16 for v in c.values())
    exact = fisher_matvecs(cs, block_vectors(cs, u.delta))
    for lay, want in zip(cs.layouts, exact, strict=True):
        assert want is not None
        got = to_matrix(c, lay)
        # round to nearest in bf16 (8 significant bits): |x~ - x| <= 2^-8 |x|
        assert bool(((got - want).abs() <= 2.0**-8 * want.abs() + 1e-30).all())
    _, fp32 = fed_round("fedng", {"aggregation": "summable", "contrib_dtype": "fp32"}, n=3)
    assert len(fp32[1].to_bytes()) - len(u.to_bytes()) >= 2 * sum(v.numel() for v in c.values())


def _probe(extra: dict[str, object], data_bytes: bool = False) -> tuple[int, set[str], str, float]:
    """One summable round on the blobs MLP: the probe's bytes (`data_bytes`: its arrays' bytes
    only, without the wire header's entry per array, which outweighs this MLP's small arrays),
    names and dtypes, and the smallest step length the line search took."""
    state, ups = fed_round("fedng", extra, n=4, rounds=1)
    algo = get_algorithm("fedng")
    rnd = ServerRound(state)
    for u in ups:
        assert rnd.add(u).status != "rejected"
    probe = rnd.probe()
    assert probe is not None
    for u in ups:
        assert rnd.add_reply(algo.answer_probe(u, probe)).status != "rejected"
    new, _ = rnd.finish()
    assert new.log["aggregation"] == "summable" and new.log["line_search"] == "answered"
    assert all(bool(torch.isfinite(v).all()) for v in new.params.values())
    if data_bytes:  # as sent (the message casts float arrays to its dtype)
        wd = {"fp32": 4, "bf16": 2, "fp16": 2}[probe.dtype]
        size = sum(v.numel() * (wd if v.is_floating_point() else 1) for v in probe.extras.values())
    else:
        size = len(probe.to_bytes())
    return (
        size,
        set(probe.extras),
        probe.dtype,
        float(new.log["alpha_min"]),
    )


def test_probe_in_bf16_is_on_the_probed_blocks_only() -> None:
    full, names, dtypes, alpha = _probe({"curvature": "kfac", "probe_dtype": "fp32"})
    assert dtypes == "fp32" and alpha >= 0
    assert names == {
        p + k for p in (PROBE_M, PROBE_D) for k in ("0.weight", "0.bias", "2.weight", "2.bias")
    }
    half, names16, dtypes16, alpha16 = _probe({"curvature": "kfac", "probe_dtype": "bf16"})
    assert dtypes16 == "bf16" and names16 == names and half < full
    # the line search keeps its step length within bf16's rounding of M and d
    assert alpha16 == pytest.approx(alpha, rel=0.05, abs=1e-3)
    # a diagonal head needs no line search: only layer 0's parameters are probed
    head, names_h, _, _ = _probe({"curvature": "kfac,2=diag", "probe_dtype": "bf16"})
    assert names_h == {p + k for p in (PROBE_M, PROBE_D) for k in ("0.weight", "0.bias")}
    assert head < half


def test_int8_probe_halves_the_probe_and_keeps_the_step() -> None:
    """probe_dtype="int8": M and d as int8 with one float32 scale per 64 entries (about half of
    bf16's bytes); the server searches along the d the clients decode, so the step length stays
    close to the fp32 probe's."""
    _, names, _, alpha = _probe({"curvature": "kfac", "probe_dtype": "fp32"})
    half, _, _, _ = _probe({"curvature": "kfac", "probe_dtype": "bf16"}, data_bytes=True)
    small, names8, dtype8, alpha8 = _probe({"probe_dtype": "int8"}, data_bytes=True)
    assert dtype8 == "fp32"  # the scales' dtype; the values travel as int8
    assert names8 == names | {k + SCALE_SUFFIX for k in names}
    assert small < 0.75 * half
    assert alpha8 == pytest.approx(alpha, rel=0.05, abs=1e-3)


def test_server_folds_low_rank_payloads_as_their_floats() -> None:
    """The server's int8 fold (`WeightedSum.fold_int8`) sums a payload with a low-rank segment
    as its dequantized floats (sized by the float entries, not the int8 values)."""
    n = LOWRANK_MIN
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, n, generator=g, dtype=torch.float64)
    segs = [("tri", 4), ("lrtri", n), ("vec", 7)]
    data = torch.cat(
        [
            pack_triangle(torch.eye(4, dtype=torch.float64)),
            pack_triangle(x.T @ x / 50),
            torch.rand(7, generator=g, dtype=torch.float64),
        ]
    ).float()
    q, side = quantize(data, segs)
    ws = WeightedSum()
    ws.fold_int8({"kfac": (q, side, segs)}, 0.25)
    ws.fold_int8({"kfac": (q, side, segs)}, 0.75)
    want = dequantize(q, side, segs)
    assert ws.sums["kfac"].shape == data.shape
    assert torch.allclose(ws.sums["kfac"], want, rtol=1e-5, atol=1e-6)
    acc = torch.zeros_like(data)
    dequantize_add(acc, q, side, segs, 2.0)
    assert torch.allclose(acc, 2 * want)


def test_low_rank_payloads_fold_and_check_run_by_run() -> None:
    """With a low-rank segment, `dequantize_add` folds the triangles around it natively and
    `side_traces` reads its trace `||B~||_F^2 + n sigma` from the 2 n k digits: both equal the
    decoded payload's (float64 reference); a negative sigma or a size mismatch falls back."""
    n = LOWRANK_MIN
    g = torch.Generator().manual_seed(2)
    x = torch.randn(60, n, generator=g, dtype=torch.float64)
    y = torch.randn(30, 6, generator=g, dtype=torch.float64)
    segs = [("tri", 6), ("lrtri", n), ("tri", 6)]
    data = torch.cat([pack_triangle(y.T @ y), pack_triangle(x.T @ x / 60), pack_triangle(y.T @ y)])
    q, side = quantize(data.float(), segs)
    want = dequantize(q, side, segs).double()
    acc = torch.full_like(data, 0.5).float()
    dequantize_add(acc, q, side, segs, 3.0)
    assert torch.allclose(acc.double(), 0.5 + 3.0 * want, rtol=1e-5, atol=1e-5)
    traces = side_traces(q, side, segs, 1e30)
    assert traces is not None and len(traces) == 3
    at, ref = 0, []
    for _, w in segs:
        size = w * (w + 1) // 2
        ref.append(float(unpack_triangle(want[at : at + size], w).trace()))
        at += size
    assert traces == pytest.approx(ref, rel=1e-5)
    bad = side.clone()
    bad[6 + 1 + LOWRANK_RANK] = -1.0  # the low-rank segment's sigma
    assert side_traces(q, bad, segs, 1e30) is None
    assert side_traces(q[:-1], side, segs, 1e30) is None
    with pytest.raises(ValueError, match="sizes"):
        dequantize_add(acc, q[:-1], side, segs, 1.0)
