"""The server's global curvature handled as stored payloads (no matrix unpacked or repacked):
the EMA fold, the broadcast factors and the reference scales equal the decoded-set versions."""

from __future__ import annotations

import pytest
import torch
from _fed import fed_round
from fedng.curvature import CurvatureSet
from fedng.federated.algorithms.base import curvature_scales
from fedng.federated.algorithms.curvature_payload import curvature_arrays
from fedng.federated.algorithms.fedng_server import (
    broadcast_factors,
    fold_global,
    fold_global_packed,
    global_arrays,
    global_scales,
    global_set,
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _state() -> object:
    state, _ = fed_round("fedng", {"compression": "int8"}, rounds=2)
    assert global_arrays(state), "two FedNG rounds leave a global curvature"
    return state


@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_packed_fold_equals_decoded_fold(beta: float) -> None:
    state = _state()
    glob = global_set(state)
    assert glob is not None
    fresh = CurvatureSet.combine([glob], [0.5])  # any set of the same layout
    arrays, meta = fresh.to_arrays(torch.float32)
    a, b = state.copy(), state.copy()
    fold_global(a, fresh, beta)
    fold_global_packed(b, arrays, meta, beta)
    assert a.meta["curv"] == b.meta["curv"]
    assert set(a.buffers) == set(b.buffers)
    for k in a.buffers:
        assert torch.equal(a.buffers[k], b.buffers[k]), k


@pytest.mark.parametrize("compression", ["int8", "none", "auto"])
def test_broadcast_factors_equal_the_decoded_ones(compression: str) -> None:
    state = _state()
    glob = global_set(state)
    assert glob is not None
    want, wmeta = curvature_arrays(glob, "fp32", compression)
    got = broadcast_factors(state, compression)
    assert got is not None
    assert got[1] == wmeta
    assert set(got[0]) == set(want)
    for k in want:
        assert got[0][k].dtype == want[k].dtype, k
        assert torch.equal(got[0][k], want[k]), k


def test_global_scales_equal_the_decoded_ones() -> None:
    state = _state()
    glob = global_set(state)
    assert glob is not None
    want = curvature_scales(glob)
    got = global_scales(state)
    assert got is not None and set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-6), k  # block traces: float32 sums
