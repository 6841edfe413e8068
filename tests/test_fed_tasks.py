"""Task generators against their definitions; partitioners' guarantees."""

from __future__ import annotations

import importlib
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fedng.federated.config import make_configs
from fedng.federated.simulator import simulate
from fedng.federated.tasks.digits import digits_task
from fedng.federated.tasks.mnist1d import mnist1d_task
from fedng.federated.tasks.models import cnn1d_mnist1d, cnn_digits
from fedng.federated.tasks.partition import (
    dirichlet_label_skew,
    domain_split,
    holdout,
    quantity_skew,
)
from fedng.federated.tasks.registry import TASKS, make_task
from fedng.federated.tasks.regression import regression_task
from fedng.federated.tasks.synthetic import draw_synthetic, synthetic_task


def test_synthetic_matches_its_definition() -> None:
    alpha, beta, k = 0.5, 1.5, 400
    d = draw_synthetic(alpha, beta, num_clients=k, seed=3)
    # u_k ~ N(0, alpha^2), B_k ~ N(0, beta^2)
    assert abs(d.u.std() / alpha - 1) < 0.15 and abs(d.u.mean()) < 0.15
    assert abs(d.B.std() / beta - 1) < 0.15
    # W_k ~ N(u_k, 1), b_k ~ N(u_k, 1), v_k ~ N(B_k, 1) elementwise
    assert abs((d.W - d.u[:, None, None]).std() - 1) < 0.02
    assert abs((d.b - d.u[:, None]).std() - 1) < 0.05
    assert abs((d.v - d.B[:, None]).std() - 1) < 0.02
    assert abs((d.W - d.u[:, None, None]).mean()) < 0.02
    # n_k = floor(lognormal(4, 2)) + 50
    logs = np.log(d.sizes - 50 + 0.5)
    assert abs(logs.mean() - 4) < 0.3 and abs(logs.std() - 2) < 0.3
    assert d.sizes.min() >= 50
    # x ~ N(v_k, diag(j^-1.2)): pooled within-client deviations
    dev = np.concatenate([x - v for x, v in zip(d.xs, d.v, strict=True)])
    j = np.arange(1, 61)
    np.testing.assert_allclose(dev.var(0), j**-1.2, rtol=0.05)
    assert np.abs(dev.mean(0) / np.sqrt(j**-1.2)).max() < 0.02
    # y = argmax(W^T x + b)
    for x, y, w, b in zip(d.xs[:20], d.ys[:20], d.W, d.b, strict=False):
        assert np.array_equal(y, np.argmax(x @ w + b, 1))


def test_synthetic_iid_shares_the_model_and_the_feature_mean() -> None:
    d = draw_synthetic(0.0, 0.0, num_clients=5, iid=True, seed=0, max_size=300)
    assert all(np.array_equal(d.W[0], w) for w in d.W)
    assert not d.v.any()


def test_synthetic_task_split() -> None:
    t = synthetic_task(1.0, 1.0, seed=0, max_size=400)
    assert len(t.clients) == 30 and t.num_classes == 10
    total = sum(c.num_examples + c.x_val.shape[0] for c in t.clients) + t.x_test.shape[0]
    assert total == sum(t.info["sizes"])
    frac = t.x_test.shape[0] / total
    assert 0.09 < frac < 0.11
    assert t.model_fn(0).weight.shape == (10, 60)
    assert torch.equal(t.model_fn(1).weight, t.model_fn(1).weight)


@pytest.mark.parametrize(
    "builder",
    [
        lambda: digits_task(num_clients=20, alpha=0.1),
        lambda: mnist1d_task(num_clients=10, alpha=1.0, num_samples=1000),
        lambda: regression_task(),
    ],
)
def test_tasks_build(builder) -> None:  # type: ignore[no-untyped-def]
    t = builder()
    model = t.model_fn(0)
    out = model(t.clients[0].x)
    assert out.shape[0] == t.clients[0].num_examples
    assert all(c.num_examples > 0 and c.x_val.shape[0] > 0 for c in t.clients)
    assert t.x_test.shape[0] > 0


def test_regression_clients_own_disjoint_intervals() -> None:
    t = regression_task(num_clients=10)
    spans = [(float(c.x.min()), float(c.x.max())) for c in t.clients]
    for (_, hi), (lo, _) in itertools.pairwise(spans):
        assert hi <= lo
    assert t.metric == "rel_l2" and not t.higher_is_better


def test_make_task_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="'name'"):
        make_task("imagenet")


def test_dirichlet_partition() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 3000)
    skewed = dirichlet_label_skew(labels, 20, 0.1, np.random.default_rng(1))
    flat = dirichlet_label_skew(labels, 20, 100.0, np.random.default_rng(1))
    for parts in (skewed, flat):
        allidx = np.sort(np.concatenate(parts))
        assert np.array_equal(allidx, np.arange(3000))
        assert min(len(p) for p in parts) >= 10

    def classes(parts: list[np.ndarray]) -> float:
        return float(np.mean([len(np.unique(labels[p])) for p in parts]))

    assert classes(skewed) < 5 < classes(flat)


def test_quantity_skew_domain_split_holdout() -> None:
    parts = quantity_skew(1000, 10, 1.5, np.random.default_rng(0))
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 1000 and min(sizes) >= 10 and max(sizes) > 3 * min(sizes)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1000))
    keys = np.random.default_rng(1).uniform(size=100)
    dom = domain_split(keys, 4)
    assert all(keys[a].max() <= keys[b].min() for a, b in itertools.pairwise(dom))
    keep, out = holdout(np.arange(50), 0.2, np.random.default_rng(2))
    assert len(out) == 10 and len(keep) == 40 and not set(keep) & set(out)
    with pytest.raises(ValueError, match="'fraction'"):
        holdout(np.arange(5), 1.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="'alpha'"):
        dirichlet_label_skew(np.zeros(10, dtype=int), 2, 0.0, np.random.default_rng(0))
    assert math.isfinite(float(keys.sum()))


CNN_TASKS = {
    # name: (default clients, input shape of one example, conv layer type)
    "digits-cnn": (20, (1, 8, 8), torch.nn.Conv2d),
    "mnist1d-cnn": (50, (40,), torch.nn.Conv1d),
}


@pytest.mark.parametrize("name", list(CNN_TASKS))
def test_cnn_tasks_build_with_their_defaults(name: str) -> None:
    clients, shape, conv = CNN_TASKS[name]
    assert name in TASKS
    t = make_task(name)
    plain = make_task(name.removesuffix("-cnn"))
    assert t.name == f"{name}(alpha=0.1)" and t.info["alpha"] == 0.1
    assert len(t.clients) == clients == len(plain.clients)
    # the same data and partition as the MLP task, only shaped for the CNN
    for c, p in zip(t.clients, plain.clients, strict=True):
        assert tuple(c.x.shape[1:]) == shape and torch.equal(c.x.flatten(1), p.x)
        assert torch.equal(c.y, p.y) and tuple(c.x_val.shape[1:]) == shape
    assert tuple(t.x_test.shape[1:]) == shape
    model = t.model_fn(0)
    assert any(isinstance(m, conv) for m in model.modules())
    assert model(t.clients[0].x).shape == (t.clients[0].num_examples, 10)
    for p, q in zip(model.parameters(), t.model_fn(0).parameters(), strict=True):
        assert torch.equal(p, q)


def test_cnn_models_are_shared_with_the_bench_zoo() -> None:
    """The zoo imports the tasks' definitions (one definition of each model)."""
    bench = str(Path(__file__).resolve().parents[1] / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    zoo = importlib.import_module("zoo")
    assert zoo.cnn_digits is cnn_digits and zoo.cnn1d_mnist1d is cnn1d_mnist1d


@pytest.mark.parametrize("name", list(CNN_TASKS))
@pytest.mark.parametrize("algo", ["fedavg", "fedng"])
def test_one_round_on_cnn_tasks(name: str, algo: str) -> None:
    task = make_task(name, num_clients=6)
    cc, sc = make_configs(algo, {"local_steps": 2, "batch_size": 16})
    h = simulate(task, cc, sc, rounds=1, participation=0.5, seed=0)
    assert len(h.rounds) == 2 and h.rounds[1].participants
    assert h.rounds[1].rejected == {}, h.rounds[1].rejected
    assert math.isfinite(h.rounds[1].train_loss) and math.isfinite(h.final())
    assert h.rounds[1].bytes_up > 0


def test_task_model_must_be_known() -> None:
    with pytest.raises(ValueError, match="'model'"):
        digits_task(model="resnet")  # type: ignore[arg-type]
