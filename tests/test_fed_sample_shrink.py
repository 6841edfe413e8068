"""FedNG's participation-aware server step (`FedNGConfig.sample_shrink`,
`fedng.federated.algorithms.sample_noise`): under partial participation the step is multiplied by
the sampled mean delta's Wiener factor; at full participation it is untouched bit for bit."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _fed import blobs_task
from fedng.federated.algorithms.sample_noise import PARTICIPATION_KEY, SampleSpread
from fedng.federated.client.params import get_params, set_params
from fedng.federated.config import make_configs
from fedng.federated.round import client_step, server_init, server_step
from fedng.federated.simulator import sampled_fraction, simulate


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def reference_shrink(deltas: list[torch.Tensor], weights: list[float], f: float) -> float:
    """The Wiener factor in float64 from the definition (unbiased spread, finite population)."""
    w = torch.tensor(weights, dtype=torch.float64)
    x = torch.stack([d.double().flatten() for d in deltas])
    p = w / w.sum()
    mean = (p[:, None] * x).sum(0)
    spread = float((p * ((x - mean) ** 2).sum(1)).sum())
    m_eff = float(w.sum() ** 2 / (w**2).sum())
    noise = spread / (m_eff - 1) * (1 - f)
    msq = float(mean @ mean)
    return msq / (msq + noise)


def test_shrink_is_the_wiener_factor_of_the_sampled_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    deltas = [torch.randn(3, 4, generator=gen) + 0.5 for _ in range(4)]
    weights = [10.0, 30.0, 20.0, 40.0]
    spread = SampleSpread()
    for d, w in zip(deltas, weights, strict=True):
        spread.fold({"w": d[:2], "b": d[2]}, w)
    total = sum(weights)
    mean = sum(w / total * d for d, w in zip(deltas, weights, strict=True))
    assert isinstance(mean, torch.Tensor)
    arrays = {"w": mean[:2], "b": mean[2]}
    for f in (0.1, 0.3, 0.9):
        got = spread.shrink(arrays, f)
        assert 0 < got < 1
        assert got == pytest.approx(reference_shrink(deltas, weights, f), rel=1e-5)
    assert spread.shrink(arrays, 1.0) == 1.0  # every client: no sampling noise


def test_no_noise_to_estimate_leaves_the_step() -> None:
    same = SampleSpread()
    d = {"w": torch.ones(5)}
    for w in (1.0, 2.0, 3.0):
        same.fold(d, w)
    assert same.shrink(d, 0.3) == pytest.approx(1.0, abs=1e-6)  # clients agree
    one = SampleSpread()
    one.fold(d, 5.0)
    assert one.shrink(d, 0.3) == 1.0  # one (pooled) update: no spread to see


def test_server_init_keeps_the_participation_below_one() -> None:
    _, sc = make_configs("fedng", {})
    params = {"w": torch.zeros(2)}
    assert PARTICIPATION_KEY not in server_init(params, sc)[0].meta
    assert server_init(params, sc, 0.3)[0].meta[PARTICIPATION_KEY] == 0.3
    with pytest.raises(ValueError, match="participation"):
        server_init(params, sc, 0.0)


def one_round(shrink: bool, participation: float) -> tuple[dict[str, torch.Tensor], Any, Any]:
    """One FedNG round of two clients from the same start; (start, new state, updates)."""
    task = blobs_task(num_clients=2, n=40)
    cc, sc = make_configs("fedng", {"local_steps": 3, "batch_size": 8, "sample_shrink": shrink})
    model = task.model_fn(0)
    start = {k: v.clone() for k, v in get_params(model).items()}
    state, msg = server_init(start, sc, participation)
    updates = []
    for c in task.clients:
        set_params(model, start)
        updates.append(client_step(model, c, msg, cc))
    new, _ = server_step(state, updates)
    return start, new, updates


def test_partial_participation_scales_the_step_by_the_factor() -> None:
    start, on, updates = one_round(True, 0.5)
    _, off, _ = one_round(False, 0.5)
    s = on.log["sample_shrink"]
    names = list(start)
    ref = reference_shrink(
        [torch.cat([u.delta[k].flatten() for k in names]) for u in updates],
        [float(u.num_examples) for u in updates],
        0.5,
    )
    assert 0 < s < 1 and s == pytest.approx(ref, rel=1e-5)
    assert "sample_shrink" not in off.log
    for k in names:
        torch.testing.assert_close(on.params[k] - start[k], s * (off.params[k] - start[k]))


def test_full_participation_is_bit_identical_to_no_shrink() -> None:
    _, on, _ = one_round(True, 1.0)
    _, off, _ = one_round(False, 1.0)
    assert "sample_shrink" not in on.log
    for k, v in off.params.items():
        assert torch.equal(on.params[k], v)


def test_simulate_passes_its_participation_to_the_server() -> None:
    task = blobs_task(num_clients=4, n=40)
    cc, sc = make_configs("fedng", {"local_steps": 3, "batch_size": 8, "sample_shrink": True})
    h = simulate(task, cc, sc, rounds=2, participation=0.5, seed=0)
    shrinks = [r.server_log["sample_shrink"] for r in h.rounds[1:]]
    assert all(0 < s <= 1 for s in shrinks)
    cc, sc = make_configs("fedng", {"local_steps": 3, "batch_size": 8})  # the default: off
    h = simulate(task, cc, sc, rounds=1, participation=0.5, seed=0)
    assert "sample_shrink" not in h.rounds[1].server_log


def test_the_server_gets_the_fraction_actually_sampled() -> None:
    """The fraction kept for the sampling-noise estimate is what the driver samples: 0.9 of 4
    clients samples all 4 (no sampling noise, the step untouched), 0.3 of 5 samples 2 (0.4)."""
    assert sampled_fraction(4, 0.9) == 1.0 and sampled_fraction(5, 0.3) == 0.4
    assert sampled_fraction(3, 0.01) == pytest.approx(1 / 3)  # at least one client
    task = blobs_task(num_clients=4, n=40)
    cc, sc = make_configs("fedng", {"local_steps": 3, "batch_size": 8, "sample_shrink": True})
    h = simulate(task, cc, sc, rounds=1, participation=0.9, seed=0)
    assert h.rounds[1].server_log.get("sample_shrink", 1.0) == 1.0
