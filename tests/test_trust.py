"""The adaptive trust region of NaturalGradient (`fedng.optim.trust`): the radius grows after
steps that were too short, shrinks after an overshoot or a blow-up, and stays inside its bounds."""

from __future__ import annotations

import inspect
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from fedng.errors import CurvatureWarning
from fedng.optim.config import DEFAULT_KL_CLIP
from fedng.optim.natural_gradient import DEFAULT_LR, NaturalGradient
from fedng.optim.trust import (
    DEFAULT_INITIAL_RADIUS,
    MIN_RADIUS_FRACTION,
    TrustRegion,
    TrustRule,
    trust_region,
)
from torch import nn


def quadratic_walk(
    region: TrustRegion, eta: float, steps: int, clipped: bool = True, taken: float = 1.0
) -> list[float]:
    """Gradient steps θ ← θ - eta H θ on L = ½ θ^T H θ (H = diag(1..4), float64, exact gradients)
    observed by `region`; the radius after each step. The line-search ratio of such a step is
    `c = 1 - κ` with κ its length over the best length along it, so eta sets c."""
    h = torch.arange(1.0, 5.0, dtype=torch.float64)
    theta = torch.ones(4, dtype=torch.float64)
    radii = []
    for _ in range(steps):
        g = h * theta
        region.observe([theta], [g])
        region.remember([theta], [g], taken, clipped)
        theta = theta - eta * g
        radii.append(region.radius)
    return radii


def region(radius: float = 1e-3, max_radius: float = 1e-1) -> TrustRegion:
    return TrustRegion(TrustRule(max_radius=max_radius, min_radius=max_radius * 1e-3), radius)


def test_rule_decisions() -> None:
    rule = TrustRule(max_radius=1.0, min_radius=1e-3)
    assert rule.decide(0.5, 0.01, count=2, clipped=True) == 0  # warming up
    assert rule.decide(0.5, 0.01, count=5, clipped=True) == 1  # significantly too short
    assert rule.decide(0.5, 0.01, count=5, clipped=False) == 0  # the radius was not the limit
    assert rule.decide(0.01, 0.01, count=50, clipped=True) == 0  # not significant
    assert rule.decide(-0.3, 0.01, count=50, clipped=True) == 0  # near the line minimum
    assert rule.decide(-0.8, 0.01, count=50, clipped=True) == -1  # a significant overshoot
    assert rule.decide(-0.8, 1.0, count=50, clipped=True) == 0  # overshoot within noise
    assert rule.bounded(10.0) == 1.0 and rule.bounded(0.0) == 1e-3


def test_rule_gives_back_only_growth_the_steps_no_longer_earn() -> None:
    rule = TrustRule(max_radius=1.0, min_radius=1e-3, anchor=1e-2)
    assert rule.decide(-0.3, 0.01, count=50, clipped=True, radius=0.05) == -2  # above its start
    assert rule.decide(-0.3, 0.01, count=50, clipped=True, radius=1e-2) == 0  # at the anchor
    assert rule.decide(-0.2, 0.01, count=50, clipped=True, radius=0.05) == 0  # near the minimum
    assert rule.decide(-0.3, 1.0, count=50, clipped=True, radius=0.05) == 0  # within noise
    assert rule.decide(-0.3, 0.01, count=2, clipped=True, radius=0.05) == 0  # warming up
    assert rule.decide(-0.8, 0.01, count=50, clipped=True, radius=1e-2) == -1  # overshoot rule


def feed(r: TrustRegion, cs: list[float], clipped: bool = True) -> list[float]:
    """Drives `r` with a synthetic sequence of continuation ratios: each step moves θ by +1
    along a slope of -1 before it, and the slope after it is -c (so the observed ratio is c).
    Returns the radius after each observation."""
    theta = torch.zeros(1, dtype=torch.float64)
    down = [torch.full((1,), -1.0, dtype=torch.float64)]
    r.remember([theta], down, taken=1.0, clipped=clipped)
    radii = []
    for c in cs:
        theta = theta + 1.0
        r.observe([theta], [torch.full((1,), -c, dtype=torch.float64)])
        r.remember([theta], down, taken=1.0, clipped=clipped)
        radii.append(r.radius)
    return radii


def test_a_radius_grown_on_short_steps_comes_back_to_its_start_when_they_overshoot() -> None:
    r = trust_region("adaptive", DEFAULT_KL_CLIP)
    assert r is not None and r.rule.anchor == DEFAULT_INITIAL_RADIUS
    grown = feed(r, [0.9] * 40)  # far too short: grows
    assert grown[-1] > 10 * DEFAULT_INITIAL_RADIUS
    # then a mild, significant overshoot (mean c -0.3, noise ±0.05): once c's average has
    # turned, the growth is given back, monotonically and never below the start
    after = feed(r, [-0.25, -0.35] * 100)
    assert all(b <= a for a, b in itertools.pairwise(after[20:]))
    assert after[-1] == pytest.approx(DEFAULT_INITIAL_RADIUS) and min(after) >= after[-1]
    assert r.shrunk > 0


def test_a_mild_overshoot_keeps_a_radius_at_or_below_its_start() -> None:
    r = trust_region("adaptive", DEFAULT_KL_CLIP)
    assert r is not None
    assert feed(r, [-0.25, -0.35] * 100)[-1] == DEFAULT_INITIAL_RADIUS  # the transformer's case
    assert feed(r, [-0.65, -0.75] * 20)[-1] < DEFAULT_INITIAL_RADIUS  # a clear overshoot still
    r = trust_region("adaptive", 1e-3)  # an explicit bound (the FedNG client): starts at it,
    assert r is not None and r.rule.anchor == 1e-3  # so the rule never applies there
    assert feed(r, [-0.25, -0.35] * 100)[-1] == 1e-3


def feed_energy(
    r: TrustRegion, cs: list[float], scale: float, energies: list[float]
) -> list[float]:
    """Like `feed`, with raw gradients of size `scale` (the slopes are scaled, so c is
    unchanged) and the unclipped steps' KL estimates `energies`. Returns the radii."""
    down = [torch.full((1,), -scale, dtype=torch.float64)]
    # go on from where the last feed left θ, with this feed's slope before the step
    theta = torch.zeros(1, dtype=torch.float64) if r._prev is None else r._prev[0][0].clone()
    r.remember([theta], down, taken=1.0, clipped=True, energy=energies[0])
    radii = []
    for c, e in zip(cs, energies, strict=True):
        theta = theta + 1.0
        r.observe([theta], [torch.full((1,), -c * scale, dtype=torch.float64)])
        r.remember([theta], down, taken=1.0, clipped=True, energy=e)
        radii.append(r.radius)
    return radii


def mild(n: int) -> list[float]:
    return [-0.25, -0.35] * (n // 2)  # mean c -0.3: a mild, significant overshoot


def test_a_noise_floor_reached_after_progress_anneals_the_radius() -> None:
    r = trust_region("adaptive", DEFAULT_KL_CLIP)
    assert r is not None and r.rule.stall_window == 50
    start = r.radius
    # the loss is not falling yet (raw gradients at their peak): a stall is a plateau, kept
    assert feed_energy(r, mild(120), scale=10.0, energies=[1.0] * 120)[-1] == start
    # progress was made (gradients 10x smaller), then the step energy stays flat: anneal
    radii = feed_energy(r, mild(300), scale=1.0, energies=[1.0] * 300)
    assert r.stalls >= 3 and r.shrunk >= 3 and radii[-1] < start / 4
    assert all(b <= a for a, b in itertools.pairwise(radii)) and min(radii) >= r.rule.min_radius


def test_annealing_stops_three_decades_below_the_start() -> None:
    # Under the default bound the least radius is tied to the start (1e-4), not to the bound:
    # a noise floor can anneal the radius below kl_clip / 1000 (the zoo's MSE regression at
    # the default lr 1.0 needs ~1e-5), but never below start / 1000.
    r = trust_region("adaptive", DEFAULT_KL_CLIP)
    assert r is not None and r.radius == DEFAULT_INITIAL_RADIUS
    feed_energy(r, mild(120), scale=10.0, energies=[1.0] * 120)
    radii = feed_energy(r, mild(1500), scale=1.0, energies=[1.0] * 1500)
    floor = DEFAULT_INITIAL_RADIUS * MIN_RADIUS_FRACTION
    assert floor < DEFAULT_KL_CLIP * MIN_RADIUS_FRACTION  # below the former least radius
    assert radii[-1] == pytest.approx(floor) and min(radii) >= floor
    assert r.stalls >= 10


def test_no_anneal_before_the_warm_up_after_a_shrink() -> None:
    # A shrink resets c's average; one observation (standard error 0) must not anneal again.
    r = trust_region("adaptive", DEFAULT_KL_CLIP)
    assert r is not None
    feed_energy(r, mild(120), scale=10.0, energies=[1.0] * 120)
    feed_energy(r, mild(300), scale=1.0, energies=[1.0] * 300)
    assert r.stalls >= 1  # the anneal conditions hold at every window's end from here on
    window = r.rule.stall_window
    n = (window - 1 - r._since) % window
    if n:
        feed_energy(r, mild(2 * window)[:n], scale=1.0, energies=[1.0] * n)
    assert r._since == window - 1
    r._shrink(1.0)  # e.g. an overshoot just before the window's end
    stalls = r.stalls
    feed_energy(r, [-0.35], scale=1.0, energies=[1.0])
    assert r.stalls == stalls


@pytest.mark.parametrize(
    ("cs", "energies", "why"),
    [
        (mild(300), [0.97**t for t in range(300)], "the step energy keeps falling"),
        (mild(300), [math.nan] * 300, "no step energy"),
        ([-0.05, 0.05] * 150, [1.0] * 300, "steps at the line minimum"),
    ],
)
def test_no_anneal_without_a_stalled_overshoot(
    cs: list[float], energies: list[float], why: str
) -> None:
    r = trust_region("adaptive", DEFAULT_KL_CLIP)
    assert r is not None
    feed_energy(r, mild(120), scale=10.0, energies=[energies[0]] * 120)
    assert feed_energy(r, cs, scale=1.0, energies=energies)[-1] == DEFAULT_INITIAL_RADIUS, why
    assert r.stalls == 0


def test_the_stall_state_resumes_exactly() -> None:
    def fresh() -> TrustRegion:
        r = trust_region("adaptive", DEFAULT_KL_CLIP)
        assert r is not None
        return r

    straight = fresh()
    feed_energy(straight, mild(120), scale=10.0, energies=[1.0] * 120)
    feed_energy(straight, mild(80), scale=1.0, energies=[1.0] * 80)
    saved = straight.state_dict()
    rest = feed_energy(straight, mild(200), scale=1.0, energies=[1.0] * 200)
    resumed = fresh()
    resumed.load_state_dict(saved)
    assert feed_energy(resumed, mild(200), scale=1.0, energies=[1.0] * 200) == rest
    assert resumed.stalls == straight.stalls > 0


def test_too_short_steps_grow_the_radius_up_to_its_bound() -> None:
    r = region()
    radii = quadratic_walk(r, eta=0.01, steps=120)  # κ <= 0.08: c >= 0.92 on every step
    assert radii[3] == pytest.approx(1e-3)  # no decision during the warm-up
    assert radii[10] > 1e-3 and r.c is not None and r.c > 0.9
    assert all(b >= a for a, b in itertools.pairwise(radii))
    assert max(radii) == pytest.approx(1e-1) and r.grown > 0 and r.shrunk == 0


def test_unclipped_steps_do_not_grow_the_radius() -> None:
    r = region()
    assert quadratic_walk(r, eta=0.01, steps=30, clipped=False)[-1] == pytest.approx(1e-3)


def test_overshooting_steps_shrink_the_radius_down_to_its_bound() -> None:
    r = region(radius=1e-2)
    # eta 0.45 on curvature 4 is κ = 1.8 along the stiffest direction: c ≈ -0.7 once it dominates.
    radii = quadratic_walk(r, eta=0.45, steps=200, taken=5e-3)
    assert r.shrunk > 0 and r.grown == 0
    assert radii[-1] < 1e-2
    assert min(radii) >= 1e-4  # never below min_radius
    assert all(b <= a for a, b in itertools.pairwise(radii))


def test_steps_near_the_line_minimum_keep_the_radius() -> None:
    r = region()
    # eta 0.25: κ = 1 along the stiffest direction (the others decay slower, c in [0, 0.75]).
    radii = quadratic_walk(r, eta=0.25, steps=8)
    assert r.shrunk == 0 and radii[-1] >= 1e-3


def test_a_rejected_step_shrinks_at_once_from_the_step_taken() -> None:
    r = region(radius=1e-2)
    theta = [torch.zeros(3, dtype=torch.float64)]
    g = [torch.ones(3, dtype=torch.float64)]
    r.observe(theta, g)
    r.remember(theta, g, taken=4e-3, clipped=False)
    moved = [theta[0] - 0.1]  # a descent step along -g ...
    assert r.observe(moved, [torch.full((3,), -10.0, dtype=torch.float64)]) == pytest.approx(2e-3)
    assert r.c == pytest.approx(-10.0) and r.shrunk == 1  # ... after which the slope is 10x up
    r.remember(moved, g, taken=4e-3, clipped=False)
    nan = [torch.full((3,), math.nan, dtype=torch.float64)]
    assert r.observe([moved[0] - 0.1], nan) == pytest.approx(1e-3)  # a non-finite change
    r.forget()
    assert r.observe([moved[0] - 0.2], g) == pytest.approx(1e-3)  # nothing to compare with


def test_no_move_is_no_evidence() -> None:
    r = region()
    theta, g = [torch.ones(2)], [torch.ones(2)]
    for _ in range(10):  # lr 0: the parameters never move
        r.observe(theta, g)
        r.remember(theta, g, taken=1.0, clipped=True)
    assert r.radius == 1e-3 and r.c is None and r.grown == r.shrunk == 0


def test_trust_region_factory() -> None:
    assert trust_region("fixed", 1e-2) is None and trust_region("adaptive", None) is None
    r = trust_region("adaptive", 1e-1)
    assert r is not None and r.radius == DEFAULT_INITIAL_RADIUS
    # the least radius is three decades below the start (not the bound): room to anneal
    assert r.rule.min_radius == pytest.approx(DEFAULT_INITIAL_RADIUS * MIN_RADIUS_FRACTION)
    for clip in (1e-4, 1e-2):  # an explicit bound: the radius starts where a fixed clip was
        given = trust_region("adaptive", clip)
        assert given is not None and given.radius == clip
        assert given.rule.min_radius == pytest.approx(clip * MIN_RADIUS_FRACTION)
    with pytest.raises(ValueError, match="'trust' must be one of"):
        trust_region("sometimes", 1e-2)


# --- inside NaturalGradient ----------------------------------------------------------------


def softmax_regression(seed: int = 0) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    x = torch.randn(128, 5)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return nn.Linear(5, 3), x, y


def train(ng: NaturalGradient, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int) -> float:
    opt = torch.optim.SGD(ng.model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(ng.model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        ng.step()
        opt.step()
    return float(loss.detach())


def test_natural_gradient_grows_its_radius_when_the_lr_is_small() -> None:
    model, x, y = softmax_regression()
    ng = NaturalGradient(model, kl_clip=1e-1, inverse_every=1)  # full batch: no noise
    train(ng, x, y, lr=0.03, steps=40)
    assert ng.last["trust_radius"] > DEFAULT_INITIAL_RADIUS and ng._trust is not None
    assert ng._trust.grown > 0 and ng.last["trust_radius"] <= 1e-1


def test_the_default_lr_is_the_unit_step_the_bound_assumes() -> None:
    # SGD at DEFAULT_LR takes exactly the step whose KL estimate the trust region bounds (the
    # `lr` argument's default), and the first steps are bounded by the small start radius.
    assert inspect.signature(NaturalGradient).parameters["lr"].default == DEFAULT_LR == 1.0
    model, x, y = softmax_regression()
    ng = NaturalGradient(model)
    assert ng._trust is not None and ng._trust.radius == DEFAULT_INITIAL_RADIUS == 1e-4
    before = [q.detach().clone() for q in model.parameters()]
    raw = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    train(ng, x, y, lr=DEFAULT_LR, steps=1)
    nu = ng.last["kl_scale"]
    assert nu < 1.0 and ng.last["trust_radius"] == DEFAULT_INITIAL_RADIUS
    # the step taken, d = lr ν p, is the clipped natural gradient itself: its KL estimate
    # lr² ν² gᵀp = lr ν gᵀd is the radius
    step = [b - q.detach() for b, q in zip(before, model.parameters(), strict=True)]
    gd = sum(float((d * g).sum()) for d, g in zip(step, raw, strict=True))
    assert DEFAULT_LR * nu * gd == pytest.approx(DEFAULT_INITIAL_RADIUS, rel=1e-4)


def test_natural_gradient_shrinks_its_radius_when_steps_overshoot() -> None:
    model, x, y = softmax_regression()
    ng = NaturalGradient(model, kl_clip=1e-1, inverse_every=1)
    assert ng._trust is not None
    ng._trust.radius = 1e-1
    train(ng, x, y, lr=8.0, steps=40)  # 8x the natural-gradient step at the bound
    assert ng._trust.shrunk > 0 and ng.last["trust_radius"] < 1e-1
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_fixed_trust_keeps_the_clip_and_state_round_trips() -> None:
    model, x, y = softmax_regression()
    fixed = NaturalGradient(model, kl_clip=1e-2, trust="fixed")
    train(fixed, x, y, lr=0.03, steps=5)
    assert fixed.last["trust_radius"] is None and fixed.stats["clipped_steps"] == 5
    fixed.remove()
    ng = NaturalGradient(model, kl_clip=1e-1, inverse_every=1)
    train(ng, x, y, lr=0.03, steps=20)
    again = NaturalGradient(model, kl_clip=1e-1, inverse_every=1)
    again.load_state_dict(ng.state_dict())
    assert again._trust is not None and ng._trust is not None
    assert again._trust.radius == ng._trust.radius and again._trust.c == ng._trust.c
    assert again._trust._prev is not None and ng._trust._prev is not None
    assert all(
        torch.equal(a, b) for a, b in zip(again._trust._prev[0], ng._trust._prev[0], strict=True)
    )
    with pytest.raises(ValueError, match="'trust'"):
        NaturalGradient(model, trust="never")


def test_a_skipped_step_is_not_compared_with() -> None:
    model, x, y = softmax_regression()
    ng = NaturalGradient(model, kl_clip=1e-1)
    train(ng, x, y, lr=0.03, steps=3)
    assert ng._trust is not None and ng._trust._prev is not None
    model.weight.grad = torch.full_like(model.weight, math.nan)
    with pytest.warns(CurvatureWarning, match="skipped"):
        ng.step()
    assert ng.last["skipped"] and ng._trust._prev is None


@pytest.mark.parametrize("check", [False, True])
def test_dots_are_float64_dots(check: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trust region's `sum_i <a_i, b_i>`: float32 tensors in one native float64 call, others
    (float64, non-contiguous) per tensor, both equal to the float64 dot to float64 round-off;
    under `trusted.CHECK` the native call's contract is checked."""
    from fedng.ops import trusted
    from fedng.optim import trust

    monkeypatch.setattr(trusted, "CHECK", check)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(s, generator=g) * 1e3 for s in ((7, 5), (5,), (0,), (40, 9))]
    ys = [torch.randn(x.shape, generator=g) for x in xs]
    pairs = zip(xs, ys, strict=True)
    want = math.fsum(
        float(torch.dot(x.double().reshape(-1), y.double().reshape(-1))) for x, y in pairs
    )
    assert trust._dot(xs, ys) == pytest.approx(want, rel=1e-12, abs=1e-9)
    xd, yd = [x.double() for x in xs], [y.double() for y in ys]
    assert trust._dot(xd, yd) == pytest.approx(want, rel=1e-12, abs=1e-9)
    xt, yt = [xs[0].t()], [ys[0].t()]  # non-contiguous: the torch path
    assert trust._dot(xt, yt) == pytest.approx(float((xs[0] * ys[0]).double().sum()), rel=1e-5)
    assert trust._dot([], []) == 0.0
    if check:
        with pytest.raises(TypeError, match="contiguous float32"):
            trust._dots_f64(xt, yt)
        with pytest.raises(ValueError, match="sizes"):
            trust._dots_f64([xs[0]], [ys[1]])


def test_step_dots_native_equals_torch() -> None:
    """The trust region's three sums of a step (`<g_old, δ>`, `<g, δ>`, `<g, g>` with δ the
    float32 step): one native pass over float32 tensors, equal to the float64 sums of the torch
    path's float32 δ; float64 or non-contiguous tensors take the torch path."""
    from fedng.optim import trust

    g = torch.Generator().manual_seed(4)
    shapes = ((7, 5), (5,), (0,), (40, 9), (3,))
    params = [torch.randn(s, generator=g) for s in shapes]
    theta = [p + 1e-3 * torch.randn(p.shape, generator=g) for p in params]
    g_old = [torch.randn(p.shape, generator=g) for p in params]
    grads = [torch.randn(p.shape, generator=g) for p in params]
    delta = [(p - t).double() for p, t in zip(params, theta, strict=True)]

    def f64(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        return math.fsum(float((x.double() * y.double()).sum()) for x, y in zip(a, b, strict=True))

    before, after, energy = trust._step_dots(params, theta, g_old, grads)
    assert before == pytest.approx(f64(g_old, delta), rel=1e-12, abs=1e-12)
    assert after == pytest.approx(f64(grads, delta), rel=1e-12, abs=1e-12)
    assert energy == pytest.approx(f64(grads, grads), rel=1e-12)
    wide = [[t.double() for t in ts] for ts in (params, theta, g_old, grads)]
    b64, a64, e64 = trust._step_dots(*wide)
    assert e64 is None
    assert b64 == pytest.approx(before, rel=1e-6) and a64 == pytest.approx(after, rel=1e-6)


def test_trust_dots_checks_its_lists_before_reading() -> None:
    """The native trust sums refuse lists of other lengths, negative sizes and null pointers
    with a one-line ValueError (they are reached only through `_step_dots`' checked calls)."""
    from fedng._backend import native

    x = torch.ones(4)
    ok: dict[str, list[int]] = {k: [x.data_ptr()] for k in ("params", "theta", "g_old", "grads")}
    with pytest.raises(ValueError, match="'grads' has 0 entries"):
        native.trust_dots(**{**ok, "grads": []}, n=[4])
    with pytest.raises(ValueError, match="negative"):
        native.trust_dots(**ok, n=[-1])
    for key in ok:
        with pytest.raises(ValueError, match=f"'{key}\\[0\\]' is a null pointer"):
            native.trust_dots(**{**ok, key: [0]}, n=[4])
    assert native.trust_dots(**ok, n=[4])[2] == 4.0  # <g, g> of four ones
