"""FIPA: the aggregation against its closed form, the client's Fisher against dense float64
references, one client, the warm-up schedule, payload checks."""

from __future__ import annotations

import pytest
import torch
from _fed import blobs_task, linear_task
from fedng.federated.aggregation.lowrank_fisher import eigenpair_step, sketch_step
from fedng.federated.client import get_params
from fedng.federated.client.lowrank_fisher import (
    fipa_omega,
    fisher_rows,
    sketch_and_product,
    top_eigenpairs,
)
from fedng.federated.config import ClientConfig, FIPAConfig, ServerConfig, make_configs
from fedng.federated.round import client_step, server_init, server_step
from fedng.federated.simulator import simulate
from fedng.federated.tasks.base import mlp, seeded_model
from torch import nn


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _problem(
    m: int, d: int, rank: int, seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
    """M PSD matrices H_m of rank `rank` [d, d], deltas [d], weights."""
    gen = torch.Generator().manual_seed(seed)
    hs = []
    for _ in range(m):
        a = torch.randn(d, rank, generator=gen, dtype=torch.float64)
        hs.append(a @ a.T)
    deltas = [torch.randn(d, generator=gen, dtype=torch.float64) for _ in range(m)]
    w = torch.rand(m, generator=gen, dtype=torch.float64) + 0.2
    return hs, deltas, (w / w.sum()).tolist()


def _dense(
    hs: list[torch.Tensor], deltas: list[torch.Tensor], p: list[float], null_space: str
) -> torch.Tensor:
    """The closed form with dense matrices: H^+ sum p H_m delta_m (+ (I - H^+ H) mean)."""
    h = sum(w * hm for w, hm in zip(p, hs, strict=True))
    assert isinstance(h, torch.Tensor)
    hp = torch.linalg.pinv(h, hermitian=True, rtol=1e-9)
    step = hp @ sum(w * hm @ dm for w, hm, dm in zip(p, hs, deltas, strict=True))
    if null_space == "mean":
        mean = sum(w * dm for w, dm in zip(p, deltas, strict=True))
        assert isinstance(mean, torch.Tensor)
        step = step + mean - hp @ (h @ mean)
    return step


def _eig(h: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    lam, u = torch.linalg.eigh(h)
    return u[:, -r:], lam[-r:]


@pytest.mark.parametrize("null_space", ["mean", "drop"])
@pytest.mark.parametrize(("m", "d", "rank"), [(3, 12, 2), (2, 6, 6), (4, 20, 5)])
def test_eigenpair_step_equals_closed_form(null_space: str, m: int, d: int, rank: int) -> None:
    hs, deltas, p = _problem(m, d, rank, seed=m * 100 + d)
    pairs = [_eig(h, rank) for h in hs]
    step, log = eigenpair_step(
        deltas, [u for u, _ in pairs], [s for _, s in pairs], p, cutoff=1e-12, null_space=null_space
    )
    torch.testing.assert_close(step, _dense(hs, deltas, p, null_space), rtol=1e-7, atol=1e-9)
    assert log["fipa_rank"] == min(d, m * rank)


def test_eigenpair_step_uses_only_the_top_eigenpairs() -> None:
    """With r below a client's rank the step is the closed form of the truncated Fishers."""
    hs, deltas, p = _problem(3, 10, 4, seed=7)
    pairs = [_eig(h, 2) for h in hs]
    truncated = [u @ torch.diag(s) @ u.T for u, s in pairs]
    step, _ = eigenpair_step(deltas, [u for u, _ in pairs], [s for _, s in pairs], p, cutoff=1e-12)
    torch.testing.assert_close(step, _dense(truncated, deltas, p, "mean"), rtol=1e-7, atol=1e-9)


def test_pseudo_inverse_cutoff_drops_small_eigenvalues() -> None:
    """An eigenvalue of H at or below cutoff * lambda_max counts as zero (its direction gets the
    mean delta), one above it is inverted."""
    d = 4
    u = torch.eye(d, dtype=torch.float64)[:, :2]
    deltas = [torch.ones(d, dtype=torch.float64)]
    s = torch.tensor([1.0, 1e-7], dtype=torch.float64)
    step, log = eigenpair_step(deltas, [u], [s], [1.0], cutoff=1e-6, null_space="drop")
    assert log["fipa_rank"] == 1
    torch.testing.assert_close(step, torch.tensor([1.0, 0, 0, 0], dtype=torch.float64))
    step, log = eigenpair_step(deltas, [u], [s], [1.0], cutoff=1e-8, null_space="drop")
    assert log["fipa_rank"] == 2


@pytest.mark.parametrize("null_space", ["mean", "drop"])
def test_sketch_step_is_exact_when_the_rank_fits_the_sketch(null_space: str) -> None:
    m, d, rank, size = 3, 30, 2, 8  # rank(H) = 6 <= 8 sketch columns: Nystrom is exact
    hs, deltas, p = _problem(m, d, rank, seed=3)
    omega = fipa_omega(d, size, seed=5)
    step, log = sketch_step(
        deltas, [h @ omega for h in hs], [h @ dm for h, dm in zip(hs, deltas, strict=True)],
        omega, p, cutoff=1e-12, null_space=null_space,
    )  # fmt: skip
    torch.testing.assert_close(step, _dense(hs, deltas, p, null_space), rtol=1e-6, atol=1e-8)
    assert log["fipa_rank"] == m * rank


def test_sketch_step_error_within_the_nystrom_bound() -> None:
    """rank(H) > s: the step is exactly the pseudo-inverse of the Nystrom approximation H_hat
    applied to sum p c_m, and the mean nuclear-norm error of H_hat over sketch seeds is within
    (1 + k / (s - k - 1)) of the best rank-k error (Tropp et al. 2017), here k = 2."""
    m, d, rank, size, k = 4, 24, 3, 8, 2
    hs, deltas, p = _problem(m, d, rank, seed=11)
    h = sum(w * hm for w, hm in zip(p, hs, strict=True))
    assert isinstance(h, torch.Tensor)
    lam = torch.linalg.eigvalsh(h)
    best_k = float(lam[:-k].sum())
    errs = []
    for seed in range(20):
        omega = fipa_omega(d, size, seed)
        y = h @ omega
        core = omega.T @ y
        h_hat = y @ torch.linalg.pinv(core, hermitian=True) @ y.T
        errs.append(float(torch.linalg.matrix_norm(h - h_hat, "nuc")))
        cs = [hm @ dm for hm, dm in zip(hs, deltas, strict=True)]
        step, _ = sketch_step(
            deltas, [hm @ omega for hm in hs], cs, omega, p, cutoff=1e-6, null_space="drop"
        )
        c = sum(w * cm for w, cm in zip(p, cs, strict=True))
        assert isinstance(c, torch.Tensor)
        ref = torch.linalg.pinv(h_hat, hermitian=True, rtol=1e-6) @ c
        torch.testing.assert_close(step, ref, rtol=1e-5, atol=1e-6 * float(ref.norm()))
    assert sum(errs) / len(errs) <= (1 + k / (size - k - 1)) * best_k


def _dense_fisher(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str, kind: str
) -> torch.Tensor:
    """The mean Fisher by loops over samples (and outputs), float64."""
    params = [p for _, p in sorted(model.named_parameters()) if p.requires_grad]
    d = sum(p.numel() for p in params)
    f = torch.zeros(d, d, dtype=torch.float64)

    def gvec(scalar: torch.Tensor) -> torch.Tensor:
        gs = torch.autograd.grad(scalar, params, retain_graph=True)
        return torch.cat([g.reshape(-1) for g in gs]).double()

    for i in range(x.shape[0]):
        out = model(x[i : i + 1])
        if kind == "empirical":
            lf = nn.functional.mse_loss if loss == "mse" else nn.functional.cross_entropy
            g = gvec(lf(out, y[i : i + 1]))
            f += torch.outer(g, g)
        elif loss == "mse":
            for j in range(out.shape[1]):
                g = gvec(out[0, j])
                f += 2.0 / out.shape[1] * torch.outer(g, g)
        else:
            logp = torch.log_softmax(out, -1)[0]
            for c in range(out.shape[1]):
                g = gvec(logp[c])
                f += float(logp[c].detach().exp()) * torch.outer(g, g)
    return f / x.shape[0]


@pytest.mark.parametrize("kind", ["empirical", "true"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_fisher_rows_match_the_dense_fisher(kind: str, loss: str) -> None:
    model = seeded_model(lambda: mlp([4, 5, 3], nn.Tanh), 0).double()
    model[0].bias.requires_grad_(False)  # frozen parameters are left out
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    y = (
        torch.randn(9, 3, generator=gen, dtype=torch.float64)
        if loss == "mse"
        else torch.randint(0, 3, (9,), generator=gen)
    )
    rows = fisher_rows(model, x, y, loss, kind)  # type: ignore[arg-type]
    assert rows.shape[1] == 4 * 5 + 5 * 3 + 3
    torch.testing.assert_close(rows.T @ rows, _dense_fisher(model, x, y, loss, kind))


@pytest.mark.parametrize("eig", ["exact", "sketch"])
@pytest.mark.parametrize(("n", "d"), [(5, 12), (12, 5)])
def test_top_eigenpairs_are_those_of_the_fisher(eig: str, n: int, d: int) -> None:
    gen = torch.Generator().manual_seed(n)
    rows = torch.randn(n, d, generator=gen, dtype=torch.float64)
    f = rows.T @ rows
    r = 3
    u, s = top_eigenpairs(rows, r, eig=eig, oversample=max(n, d), seed=2)
    lam, vec = torch.linalg.eigh(f)
    torch.testing.assert_close(s, lam.flip(0)[:r])
    # the same subspace: U U^T equals the projector onto the top eigenvectors
    top = vec[:, -r:]
    torch.testing.assert_close(u @ u.T, top @ top.T, rtol=1e-6, atol=1e-8)
    u8, s8 = top_eigenpairs(rows, min(n, d) + 2, eig="exact")
    assert (s8[min(n, d) :] == 0).all() and (u8[:, min(n, d) :] == 0).all()


def test_sketch_payload_is_the_fisher_times_omega() -> None:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(7, 10, generator=gen, dtype=torch.float64)
    delta = torch.randn(10, generator=gen, dtype=torch.float64)
    y, c = sketch_and_product(rows, delta, 4, seed=3)
    f = rows.T @ rows
    torch.testing.assert_close(y, f @ fipa_omega(10, 4, 3))
    torch.testing.assert_close(c, f @ delta)


@pytest.mark.parametrize("algo", ["fipa", "fipa_sketch"])
def test_one_client_fipa_equals_its_update(algo: str) -> None:
    """FIPA with any rank; the summable variant when its sketch holds the Fisher's rank (here
    d = 4, so 4 columns: below that its H is the Nystrom approximation and c = H delta is not
    in its range)."""
    task = linear_task()
    rank = 2 if algo == "fipa" else 4
    cc, sc = make_configs(algo, {"lr": 0.05, "batch_size": 6, "local_steps": 4, "rank": rank})
    cc = cc.replace(loss="mse")
    model = task.model_fn(0)
    state, msg = server_init(get_params(model), sc)
    upd = client_step(model, task.clients[0], msg, cc)
    assert set(upd.extras) == ({"fipa_U", "fipa_S"} if algo == "fipa" else {"fipa_Y", "fipa_c"})
    new, _ = server_step(state, [upd])
    assert new.log["accepted"] == [0] and new.log["aggregation"] == algo
    for k in state.params:
        torch.testing.assert_close(new.params[k], state.params[k] + upd.delta[k])


def test_warmup_rounds_are_fedavg() -> None:
    """Before `warmup_rounds` no Fisher is computed or sent, and the round is FedAvg's."""
    task = blobs_task(num_clients=3, n=30)
    flat = {"lr": 0.1, "local_steps": 3, "batch_size": 10}
    cc, sc = make_configs("fipa", {**flat, "warmup_rounds": 2})
    ca, sa = make_configs("fedavg", flat)
    h = simulate(task, cc, sc, rounds=3, seed=0)
    ha = simulate(task, ca, sa, rounds=2, seed=0)
    for r in (1, 2):
        assert h.rounds[r].metric == ha.rounds[r].metric
        assert h.rounds[r].server_log.get("aggregation") == "mean"
    assert h.rounds[3].server_log["aggregation"] == "fipa"
    assert h.rounds[3].bytes_up > h.rounds[2].bytes_up


def test_bad_fisher_payloads_are_rejected() -> None:
    task = blobs_task(num_clients=3, n=30)
    cc, sc = make_configs("fipa", {"lr": 0.1, "local_steps": 2, "batch_size": 10, "rank": 2})
    model = task.model_fn(0)
    state, msg = server_init(get_params(model), sc)
    ups = [client_step(model, c, msg, cc) for c in task.clients]
    ups[0].extras["fipa_S"] = -ups[0].extras["fipa_S"] - 1.0
    ups[1].extras["fipa_U"] = 3 * ups[1].extras["fipa_U"] + 1.0
    new, _ = server_step(state, ups)
    assert new.log["accepted"] == [2]
    assert "negative Fisher eigenvalue" in new.log["rejected"][0][0]
    assert "norm" in new.log["rejected"][1][0]


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="FIPAConfig: 'fisher_type' must be one of"):
        FIPAConfig(fisher_type="mc")
    with pytest.raises(ValueError, match="FIPAConfig: 'cutoff'"):
        FIPAConfig(cutoff=1.5)
    with pytest.raises(ValueError, match="'null_space'"):
        eigenpair_step([torch.zeros(2)], [torch.eye(2)], [torch.ones(2)], [1.0], null_space="x")
    assert ClientConfig(algorithm="fipa").options_as(FIPAConfig).rank == 8
    assert ServerConfig(algorithm="fipa_sketch").options_as(FIPAConfig).warmup_rounds == 0


def test_no_curvature_at_all_gives_the_mean_delta() -> None:
    """Zero Fishers (e.g. a LoRA B still at zero sees no curvature in A): no eigenvalue is
    inverted, the step is the weighted mean delta (or zero with null_space "drop")."""
    d = 5
    deltas = [torch.ones(d, dtype=torch.float64), 3 * torch.ones(d, dtype=torch.float64)]
    omega = fipa_omega(d, 2, 0)
    zeros = [torch.zeros(d, 2, dtype=torch.float64)] * 2
    step, log = sketch_step(deltas, zeros, [torch.zeros(d)] * 2, omega, [1.0, 1.0])
    torch.testing.assert_close(step, 2 * torch.ones(d, dtype=torch.float64))
    assert log["fipa_rank"] == 0
    u = [torch.zeros(d, 2, dtype=torch.float64)] * 2
    step, _ = eigenpair_step(deltas, u, [torch.zeros(2)] * 2, [1.0, 1.0], null_space="drop")
    assert float(step.abs().max()) == 0.0
    with pytest.raises(ValueError, match="one entry per client"):
        eigenpair_step(deltas, u[:1], [torch.zeros(2)] * 2, [1.0, 1.0])


@pytest.mark.parametrize("fisher_samples", [0, 16])
def test_fipa_reads_a_dataset_client_like_tensors(fisher_samples: int) -> None:
    """A client holding a `Dataset` gets the same Fisher payload as one holding tensors."""
    from fedng.federated.tasks.base import ClientData
    from torch.utils.data import TensorDataset

    task = blobs_task(num_clients=1, n=40)
    c = task.clients[0]
    as_ds = ClientData.from_data(0, TensorDataset(c.x, c.y))
    flat = {"lr": 0.1, "local_steps": 2, "batch_size": 10, "fisher_samples": fisher_samples}
    cc, sc = make_configs("fipa", flat)
    model = task.model_fn(0)
    _, msg = server_init(get_params(model), sc)
    a, b = client_step(model, c, msg, cc), client_step(model, as_ds, msg, cc)
    for k in a.extras:
        torch.testing.assert_close(a.extras[k], b.extras[k])
