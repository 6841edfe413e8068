"""`fedng.ops.trusted` and the flat-buffer step: same bits as the validated path, contract kept.

The trusted entry points skip every check, so the tests prove three things: they give exactly
what the public ops give; fedng's own callers (K-FAC, NaturalGradient over several models and
representations) satisfy the public ops' validation when routed through it (`trusted.CHECK`);
and NaturalGradient's flat-buffer fast path rewrites `.grad` like the per-block path.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from _tols import assert_close
from fedng import ops, reference
from fedng.ops import trusted
from fedng.ops.damped_cholesky_inverse import alloc_like
from fedng.optim.gather import FlatGrads
from fedng.optim.natural_gradient import NaturalGradient
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

F64 = torch.float64


def spd(n: int, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(n + 3, n, generator=g, dtype=F64)
    return (x.T @ x / (n + 3)).to(dtype)


@settings(max_examples=15, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9), st.integers(0, 6)), max_size=5),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_trusted_ops_give_the_public_ops_bits(
    sizes: list[tuple[int, int, int]], dtype: torch.dtype, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    ms, ns, bs = [s[0] for s in sizes], [s[1] for s in sizes], [s[2] for s in sizes]
    a_inv = [spd(n, g, dtype) for n in ns]
    g_inv = [spd(m, g, dtype) for m in ms]

    def rand(r: int, c: int) -> torch.Tensor:
        return torch.randn(r, c, generator=g, dtype=F64).to(dtype)

    grads = [rand(m, n) for m, n in zip(ms, ns, strict=True)]
    rows_a = [rand(b, n) for b, n in zip(bs, ns, strict=True)]
    rows_g = [rand(b, m) for b, m in zip(bs, ms, strict=True)]
    # kron_accumulate (in place)
    f1, f2 = [t.clone() for t in a_inv], [t.clone() for t in a_inv]
    scale = [0.5 + i for i in range(len(f1))]
    ops.kron_accumulate(f1, rows_a, 0.9, scale)
    trusted.kron_accumulate(f2, rows_a, 0.9, scale)
    assert all(torch.equal(x, y) for x, y in zip(f1, f2, strict=True))
    # kron_precondition: dense, batch form, and into given outputs
    want = ops.kron_precondition(grads, a_inv, g_inv)
    assert all(
        torch.equal(x, y)
        for x, y in zip(want, trusted.kron_precondition(grads, a_inv, g_inv), strict=True)
    )
    outs = [torch.full((m, n), float("nan"), dtype=dtype) for m, n in zip(ms, ns, strict=True)]
    got = trusted.kron_precondition(grads, a_inv, g_inv, outs=outs)
    assert all(x is y for x, y in zip(got, outs, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(want, got, strict=True))
    want_b = ops.kron_precondition(None, a_inv, g_inv, inputs=rows_a, output_grads=rows_g)
    got_b = trusted.kron_precondition(None, a_inv, g_inv, rows_a, rows_g)
    assert all(torch.equal(x, y) for x, y in zip(want_b, got_b, strict=True))
    # damped_cholesky_inverse
    lam = [1e-2 * (i + 1) for i in range(len(a_inv))]
    r1 = ops.damped_cholesky_inverse(a_inv, lam)
    r2 = trusted.damped_cholesky_inverse(a_inv, lam)
    assert torch.equal(r1.status, r2.status) and torch.equal(r1.damping, r2.damping)
    assert all(torch.equal(x, y) for x, y in zip(r1.inverses, r2.inverses, strict=True))


def test_inverses_of_many_matrices_share_one_block_per_size() -> None:
    """Thousands of tiny matrices: one allocation per distinct size; every output is a
    contiguous, non-overlapping view, and the results match the float64 reference."""
    g = torch.Generator().manual_seed(3)
    sizes = [3, 5, 3, 1, 5, 5, 3, 7, 1, 3, 0, 5]
    mats = [spd(n, g, torch.float64) for n in sizes]
    outs = alloc_like(mats)
    assert [tuple(o.shape) for o in outs] == [(n, n) for n in sizes]
    assert all(o.is_contiguous() for o in outs)
    spans = sorted((o.data_ptr(), o.data_ptr() + o.numel() * 8) for o in outs if o.numel())
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), "outputs overlap"
    assert len({o.untyped_storage().data_ptr() for o in outs if o.numel()}) == 4
    res = ops.damped_cholesky_inverse(mats, 1e-3)
    for m, inv in zip(mats, res.inverses, strict=True):
        ref = reference.damped_cholesky_inverse_ref([m], 1e-3)[0]
        assert_close(inv, ref, F64, "damped_cholesky_inverse")


class Mixed(nn.Module):
    """Embedding, convolution, normalization and linear layers in one model."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.conv = nn.Conv1d(6, 8, 3, padding=1, groups=2)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)
        self.extra = nn.Parameter(torch.zeros(5))  # no block covers it

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        return self.head(torch.tanh(self.norm(h))).mean(1) + self.extra


def _run(model: nn.Module, curvature: object, fast: bool, steps: int = 12) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = copy.deepcopy(model)
    ng = NaturalGradient(
        model,
        curvature=curvature,  # type: ignore[arg-type]
        inverse_every=3,
        lr=0.1,
        rank=4,
        warn_unsupported=False,
    )
    if not fast:
        ng._flat = None
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 11, (7, 5), generator=g)
        y = torch.randint(0, 5, (7,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(ids), y).backward()
        ng.step()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("curvature", ["kfac", "diag", {"default": "kfac", "head": "lowrank"}])
def test_internal_calls_pass_the_public_validation(
    monkeypatch: pytest.MonkeyPatch, curvature: object
) -> None:
    """With every trusted call validated as the public op would, nothing is rejected and the
    training run is bit-identical to the unchecked one."""
    torch.manual_seed(2)
    model = Mixed().double()
    plain = _run(model, curvature, fast=True)
    monkeypatch.setattr(trusted, "CHECK", True)
    checked = _run(model, curvature, fast=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, checked, strict=True))


@pytest.mark.parametrize("curvature", ["kfac", "diag"])
def test_flat_buffers_rewrite_grads_like_the_per_block_path(
    monkeypatch: pytest.MonkeyPatch, curvature: str
) -> None:
    """The fast path (flat buffers, one reduction for finiteness and the KL clip) trains like the
    per-block path; the KL clip is active (lr 0.1, default kl_clip), so its product is used."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(7, 9), nn.ReLU(), nn.Linear(9, 3)).double()
    wrapped = nn.Sequential(model)

    def run(fast: bool) -> tuple[list[torch.Tensor], int]:
        m = copy.deepcopy(wrapped)
        ng = NaturalGradient(m, curvature=curvature, inverse_every=2, lr=0.1)
        if not fast:
            ng._flat = None
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(5)
        for _ in range(8):
            x, y = (
                torch.randn(16, 7, generator=g, dtype=F64),
                torch.randint(0, 3, (16,), generator=g),
            )
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            ng.step()
            opt.step()
        return [p.detach().clone() for p in m.parameters()], int(ng.stats["clipped_steps"])

    used: list[float] = []
    real = FlatGrads.write_back
    monkeypatch.setattr(FlatGrads, "write_back", lambda self, s: used.append(s) or real(self, s))
    fast, clipped_fast = run(True)
    # K-FAC writes into the buffers (the fast path); the diagonal Fisher takes the per-block one
    assert (len(used) > 0) == (curvature == "kfac")
    slow, clipped_slow = run(False)
    assert clipped_fast == clipped_slow > 0
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_flat_path_still_skips_non_finite_gradients() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    ng = NaturalGradient(model, lr=0.1)
    assert ng._flat is not None
    F.cross_entropy(model(torch.randn(5, 4)), torch.randint(0, 3, (5,))).backward()
    model[0].bias.grad[1] = float("inf")
    with pytest.warns(Warning):
        ng.step()
    assert ng.last["skipped"] and model[0].weight.grad is None
