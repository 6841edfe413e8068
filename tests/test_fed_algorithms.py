"""Baselines against hand-computed steps; every algorithm learns; determinism."""

from __future__ import annotations

import pytest
import torch
from _fed import blobs_task, linear_task
from fedng.federated.client import batch_indices, get_params, round_seed, set_params
from fedng.federated.config import (
    ALGORITHMS,
    ClientConfig,
    FedOptConfig,
    FedProxConfig,
    ServerConfig,
    make_configs,
)
from fedng.federated.round import client_step, server_init, server_step
from fedng.federated.simulator import simulate
from torch import nn


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-6) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol)


def test_fedavg_one_client_equals_centralized_sgd() -> None:
    task = linear_task()
    cfg = ClientConfig(algorithm="fedavg", lr=0.05, batch_size=5, local_steps=4, loss="mse")
    rounds = 3
    h_model = task.model_fn(0)
    state, msg = server_init(get_params(h_model), ServerConfig(algorithm="fedavg"))
    for _ in range(rounds):
        upd = client_step(h_model, task.clients[0], msg, cfg)
        state, msg = server_step(state, [upd])
    ref = task.model_fn(0)
    opt = torch.optim.SGD(ref.parameters(), lr=cfg.lr)
    data = task.clients[0]
    for r in range(rounds):
        for idx in batch_indices(
            data.num_examples, cfg.batch_size, cfg.local_steps, round_seed(cfg.seed, r, 0)
        ):
            opt.zero_grad()
            nn.functional.mse_loss(ref(data.x[idx]), data.y[idx]).backward()
            opt.step()
    _close(state.params, get_params(ref), 1e-6)


def test_fedprox_matches_hand_computed_steps() -> None:
    task = linear_task()
    mu, lr, k = 0.7, 0.1, 3
    cfg = ClientConfig(
        algorithm="fedprox",
        lr=lr,
        batch_size=6,
        local_steps=k,
        loss="mse",
        options=FedProxConfig(prox_mu=mu),
    )
    model = task.model_fn(0)
    _, msg = server_init(get_params(model), ServerConfig(algorithm="fedprox"))
    upd = client_step(model, task.clients[0], msg, cfg)
    # by hand: w <- w - lr (grad f(w) + mu (w - w_t)), with closed-form MSE gradients
    w, b = msg.params["weight"].clone(), msg.params["bias"].clone()
    w0, b0 = w.clone(), b.clone()
    data = task.clients[0]
    for idx in batch_indices(data.num_examples, 6, k, round_seed(0, 0, 0)):
        x, y = data.x[idx], data.y[idx]
        err = x @ w.T + b - y  # [B, 1]
        gw = 2 * err.T @ x / len(idx)
        gb = 2 * err.sum(0) / len(idx)
        w, b = w - lr * (gw + mu * (w - w0)), b - lr * (gb + mu * (b - b0))
    _close(upd.delta, {"weight": w - w0, "bias": b - b0}, 1e-5)
    plain = client_step(task.model_fn(0), data, msg, cfg.replace(options=FedProxConfig(0.0)))
    assert not torch.allclose(plain.delta["weight"], upd.delta["weight"])


def test_scaffold_control_variates_by_hand() -> None:
    task = blobs_task(num_clients=3, n=20)
    lr, k = 0.1, 4
    cfg = ClientConfig(algorithm="scaffold", lr=lr, batch_size=8, local_steps=k)
    model = task.model_fn(0)
    state, msg = server_init(get_params(model), ServerConfig(algorithm="scaffold", num_clients=3))
    ups = [client_step(model, task.clients[i], msg, cfg) for i in (0, 1)]
    for u in ups:  # round 0: c = c_i = 0, so c_i+ = (x - y) / (K lr) = -delta / (K lr)
        for name, d in u.delta.items():
            torch.testing.assert_close(u.extras[f"dc/{name}"], -d / (k * lr))
            torch.testing.assert_close(u.client_state[f"c/{name}"], -d / (k * lr))
    new, msg2 = server_step(state, ups)
    for name in state.params:
        want = sum(u.extras[f"dc/{name}"] for u in ups) / 3  # (|S| / N) * mean = sum / N
        torch.testing.assert_close(new.buffers[f"c/{name}"], want)
        torch.testing.assert_close(msg2.extras[f"c/{name}"], want)
    # round 1, client 0: every local gradient gets c - c_0 added (check the first step by hand)
    one = cfg.replace(local_steps=1)
    upd = client_step(model, task.clients[0], msg2, one, ups[0].client_state)
    set_params(model, msg2.params)
    idx = next(batch_indices(task.clients[0].num_examples, 8, 1, round_seed(0, 1, 0)))
    model.zero_grad()
    nn.functional.cross_entropy(model(task.clients[0].x[idx]), task.clients[0].y[idx]).backward()
    for name, p in model.named_parameters():
        corr = msg2.extras[f"c/{name}"] - ups[0].client_state[f"c/{name}"]
        torch.testing.assert_close(upd.delta[name], -lr * (p.grad + corr), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ["fedadam", "fedyogi", "fedadagrad"])
def test_fedopt_server_step_by_hand(rule: str) -> None:
    task = blobs_task(num_clients=2, n=16)
    _, sc = make_configs(rule, {"server_lr": 0.1})
    opt = sc.options_as(FedOptConfig)
    model = task.model_fn(0)
    state, msg = server_init(get_params(model), sc)
    cfg = ClientConfig(algorithm=rule, local_steps=2)
    ups = [client_step(model, task.clients[i], msg, cfg) for i in (0, 1)]
    new, _ = server_step(state, ups)
    n = [u.num_examples for u in ups]
    for name, p0 in state.params.items():
        d = sum(ni * u.delta[name] for ni, u in zip(n, ups, strict=True)) / sum(n)
        m = (1 - opt.beta1) * d
        v0 = torch.full_like(d, opt.tau**2)
        if rule == "fedadam":
            v = opt.beta2 * v0 + (1 - opt.beta2) * d * d
        elif rule == "fedyogi":
            v = v0 - (1 - opt.beta2) * d * d * torch.sign(v0 - d * d)
        else:
            v = v0 + d * d
        torch.testing.assert_close(new.params[name], p0 + sc.server_lr * m / (v.sqrt() + opt.tau))


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_every_algorithm_learns(algo: str) -> None:
    task = blobs_task(num_clients=4, n=40)
    cc, sc = make_configs(algo, {"lr": 0.1, "local_steps": 5, "batch_size": 10})
    h = simulate(task, cc, sc, rounds=6, participation=0.5, seed=0)
    assert h.rounds[0].metric < 0.6
    assert h.final() > 0.85, f"{algo}: accuracy {h.series('metric')}"
    assert all(not r.rejected for r in h.rounds)


def test_same_seed_same_history() -> None:
    task = blobs_task()
    cc, sc = make_configs("fedng", {"fisher_type": "mc", "local_steps": 3, "aggregation": "fisher"})

    def run(seed: int) -> list:
        h = simulate(task, cc, sc, rounds=3, participation=0.5, seed=seed)
        return [
            (r.metric, r.test_loss, r.bytes_up, r.bytes_down, r.participants, repr(r.train_loss))
            for r in h.rounds
        ]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_client_config_must_match_the_message() -> None:
    task = blobs_task()
    _, msg = server_init(get_params(task.model_fn(0)), ServerConfig(algorithm="fedavg"))
    with pytest.raises(ValueError, match="must match"):
        client_step(task.model_fn(0), task.clients[0], msg, ClientConfig(algorithm="fedprox"))
