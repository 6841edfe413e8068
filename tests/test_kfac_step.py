"""`fedng.ops.kfac_step`: the fused K-FAC update + preconditioning against the float64 reference,
both forms, the bias column folded without a copy, the plan, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from _tols import DTYPES, assert_close
from fedng import ops, reference
from fedng.ops import trusted
from fedng.ops.kfac_step import KfacStepPlan
from hypothesis import given, settings
from hypothesis import strategies as st

F64 = torch.float64


def spd(n: int, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(n + 3, n, generator=g, dtype=F64)
    return (x.T @ x / (n + 3) + 0.1 * torch.eye(n, dtype=F64)).to(dtype)


def layers(
    shapes: list[tuple[int, int, int, bool]], dtype: torch.dtype, seed: int, consistent: bool
) -> dict[str, list[torch.Tensor]]:
    """Random layers (m, k, rows, bias); `consistent`: grads = g^T [x 1] (the batch explains
    them), else unrelated grads (the batch form's probe must refuse them)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=F64).to(dtype)

    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("x", "g", "A", "G", "W", "Ai", "Gi")}
    out.update({"u": [], "v": []})
    for m, k, b, bias in shapes:
        n = k + bias
        x, gr = rand(b, k), rand(b, m)
        xa = torch.cat([x, torch.ones(b, 1, dtype=dtype)], 1) if bias else x
        w = (gr.to(F64).T @ xa.to(F64)).to(dtype) if consistent else rand(m, n)
        out["x"].append(x)
        out["g"].append(gr)
        out["A"].append(spd(n, g, dtype))
        out["G"].append(spd(m, g, dtype))
        out["W"].append(w)
        out["Ai"].append(spd(n, g, dtype))
        out["Gi"].append(spd(m, g, dtype))
        out["u"].append(rand(m))
        out["v"].append(rand(n))
    return out


def precondition_kw(d: dict[str, list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    """The preconditioning arguments of `kfac_step` from `layers`' output."""
    return {
        "grads": d["W"],
        "a_inv": d["Ai"],
        "g_inv": d["Gi"],
        "probe_u": d["u"],
        "probe_v": d["v"],
    }


SHAPES = st.lists(
    st.tuples(st.integers(1, 12), st.integers(0, 12), st.integers(1, 9), st.booleans()),
    min_size=1,
    max_size=4,
)


@settings(max_examples=25, deadline=None)
@given(
    shapes=SHAPES,
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    consistent=st.booleans(),
)
def test_matches_the_reference(
    shapes: list[tuple[int, int, int, bool]], dtype: torch.dtype, seed: int, consistent: bool
) -> None:
    """Factors updated and gradients preconditioned as the reference does, whichever form."""
    d = layers(shapes, dtype, seed, consistent)
    bias = [s[3] for s in shapes]
    decay = [0.0 if i % 2 else 0.9 for i in range(len(shapes))]
    a_scale = [1.0 / s[2] for s in shapes]
    g_scale = [float(s[2]) for s in shapes]
    want_a, want_g, want_p = reference.kfac_step_ref(
        d["x"], d["g"], bias, d["A"], d["G"], decay, a_scale, g_scale, d["W"], d["Ai"], d["Gi"]
    )
    a, gf = [t.clone() for t in d["A"]], [t.clone() for t in d["G"]]
    res = ops.kfac_step(
        d["x"],
        d["g"],
        bias=bias,
        a_factors=a,
        g_factors=gf,
        decay=decay,
        a_scale=a_scale,
        g_scale=g_scale,
        **precondition_kw(d),  # type: ignore[arg-type]
    )
    assert res.outs is not None
    for got, want in zip(a + gf, want_a + want_g, strict=True):
        assert_close(got, want, dtype, "kron_accumulate")
        assert torch.equal(got, got.T)
    for got, want in zip(res.outs, want_p or [], strict=True):
        # the batch and dense forms round differently: errors relative to the operands' size
        scale = 10 * float(want.abs().max()) if want.numel() else 1.0
        assert_close(got, want, dtype, "kron_precondition", scale=scale)
    for (m, k, b, bi), form in zip(shapes, res.form, strict=True):
        n = k + bi
        cheaper = b * (m * m + n * n + m * n) < m * n * (m + n)
        # unrelated gradients always fail the probe; explained ones pass it where it is cheaper
        assert form == (0 if m * n == 0 else 2 if cheaper and consistent else 1)


def test_batch_form_taken_and_exact_on_a_wide_layer() -> None:
    """A wide layer with few rows: the batch form, equal to the dense product."""
    shapes = [(40, 50, 4, True), (10, 40, 4, False)]
    d = layers(shapes, F64, 0, True)
    res = ops.kfac_step(
        d["x"],
        d["g"],
        bias=[True, False],
        **precondition_kw(d),  # type: ignore[arg-type]
    )
    assert res.form == [2, 2]
    assert res.outs is not None
    want = reference.kron_precondition_ref(d["W"], d["Ai"], d["Gi"])
    for got, w in zip(res.outs, want, strict=True):
        assert_close(got, w, F64, "kron_precondition")


def test_update_only_and_decay_zero_overwrites_non_finite() -> None:
    d = layers([(3, 4, 5, True)], F64, 1, True)
    a = [torch.full((5, 5), float("nan"), dtype=F64)]
    gf = [torch.full((3, 3), float("inf"), dtype=F64)]
    res = ops.kfac_step(d["x"], d["g"], bias=[True], a_factors=a, g_factors=gf, decay=0.0)
    assert res.outs is None and res.form == [0]
    want_a, want_g, _ = reference.kfac_step_ref(
        d["x"], d["g"], [True], [torch.zeros(5, 5)], [torch.zeros(3, 3)], 0.0, 1.0, 1.0
    )
    assert_close(a[0], want_a[0], F64, "kron_accumulate")
    assert_close(gf[0], want_g[0], F64, "kron_accumulate")


@pytest.mark.parametrize("check", [False, True])
def test_plan_gives_the_op_bits(check: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trusted plan (pointers built once) and the validating op agree bit for bit, and
    `trusted.CHECK` routes the plan through the op."""
    monkeypatch.setattr(trusted, "CHECK", check)
    shapes = [(6, 5, 7, True), (3, 6, 7, False)]
    d = layers(shapes, torch.float32, 2, True)
    a1, g1 = [t.clone() for t in d["A"]], [t.clone() for t in d["G"]]
    a2, g2 = [t.clone() for t in d["A"]], [t.clone() for t in d["G"]]
    outs = [torch.empty(6, 6), torch.empty(3, 6)]
    plan = KfacStepPlan(a2, g2, d["W"], outs, d["u"], d["v"], [True, False])
    kw = {"decay": [0.5, 0.5], "a_scale": [0.25, 0.5], "g_scale": [2.0, 3.0]}
    res = ops.kfac_step(
        d["x"],
        d["g"],
        bias=[True, False],
        a_factors=a1,
        g_factors=g1,
        **kw,  # type: ignore[arg-type]
    )
    plan(d["x"], d["g"], kw["decay"], kw["a_scale"], kw["g_scale"], update=True, inverses=None)
    assert all(torch.equal(x, y) for x, y in zip(a1 + g1, a2 + g2, strict=True))
    res = ops.kfac_step(
        d["x"],
        d["g"],
        bias=[True, False],
        **precondition_kw(d),  # type: ignore[arg-type]
    )
    plan(d["x"], d["g"], [0.0] * 2, [0.0] * 2, [0.0] * 2, update=False, inverses=(d["Ai"], d["Gi"]))
    assert res.outs is not None
    assert all(torch.equal(x, y) for x, y in zip(res.outs, outs, strict=True))
    assert plan.form.tolist() == res.form
    assert plan.matches(a2, g2) and not plan.matches(a1, g2)


@pytest.mark.parametrize("check", [False, True])
def test_plan_skips_the_callers_layers(check: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers in `skip` are updated like the others but get no finiteness sum, no output and
    dot 0; the other layers' results equal the op's on them alone (also under CHECK)."""
    monkeypatch.setattr(trusted, "CHECK", check)
    shapes = [(6, 5, 7, True), (3, 6, 7, False), (4, 3, 7, True)]
    d = layers(shapes, F64, 2, True)
    a1, g1 = [t.clone() for t in d["A"]], [t.clone() for t in d["G"]]
    outs = [torch.full((m, k + b), 7.0, dtype=F64) for m, k, _, b in shapes]
    d["W"][1].fill_(float("nan"))  # the skipped layer's gradient is never read
    plan = KfacStepPlan(a1, g1, d["W"], outs, d["u"], d["v"], [True, False, True])
    kw = {"decay": [0.5] * 3, "a_scale": [0.25] * 3, "g_scale": [2.0] * 3}
    plan(d["x"], d["g"], **kw, update=True, inverses=None, check_finite=True, skip=(1,))
    sums = plan.sums.tolist()
    assert math.isfinite(sum(sums[:3])) and sums[1] == 0.0
    a2, g2 = [t.clone() for t in d["A"]], [t.clone() for t in d["G"]]
    ops.kfac_step(d["x"], d["g"], bias=[True, False, True], a_factors=a2, g_factors=g2, **kw)  # type: ignore[arg-type]
    assert all(torch.equal(x, y) for x, y in zip(a1 + g1, a2 + g2, strict=True))
    zeros = [0.0] * 3
    plan(d["x"], d["g"], zeros, zeros, zeros, update=False, inverses=(d["Ai"], d["Gi"]), skip=(1,))
    assert torch.equal(outs[1], torch.full_like(outs[1], 7.0)) and plan.sums[4] == 0.0
    keep = [0, 2]
    res = ops.kfac_step(
        [d["x"][i] for i in keep],
        [d["g"][i] for i in keep],
        bias=[True, True],
        **{k: [v[i] for i in keep] for k, v in precondition_kw(d).items()},  # type: ignore[arg-type]
    )
    assert res.outs is not None
    for j, i in enumerate(keep):
        assert torch.equal(res.outs[j], outs[i]) and plan.sums[3 + i] == res.dots[j]


@settings(max_examples=20, deadline=None)
@given(
    shapes=SHAPES,
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    mask=st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_plan_skip_matches_the_reference(
    shapes: list[tuple[int, int, int, bool]], dtype: torch.dtype, seed: int, mask: list[bool]
) -> None:
    """Ragged layers, any subset skipped: every factor updated as the reference does, the
    others' outputs equal to the reference's, the skipped ones' outputs untouched."""
    d = layers(shapes, dtype, seed, True)
    count = len(shapes)
    skip = tuple(i for i in range(count) if mask[i])
    bias = [s[3] for s in shapes]
    decay, a_scale, g_scale = [0.9] * count, [0.5] * count, [2.0] * count
    want_a, want_g, want_p = reference.kfac_step_ref(
        d["x"], d["g"], bias, d["A"], d["G"], decay, a_scale, g_scale, d["W"], d["Ai"], d["Gi"]
    )
    a, gf = [t.clone() for t in d["A"]], [t.clone() for t in d["G"]]
    outs = [torch.full((m, k + b), 3.0, dtype=dtype) for m, k, _, b in shapes]
    plan = KfacStepPlan(a, gf, d["W"], outs, d["u"], d["v"], bias)
    inv = (d["Ai"], d["Gi"])
    plan(d["x"], d["g"], decay, a_scale, g_scale, update=True, inverses=inv, skip=skip)
    for got, want in zip(a + gf, want_a + want_g, strict=True):
        assert_close(got, want, dtype, "kron_accumulate")
    for i, (got, want) in enumerate(zip(outs, want_p or [], strict=True)):
        if i in skip:
            assert bool((got == 3.0).all()) and plan.sums[count + i] == 0.0
        else:
            scale = 10 * float(want.abs().max()) if want.numel() else 1.0
            assert_close(got, want, dtype, "kron_precondition", scale=scale)


def test_bad_input_is_refused() -> None:
    d = layers([(3, 4, 5, True)], F64, 3, True)
    with pytest.raises(ValueError, match="'bias' must hold 1 bools"):
        ops.kfac_step(d["x"], d["g"], bias=[True, False])
    with pytest.raises(ValueError, match="given together"):
        ops.kfac_step(d["x"], d["g"], bias=[True], a_factors=d["A"])
    with pytest.raises(ValueError, match="'grads' must be given exactly"):
        ops.kfac_step(d["x"], d["g"], bias=[True], grads=d["W"])
    with pytest.raises(ValueError, match="given together"):
        ops.kfac_step(d["x"], d["g"], bias=[True], grads=d["W"], a_inv=d["Ai"])
    with pytest.raises(ValueError, match=r"'a_factors\[0\]' must have shape \[5, 5\]"):
        ops.kfac_step(
            d["x"], d["g"], bias=[True], a_factors=[torch.zeros(4, 4, dtype=F64)], g_factors=d["G"]
        )
    with pytest.raises(ValueError, match=r"'output_grads\[0\]' must have shape \[5, \*\]"):
        ops.kfac_step(d["x"], [torch.zeros(4, 3, dtype=F64)], bias=[True])
    with pytest.raises(TypeError):
        ops.kfac_step(d["x"], [d["g"][0].float()], bias=[True])
    with pytest.raises(ValueError, match="finite"):
        ops.kfac_step(
            d["x"], d["g"], bias=[True], a_factors=d["A"], g_factors=d["G"], decay=float("nan")
        )
    buf = torch.zeros(25, dtype=F64)
    with pytest.raises(ValueError, match="overlap"):
        ops.kfac_step(
            d["x"], d["g"], bias=[True], a_factors=[buf.view(5, 5)], g_factors=[buf[:9].view(3, 3)]
        )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e308])
def test_check_finite_stops_before_any_update(bad: float) -> None:
    """A gradient that does not sum to a finite value (NaN, Inf, or finite entries whose sum
    overflows) leaves factors and outputs alone; a finite one reports its sum and the dots."""
    d = layers([(3, 4, 5, True), (2, 5, 5, False)], F64, 5, True)
    a, gf = [t.clone() for t in d["A"]], [t.clone() for t in d["G"]]
    kw = {"a_inv": d["Ai"], "g_inv": d["Gi"], "probe_u": d["u"], "probe_v": d["v"]}
    res = ops.kfac_step(
        d["x"],
        d["g"],
        bias=[True, False],
        a_factors=a,
        g_factors=gf,
        grads=d["W"],
        check_finite=True,
        **kw,  # type: ignore[arg-type]
    )
    assert res.outs is not None
    assert res.grad_sums == pytest.approx([float(w.sum()) for w in d["W"]], rel=1e-12)
    want = [float((o * w).sum()) for o, w in zip(res.outs, d["W"], strict=True)]
    assert res.dots == pytest.approx(want, rel=1e-12)
    w = [t.clone() for t in d["W"]]
    w[1][0, :2] = bad
    before = [t.clone() for t in a + gf]
    res = ops.kfac_step(
        d["x"],
        d["g"],
        bias=[True, False],
        a_factors=a,
        g_factors=gf,
        grads=w,
        check_finite=True,
        **kw,  # type: ignore[arg-type]
    )
    assert res.form == [0, 0] and all(math.isnan(x) for x in res.dots)
    assert all(torch.equal(x, y) for x, y in zip(a + gf, before, strict=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_plan_lower_only_updates_the_lower_triangles(
    dtype: torch.dtype, decay: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lower_only`: the lower triangles (diagonal, bias row included) equal the full update's
    (up to the BLAS triangle's rounding), the strict upper triangles keep their old values
    (the trusted call; under `trusted.CHECK` the validating op mirrors, which is allowed)."""
    monkeypatch.setattr(trusted, "CHECK", False)
    shapes = [(6, 5, 7, True), (3, 6, 7, False), (9, 40, 5, True)]
    d = layers(shapes, dtype, 5, True)
    a1, g1 = [t.clone() for t in d["A"]], [t.clone() for t in d["G"]]
    a2, g2 = [t.clone() for t in d["A"]], [t.clone() for t in d["G"]]
    outs = [torch.empty(m, k + b, dtype=dtype) for m, k, _, b in shapes]
    kw = {"decay": [decay] * 3, "a_scale": [0.25, 0.5, 1.0], "g_scale": [2.0, 3.0, 0.5]}
    full = KfacStepPlan(a1, g1, d["W"], outs, d["u"], d["v"], [True, False, True])
    lower = KfacStepPlan(a2, g2, d["W"], outs, d["u"], d["v"], [True, False, True])
    full(d["x"], d["g"], **kw, update=True, inverses=None)  # type: ignore[arg-type]
    lower(d["x"], d["g"], **kw, update=True, inverses=None, lower_only=True)  # type: ignore[arg-type]
    for new, old, ref in zip(a2 + g2, d["A"] + d["G"], a1 + g1, strict=True):
        assert_close(new.tril(), ref.tril(), dtype, "kfac_step")
        assert torch.equal(new.triu(1), old.triu(1))
