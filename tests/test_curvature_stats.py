"""Tagged per-block statistics: one class per block kind, each with exactly its own fields."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fedng.curvature import CurvatureCapture, ElementwiseStats, EmbeddingStats, KronStats
from fedng.curvature.checks import check_stats
from fedng.curvature.stats import STATS_TYPES
from torch import nn

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1] / "python" / "fedng"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.ln(self.emb(ids)).mean(1))


def collect(fisher: str = "empirical") -> tuple[CurvatureCapture, list[object]]:
    torch.manual_seed(0)
    net = Net().double()
    cap = CurvatureCapture(net, dtype=F64)
    cap.recording = True
    ids = torch.randint(0, 7, (5, 3))
    F.cross_entropy(net(ids), torch.randint(0, 3, (5,))).backward()
    return cap, list(cap.collect(fisher))


def test_each_kind_has_its_class_and_only_its_fields() -> None:
    cap, stats = collect()
    emb, ln, fc = stats
    assert isinstance(emb, EmbeddingStats) and isinstance(ln, ElementwiseStats)
    assert isinstance(fc, KronStats)
    assert [s.kind for s in (emb, ln, fc)] == [b.spec.kind for b in cap.blocks]
    fields = {cls: {f.name for f in dataclasses.fields(cls)} for cls in STATS_TYPES.values()}
    common = {"batch_size", "fisher_scale"}
    assert fields[KronStats] == common | {"a", "g", "g_loss"}
    assert fields[EmbeddingStats] == common | {"ids", "g", "g_loss"}
    assert fields[ElementwiseStats] == common | {"psg"}
    assert emb.ids.shape == (5, 3) and emb.g.shape == (5, 3, 4) and emb.g_loss is emb.g
    assert ln.psg.shape == (5, 1, 8) and ln.rows == 5
    assert fc.a.shape == (5, 1, 5) and fc.rows == 5 and fc.dtype == F64


def test_squared_sum_is_the_sum_of_squared_per_sample_gradients() -> None:
    cap, stats = collect()
    for blk, st in zip(cap.blocks, stats, strict=True):
        s = blk.spec
        psg = st.per_sample(0, st.batch_size, s.n)  # type: ignore[attr-defined]
        assert psg.shape == (st.batch_size, s.m * s.n)  # type: ignore[attr-defined]
        torch.testing.assert_close(
            st.squared_sum(s.m, s.n).reshape(-1),  # type: ignore[attr-defined]
            psg.square().sum(0),
        )


def test_block_gradient_is_the_sum_of_per_sample_gradients() -> None:
    cap, stats = collect()
    for blk, st in zip(cap.blocks, stats, strict=True):
        s = blk.spec
        psg = st.per_sample(0, st.batch_size, s.n)  # type: ignore[attr-defined]
        torch.testing.assert_close(psg.sum(0), blk.grad_matrix(F64).reshape(-1))


def test_rows_as_samples_and_join() -> None:
    _, stats = collect()
    emb = stats[0]
    assert isinstance(emb, EmbeddingStats)
    flat = emb.rows_as_samples()
    assert (flat.batch_size, flat.ids.shape, flat.g.shape) == (15, (15, 1), (15, 1, 4))
    joined = emb.join([emb], True, emb.batch_size, emb.fisher_scale)  # the same samples
    assert joined.g.shape == (5, 6, 4) and joined.g_loss is joined.g
    stacked = emb.join([emb], False, 10, 10.0)  # more samples
    assert stacked.ids.shape == (10, 3) and stacked.batch_size == 10


def test_stats_of_the_wrong_kind_are_rejected() -> None:
    cap, stats = collect()
    specs = [b.spec for b in cap.blocks]
    check_stats("here", stats, specs)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="stats for block 'fc' must be KronStats"):
        check_stats("here", [stats[0], stats[1], stats[1]], specs)  # type: ignore[list-item]


def test_no_optional_field_guards_remain() -> None:
    for path in [*(ROOT / "curvature").glob("*.py"), *(ROOT / "optim").glob("*.py")]:
        assert "invariant broken" not in path.read_text(), path.name
