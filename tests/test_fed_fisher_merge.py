"""Fisher-weighted aggregation equals the closed form `(sum p F + lam I)^-1 sum p F delta`."""

from __future__ import annotations

import pytest
import torch
from _fed import blobs_task
from fedng.curvature import CurvatureSet, to_matrix
from fedng.federated.aggregation import (
    fisher_weighted_step,
    merge_diag,
    merge_kfac,
    merge_lowrank,
    weights_of,
)
from fedng.federated.algorithms.curvature_payload import decoded_all
from fedng.federated.client import get_params
from fedng.federated.config import make_configs
from fedng.federated.messages import ClientUpdate
from fedng.federated.round import client_step, server_init

W = [0.2, 0.5, 0.3]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _spd(n: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, n + 2, generator=gen, dtype=torch.float64)
    return x @ x.T / n


def test_diag_closed_form() -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,)]
    diags = [[torch.rand(s, generator=gen) for s in shapes] for _ in W]
    deltas = [[torch.randn(s, generator=gen) for s in shapes] for _ in W]
    lam = [0.1, 0.01]
    out = merge_diag(diags, deltas, W, lam)
    for i in range(len(shapes)):
        f = [torch.diag(d[i].reshape(-1).double()) for d in diags]
        x = torch.linalg.solve(
            sum(w * fk for w, fk in zip(W, f, strict=True))
            + lam[i] * torch.eye(f[0].shape[0], dtype=torch.float64),
            sum(
                w * fk @ dl[i].reshape(-1).double() for w, fk, dl in zip(W, f, deltas, strict=True)
            ),
        )
        torch.testing.assert_close(out[i].reshape(-1).double(), x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dims", [[20, 9], [5]])  # [5]: K r >= d, the dense path
def test_lowrank_closed_form(dims: list[int]) -> None:
    gen = torch.Generator().manual_seed(1)
    r = 2
    us = [[torch.linalg.qr(torch.randn(d, r, generator=gen))[0] for d in dims] for _ in W]
    ss = [[3 * torch.rand(r, generator=gen) for _ in dims] for _ in W]
    deltas = [[torch.randn(d, generator=gen) for d in dims] for _ in W]
    lam = [0.05] * len(dims)
    out = merge_lowrank(us, ss, deltas, W, lam)
    for i, d in enumerate(dims):
        f = [(u[i] * s[i]).double() @ u[i].T.double() for u, s in zip(us, ss, strict=True)]
        x = torch.linalg.solve(
            sum(w * fk for w, fk in zip(W, f, strict=True))
            + lam[i] * torch.eye(d, dtype=torch.float64),
            sum(w * fk @ dl[i].double() for w, fk, dl in zip(W, f, deltas, strict=True)),
        )
        torch.testing.assert_close(out[i].double(), x, rtol=1e-4, atol=1e-5)


def test_mean_prior_center() -> None:
    """With the prior centered on the mean delta: (sum pF + lam I)^-1 (sum pF delta + lam c)."""
    gen = torch.Generator().manual_seed(4)
    a = [[_spd(3, gen).float()] for _ in W]
    g = [[_spd(2, gen).float()] for _ in W]
    deltas = [[torch.randn(2, 3, generator=gen)] for _ in W]
    c = [sum(w * d[0] for w, d in zip(W, deltas, strict=True))]
    out, _ = merge_kfac(a, g, deltas, W, [0.3], iters=200, tol=1e-10, prior=c)
    f = [torch.kron(ak[0].double(), gk[0].double()) for ak, gk in zip(a, g, strict=True)]
    b = sum(w * fk @ d[0].double().T.reshape(-1) for w, fk, d in zip(W, f, deltas, strict=True))
    lhs = sum(w * fk for w, fk in zip(W, f, strict=True)) + 0.3 * torch.eye(6, dtype=torch.float64)
    x = torch.linalg.solve(lhs, b + 0.3 * c[0].double().T.reshape(-1))
    torch.testing.assert_close(out[0].double(), x.reshape(3, 2).T, rtol=1e-4, atol=1e-5)
    # huge lambda: FedAvg; no curvature seen (diag of zeros): FedAvg too
    big, _ = merge_kfac(a, g, deltas, W, [1e8], prior=c)
    torch.testing.assert_close(big[0], c[0], rtol=1e-4, atol=1e-5)
    zero = merge_diag([[torch.zeros(2, 3)] for _ in W], deltas, W, [0.1], c)
    torch.testing.assert_close(zero[0], c[0])


def test_kfac_cg_closed_form() -> None:
    gen = torch.Generator().manual_seed(2)
    shapes = [(4, 5), (3, 6)]
    a = [[_spd(n, gen).float() for _, n in shapes] for _ in W]
    g = [[_spd(m, gen).float() for m, _ in shapes] for _ in W]
    deltas = [[torch.randn(m, n, generator=gen) for m, n in shapes] for _ in W]
    lam = [0.1, 0.02]
    out, info = merge_kfac(a, g, deltas, W, lam, iters=200, tol=1e-9)
    assert info["cg_rel_residual"] < 1e-5
    for i, (m, n) in enumerate(shapes):
        # vec by columns: vec(G X A) = (A ⊗ G) vec(X) for symmetric A
        f = [torch.kron(ak[i].double(), gk[i].double()) for ak, gk in zip(a, g, strict=True)]
        b = sum(
            w * fk @ dl[i].double().T.reshape(-1) for w, fk, dl in zip(W, f, deltas, strict=True)
        )
        x = torch.linalg.solve(
            sum(w * fk for w, fk in zip(W, f, strict=True))
            + lam[i] * torch.eye(m * n, dtype=torch.float64),
            b,
        )
        torch.testing.assert_close(out[i].double(), x.reshape(n, m).T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("curvature", ["kfac", "diag", "kfac,2=diag"])
def test_fisher_weighted_step_on_real_payloads(curvature: str) -> None:
    """End to end: clients' decoded payloads -> the dense closed form on every block."""
    task = blobs_task(num_clients=3, n=30)
    cc, sc = make_configs(
        "fedng",
        {"curvature": curvature, "local_steps": 3, "aggregation": "fisher", "precond": "none"},
    )
    model = task.model_fn(0)
    _, msg = server_init(get_params(model), sc)
    ups = [ClientUpdate.from_bytes(client_step(model, c, msg, cc).to_bytes()) for c in task.clients]
    sets = decoded_all(ups)
    step, _ = fisher_weighted_step(ups, sets, 1e-2, 500, 1e-10)
    ws = weights_of(ups)
    pooled = CurvatureSet.combine(sets, ws)
    lams = pooled.relative_damping(1e-2)
    for kind, idx in sets[0].groups.items():
        for j, i in enumerate(idx):
            lay = sets[0].layouts[i]
            dense = []
            for s in sets:
                rep = s.reps[kind]
                if kind == "kfac":
                    dense.append(torch.kron(rep.A[j].double(), rep.G[j].double()))
                else:
                    dense.append(torch.diag(rep.diag[j].double().T.reshape(-1)))
            vecs = [to_matrix(u.delta, lay).double().T.reshape(-1) for u in ups]
            lhs = sum(w * f for w, f in zip(ws, dense, strict=True))
            x = torch.linalg.solve(
                lhs + lams[kind][j] * torch.eye(lhs.shape[0], dtype=torch.float64),
                sum(w * f @ v for w, f, v in zip(ws, dense, vecs, strict=True)),
            )
            got = to_matrix(step, lay).double().T.reshape(-1)
            torch.testing.assert_close(got, x, rtol=2e-3, atol=1e-5)
