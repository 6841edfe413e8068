"""bf16 GEMMs in the fused K-FAC step (`fedng.ops.bf16_gemm`, `NaturalGradient(bf16=...)`):
the GEMM against float64 within its stated bound, factors and steps against a float64 run of
the same model, the kernel's caller-updated layers, skipped steps, and the switches.

The bf16 routine is MKL's, inside torch's CPU library; without it these tests are skipped. They
do not need bf16 instructions (MKL emulates them, slowly): `fast` is forced on."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _tols import assert_close, tol
from fedng.curvature.stats import fisher_scale
from fedng.ops import bf16_gemm, trusted
from fedng.ops.kfac_step import KfacStepPlan
from fedng.optim.fused_kfac import BF16_MIN, FusedKFAC
from fedng.optim.natural_gradient import NaturalGradient
from torch import nn

F32, F64 = torch.float32, torch.float64
U = 2.0**-8  # bf16's unit roundoff

pytestmark = pytest.mark.skipif(
    bf16_gemm._symbol() is None, reason="MKL's cblas_gemm_bf16bf16f32 not in torch's library"
)


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bf16_gemm, "_FAST", True)


def test_gemm_refuses_what_mkl_would_misread() -> None:
    """Wrong dtypes, non-contiguous operands and shapes that do not chain raise ValueError
    before any pointer reaches MKL."""
    a, b = torch.ones(4, 3).bfloat16(), torch.ones(3, 5).bfloat16()
    out = torch.zeros(4, 5)
    bf16_gemm.gemm(out, a, b)
    assert torch.equal(out, torch.full((4, 5), 3.0))
    bad = [
        (out.double(), a, b, False),  # float64 out
        (out, a.float(), b, False),  # float32 a
        (out, a, b.t().contiguous().t(), False),  # non-contiguous b
        (out, a, b, True),  # a^T is [3, 4]
        (torch.zeros(4, 6), a, b, False),  # out too wide
    ]
    for o, x, y, trans in bad:
        with pytest.raises(ValueError, match="bf16_gemm"):
            bf16_gemm.gemm(o, x, y, trans_a=trans)


def test_gemm_within_its_bound() -> None:
    """`alpha op(a) b + beta out` from bf16 inputs: equal to float64 on the rounded inputs up to
    float32 accumulation, and within `(2u + u^2) |op(a)| |b|` (+ accumulation) of the exact
    product; `gram` is exactly symmetric and PSD."""
    gen = torch.Generator().manual_seed(0)
    for p, r, q, trans in [(7, 300, 33, False), (40, 65, 20, True), (1, 1, 1, False)]:
        a = torch.randn((r, p) if trans else (p, r), generator=gen)
        b = torch.randn(r, q, generator=gen)
        c0 = torch.randn(p, q, generator=gen)
        out = c0.clone()
        bf16_gemm.gemm(out, a.bfloat16(), b.bfloat16(), alpha=0.5, beta=0.75, trans_a=trans)
        a16, a64 = a.bfloat16().double(), a.double()
        if trans:
            a16, a64 = a16.t(), a64.t()
        rounded = 0.5 * a16 @ b.bfloat16().double() + 0.75 * c0.double()
        assert_close(out, rounded, F32, "default")
        exact = 0.5 * a64 @ b.double() + 0.75 * c0.double()
        mag = 0.5 * a64.abs() @ b.double().abs()
        slack = (2 * U + U * U) * mag + tol(F32, "default").rtol * (mag + c0.double().abs())
        assert bool(((out.double() - exact).abs() <= slack + 1e-6).all())
    x = torch.randn(50, 257, generator=gen)
    gram = torch.full((257, 257), float("nan"))
    bf16_gemm.gram(gram, x.bfloat16(), alpha=1 / 50, beta=0.0)  # beta 0: NaN not read
    assert torch.equal(gram, gram.t())
    assert float(torch.linalg.eigvalsh(gram.double()).min()) > -1e-5
    assert_close(gram, x.bfloat16().double().t() @ x.bfloat16().double() / 50, F32, "default")


def test_fast_needs_the_symbol_the_hardware_and_no_opt_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bf16_gemm, "_FAST", None)
    monkeypatch.setenv("FEDNG_BF16", "0")
    assert bf16_gemm.fast() is False
    monkeypatch.setattr(bf16_gemm, "_FAST", None)
    monkeypatch.delenv("FEDNG_BF16")
    monkeypatch.setattr(bf16_gemm, "_cpu_has_bf16", lambda: False)
    assert bf16_gemm.fast() is False


def mlp(widths: list[int], dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(dtype)


def train(
    model: nn.Module, dtype: torch.dtype, steps: int, nowg: bool = False, **kw: Any
) -> tuple[NaturalGradient, list[torch.Tensor], nn.Module]:
    """`steps` steps of K-FAC (absolute damping, no KL clip) on fixed random batches; returns the
    optimizer, the last step's preconditioned gradients and the model."""
    model = copy.deepcopy(model).to(dtype)
    ng = NaturalGradient(model, damping=1e-2, kl_clip=None, inverse_every=2, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    d_in = next(model.parameters()).shape[1]
    for _ in range(steps):
        x = torch.randn(32, d_in, generator=gen).to(dtype)
        y = torch.randint(0, 3, (32,), generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        ng.backward(loss) if nowg else loss.backward()  # type: ignore[func-returns-value]
        ng.step()
        grads = [p.grad.detach().clone() for p in model.parameters()]  # type: ignore[union-attr]
        opt.step()
    return ng, grads, model


def test_bf16_factors_are_the_grams_of_the_rounded_rows(
    fast: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backward-error statement of `bf16="factors"`: after one step, every factor equals
    the float64 Gram of the recorded rows rounded to bf16 (a_scale [x 1]^T [x 1], g_scale g^T g)
    to float32 accumulation. (The forward error of the step is that perturbation of the rows,
    at most 2^-8 relative, carried through the damped inverse: as for any change of the batch.)"""
    seen: list[Any] = []
    inner = FusedKFAC.take

    def take(self: FusedKFAC, *a: Any, **k: Any) -> Any:
        rows = inner(self, *a, **k)
        seen.append(rows)
        return rows

    monkeypatch.setattr(FusedKFAC, "take", take)
    model = mlp([BF16_MIN + 44, BF16_MIN + 44, 3], F64)
    ng, _, _ = train(model, F32, 1, bf16="factors")
    assert ng._fused is not None and ng._fused.bf16_blocks == (0, 1)
    kf = ng._fused.kfac
    rows = seen[0]
    r16 = lambda t: t.detach().bfloat16().double()  # noqa: E731
    for i, (x, g) in enumerate(zip(rows.x, rows.g, strict=True)):
        b = x.shape[0]
        x1 = torch.cat([r16(x), torch.ones(b, 1, dtype=F64)], 1)
        assert torch.equal(kf.A[i], kf.A[i].t()) and torch.equal(kf.G[i], kf.G[i].t())
        assert_close(kf.A[i], x1.t() @ x1 / b, F32, "default")
        assert_close(kf.G[i], r16(g).t() @ r16(g) * fisher_scale(b, "mean"), F32, "default")


@pytest.mark.parametrize("nowg", [False, True])
def test_bf16_products_within_their_tolerance(
    nowg: bool, fast: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`bf16="all"` against `"factors"` (the same factors and inverses): one step's
    preconditioned gradients within `kfac_bf16[all]`, with `loss.backward()` (the batch form
    of a large block) and with `ng.backward` (the rows-only step); the products did run."""
    products = 0
    inner = bf16_gemm.gemm

    def counted(*a: Any, **k: Any) -> None:
        nonlocal products
        products += 1
        inner(*a, **k)

    model = mlp([BF16_MIN + 44, BF16_MIN + 44, 3], F64)  # block 0 takes the batch form
    monkeypatch.setattr(bf16_gemm, "gemm", counted)
    _, want, _ = train(model, F32, 1, nowg, bf16="factors")
    grams, products = products, 0  # the same run's bf16 calls without the products
    ng, got, _ = train(model, F32, 1, nowg, bf16="all")
    assert ng._fused is not None and ng._fused.bf16_products
    assert grams > 0 and products > grams  # the Grams plus the products
    for a, b in zip(got, want, strict=True):
        assert_close(a, b.double(), F32, "kfac_bf16[all]")


def test_bf16_off_narrow_or_float64_is_the_float32_step(fast: None) -> None:
    """Nothing changes with `bf16="off"`, blocks narrower than `BF16_MIN` or a float64 model;
    the default is "off" (bf16 is opt-in)."""
    assert NaturalGradient(mlp([3, 2], F32)).bf16 == "off"
    wide = mlp([20, BF16_MIN + 44, 3], F64)
    narrow = mlp([20, BF16_MIN - 2, 3], F64)  # n = 255 with the bias
    for model, dtype, mode in [(wide, F32, "off"), (narrow, F32, "all"), (wide, F64, "all")]:
        a, ga, _ = train(model, dtype, 2, bf16=mode)
        _, gb, _ = train(model, dtype, 2, bf16="off")
        assert a._fused is not None and a._fused.bf16_blocks == ()
        assert all(torch.equal(x, y) for x, y in zip(ga, gb, strict=True))
    with pytest.raises(ValueError, match="bf16"):
        NaturalGradient(narrow, bf16="half")


@pytest.mark.filterwarnings("ignore:.*gradient was not finite")
def test_bf16_skipped_step_changes_no_factor(fast: None) -> None:
    """A step with a non-finite gradient is skipped before the bf16 fold: factors unchanged."""
    model = mlp([20, BF16_MIN + 44, 3], F32)
    ng, _, model = train(model, F32, 2, bf16="factors")
    kf = ng._fused.kfac  # type: ignore[union-attr]
    before = [t.clone() for t in kf.A + kf.G]
    x = torch.randn(32, 20)
    x[0, 0] = math.nan
    model.zero_grad()
    F.cross_entropy(model(x), torch.zeros(32, dtype=torch.long)).backward()
    ng.step()
    assert ng.last["skipped"]
    assert all(torch.equal(a, b) for a, b in zip(kf.A + kf.G, before, strict=True))


@pytest.mark.parametrize("check", [False, True])
def test_plan_leaves_the_callers_factors(check: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers in `own` are not updated (also under CHECK); the others as without `own`."""
    monkeypatch.setattr(trusted, "CHECK", check)
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (3, 6)]  # (m, k), both with a bias
    xs = [torch.randn(7, k, generator=gen, dtype=F64) for _, k in shapes]
    gs = [torch.randn(7, m, generator=gen, dtype=F64) for m, _ in shapes]

    def plan() -> KfacStepPlan:
        a = [torch.eye(k + 1, dtype=F64) for _, k in shapes]
        g = [torch.eye(m, dtype=F64) for m, _ in shapes]
        w = [torch.zeros(m, k + 1, dtype=F64) for m, k in shapes]
        o = [torch.zeros(m, k + 1, dtype=F64) for m, k in shapes]
        u = [torch.ones(m, dtype=F64) for m, _ in shapes]
        v = [torch.ones(k + 1, dtype=F64) for _, k in shapes]
        return KfacStepPlan(a, g, w, o, u, v, [True, True])

    kw = {"decay": [0.5, 0.5], "a_scale": [0.25, 0.25], "g_scale": [2.0, 2.0]}
    mine, full = plan(), plan()
    mine(xs, gs, **kw, update=True, inverses=None, own=(1,))
    full(xs, gs, **kw, update=True, inverses=None)
    assert torch.equal(mine.factors[0][0], full.factors[0][0])
    assert torch.equal(mine.factors[1][0], full.factors[1][0])
    assert torch.equal(mine.factors[0][1], torch.eye(7, dtype=F64))
    assert torch.equal(mine.factors[1][1], torch.eye(3, dtype=F64))
