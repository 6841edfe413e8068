"""K-FAC against explicit math: per-sample quantities from torch.func, dense Kronecker solves."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from fedng.curvature import kfac as kfac_mod
from fedng.curvature.capture import CurvatureCapture
from fedng.curvature.kfac import KFAC
from fedng.curvature.stats import BlockStats
from fedng.optim.natural_gradient import NaturalGradient
from torch import nn

F64 = torch.float64
TOL = {"f64": 1e-10, "f32": 1e-4}


def capture_stats(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[CurvatureCapture, list[BlockStats | None]]:
    cap = CurvatureCapture(model, dtype=F64)
    cap.recording = True
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return cap, cap.collect()


def fitted(cap: CurvatureCapture, stats: list[BlockStats | None]) -> KFAC:
    k = KFAC([b.spec for b in cap.blocks], F64)
    k.update(stats, decay=0.5)  # first update: takes the batch as is
    return k


def per_sample(
    fn, params: dict[str, torch.Tensor], *batched: torch.Tensor
) -> dict[str, torch.Tensor]:
    return torch.func.vmap(torch.func.grad(fn), in_dims=(None, *([0] * len(batched))))(
        params, *batched
    )


def test_mlp_factors_equal_per_sample_math() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(11, 5, dtype=F64), torch.randint(0, 3, (11,))
    cap, stats = capture_stats(model, x, y)
    k = fitted(cap, stats)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, p, (xb.unsqueeze(0),))
        return F.cross_entropy(out, yb.unsqueeze(0))

    psg = per_sample(loss, params, x, y)
    h = torch.tanh(x @ params["0.weight"].T + params["0.bias"])
    ones = torch.ones(11, 1, dtype=F64)
    for i, (a, gb) in enumerate([(x, psg["0.bias"]), (h, psg["2.bias"])]):
        at = torch.cat([a, ones], 1)
        torch.testing.assert_close(k.A[i], at.T @ at / 11, rtol=TOL["f64"], atol=TOL["f64"])
        # a Linear layer's per-sample bias gradient is its per-sample output gradient
        torch.testing.assert_close(k.G[i], gb.T @ gb / 11, rtol=TOL["f64"], atol=TOL["f64"])


def test_conv2d_factors_equal_per_sample_math() -> None:
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, 3, stride=1, padding=1).double()
    head = nn.Sequential(nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).double()
    model = nn.Sequential(conv, head)
    x, y = torch.randn(6, 2, 4, 4, dtype=F64), torch.randint(0, 4, (6,))
    cap, stats = capture_stats(model, x, y)
    k = fitted(cap, stats)
    with torch.no_grad():
        h = conv(x)
    hp = {n: p.detach() for n, p in head.named_parameters()}

    def loss(hb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(head, hp, (hb.unsqueeze(0),))
        return F.cross_entropy(out, yb.unsqueeze(0))

    dh = torch.func.vmap(torch.func.grad(loss))(h, y)  # [B, C, H, W] per-sample
    rows = dh.flatten(2).transpose(1, 2).reshape(-1, 3)
    torch.testing.assert_close(k.G[0], rows.T @ rows / 6, rtol=TOL["f64"], atol=TOL["f64"])
    patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18)
    pt = torch.cat([patches, torch.ones(len(patches), 1, dtype=F64)], 1)
    torch.testing.assert_close(k.A[0], pt.T @ pt / len(pt), rtol=TOL["f64"], atol=TOL["f64"])


def test_embedding_factors_equal_per_sample_math() -> None:
    torch.manual_seed(3)
    emb = nn.Embedding(9, 4).double()
    head = nn.Sequential(nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).double()
    model = nn.Sequential(emb, head)
    ids, y = torch.randint(0, 9, (5, 3)), torch.randint(0, 3, (5,))
    cap, stats = capture_stats(model, ids, y)
    k = fitted(cap, stats)
    hp = {n: p.detach() for n, p in head.named_parameters()}

    def loss(eb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            torch.func.functional_call(head, hp, (eb.unsqueeze(0),)), yb.unsqueeze(0)
        )

    de = torch.func.vmap(torch.func.grad(loss))(emb(ids).detach(), y).reshape(-1, 4)
    torch.testing.assert_close(k.G[0], de.T @ de / 5, rtol=TOL["f64"], atol=TOL["f64"])
    counts = torch.bincount(ids.reshape(-1), minlength=9).to(F64) / 15
    torch.testing.assert_close(k.A[0], counts)


def test_one_linear_one_sample_is_exact() -> None:
    torch.manual_seed(4)
    lin = nn.Linear(4, 3).double()
    x, y = torch.randn(1, 4, dtype=F64), torch.tensor([2])
    lam = 1e-2
    params = {n: p.detach() for n, p in lin.named_parameters()}
    psg = torch.func.grad(lambda p: F.cross_entropy(torch.func.functional_call(lin, p, (x,)), y))(
        params
    )
    w = torch.cat([psg["weight"], psg["bias"][:, None]], 1).reshape(-1)
    fisher = torch.outer(w, w)  # the exact Fisher of one sample
    ng = NaturalGradient(lin, damping=lam, damping_mode="tikhonov", inverse_every=1, kl_clip=None)
    lin.zero_grad()
    F.cross_entropy(lin(x), y).backward()
    v = torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1).reshape(-1).clone()
    ng.step()
    p = torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1).reshape(-1)
    k = ng.representations["kfac"]
    torch.testing.assert_close(torch.kron(k.G[0], k.A[0]), fisher, rtol=TOL["f64"], atol=TOL["f64"])
    root = math.sqrt(lam)
    eye = torch.eye
    damped = torch.kron(k.G[0] + root * eye(3, dtype=F64), k.A[0] + root * eye(5, dtype=F64))
    torch.testing.assert_close(p, torch.linalg.solve(damped, v), rtol=1e-9, atol=1e-12)
    # A = a a^T and G = g g^T are rank one, so the damped K-FAC step is the dense Tikhonov step
    # (F + λ' I)^-1 g with λ' = sqrt(λ)(|a|^2 + |g|^2) + λ.
    a2, g2 = float(k.A[0].trace()), float(k.G[0].trace())
    lam_eff = root * (a2 + g2) + lam
    dense = torch.linalg.solve(fisher + lam_eff * eye(15, dtype=F64), v)
    torch.testing.assert_close(p, dense, rtol=1e-9, atol=1e-12)


def test_ema_and_running_mean() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4)).double()
    batches = [(torch.randn(6, 3, dtype=F64), torch.randint(0, 4, (6,))) for _ in range(3)]
    singles = []
    for x, y in batches:
        cap, st = capture_stats(model, x, y)
        singles.append((st, fitted(cap, st)))
    specs = singles[0][1].specs
    ema, mean = KFAC(specs, F64), KFAC(specs, F64)
    for st, _ in singles:
        ema.update(st, decay=0.9)
        mean.update(st, decay=None)
    a = [s[1].A[0] for s in singles]
    torch.testing.assert_close(ema.A[0], 0.9 * (0.9 * a[0] + 0.1 * a[1]) + 0.1 * a[2])
    torch.testing.assert_close(mean.A[0], (a[0] + a[1] + a[2]) / 3)
    assert ema.counts == [3]


def test_batch_form_equals_dense_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 20)).double()
    x, y = torch.randn(4, 32, dtype=F64), torch.randint(0, 20, (4,))
    cap, stats = capture_stats(model, x, y)
    k = fitted(cap, stats)
    k.inverse(1e-2)
    grads = [b.grad_matrix(F64) for b in cap.blocks]
    calls: list[bool] = []
    real = kfac_mod.trusted.kron_precondition

    def spy(*args, **kwargs):
        inputs = kwargs["inputs"] if "inputs" in kwargs else (args[3] if len(args) > 3 else None)
        calls.append(inputs is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(kfac_mod.trusted, "kron_precondition", spy)
    dense = k.precondition(grads)
    batch = k.precondition(grads, stats)
    assert calls == [False, True]
    for d, b in zip(dense, batch, strict=True):
        torch.testing.assert_close(b, d, rtol=1e-9, atol=1e-12)
    # a gradient the recorded batch does not explain (e.g. a penalty term): dense form again
    calls.clear()
    bent = [g + 0.1 * torch.randn_like(g) for g in grads]
    for d, b in zip(k.precondition(bent), k.precondition(bent, stats), strict=True):
        torch.testing.assert_close(b, d, rtol=1e-9, atol=1e-12)
    assert calls == [False, False]


def test_embedding_precondition_matches_dense_kronecker() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Embedding(6, 3), nn.Flatten(), nn.Linear(6, 2)).double()
    cap, stats = capture_stats(model, torch.randint(0, 6, (4, 2)), torch.randint(0, 2, (4,)))
    k = fitted(cap, stats)
    lam = 0.05
    k.inverse(lam)
    grad = cap.blocks[0].grad_matrix(F64)  # [dim 3, vocab 6]
    p = k.precondition([grad, None])[0]
    r = math.sqrt(lam)
    dense = torch.kron(k.G[0] + r * torch.eye(3, dtype=F64), torch.diag(k.A[0] + r))
    expected = torch.linalg.solve(dense, grad.reshape(-1)).reshape(3, 6)
    torch.testing.assert_close(p, expected, rtol=1e-9, atol=1e-12)


def test_factored_damping_pi() -> None:
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    cap, stats = capture_stats(model, torch.randn(7, 5, dtype=F64), torch.randint(0, 3, (7,)))
    k = fitted(cap, stats)
    lam = 1e-3
    rep = k.inverse(lam, factored=True)
    for i, spec in enumerate(k.specs):
        pi = math.sqrt((float(k.A[i].trace()) / spec.n) / (float(k.G[i].trace()) / spec.m))
        assert rep.names[2 * i : 2 * i + 2] == [f"{spec.name}.A", f"{spec.name}.G"]
        assert rep.damping[2 * i].item() == pytest.approx(pi * math.sqrt(lam), rel=1e-12)
        assert rep.damping[2 * i + 1].item() == pytest.approx(math.sqrt(lam) / pi, rel=1e-12)
        expected = torch.linalg.inv(k.A[i] + pi * math.sqrt(lam) * torch.eye(spec.n, dtype=F64))
        torch.testing.assert_close(k.a_inv[i], expected, rtol=1e-9, atol=1e-12)


def test_failed_inverse_keeps_previous_and_validate_names_block() -> None:
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    cap, stats = capture_stats(model, torch.randn(5, 3, dtype=F64), torch.randint(0, 2, (5,)))
    k = fitted(cap, stats)
    k.inverse(1e-3)
    before = k.a_inv[1].clone()
    k.A[1][0, 0] = float("nan")
    rep = k.inverse(1e-3)
    assert rep.failed == ["2.A"]
    torch.testing.assert_close(k.a_inv[1], before)
    with pytest.raises(ValueError, match="kfac block '2' A has NaN"):
        k.validate()
    k.A[1] = torch.eye(5, dtype=F64)
    k.A[1][0, 1] = 0.5
    with pytest.raises(ValueError, match="kfac block '2' A is not symmetric"):
        k.validate()
    k.A[1] = -torch.eye(5, dtype=F64)
    with pytest.raises(ValueError, match="kfac block '2' A is not positive semi-definite"):
        k.validate()
    k.A[1] = torch.eye(5, dtype=F64)
    k.validate()


def test_update_rejects_bad_arguments() -> None:
    k = KFAC([], F64)
    with pytest.raises(ValueError, match="'decay'"):
        k.update([], decay=1.5)
    with pytest.raises(ValueError, match="'stats' must have 0 entries"):
        k.update([None])


def test_probe_vectors_are_fixed_per_block_and_shared() -> None:
    """`probe_vectors` (the batch-form test's vectors, also used by the fused step): shapes
    [m], [n] in the representation's dtype, the same cached tensors on every call, the same
    values in another instance, different per block."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    cap, _ = capture_stats(model, torch.randn(6, 5), torch.randint(0, 3, (6,)))
    specs = [b.spec for b in cap.blocks]
    a, b = KFAC(specs, F64), KFAC(specs, F64)
    for i, s in enumerate(specs):
        u, v = a.probe_vectors(i)
        assert u.shape == (s.m,) and v.shape == (s.n,) and u.dtype == F64
        assert a.probe_vectors(i)[0] is u  # cached: the fused plan keeps these tensors
        assert torch.equal(b.probe_vectors(i)[0], u) and torch.equal(b.probe_vectors(i)[1], v)
    assert KFAC(specs, torch.float32).probe_vectors(0)[0].dtype == torch.float32
    assert not torch.equal(a.probe_vectors(0)[0][:3], a.probe_vectors(1)[0][:3])
