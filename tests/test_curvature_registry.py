"""The registry of Fisher representations: the one list of kinds, dispatch by name, extension."""

from __future__ import annotations

import pytest
import torch
from fedng import curvature
from fedng.curvature import registry
from fedng.curvature.block_diagonal import CurvatureSet
from fedng.curvature.diagonal import DiagonalFisher
from fedng.curvature.kfac import KFAC
from fedng.curvature.layout import BlockLayout
from fedng.curvature.lowrank import LowRankFisher
from fedng.curvature.spec import BlockSpec, Payload

SPECS = (BlockSpec("fc", "kron", 3, 4), BlockSpec("emb", "embedding", 2, 5))


def test_kinds_in_order_and_lookup() -> None:
    assert registry.kinds() == ("kfac", "diag", "lowrank")
    assert registry.representation("kfac") is KFAC
    assert registry.representation("diag") is DiagonalFisher
    assert registry.representation("lowrank") is LowRankFisher
    with pytest.raises(ValueError, match=r"kind must be one of \['kfac', 'diag', 'lowrank'\]"):
        registry.representation("ekfac")
    assert not hasattr(curvature, "REPRESENTATIONS")  # the registry is the one list


@pytest.mark.parametrize("kind", ["kfac", "diag", "lowrank"])
def test_from_payload_dispatches_by_kind(kind: str) -> None:
    rep = registry.representation(kind).create(SPECS, rank=3, sketch_seed=7)
    rep.counts = [1, 1]
    back = registry.from_payload(rep.to_payload())
    assert type(back) is type(rep) and back.specs == rep.specs
    with pytest.raises(ValueError, match=r"'payload\.kind'"):
        registry.from_payload(Payload("nope", SPECS, torch.zeros(0)))
    with pytest.raises(TypeError, match="must be a Payload"):
        registry.from_payload("kfac")  # type: ignore[arg-type]


def test_create_passes_sketch_options_only_to_sketches() -> None:
    low = LowRankFisher.create(SPECS, rank=3, sketch_seed=7, dtype=torch.float64)
    assert (low.rank, low.sketch_seed, low.dtype) == (3, 7, torch.float64)
    assert KFAC.create(SPECS, rank=3, sketch_seed=7).dtype == torch.float32


def test_block_kinds_are_checked_by_the_class() -> None:
    with pytest.raises(ValueError, match="KFAC holds only"):
        KFAC([BlockSpec("ln", "elementwise", 1, 4)])
    assert LowRankFisher.default_block_kinds == frozenset({"kron"})


class Scaled(DiagonalFisher):
    """A stand-in for a new kind: a diagonal Fisher under another name."""

    kind = "scaled"
    order = 3


def test_a_new_kind_is_one_registered_class(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register(Scaled)
    assert registry.kinds() == ("kfac", "diag", "lowrank", "scaled")
    layouts = [
        BlockLayout(s.name, s.kind, s.m, s.n, f"{s.name}.w", None, None, None, False) for s in SPECS
    ]
    cs = CurvatureSet.empty(layouts, ["scaled", "kfac"])
    assert list(cs.reps) == ["kfac", "scaled"]  # registry order, not block order
    assert isinstance(cs.reps["scaled"], Scaled)
    arrays, meta = cs.to_arrays(torch.float32)
    assert set(CurvatureSet.from_arrays(arrays, meta).reps) == {"kfac", "scaled"}


def test_register_rejects_a_taken_kind_or_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    class SameKind(DiagonalFisher):
        kind = "diag"
        order = 9

    class SameOrder(DiagonalFisher):
        kind = "other"
        order = 0

    for cls in (SameKind, SameOrder):
        with pytest.raises(ValueError, match="clashes with"):
            registry.register(cls)
