"""FIPA's tasks: the Poisson PINN against its analytic solution, LoRA clients (fedng's adapters
and peft's) send only adapter parameters and are captured by the curvature hooks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from fedng.curvature import CurvatureCapture
from fedng.federated.client import get_params
from fedng.federated.config import make_configs
from fedng.federated.round import client_step, server_init, server_step
from fedng.federated.tasks.base import mlp, seeded_model
from fedng.federated.tasks.lora import add_lora
from fedng.federated.tasks.lora_finetune import lora_model, lora_task
from fedng.federated.tasks.pinn import (
    RESIDUAL_SCALE,
    PoissonPINN,
    exact_solution,
    pinn_task,
    residual_inputs,
    source,
    value_inputs,
)
from fedng.federated.tasks.registry import TASKS, make_task
from torch import nn


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _second_derivative(fn: object, x: torch.Tensor) -> torch.Tensor:
    """d^2 fn / dx^2 at each x [n, 1] by nested autograd (float64)."""
    assert callable(fn)
    x = x.clone().requires_grad_(True)
    u = fn(x)
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    (d2u,) = torch.autograd.grad(du.sum(), x)
    return d2u


def test_source_is_minus_the_laplacian_of_the_analytic_solution() -> None:
    x = torch.linspace(0, 1, 101, dtype=torch.float64).unsqueeze(1)
    torch.testing.assert_close(-_second_derivative(exact_solution, x), source(x))
    assert float(exact_solution(torch.tensor([0.0, 1.0], dtype=torch.float64)).abs().max()) < 1e-12


def test_pinn_residual_matches_autograd_and_vanishes_at_the_solution() -> None:
    """The model's closed-form residual is -u''/pi^2 of its own u (checked by nested autograd),
    u meets the boundary conditions, and the task's targets are the residual of u*: a model
    equal to u* would have zero training loss."""
    model = seeded_model(lambda: PoissonPINN(16), 0).double()
    x = torch.rand(40, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    res = model(residual_inputs(x))
    d2u = _second_derivative(lambda t: model(value_inputs(t)), x)
    torch.testing.assert_close(res, -d2u * RESIDUAL_SCALE)
    ends = model(value_inputs(torch.tensor([[0.0], [1.0]], dtype=torch.float64)))
    assert float(ends.detach().abs().max()) == 0.0
    task = pinn_task(num_clients=4, num_points=200)
    for c in task.clients:
        xc = c.x[:, :1].double()
        assert bool((c.x[:, 1] == 1).all())
        target = -_second_derivative(exact_solution, xc) * RESIDUAL_SCALE
        torch.testing.assert_close(c.y.double(), target, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(task.y_test, exact_solution(task.x_test[:, :1]))


def test_pinn_clients_own_disjoint_sub_intervals() -> None:
    task = pinn_task(num_clients=5, num_points=300)
    spans = sorted(
        (float(torch.cat([c.x, c.x_val])[:, 0].min()), float(torch.cat([c.x, c.x_val])[:, 0].max()))
        for c in task.clients
    )
    for (_, hi), (lo, _) in itertools.pairwise(spans):
        assert hi < lo
    assert "pinn" in TASKS and make_task("pinn", num_clients=3).name == "pinn-poisson1d"


def test_pinn_learns_with_fipa() -> None:
    task = pinn_task(num_clients=4, num_points=160, width=16)
    from fedng.federated.simulator import simulate

    cc, sc = make_configs("fipa", {"lr": 0.03, "local_steps": 10, "batch_size": 20, "rank": 8})
    h = simulate(task, cc, sc, rounds=3, seed=0)
    assert math.isfinite(h.final()) and h.final() < 0.9 * h.rounds[0].metric


def test_lora_model_trains_only_adapters() -> None:
    model = lora_model(0, rank=4)
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in k or ".lora_B." in k for k in names)
    base = lora_model(1, rank=4)  # another adapter seed: the same frozen base
    for (k, p), (_, q) in zip(model.named_parameters(), base.named_parameters(), strict=True):
        if "base_layer" in k:
            assert torch.equal(p, q)


@pytest.mark.parametrize("algo", ["fipa", "fedavg", "fedng"])
def test_lora_clients_send_only_adapter_params(algo: str) -> None:
    task = lora_task(num_clients=3, rank=4)
    own = {"fisher_samples": 32} if algo == "fipa" else {}
    cc, sc = make_configs(algo, {"lr": 0.1, "local_steps": 2, "batch_size": 16, **own})
    model = task.model_fn(0)
    frozen = {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}
    state, msg = server_init(get_params(model), sc)
    adapters = {k for k in state.params}
    assert adapters and all("lora_" in k for k in adapters)
    upd = client_step(model, task.clients[0], msg, cc)
    assert set(upd.delta) == adapters
    d = sum(v.numel() for v in state.params.values())
    full = sum(p.numel() for p in model.parameters())
    assert d < full / 4
    if algo == "fedavg":  # bytes are the adapters' (fp32) plus headers; FedNG/FIPA add curvature
        assert 4 * d < upd.nbytes < 4 * d + 4096
    new, _ = server_step(state, [upd])
    assert new.log["accepted"] == [0] and set(new.params) == adapters
    for k, p in model.named_parameters():
        if k in frozen:
            assert torch.equal(p, frozen[k])


def test_lora_adapters_are_captured_like_any_linear() -> None:
    model = add_lora(seeded_model(lambda: mlp([6, 5, 3]), 0), rank=2)
    cap = CurvatureCapture(model, warn=True)
    try:
        blocks = sorted(b.spec.name for b in cap.blocks)
    finally:
        cap.remove()
    assert blocks == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]


@pytest.mark.slow  # importing peft (and transformers) takes 10-30 s
def test_peft_lora_model_trains_only_adapters_and_is_captured() -> None:
    pytest.importorskip("peft")
    model = add_lora(seeded_model(lambda: mlp([6, 5, 3]), 0), rank=2, backend="peft")
    names = {k for k, p in model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in k for k in names)
    cap = CurvatureCapture(model, warn=True)
    try:
        blocks = [b.spec.name for b in cap.blocks]
    finally:
        cap.remove()
    assert len(blocks) == 4 and all("lora_" in b for b in blocks)
    task = lora_task(num_clients=2, rank=4, backend="peft")
    flat = {"lr": 0.1, "local_steps": 2, "batch_size": 16, "rank": 4, "fisher_samples": 32}
    cc, sc = make_configs("fipa", flat)
    model = task.model_fn(0)
    state, msg = server_init(get_params(model), sc)
    upd = client_step(model, task.clients[0], msg, cc)
    assert set(upd.delta) == set(state.params) and all("lora_" in k for k in upd.delta)
    new, _ = server_step(state, [upd])
    assert new.log["accepted"] == [0]


def test_lora_task_is_registered_and_shifted() -> None:
    task = make_task("lora-digits", num_clients=4)
    assert "lora-digits" in TASKS and task.name.startswith("lora-digits")
    model = task.model_fn(0)
    model.eval()
    with torch.no_grad():
        acc = float((model(task.x_test).argmax(1) == task.y_test).float().mean())
    assert 0.2 < acc < 0.9  # the pre-trained model transfers, but not fully (domain shift)


def test_add_lora_rejects_bad_targets() -> None:
    with pytest.raises(ValueError, match=r"add_lora: target 'nope' is not an nn\.Linear"):
        add_lora(mlp([3, 2]), targets=["nope"])
    with pytest.raises(ValueError, match="LoRALinear: 'rank' must be >= 1"):
        add_lora(mlp([3, 2]), rank=0)
    with pytest.raises(ValueError, match="'backend'"):
        add_lora(nn.Sequential(nn.Linear(2, 2)), backend="x")  # type: ignore[arg-type]
