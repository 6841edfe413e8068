"""NaturalGradient's fused K-FAC step (`fedng.optim.fused_kfac`) against its general path: the
same `.grad`, factors, inverses and counters (float64, 1e-12) over steps that cross the inverse
cadence, with the trust region, relative damping and its floor, absolute damping, the batch
form, and the cases that must leave the fused step (tied layers, a skipped step, a failed
block)."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _tols import assert_close
from fedng.curvature.kfac import KFAC
from fedng.errors import CurvatureWarning
from fedng.ops import trusted
from fedng.optim.fused_kfac import FusedKFAC
from fedng.optim.natural_gradient import NaturalGradient
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

F64 = torch.float64


def mlp(widths: list[int], bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b, bias=bias or i == 0))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(F64)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def run(
    model: nn.Module, fused: bool, steps: int, batch: int, **kw: Any
) -> tuple[list[torch.Tensor], NaturalGradient, int]:
    """Trains `steps` steps; returns the parameters, the optimizer and the fused calls made."""
    params, ng, calls = train_as(model, "fused" if fused else "general", steps, batch, **kw)
    return params, ng, len(calls)


def train_as(
    model: nn.Module, how: str, steps: int, batch: int, extra: Any = None, **kw: Any
) -> tuple[list[torch.Tensor], NaturalGradient, list[int]]:
    """Trains a copy of `model` `steps` steps with `ng.backward(loss)` (how="rows"), or
    `loss.backward()` on the fused ("fused") or general ("general") path; `extra(model)` adds a
    term to the loss. Returns the parameters, the optimizer and, per fused call, how many weight
    gradients the step went without."""
    model = copy.deepcopy(model)
    ng = NaturalGradient(model, lr=0.05, **{"inverse_every": 3, **kw})
    if how == "general":
        ng._fused = None
    skipped: list[int] = []
    if ng._fused is not None:
        inner = ng._fused.step

        def counted(*a: Any, **k: Any) -> Any:
            skipped.append(len(a[8]) if len(a) >= 9 else 0)
            return inner(*a, **k)

        ng._fused.step = counted  # type: ignore[method-assign]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    d_in = next(p for p in model.parameters()).shape[1]
    for _ in range(steps):
        x = torch.randn(batch, d_in, generator=g, dtype=F64)
        y = torch.randint(0, 3, (batch,), generator=g)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if extra is not None:
            loss = loss + extra(model)
        if how == "rows":
            ng.backward(loss)
        else:
            loss.backward()
        ng.step()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], ng, skipped


def assert_same(
    a: NaturalGradient,
    b: NaturalGradient,
    pa: list[torch.Tensor],
    pb: list[torch.Tensor],
    trajectory: bool = False,
) -> None:
    """Equal parameters, factors (1e-12) and inverses (1e-10), counters and trust state; with
    `trajectory`, parameters and factors to the `kfac_trajectory` tolerance (tests/_tols.py)."""
    close = (
        (lambda x, y: assert_close(x, y, F64, "kfac_trajectory"))
        if trajectory
        else (lambda x, y: torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12))
    )
    for x, y in zip(pa, pb, strict=True):
        close(x, y)
    ka, kb = a.local_curvature.reps["kfac"], b.local_curvature.reps["kfac"]
    assert ka.counts == kb.counts  # type: ignore[attr-defined]
    for x, y in zip(ka.A + ka.G, kb.A + kb.G, strict=True):  # type: ignore[attr-defined]
        close(x, y)
    for x, y in zip(ka.a_inv + ka.g_inv, kb.a_inv + kb.g_inv, strict=True):  # type: ignore[attr-defined]
        close(x, y) if trajectory else torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    assert a.stats == b.stats
    assert a._batch_form == b._batch_form
    for k in ("kl_scale", "trust_radius", "damping"):
        assert (a.last[k] is None) == (b.last[k] is None)
        if a.last[k] is not None:
            assert a.last[k] == pytest.approx(b.last[k], rel=1e-12)


@pytest.mark.parametrize(
    "kw",
    [
        {},  # relative damping with its floor, adaptive trust region under the default kl_clip
        {"damping": 1e-3, "kl_clip": None},  # the bench's setting: absolute damping, unbounded
        {"damping": 1e-2, "trust": "fixed", "kl_clip": 1e-4, "curvature_decay": None},
        {"damping_mode": "factored"},
        {"damping": 1e-3, "kl_clip": None, "factor_every": 2},  # steps without factor update
        {"factor_every": 3, "inverse_every": 2},  # an inversion on a step without update
    ],
)
def test_fused_step_equals_the_general_step(kw: dict[str, Any]) -> None:
    model = mlp([7, 9, 8, 3])
    pa, a, calls = run(model, True, 8, 16, **kw)
    pb, b, _ = run(model, False, 8, 16, **kw)
    assert calls == 8
    assert_same(a, b, pa, pb)


def test_fused_batch_form_and_layers_without_bias() -> None:
    """Wide layers, few rows: the batch form (probe checked natively); biasless layers."""
    model = mlp([30, 40, 3], bias=False)
    pa, a, calls = run(model, True, 7, 4)
    pb, b, _ = run(model, False, 7, 4)
    assert calls == 7 and a._batch_form
    assert a._fused is not None and a._fused.plan().form.tolist() == [2, 1]  # the head: dense
    assert_same(a, b, pa, pb)


def test_tied_layers_and_other_sources_take_the_general_path() -> None:
    model = Tied().to(F64)
    pa, a, calls = run(model, True, 4, 8)
    pb, b, _ = run(model, False, 4, 8)
    assert a._fused is not None and calls == 0
    assert_same(a, b, pa, pb)
    assert NaturalGradient(mlp([4, 3]), fisher_type="mc")._fused is None
    assert NaturalGradient(mlp([4, 3]), curvature="diag")._fused is None


@pytest.mark.filterwarnings("ignore::fedng.errors.CurvatureWarning")
def test_skipped_step_and_reset_block_keep_the_paths_equal() -> None:
    """A non-finite gradient skips the step on both paths; a block whose curvature overflows
    is reset and stays unpreconditioned until re-inverted, through the general precondition."""
    model = mlp([5, 6, 3])
    outs = []
    for fused in (True, False):
        m = copy.deepcopy(model)
        ng = NaturalGradient(m, lr=0.05, inverse_every=2)
        if not fused:
            ng._fused = None
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(2)
        for t in range(7):
            x = torch.randn(8, 5, generator=g, dtype=F64)
            if t == 2:
                x[0, 0] = float("nan")
            if t == 4:
                x = x * 1e200  # the factors overflow: the block fails and is reset
            opt.zero_grad()
            F.cross_entropy(m(x), torch.randint(0, 3, (8,), generator=g)).backward()
            ng.step()
            opt.step()
        outs.append((ng, [p.detach().clone() for p in m.parameters()]))
    (a, pa), (b, pb) = outs
    assert a.stats["skipped_steps"] == 1
    assert_same(a, b, pa, pb)


def train(
    m: nn.Module, ng: NaturalGradient, opt: torch.optim.Optimizer, g: torch.Generator
) -> None:
    for _ in range(4):
        x = torch.randn(8, 6, generator=g, dtype=F64)
        opt.zero_grad()
        F.cross_entropy(m(x), torch.randint(0, 3, (8,), generator=g)).backward()
        ng.step()
        opt.step()


def test_resumed_optimizer_rebuilds_its_plan_on_the_loaded_factors() -> None:
    """`load_state_dict` replaces the factor tensors: the fused step must write the new ones."""
    model = mlp([6, 7, 3])
    done, plans = [], []
    for fused in (True, False):
        m = copy.deepcopy(model)
        first = NaturalGradient(m, lr=0.05, inverse_every=3)
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(4)
        train(m, first, opt, g)
        state = first.state_dict()
        first.remove()
        second = NaturalGradient(m, lr=0.05, inverse_every=3)
        if second._fused is not None:
            plans.append(second._fused.plan())  # built on the fresh factors, replaced by the load
            if not fused:
                second._fused = None
        second.load_state_dict(state)
        train(m, second, opt, g)
        done.append((second, [p.detach().clone() for p in m.parameters()]))
    (a, pa), (b, pb) = done
    assert a._fused is not None and a._fused.plan() is not plans[0]
    assert a._fused.plan().matches(a._fused.kfac.A, a._fused.kfac.G)
    assert_same(a, b, pa, pb)


# --- NaturalGradient.backward: wide layers preconditioned from their rows ----------------------


def run_rows(
    model: nn.Module, how: str, steps: int, batch: int, extra: Any = None, **kw: Any
) -> tuple[list[torch.Tensor], NaturalGradient, list[int]]:
    """`train_as` with kl_clip=None unless `kw` says otherwise (`NaturalGradient.backward`)."""
    return train_as(model, how, steps, batch, extra, **{"kl_clip": None, **kw})


WIDE = [7, 40, 30, 3]  # batch 6: the two hidden layers take the batch form, the head does not


@pytest.mark.parametrize(
    "kw",
    [
        {"damping": 1e-3},
        {"damping": 1e-3, "factor_every": 2},
        {},  # relative damping with its floor
        {"damping_mode": "factored", "curvature_decay": None},
    ],
)
def test_backward_without_weight_grads_equals_the_general_step(kw: dict[str, Any]) -> None:
    model = mlp(WIDE)
    pa, a, skipped = run_rows(model, "rows", 1, 6, **kw)
    pb, b, _ = run_rows(model, "general", 1, 6, **kw)
    assert skipped == [2]  # both hidden layers
    assert_same(a, b, pa, pb)  # one step: equal to rounding
    pa, a, skipped = run_rows(model, "rows", 4, 6, **kw)
    pb, b, _ = run_rows(model, "general", 4, 6, **kw)
    assert skipped == [2] * 4  # every step (crossing the inverse and factor cadences)
    assert_same(a, b, pa, pb, trajectory=True)


def test_backward_forms_the_weight_grads_a_step_needs() -> None:
    """Weight decay in the loss (a second edge into a weight), the KL clip, and a batch too
    large for the batch form: every weight gradient is formed, results unchanged."""
    model = mlp(WIDE)
    decay = lambda m: 1e-2 * m[0].weight.square().sum()  # noqa: E731
    for extra, kw, batch, left in [
        (decay, {"damping": 1e-3}, 6, [1] * 4),  # only the second hidden layer goes without
        (None, {"damping": 1e-3, "kl_clip": 1e-3}, 6, [0] * 4),
        (None, {"damping": 1e-3}, 64, [0] * 4),
    ]:
        pa, a, skipped = run_rows(model, "rows", 4, batch, extra, **kw)
        pb, b, _ = run_rows(model, "general", 4, batch, extra, **kw)
        assert skipped == left
        assert_same(a, b, pa, pb, trajectory=True)


def test_backward_weight_grads_formed_when_the_rows_do_not_explain_them() -> None:
    """A bias term in the loss (the bias gradient is not the rows' column sums), and two
    forward passes before one step (gradient accumulation): formed from the rows."""
    model = mlp(WIDE)
    bias_term = lambda m: 1e-1 * m[0].bias.sum()  # noqa: E731
    pa, a, skipped = run_rows(model, "rows", 4, 6, bias_term, damping=1e-3)
    pb, b, _ = run_rows(model, "general", 4, 6, bias_term, damping=1e-3)
    assert skipped == [0] * 4
    assert_same(a, b, pa, pb, trajectory=True)
    grads = []
    for how in ("rows", "general"):
        m = copy.deepcopy(model)
        ng = NaturalGradient(m, damping=1e-3, kl_clip=None)
        if how == "general":
            ng._fused = None
        x = torch.randn(6, 7, generator=torch.Generator().manual_seed(3), dtype=F64)
        y = torch.tensor([0, 1, 2, 0, 1, 2])
        for half in (x[:3], x[3:]):
            loss = F.cross_entropy(m(half), y[:3])
            ng.backward(loss) if how == "rows" else loss.backward()
        ng.step()
        grads.append([p.grad.clone() for p in m.parameters()])  # type: ignore[union-attr]
    for u, v in zip(*grads, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


def snapshot(model: nn.Module, ng: NaturalGradient) -> list[Any]:
    """What a step left: every `.grad` (copies), skipped, the reset count, the fallbacks."""
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    return [*grads, ng.last["skipped"], ng.stats["reset_blocks"], ng.last["fallbacks"]]


def assert_same_records(a: list[list[Any]], b: list[list[Any]]) -> None:
    """Two runs' `snapshot`s equal: tensors to 1e-10 (NaN where NaN), the rest exactly."""
    for u, v in zip(a, b, strict=True):
        for s, t in zip(u, v, strict=True):
            if isinstance(s, torch.Tensor) and isinstance(t, torch.Tensor):
                torch.testing.assert_close(s, t, rtol=1e-10, atol=1e-12, equal_nan=True)
            else:
                assert s == t


@pytest.mark.filterwarnings("ignore::fedng.errors.CurvatureWarning")
def test_backward_skipped_step_and_failed_block() -> None:
    """A NaN input skips the step (no weight gradient formed, all `.grad` None); an overflow
    that makes a factor fail falls back with the gradients formed from the rows."""
    model = mlp(WIDE)
    results = []
    for how in ("rows", "general"):
        m = copy.deepcopy(model)
        ng = NaturalGradient(m, damping=1e-3, kl_clip=None, inverse_every=1)
        if how == "general":
            ng._fused = None
        g = torch.Generator().manual_seed(2)
        for scale in (1.0, float("nan"), 1.0, 1e200, 1.0):
            x = torch.randn(6, 7, generator=g, dtype=F64) * scale
            y = torch.randint(0, 3, (6,), generator=g)
            loss = F.cross_entropy(m(x), y)
            ng.backward(loss) if how == "rows" else loss.backward()
            ng.step()
            results.append(snapshot(m, ng))
            m.zero_grad()
    half = len(results) // 2
    assert results[1][-3] is True and results[3][-2] == 1  # skipped; a block failed and reset
    assert_same_records(results[:half], results[half:])


@pytest.mark.parametrize("kw", [{"damping": 1e-3, "kl_clip": None}, {}])
def test_short_path_skips_and_falls_back_as_the_general_step(kw: dict[str, Any]) -> None:
    """The common step's short path (`NaturalGradient._quick`, with or without an inversion): a
    NaN input skips the step; finite gradients whose sum and outputs overflow are not skipped,
    fall back and reset the block, as the general path does (gradients, counters, fallbacks,
    warnings); so does an inverse whose products overflow (then on the general path)."""
    model = mlp(WIDE)
    results = []
    quick = []
    for how in ("fused", "general"):
        m = copy.deepcopy(model)
        ng = NaturalGradient(m, inverse_every=4, **kw)  # inversions at steps 0 and 4 only
        if how == "general":
            ng._fused = None
        else:
            inner = ng._quick

            def counted(t: int, factor_step: bool, inverse_step: bool, inner: Any = inner) -> bool:
                done = inner(t, factor_step, inverse_step)
                quick.append(done)
                return done

            ng._quick = counted  # type: ignore[method-assign]
        g = torch.Generator().manual_seed(2)
        with pytest.warns(CurvatureWarning) as warned:
            for t, scale in enumerate((1.0, float("nan"), 1.0, 1.0, 1.0)):
                x = torch.randn(6, 7, generator=g, dtype=F64) * scale
                y = torch.randint(0, 3, (6,), generator=g)
                F.cross_entropy(m(x), y).backward()
                if t == 2:  # finite entries whose sum (and outputs) overflow: not skipped
                    next(m.parameters()).grad.fill_(1e308)  # type: ignore[union-attr]
                if t == 3:  # an inverse whose products overflow
                    ng.local_curvature.reps["kfac"].a_inv[1].fill_(1e308)  # type: ignore[attr-defined]
                ng.step()
                results.append(snapshot(m, ng))
                m.zero_grad()
        results.append(sorted(str(w.message)[:40] for w in warned))
    # Step 0 (no curvature yet) and step 3 (a block reset at step 2) take the general path;
    # steps 1, 2 and 4 (an inversion) the short one.
    assert quick == [False, True, True, False, True]
    half = len(results) // 2
    assert results[1][-3] is True and results[2][-3] is False  # skipped; not skipped
    assert results[2][-2] >= 1 and results[2][-1]  # step 2: outputs overflow, fall back, reset
    assert_same_records(results[:half], results[half:])


def test_backward_refuses_a_non_scalar_loss() -> None:
    ng = NaturalGradient(mlp(WIDE), kl_clip=None)
    with pytest.raises(ValueError, match="backward: 'loss' must be a scalar"):
        ng.backward(torch.ones(2))


@pytest.mark.parametrize("kw", [{}, {"damping": 1e-3, "kl_clip": None}])
def test_large_batch_form_blocks_through_torch_equal_the_general_step(
    kw: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A block of at least `TORCH_MIN` entries taking the batch form is preconditioned with
    torch's GEMM inside the fused step (probe, batch form, dot): same results as the general
    path; a gradient the rows do not explain (weight decay in the loss) takes the dense form."""
    big = 0
    inner = FusedKFAC._precondition_big

    def counted(self: FusedKFAC, rows: Any, i: int) -> float:
        nonlocal big
        big += 1
        return inner(self, rows, i)

    monkeypatch.setattr(FusedKFAC, "_precondition_big", counted)
    model = mlp([7, 300, 260, 3])  # the 260 x 301 block: 78260 entries >= TORCH_MIN
    decay = lambda m: 1e-2 * m[2].weight.square().sum()  # noqa: E731
    for extra in (None, decay):
        pa, a, calls = train_as(model, "fused", 4, 6, extra, **kw)
        pb, b, _ = train_as(model, "general", 4, 6, extra, **kw)
        assert len(calls) == 4
        assert_same(a, b, pa, pb, trajectory=True)
    assert big >= 4


# The general path's probe (`KFAC._batch_rows`) reads a recorded input that requires grad.
@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True")
@settings(max_examples=15, deadline=None)
@given(
    widths=st.lists(st.integers(1, 40), min_size=2, max_size=4),
    batch=st.integers(1, 12),
    bias=st.booleans(),
)
def test_backward_on_ragged_mlps_equals_the_general_step(
    widths: list[int], batch: int, bias: bool
) -> None:
    """Any widths and batch (layers with and without a bias, batch 1, layers too narrow for the
    batch form): two steps with `ng.backward` equal two general steps."""
    model = mlp(widths[:1] + widths[1:] + [3], bias=bias)
    pa, a, _ = run_rows(model, "rows", 2, batch, damping=1e-3, inverse_every=1)
    pb, b, _ = run_rows(model, "general", 2, batch, damping=1e-3, inverse_every=1)
    assert_same(a, b, pa, pb, trajectory=True)


def test_fused_factors_are_mirrored_when_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused step writes the factors' lower triangles only (`KFAC.lower_only`): the stored
    upper triangles lag, reading `A` / `G` mirrors them (exactly symmetric, equal to the general
    path's), and the inversion in between reads the lower triangles only (1e-12 throughout).
    (Under `trusted.CHECK` the plan runs the validating op, which mirrors: not this test.)"""
    monkeypatch.setattr(trusted, "CHECK", False)
    model = mlp([5, 7, 3])
    fused_p, ng, _ = run(model, True, 4, 9)  # inverse_every 3: an inversion from lagging factors
    general_p, ref, _ = run(model, False, 4, 9)
    assert ng._fused is not None
    kfac, kfac_ref = ng._fused.kfac, ref.local_curvature.reps["kfac"]
    assert isinstance(kfac_ref, KFAC)
    stored_g = kfac.stored()[1]
    assert kfac._lagging and not torch.equal(stored_g[0], stored_g[0].T)
    for got, exp in zip(kfac.A + kfac.G, kfac_ref.A + kfac_ref.G, strict=True):
        assert torch.equal(got, got.T)
        assert_close(got, exp, F64, "kfac_step")
    assert not kfac._lagging and torch.equal(stored_g[0], stored_g[0].T)
    for a, b in zip(fused_p, general_p, strict=True):
        assert_close(a, b, F64, "kfac_step")


def test_lagging_factors_survive_pickle_and_old_pickles_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A KFAC pickled with lagging upper triangles mirrors them after loading; the state of one
    pickled before `A` / `G` became properties (plain attributes, no `_lagging`) loads too."""
    import pickle

    monkeypatch.setattr(trusted, "CHECK", False)
    model = mlp([5, 7, 3])
    _, ng, _ = run(model, True, 2, 9)
    assert ng._fused is not None
    kfac = ng._fused.kfac
    assert kfac._lagging
    back = pickle.loads(pickle.dumps(kfac))
    assert back._lagging == kfac._lagging
    for got, exp in zip(back.A + back.G, kfac.A + kfac.G, strict=True):
        assert torch.equal(got, exp) and torch.equal(got, got.T)
    old = {k: v for k, v in kfac.__dict__.items() if k != "_lagging"}
    old["A"], old["G"] = old.pop("_A"), old.pop("_G")
    loaded = KFAC.__new__(KFAC)
    loaded.__setstate__(old)
    assert all(torch.equal(a, b) for a, b in zip(loaded.A, kfac.A, strict=True))


def test_mirror_copies_entries_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a lagging factor copies each lower entry onto its mirror bit for bit (a -0.0
    stays -0.0; nothing is summed)."""
    monkeypatch.setattr(trusted, "CHECK", False)
    _, ng, _ = run(mlp([5, 7, 3]), True, 2, 9)
    assert ng._fused is not None
    kfac = ng._fused.kfac
    stored_a = kfac.stored()[0][0]
    stored_a[3, 1] = -0.0
    stored_a[1, 3] = 5.0  # stale
    kfac.lower_only([0])
    a = kfac.A[0]
    assert a[1, 3].item() == 0.0 and torch.signbit(a[1, 3]) and torch.equal(a, a.T)
