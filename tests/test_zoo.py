"""The bench model zoo: every model takes 20 NaturalGradient steps with the defaults, finite."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from fedng.optim import NaturalGradient
from fedng.optim.natural_gradient import DEFAULT_LR
from zoo import ZOO, Entry, float64, train


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_takes_20_default_steps_finite(name: str) -> None:
    entry: Entry = ZOO[name]

    def make(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, object]:
        ng = NaturalGradient(model, loss=entry.loss)  # type: ignore[arg-type]
        return torch.optim.SGD(model.parameters(), lr=DEFAULT_LR), ng.step

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback on a healthy model
        run = train(entry, make, steps=20)  # type: ignore[arg-type]
    assert run.nonfinite_losses == 0 and not run.nonfinite_params
    assert run.final_loss < run.losses[0], (run.losses[0], run.final_loss)
    assert run.extra["skipped_steps"] == 0
    assert sum(run.extra["inverse_fallbacks"].values()) == 0


def test_zoo_data_is_seeded() -> None:
    entry = ZOO["transformer_mode"]
    a, b = entry.model(), entry.model()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    x, y, xt, yt = entry.data()
    assert x.shape[0] == y.shape[0] and xt.shape[0] == yt.shape[0]


@pytest.mark.parametrize("name", ["mlp_regression", "transformer_mode"])
def test_float64_variant_is_float64_and_starts_where_the_float32_model_does(name: str) -> None:
    entry, double = ZOO[name], float64(ZOO[name])
    x, y, _, _ = double.data()
    assert x.dtype == (torch.float64 if x.is_floating_point() else torch.int64)
    assert y.dtype == (torch.float64 if entry.loss == "mse" else torch.int64)
    model32, model64 = entry.model(), double.model()
    assert all(p.dtype == torch.float64 for p in model64.parameters())
    for p, q in zip(model32.parameters(), model64.parameters(), strict=True):
        assert torch.equal(p.double(), q)  # the same seeded initialization, cast
    x32, y32, _, _ = entry.data()
    with torch.no_grad():
        l32 = entry.loss_fn(model32(x32), y32)
        l64 = double.loss_fn(model64(x), y)
    assert l64.dtype == torch.float64
    assert float(l64) == pytest.approx(float(l32), rel=1e-5)
    assert double.name == f"{name}_f64" and entry.data()[0].dtype == x32.dtype  # own cache
