"""FedAvg's checked fold (`WeightedSum.fold_checked`, `_C.check_fold`): one native call per plain
update that measures, checks and folds it must give the verdicts, reasons and sums of the
Python path (`check_update`, `_judge`, `WeightedSum.fold`) bit for bit, and a rejected update
must leave the round's sums untouched."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from _fed import count_python_checks, fed_round, replay
from fedng._backend import native
from fedng.federated import ServerRound
from fedng.federated.aggregation.mean import apply_server_step, mean_delta
from fedng.federated.aggregation.sums import WeightedSum
from fedng.federated.messages import ClientUpdate
from fedng.federated.server_round import non_finite
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.floats(min_value=0.0, max_value=1e300, allow_nan=False, allow_infinity=False),
        max_size=12,
    )
)
def test_exact_sum_is_math_fsum(xs: list[float]) -> None:
    assert native.exact_sum(x=xs) == math.fsum(xs)


def test_exact_sum_half_even_corner() -> None:
    """CPython's final correction: a tie in the partials rounds to even."""
    for xs in ([1.0, 1e-16, 1e-16 * 0.5], [1e16, 1.0, 1e-16], [2.0**53, 1.0, 2.0**-60]):
        assert native.exact_sum(x=xs) == math.fsum(xs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_check_fold_is_the_torch_fold_bit_for_bit(dtype: torch.dtype) -> None:
    """First fold `w x`, then `acc + w x` with the product rounded first: `WeightedSum.fold`'s
    `_foreach_mul` / `_foreach_add_`, bit for bit (signed zeros included); the squared norms are
    `sum_squares`'; their float64 sum agrees with a float64 reference."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(37, 5), (5,), (1,), (1030,)]
    ref, fast = WeightedSum(), WeightedSum()
    names = [f"p{i}" for i in range(len(shapes))]
    for step in range(4):
        xs = [(torch.randn(s, generator=gen) * 10.0 ** (step - 2)).to(dtype) for s in shapes]
        xs[2].fill_(-0.0)
        w = [0.3, 7.0, 1e-3, 1.0 / 3.0][step]
        ref.fold(dict(zip(names, xs, strict=True)), w)
        folded, sqs = fast.fold_checked(names, xs, w, math.inf)
        assert folded
        for x, sq in zip(xs, sqs, strict=True):
            assert sq == pytest.approx(float((x.double() ** 2).sum()), rel=1e-6)
        for k in names:
            assert torch.equal(fast.sums[k], ref.sums[k]), k
            assert torch.equal(fast.sums[k].signbit(), ref.sums[k].signbit()), k
    assert (fast.count, fast.total_weight) == (ref.count, ref.total_weight)


def test_check_fold_rejects_without_writing() -> None:
    """Above the bound, or NaN / Inf anywhere: nothing is written (also on the first fold)."""
    names = ["a", "b"]
    xs = [torch.ones(3, 4), torch.full((2,), 2.0)]  # norm sqrt(12 + 8)
    acc = WeightedSum()
    assert acc.fold_checked(names, xs, 1.0, math.sqrt(20.0) * (1 - 1e-12))[0] is False
    assert acc.sums == {} and acc.count == 0
    assert acc.fold_checked(names, xs, 1.0, math.sqrt(20.0))[0] is True  # <= bound passes
    before = {k: v.clone() for k, v in acc.sums.items()}
    for bad in (float("nan"), float("inf"), -float("inf")):
        ys = [xs[0].clone(), xs[1].clone()]
        ys[1][1] = bad
        folded, sqs = acc.fold_checked(names, ys, 1.0, math.inf)
        assert folded is False and not math.isfinite(sqs[1]) and math.isfinite(sqs[0])
        for k in names:
            assert torch.equal(acc.sums[k], before[k])
    assert acc.fold_checked(names, xs, 1.0, float("nan"))[0] is True  # a NaN bound bounds nothing
    with pytest.raises(ValueError, match="do not match"):
        acc.fold_checked(names, [torch.ones(3), xs[1]], 1.0, math.inf)
    with pytest.raises(ValueError, match="contiguous"):
        acc.fold_checked(names, [xs[0].half(), xs[1]], 1.0, math.inf)
    with pytest.raises(ValueError, match="contiguous"):
        acc.fold_checked(names, [xs[0].t(), xs[1]], 1.0, math.inf)
    with pytest.raises(ValueError, match="exact"):
        WeightedSum(exact=False).fold_checked(names, xs, 1.0, math.inf)
    with pytest.raises(ValueError, match=r"no sum for \['c'\]"):  # a name the sums lack
        acc.fold_checked(["a", "c"], xs, 1.0, math.inf)
    with pytest.raises(ValueError, match="1 arrays for 2 names"):
        acc.fold_checked(names, xs[:1], 1.0, math.inf)
    assert acc.count == 2  # two folds passed; none of the errors folded anything


def test_check_fold_checks_its_counts_before_any_pointer() -> None:
    """Lists of the wrong length are one-line ValueErrors, not reads past their ends."""
    x = torch.ones(4)
    ok: dict[str, Any] = {"xs": [x.data_ptr()], "accs": [x.data_ptr()], "n": [4], "bf16": [0]}
    for key in ("accs", "n", "bf16"):
        with pytest.raises(ValueError, match=f"'{key}' has 0 entries"):
            native.check_fold(**{**ok, key: []}, weight=1.0, bound=1.0, first=True)
    with pytest.raises(ValueError, match="negative"):
        native.check_fold(**{**ok, "n": [-1]}, weight=1.0, bound=1.0, first=True)
    with pytest.raises(ValueError, match="null pointer"):
        native.check_fold(**{**ok, "accs": [0]}, weight=1.0, bound=1.0, first=True)


def _hostile(ups: list[ClientUpdate]) -> list[ClientUpdate]:
    """Honest replies interleaved with every malformed or outlying kind a plain update can be."""
    u = ups[0]
    k0 = next(iter(u.delta))

    def with_delta(cid: int, f: Any) -> ClientUpdate:
        r = replay(u, cid)
        r.delta = {k: f(k, v) for k, v in r.delta.items()}
        return r

    def nan_at(k: str, v: torch.Tensor) -> torch.Tensor:
        v = v.clone()
        if k == k0:
            v.view(-1)[-1] = float("nan")
        return v

    out = [
        with_delta(100, nan_at),
        with_delta(101, lambda k, v: v * 1e4),  # too large (held first without a reference)
    ]
    out += [replay(x, i) for i, x in enumerate(ups)]
    out += [
        with_delta(102, lambda k, v: v.half()),  # fp16: the Python path, accepted
        with_delta(103, lambda k, v: v.t().contiguous().t() if v.dim() == 2 else v),  # strided
        with_delta(104, lambda k, v: v.bfloat16()),  # bf16: accepted
        with_delta(105, lambda k, v: v[:1] if k == k0 else v),  # wrong shape
        with_delta(106, lambda k, v: v.double()),  # float64: not a wire dtype
        replay(u, 107, num_examples=True),
        replay(u, 108, num_examples=0),
        replay(u, 109, round=u.round + 1),
        replay(u, 110, extras={"x": torch.zeros(1)}),
        replay(u, 111, curvature={"x": torch.zeros(1)}),
        replay(u, 112, meta=[]),
        replay(u, 113, delta={k: v for k, v in u.delta.items() if k != k0}),
        replay(u, 0),  # a second reply under id 0
        with_delta(114, lambda k, v: v * 0.5),
        with_delta(115, lambda k, v: v.to_sparse() if k == k0 else v),  # not strided
        with_delta(116, lambda k, v: torch._neg_view(v) if k == k0 else v),  # lazy negation
    ]
    return out


@pytest.mark.parametrize("total", [False, True])
@pytest.mark.parametrize("rounds", [0, 1])
def test_fast_round_equals_the_python_round(
    total: bool, rounds: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same replies through the fast path and with it switched off: the same verdicts and
    reasons, bit-identical parameters; and equal to a round of only the accepted replies. Round
    0 has no reference: the first replies are held (warm-up) on both paths."""
    state, ups = fed_round("fedavgm", {"server_momentum": 0.9}, rounds=rounds)
    assert ("reference" in state.meta) == (rounds > 0)
    replies = _hostile(ups)
    slow_checks = count_python_checks(monkeypatch)

    def run(fast: bool, rs: list[ClientUpdate]) -> tuple[list[Any], Any]:
        n = 1000 if total else None  # weights n_k / 1000, no rescaling at the end
        rnd = ServerRound(state, total_examples=n)
        assert (rnd._plain is not None) is True
        if not fast:
            rnd._plain = None
        verdicts = [rnd.add(copy.copy(r)) for r in rs]  # fresh: no cached norms
        return verdicts, rnd.finish()[0]

    v_fast, s_fast = run(True, replies)
    # only the replies that are not plain took the Python checks
    assert sorted(slow_checks) == [102, 103, 105, 106, 107, 108, 109, 110, 111, 112, 113, 115, 116]
    v_slow, s_slow = run(False, replies)
    assert v_fast == v_slow
    assert len(s_fast.log["accepted"]) == len(ups) + 5  # fp16, strided, bf16, 1/2, negated
    assert 115 in s_fast.log["rejected"] and 116 in s_fast.log["accepted"]
    for k in s_slow.params:
        assert torch.equal(s_fast.params[k], s_slow.params[k]), k
    assert s_fast.meta == s_slow.meta and s_fast.log["rejected"] == s_slow.log["rejected"]
    kept = [r for r in replies if r.client_id in s_fast.log["accepted"]]
    _, s_kept = run(True, kept)
    for k in s_kept.params:
        assert torch.equal(s_fast.params[k], s_kept.params[k]), k


def test_fast_round_with_known_total_is_the_batch_mean_bit_for_bit() -> None:
    state, ups = fed_round("fedavgm", {"server_momentum": 0.9}, rounds=1)
    rnd = ServerRound(state, total_examples=sum(u.num_examples for u in ups))
    assert all(rnd.add(u).status == "accepted" for u in ups)
    new, _ = rnd.finish()
    ref = state.copy()
    apply_server_step(ref, mean_delta(ups))
    for k in ref.params:
        assert torch.equal(new.params[k], ref.params[k]), k
        assert torch.equal(new.buffers[f"m/{k}"], ref.buffers[f"m/{k}"]), k


def test_strided_first_fold_then_fast_folds() -> None:
    """A first reply with strided arrays (the Python fold keeps their strides in the sums), then
    plain ones (folded natively in memory order): the same parameters as the Python path."""
    state, ups = fed_round("fedavg", rounds=1)
    first = replay(ups[0], 50)
    first.delta = {k: v.t().contiguous().t() if v.dim() == 2 else v for k, v in first.delta.items()}
    assert not all(v.is_contiguous() for v in first.delta.values())
    outs = []
    for fast in (True, False):
        rnd = ServerRound(state)
        if not fast:
            rnd._plain = None
        verdicts = [rnd.add(copy.copy(r)).status for r in [first, *ups]]
        assert verdicts == ["accepted"] * (len(ups) + 1)
        outs.append(rnd.finish()[0])
    for k in outs[0].params:
        assert torch.equal(outs[0].params[k], outs[1].params[k]), k


@pytest.mark.parametrize("lr", [1.0, 0.7, 1.0 / 3.0])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_server_step_is_the_per_parameter_formula_bit_for_bit(lr: float, momentum: float) -> None:
    """`apply_server_step` (one `_foreach` dispatch for all float32 parameters without momentum)
    gives `p + lr * d` of each parameter, as written per parameter; a float64 parameter takes
    the per-parameter path and keeps its dtype promotion; `WeightedSum.scaled` is `v * scale`."""
    state, _ = fed_round("fedavgm", {"server_momentum": momentum, "server_lr": lr}, rounds=0)
    gen = torch.Generator().manual_seed(3)
    step = {k: torch.randn(v.shape, generator=gen) * 1e-2 for k, v in state.params.items()}
    acc = WeightedSum()
    acc.fold(step, 1.0)
    for k, v in acc.scaled(0.3).items():
        assert torch.equal(v, acc.sums[k] * 0.3), k
    new = state.copy()
    apply_server_step(new, step)
    for k, p in state.params.items():
        want = p + lr * step[k]
        if momentum > 0:  # a first momentum buffer is the step itself
            assert torch.equal(new.buffers[f"m/{k}"], step[k]), k
        assert torch.equal(new.params[k], want), k
    k0 = next(iter(state.params))
    mixed = state.copy()
    mixed.params[k0] = mixed.params[k0].double()
    apply_server_step(mixed, step)
    assert mixed.params[k0].dtype == torch.float64
    assert torch.equal(mixed.params[k0], state.params[k0].double() + lr * step[k0])
    empty = state.copy()  # nothing to step or scale: no-ops (torch's _foreach ops refuse [])
    apply_server_step(empty, {})
    assert all(torch.equal(empty.params[k], p) for k, p in state.params.items())
    assert WeightedSum().scaled(0.5) == {}


def test_non_finite_names_every_bad_float_array_in_order() -> None:
    """`server_round.non_finite`: [] for a finite state (the one-call common case); else the
    float arrays (params, then buffers; any float dtype) holding NaN/Inf, in that order."""
    state, _ = fed_round("fedavgm", {"server_momentum": 0.9}, rounds=1)
    assert non_finite(state) == []
    bad = state.copy()
    names = list(bad.params)
    bad.params[names[1]] = bad.params[names[1]].clone()
    bad.params[names[1]].view(-1)[0] = float("inf")
    bad.buffers["x64"] = torch.tensor([1.0, float("nan")], dtype=torch.float64)
    bad.buffers["count"] = torch.tensor([3])  # not a float array: never named
    bad.buffers["h"] = torch.ones(2, dtype=torch.float16)
    assert non_finite(bad) == [names[1], "x64"]
    ok = state.copy()
    ok.buffers["x64"] = torch.ones(2, dtype=torch.float64)  # the general path, all finite
    assert non_finite(ok) == []


def test_fold_plain_is_fold_checked_and_follows_replaced_sums() -> None:
    """`WeightedSum.fold_plain` (the sums' addresses kept between folds) folds and rejects as
    `fold_checked` does, bit for bit; a sum replaced by another tensor, or another names list,
    is not folded into through a stale address."""
    gen = torch.Generator().manual_seed(5)
    names = ["a", "b", "c"]
    shapes = [(6, 7), (7,), (1,)]
    sizes = [42, 7, 1]
    ref, fast = WeightedSum(), WeightedSum()
    for step in range(6):
        xs = [torch.randn(s, generator=gen) for s in shapes]
        xs[1] = xs[1].bfloat16()
        bound = math.inf if step != 3 else 1e-3  # step 3: above the bound, rejected
        if step == 4:
            xs[0][0, 0] = float("nan")
        if step == 5:  # the sums replaced by copies (as a strided first fold does)
            fast.sums = {k: v.clone() for k, v in fast.sums.items()}
        got = fast.fold_plain(names, xs, sizes, 0.3, bound)
        want = ref.fold_checked(names, xs, 0.3, bound)
        assert got[0] == want[0] and repr(got[1]) == repr(want[1]), step  # NaN too
        for k in names:
            assert torch.equal(fast.sums[k], ref.sums[k]), (step, k)
    assert fast.count == ref.count == 4 and fast.total_weight == ref.total_weight
    other = list(names)  # another list object: the addresses are taken again
    xs = [torch.ones(s) for s in shapes]
    fast.fold_plain(other, xs, sizes, 1.0, math.inf)
    ref.fold_checked(other, xs, 1.0, math.inf)
    assert all(torch.equal(fast.sums[k], ref.sums[k]) for k in names)
