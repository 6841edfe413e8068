"""NaturalGradient: composes with torch.optim, schedules, damping modes, KL clipping, resume."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
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
        if ng.fisher == "mc":
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
    ng = NaturalGradient(model, damping=1e-2)
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
    ng = NaturalGradient(model, curvature=curvature, damping=damping, inverse_every=3, rank=8)
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.2)
        if optimizer == "sgd"
        else torch.optim.Adam(model.parameters(), lr=1e-2)
    )
    x, y = batches(1, seed=3)[0]
    losses = train(model, ng, opt, [(x, y)] * 15)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0]


def test_factor_and_inverse_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    model = mlp()
    ng = NaturalGradient(model, factor_every=2, inverse_every=3)
    inverted = []
    real = ng._invert
    monkeypatch.setattr(ng, "_invert", lambda rep: inverted.append(ng.steps) or real(rep))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    recording = []
    for x, y in batches(7):
        recording.append(ng.capture.recording)
        train(model, ng, opt, [(x, y)])
    kfac = ng.representations["kfac"]
    assert kfac.counts == [4, 4]  # steps 0, 2, 4, 6
    assert sorted(set(inverted)) == [0, 3, 6]
    assert recording == [True, False, True, False, True, False, True]


def test_kl_clip_scales_the_step() -> None:
    model = mlp()
    x, y = batches(1)[0]
    ref = copy.deepcopy(model)
    ng_ref = NaturalGradient(ref, damping=1e-2)
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
    kw = dict(damping=1.0, damping_mode="adaptive", inverse_every=1)
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
        curvature=curvature, fisher=fisher, damping_mode=mode, damping=1e-2, inverse_every=3, rank=6
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
        ({"factor_decay": 1.0}, "'factor_decay' must be None or a float in"),
        ({"curvature": "dense"}, "'curvature' must be one of"),
        ({"damping_mode": "lm"}, "'damping_mode' must be one of"),
        ({"fisher": "true"}, "'fisher' must be one of"),
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
    ng = NaturalGradient(model, fisher="mc")
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="mc_backward"):
        ng.step()
    empirical = NaturalGradient(mlp())
    with pytest.raises(ValueError, match="fisher='mc'"):
        empirical.mc_backward(mlp()(x))


def test_mc_backward_leaves_grads_alone() -> None:
    model = mlp()
    ng = NaturalGradient(model, fisher="mc")
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
    ng = NaturalGradient(model, curvature=curvature, damping=0.1, inverse_every=2, rank=4)
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
