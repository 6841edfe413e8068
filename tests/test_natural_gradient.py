"""NaturalGradient: composes with torch.optim, schedules, damping modes, KL clipping, resume."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from fedng.curvature.block_diagonal import CurvatureSet
from fedng.curvature.capture import UnsupportedLayerWarning
from fedng.curvature.diagonal import DiagonalFisher
from fedng.curvature.kfac import KFAC
from fedng.curvature.lowrank import LowRankFisher
from fedng.optim.natural_gradient import NaturalGradient
from torch import nn

F64 = torch.float64


def mlp(seed: int = 0, dtype: torch.dtype = F64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def batches(n: int, seed: int = 1, dtype: torch.dtype = F64) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(12, 6, generator=g, dtype=dtype), torch.randint(0, 4, (12,), generator=g))
        for _ in range(n)
    ]


def train(
    model: nn.Module,
    ng: NaturalGradient,
    opt: torch.optim.Optimizer,
    data: list[tuple[torch.Tensor, ...]],
    closure: bool = False,
) -> list[float]:
    losses = []
    for x, y in data:
        opt.zero_grad()
        out = model(x)
        if ng.fisher_type == "mc":
            ng.mc_backward(out)
        loss = F.cross_entropy(out, y)
        loss.backward()
        ng.step(closure=(lambda x=x, y=y: F.cross_entropy(model(x), y)) if closure else None)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def raw_grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def test_step_rewrites_grad_with_the_representation() -> None:
    model = mlp()
    ng = NaturalGradient(model, damping=1e-2, kl_clip=None)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    before = [b.grad_matrix(F64) for b in ng.capture.blocks]
    ng.step()
    kfac = ng.representations["kfac"]
    diag = ng.representations["diag"]
    assert isinstance(kfac, KFAC) and isinstance(diag, DiagonalFisher)
    assert [s.name for s in kfac.specs] == ["0", "3"] and [s.name for s in diag.specs] == ["1"]
    expected = kfac.precondition([before[0], before[2]])
    torch.testing.assert_close(ng.capture.blocks[0].grad_matrix(F64), expected[0])
    torch.testing.assert_close(ng.capture.blocks[2].grad_matrix(F64), expected[1])
    torch.testing.assert_close(
        ng.capture.blocks[1].grad_matrix(F64), diag.precondition([before[1]])[0]
    )
    assert ng.last["preconditioned"] == ["0", "1", "3"]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("curvature", ["kfac", "diag", "lowrank"])
def test_composes_with_optimizers_and_trains(optimizer: str, curvature: str) -> None:
    model = mlp(2)
    # low rank: directions outside the sketch are scaled by 1/damping, so damp more
    damping = 0.3 if curvature == "lowrank" else 1e-2
    ng = NaturalGradient(
        model, curvature=curvature, damping=damping, inverse_every=3, rank=8, kl_clip=None
    )
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.2)
        if optimizer == "sgd"
        else torch.optim.Adam(model.parameters(), lr=1e-2)
    )
    x, y = batches(1, seed=3)[0]
    losses = train(model, ng, opt, [(x, y)] * 15)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0]


def test_factor_and_inverse_schedule() -> None:
    model = mlp()
    ng = NaturalGradient(model, factor_every=2, inverse_every=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    recording, inverted = [], []
    for x, y in batches(7):
        recording.append(ng.capture.recording)
        train(model, ng, opt, [(x, y)])
        if ng.last["inverse"] is not None:
            inverted.append(ng.last["step"])
    kfac = ng.representations["kfac"]
    assert kfac.counts == [4, 4]  # steps 0, 2, 4, 6
    assert inverted == [0, 3, 6]
    assert recording == [True, False, True, False, True, False, True]


class LateBranch(nn.Module):
    """`b` joins the forward pass only once `use_b` is set (a branch first seen mid-schedule)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(6, 4)
        self.use_b = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x) if self.use_b else self.a(x)


def test_a_block_is_preconditioned_from_its_first_curvature() -> None:
    """With the own curvature, a block first seen between inverse steps is inverted at once (its
    representation, off schedule); the schedule then goes on as before."""
    torch.manual_seed(3)
    model = LateBranch().double()
    ng = NaturalGradient(model, inverse_every=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    inverted, preconditioned = [], []
    for t, (x, y) in enumerate(batches(4)):
        model.use_b = t >= 2
        train(model, ng, opt, [(x, y)])
        inverted.append(ng.last["inverse"] is not None)
        preconditioned.append(ng.last["preconditioned"])
    assert inverted == [True, False, True, False]
    assert preconditioned == [["a"], ["a"], ["a", "b"], ["a", "b"]]


def test_warn_unsupported_false_is_silent() -> None:
    torch.manual_seed(10)
    model = WithFunctional().double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ng = NaturalGradient(model, warn_unsupported=False)
        model(torch.randn(6, 4, dtype=F64)).square().mean().backward()
        ng.step()
    assert ng.capture.unsupported and ng.last["preconditioned"] == ["a"]
    with pytest.raises(TypeError, match="'warn_unsupported' must be a bool"):
        NaturalGradient(mlp(), warn_unsupported=1)  # type: ignore[arg-type]


def test_kl_clip_scales_the_step() -> None:
    model = mlp()
    x, y = batches(1)[0]
    ref = copy.deepcopy(model)
    ng_ref = NaturalGradient(ref, damping=1e-2, kl_clip=None)
    F.cross_entropy(ref(x), y).backward()
    raw = raw_grads(ref)
    ng_ref.step()
    unclipped = raw_grads(ref)
    g_dot_p = sum(float((r * u).sum()) for r, u in zip(raw, unclipped, strict=True))
    lr, clip = 0.5, 1e-3
    nu = min(1.0, math.sqrt(clip / (lr * lr * g_dot_p)))
    assert nu < 1.0
    ng = NaturalGradient(model, damping=1e-2, kl_clip=clip, lr=lr)
    F.cross_entropy(model(x), y).backward()
    ng.step()
    assert ng.last["kl_scale"] == pytest.approx(nu, rel=1e-9)
    for got, u in zip(raw_grads(model), unclipped, strict=True):
        torch.testing.assert_close(got, nu * u)


def test_adaptive_damping_follows_the_reduction_ratio() -> None:
    x, y = batches(1, seed=4)[0]
    kw = dict(damping=1.0, damping_mode="adaptive", inverse_every=1, kl_clip=None)
    careful = NaturalGradient(mlp(), lr=1e-3, **kw)  # tiny step: the model is accurate, ρ ~ 1
    wild = NaturalGradient(mlp(), lr=1e3, **kw)  # huge step: the loss goes up, ρ < 0
    for ng in (careful, wild):
        opt = torch.optim.SGD(ng.model.parameters(), lr=0.0)
        train(ng.model, ng, opt, [(x, y)] * 3, closure=True)
    assert careful.last["rho"] == pytest.approx(1.0, abs=0.05)
    assert careful.damping == pytest.approx(0.95**2)
    assert wild.last["rho"] < 0.25 and wild.damping == pytest.approx(0.95**-2)
    with pytest.raises(ValueError, match="'closure'"):
        train(careful.model, careful, torch.optim.SGD(careful.model.parameters(), lr=0.0), [(x, y)])


def test_adaptive_leaves_parameters_and_buffers_untouched() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 4)).double()
    ng = NaturalGradient(model, damping_mode="adaptive", inverse_every=1, lr=0.1)
    data = batches(2)
    train(model, ng, torch.optim.SGD(model.parameters(), lr=0.0), data[:1])
    state = copy.deepcopy(model.state_dict())
    train(model, ng, torch.optim.SGD(model.parameters(), lr=0.0), data[1:], closure=True)
    running = model[1].running_mean.clone()
    assert ng.last["rho"] is not None
    for k, v in model.state_dict().items():
        if k.startswith("1.running") or k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(v, state[k]), k
    assert torch.equal(model[1].running_mean, running)


@pytest.mark.parametrize(
    "curvature,fisher,mode",
    [
        ("kfac", "empirical", "factored"),
        ("diag", "mc", "tikhonov"),
        ("lowrank", "mc", "tikhonov"),
        ("kfac", "mc", "adaptive"),
    ],
)
def test_resume_gives_the_identical_next_step(curvature: str, fisher: str, mode: str) -> None:
    data = batches(8, seed=6)
    kw = dict(
        curvature=curvature,
        fisher_type=fisher,
        damping_mode=mode,
        damping=1e-2,
        inverse_every=3,
        rank=6,
    )
    closure = mode == "adaptive"
    model = mlp(7)
    ng = NaturalGradient(model, **kw)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, ng, opt, data[:5], closure)
    saved = (
        copy.deepcopy(model.state_dict()),
        copy.deepcopy(opt.state_dict()),
        copy.deepcopy(ng.state_dict()),
    )
    train(model, ng, opt, data[5:], closure)
    clone = mlp(8)  # different initial weights: everything must come from the state dicts
    clone.load_state_dict(saved[0])
    ng2 = NaturalGradient(clone, **kw)
    opt2 = torch.optim.Adam(clone.parameters(), lr=1e-2)
    opt2.load_state_dict(saved[1])
    ng2.load_state_dict(saved[2])
    train(clone, ng2, opt2, data[5:], closure)
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)


def test_load_state_dict_rejects_another_configuration() -> None:
    ng = NaturalGradient(mlp(), curvature="kfac")
    other = NaturalGradient(mlp(), curvature="diag")
    with pytest.raises(ValueError, match="representations must be"):
        other.load_state_dict(ng.state_dict())
    with pytest.raises(ValueError, match="'state' must be a NaturalGradient state dict"):
        ng.load_state_dict({"steps": 1})


def test_autocast_bf16_forward_keeps_fp32_factors() -> None:
    x, y = batches(1, dtype=torch.float32)[0]
    steps = {}
    for amp in (False, True):
        model = mlp(9, torch.float32)
        ng = NaturalGradient(model, damping=1e-2)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        ng.step()
        k = ng.representations["kfac"]
        assert all(t.dtype == torch.float32 for t in k.A + k.G + k.a_inv + k.g_inv)
        steps[amp] = raw_grads(model)
    for a, b in zip(steps[True], steps[False], strict=True):
        assert float((a - b).norm()) <= 0.1 * float(b.norm())


def test_per_layer_curvature_mapping() -> None:
    model = mlp()
    ng = NaturalGradient(model, curvature={"0": "lowrank", nn.Linear: "kfac"}, rank=4)
    assert [s.name for s in ng.representations["lowrank"].specs] == ["0"]
    assert [s.name for s in ng.representations["kfac"].specs] == ["3"]
    assert isinstance(ng.representations["lowrank"], LowRankFisher)
    ng = NaturalGradient(mlp(), curvature={"Linear": "diag", "default": "kfac"})
    assert set(ng.representations) == {"diag"}
    with pytest.raises(ValueError, match=r"keys \['nope'\] match no layer"):
        NaturalGradient(mlp(), curvature={"nope": "kfac"})
    with pytest.raises(ValueError, match="'1', a normalization layer"):
        NaturalGradient(mlp(), curvature={"1": "kfac"})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"damping": -1.0}, "'damping' must be a finite float > 0, got -1.0"),
        ({"factor_every": 0}, "'factor_every' must be an int >= 1, got 0"),
        ({"inverse_every": 2.5}, "'inverse_every' must be an int >= 1, got 2.5"),
        ({"curvature_decay": 1.0}, "'curvature_decay' must be None or a float in"),
        ({"curvature": "dense"}, "'curvature' must be one of"),
        ({"damping_mode": "lm"}, "'damping_mode' must be one of"),
        ({"fisher_type": "true"}, "'fisher_type' must be one of"),
        ({"loss": "nll"}, "'loss' must be one of"),
        ({"kl_clip": 0.0}, "'kl_clip' must be None or a finite float > 0"),
        ({"damping_bounds": (1.0, 0.1)}, "'damping_bounds'"),
    ],
)
def test_argument_errors_name_the_argument(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        NaturalGradient(mlp(), **kwargs)


def test_mc_requires_the_fisher_pass() -> None:
    model = mlp()
    ng = NaturalGradient(model, fisher_type="mc")
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="mc_backward"):
        ng.step()
    empirical = NaturalGradient(mlp())
    with pytest.raises(ValueError, match="fisher_type='mc'"):
        empirical.mc_backward(mlp()(x))


def test_mc_backward_leaves_grads_alone() -> None:
    model = mlp()
    ng = NaturalGradient(model, fisher_type="mc")
    x, y = batches(1)[0]
    out = model(x)
    ng.mc_backward(out)
    assert all(p.grad is None for p in model.parameters())
    F.cross_entropy(out, y).backward()
    ng.step()
    assert ng.last["preconditioned"] == ["0", "1", "3"]


class WithFunctional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 3)
        self.gru = nn.GRUCell(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(torch.tanh(self.a(x)), self.b.weight, self.b.bias)
        return self.gru(h)


def test_functional_and_unsupported_layers_keep_plain_gradients() -> None:
    torch.manual_seed(10)
    model = WithFunctional().double()
    with pytest.warns(UnsupportedLayerWarning, match="gru"):
        ng = NaturalGradient(model)
    x = torch.randn(6, 4, dtype=F64)
    model(x).square().mean().backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ng.step()
        model(x).square().mean().backward()
        ng.step()
    unseen = [w for w in caught if "never seen in a recorded forward pass" in str(w.message)]
    assert len(unseen) == 1 and "'b'" in str(unseen[0].message)
    after = dict(model.named_parameters())
    assert not torch.equal(after["a.weight"].grad, 2 * raw["a.weight"])
    for n in ("b.weight", "b.bias", "gru.weight_ih", "gru.bias_hh"):
        torch.testing.assert_close(after[n].grad, 2 * raw[n])  # two backward passes, untouched


class Everything(nn.Module):
    """Embedding, attention, LayerNorm, RMSNorm, Conv2d with groups, BatchNorm and Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.ln = nn.LayerNorm(8)
        self.conv = nn.Conv2d(1, 4, 3, padding=1, groups=1)
        self.gconv = nn.Conv2d(4, 4, 3, groups=2)
        self.bn = nn.BatchNorm2d(4)
        self.rms = nn.RMSNorm(12)
        self.head = nn.Linear(12, 3)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = self.ln(h + self.attn(h, h, h)[0]).mean(1)
        c = torch.relu(self.bn(self.gconv(torch.relu(self.conv(img))))).mean((2, 3))
        return self.head(self.rms(torch.cat([h, c], 1)))


@pytest.mark.parametrize("curvature", ["kfac", "diag", "lowrank"])
def test_every_layer_type_is_preconditioned_and_trains(curvature: str) -> None:
    torch.manual_seed(13)
    model = Everything().double()
    ng = NaturalGradient(
        model, curvature=curvature, damping=0.1, inverse_every=2, rank=4, kl_clip=None
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(14)
    ids = torch.randint(0, 20, (16, 5), generator=g)
    img = torch.randn(16, 1, 6, 6, generator=g, dtype=F64)
    y = torch.randint(0, 3, (16,), generator=g)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = F.cross_entropy(model(ids, img), y)
        loss.backward()
        ng.step()
        opt.step()
        losses.append(float(loss.detach()))
    expected = [
        "emb",
        "attn.q",
        "attn.k",
        "attn.v",
        "attn.out_proj",
        "ln",
        "conv",
        "gconv.g0",
        "gconv.g1",
        "bn",
        "rms",
        "head",
    ]
    assert sorted(ng.last["preconditioned"]) == sorted(expected)
    assert not ng.capture.unsupported
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.8 * losses[0], losses


# --- preconditioner sources ---------------------------------------------------------------


def first_step_grads(
    ng: NaturalGradient, x: torch.Tensor, y: torch.Tensor
) -> list[torch.Tensor | None]:
    """Runs one recorded backward; returns the raw block gradients."""
    F.cross_entropy(ng.model(x), y).backward()
    return [b.grad_matrix(F64) for b in ng.capture.blocks]


def server_curvature(seed: int = 11) -> CurvatureSet:
    """Curvature of the same architecture fitted on other data (a stand-in for a server's)."""
    other = NaturalGradient(mlp(), damping=1e-2)
    opt = torch.optim.SGD(other.model.parameters(), lr=0.0)
    train(other.model, other, opt, batches(3, seed=seed))
    other.remove()
    return other.local_curvature


def test_global_source_uses_exactly_the_given_inverses() -> None:
    glob = server_curvature()
    glob.inverse(0.05)
    kfac = glob.reps["kfac"]
    a_inv = list(kfac.a_inv)  # type: ignore[attr-defined]
    ng = NaturalGradient(mlp(), inverse_every=1, kl_clip=None)
    ng.set_global(glob)
    assert ng.source.mode == "global"
    for x, y in batches(3, seed=5):
        ng.model.zero_grad()
        raw = first_step_grads(ng, x, y)
        expected = glob.precondition(raw)  # batch form off: these layers are narrow
        ng.step()
        for blk, want in zip(ng.capture.blocks, expected, strict=True):
            assert torch.equal(blk.grad_matrix(F64), want)
        assert ng.last["inverse"] is None  # never re-inverted ...
    assert all(a is b for a, b in zip(kfac.a_inv, a_inv, strict=True))  # type: ignore[attr-defined]
    assert ng.local_curvature.reps["kfac"].counts == [3, 3]  # ... while the own one accumulates


def test_mixed_source_equals_the_explicit_combination() -> None:
    glob = server_curvature()
    ng = NaturalGradient(mlp(), damping=0.03, inverse_every=2, curvature_decay=0.8, kl_clip=None)
    ng.set_global(glob, mix=0.25)
    assert ng.source.mode == "mixed"
    for t, (x, y) in enumerate(batches(3, seed=5)):
        ng.model.zero_grad()
        raw = first_step_grads(ng, x, y)
        ng.step()
        if t % 2 == 0:  # re-inverted on inverse steps, from the own curvature updated this step
            mixed = CurvatureSet.combine([glob, ng.local_curvature], [0.75, 0.25])
            mixed.inverse(0.03)
            assert ng.last["inverse"] is not None
        else:
            assert ng.last["inverse"] is None
        for blk, want in zip(ng.capture.blocks, mixed.precondition(raw), strict=True):
            assert torch.equal(blk.grad_matrix(F64), want)


def test_none_source_accumulates_and_leaves_grads_alone() -> None:
    ng = NaturalGradient(mlp(), source="none")
    for x, y in batches(2):
        ng.model.zero_grad()
        raw = first_step_grads(ng, x, y)
        ng.step()
        for blk, want in zip(ng.capture.blocks, raw, strict=True):
            assert torch.equal(blk.grad_matrix(F64), want)
    assert ng.last["preconditioned"] == [] and ng.last["inverse"] is None
    assert ng.local_curvature.reps["kfac"].counts == [2, 2]
    assert not any(ng.local_curvature.ready)
    with pytest.raises(ValueError, match="source='none'"):
        ng.set_global(server_curvature())


def test_set_global_checks_its_curvature() -> None:
    ng = NaturalGradient(mlp())
    diag_only = NaturalGradient(mlp(), curvature="diag").local_curvature
    with pytest.raises(ValueError, match="same kinds"):
        ng.set_global(diag_only)
    with pytest.raises(TypeError, match="must be a CurvatureSet"):
        ng.set_global({"kfac": 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dtype"):
        ng.set_global(NaturalGradient(mlp(dtype=torch.float32)).local_curvature, mix=0.5)
    with pytest.raises(ValueError, match=r"'mix' must be a float in \[0, 1\]"):
        ng.set_global(server_curvature(), mix=1.5)
    adaptive = NaturalGradient(mlp(), damping_mode="adaptive")
    with pytest.raises(ValueError, match="adaptive"):
        adaptive.set_global(server_curvature())
    with pytest.raises(ValueError, match="'source' must be one of"):
        NaturalGradient(mlp(), source="global")
    fresh = NaturalGradient(mlp())
    fresh.source.mode = "global"  # a global source without its curvature cannot step
    x, y = batches(1)[0]
    F.cross_entropy(fresh.model(x), y).backward()
    with pytest.raises(ValueError, match="set_global"):
        fresh.step()


def test_resume_with_mixed_source_gives_the_identical_next_step() -> None:
    glob = server_curvature()
    data = batches(6, seed=8)
    model = mlp(3)
    ng = NaturalGradient(model, inverse_every=4)
    ng.set_global(glob, mix=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train(model, ng, opt, data[:3])
    saved = copy.deepcopy(model.state_dict()), copy.deepcopy(ng.state_dict())
    train(model, ng, opt, data[3:])
    clone = mlp(4)
    clone.load_state_dict(saved[0])
    ng2 = NaturalGradient(clone, inverse_every=4)
    ng2.set_global(glob, mix=0.5)
    ng2.load_state_dict(saved[1])
    train(clone, ng2, torch.optim.SGD(clone.parameters(), lr=0.1), data[3:])
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)


def test_deprecated_keywords_warn_and_still_apply() -> None:
    with pytest.warns(
        DeprecationWarning, match="'factor_decay' is deprecated, use 'curvature_decay'"
    ):
        ng = NaturalGradient(mlp(), factor_decay=0.5)
    assert ng.curvature_decay == 0.5
    with pytest.warns(DeprecationWarning, match="'fisher' is deprecated, use 'fisher_type'"):
        assert NaturalGradient(mlp(), fisher="mc").fisher_type == "mc"
    with pytest.warns(DeprecationWarning, match="'seed' is deprecated, use 'sketch_seed'"):
        assert NaturalGradient(mlp(), seed=3).sketch_seed == 3
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['decay'\]"):
        NaturalGradient(mlp(), decay=0.5)


def test_defaults() -> None:
    ng = NaturalGradient(mlp(), curvature="lowrank")
    assert ng.damping == 0.1 and ng.damping_scale == "relative" and ng.kl_clip == 1e-1
    assert NaturalGradient(mlp(), damping_scale="absolute").damping == 1e-2
    assert ng.rank == 16 and ng.curvature_decay == 0.95
    assert ng.fisher_type == "empirical" and ng.source.mode == "local"
    assert ng.representations["lowrank"].rank == 16  # type: ignore[attr-defined]


def test_mc_backward_with_an_external_generator() -> None:
    x, y = batches(1)[0]
    results = []
    for own in (True, False):
        model = mlp()
        ng = NaturalGradient(model, fisher_type="mc", sketch_seed=3)
        out = model(x)
        ng.mc_backward(out, None if own else torch.Generator().manual_seed(3))
        F.cross_entropy(out, y).backward()
        ng.step()
        results.append(ng.representations["kfac"].G[0])  # type: ignore[attr-defined]
    assert torch.equal(results[0], results[1])  # the own stream is seeded by sketch_seed
