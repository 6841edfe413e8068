"""FedNG-summable's fast path (`fedng.federated.summable_check`, `_C.summable_check_fold`): a
reply that matches the round's plan is checked and folded in one native call, and must get the
verdict, the reason and the sums of the Python path (`check_update`, the signature, `_judge`,
`CurvatureSums.fold`) bit for bit; a reply the call declines leaves the sums untouched."""

from __future__ import annotations

import copy
import functools
import math
import random
from collections import Counter
from typing import Any

import pytest
import torch
from _fed import blobs_task, count_python_checks, fed_round, replay
from fedng._backend import native
from fedng.curvature.packed_fold import fold_update, payload_traces, sum_squares
from fedng.curvature.quantize import VEC_CHUNK, fold_plan, quantize
from fedng.curvature.spec import pack_triangle
from fedng.federated import ServerRound, server_round, validate, wire
from fedng.federated.algorithms.fedng_server import CurvatureSums
from fedng.federated.config import make_configs
from fedng.federated.messages import ClientUpdate
from fedng.federated.round import server_step
from fedng.federated.simulator import simulate
from fedng.federated.summable_check import SummableFast
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fed_fuzz import BAD_ID, fuzzed_update


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@functools.cache
def _summable_round() -> tuple[Any, list[ClientUpdate]]:
    """A FedNG-summable server after one round (references set) and the next round's updates."""
    return fed_round("fedng", {"aggregation": "summable"}, rounds=1)


def _zoo(ups: list[ClientUpdate]) -> tuple[list[ClientUpdate], set[int]]:
    """Honest summable replies interleaved with every malformed or outlying kind, and the ids
    that must take the fast path (the honest ones, a scaled delta, a bf16 delta, a large c_k)."""
    u = ups[0]
    k0 = next(iter(u.delta))
    f0 = next(iter(u.extras))

    def part(cid: int, what: str, f: Any) -> ClientUpdate:
        r = replay(u, cid)
        setattr(r, what, {k: f(k, v) for k, v in getattr(r, what).items()})
        return r

    def nan_at(first: str) -> Any:
        def f(k: str, v: torch.Tensor) -> torch.Tensor:
            v = v.clone()
            if k == first:
                v.view(-1)[-1] = float("nan")
            return v

        return f

    def meta(cid: int, f: Any) -> ClientUpdate:
        r = replay(u, cid)
        r.meta["curv"] = f(copy.deepcopy(r.meta["curv"]))
        return r

    def floaty(m: dict[str, Any]) -> dict[str, Any]:
        m["layouts"][0][2] = float(m["layouts"][0][2])  # 8 -> 8.0: == but not the same JSON
        return m

    def scaled_side(factor: float, first_only: bool = True) -> Any:
        def f(k: str, v: torch.Tensor) -> torch.Tensor:
            if not k.endswith("/scale"):
                return v
            v = v.clone()
            (v[:4] if first_only else v).mul_(factor)
            return v

        return f

    out = [
        part(100, "delta", nan_at(k0)),
        part(101, "delta", lambda k, v: v * 1e4),  # too large
    ]
    out += [replay(x, i) for i, x in enumerate(ups)]
    out += [
        part(102, "delta", nan_at(k0)),  # judged on arrival now
        part(103, "extras", nan_at(f0)),  # NaN in c_k (bf16)
        part(104, "delta", lambda k, v: v * 1e4),
        part(105, "curvature", scaled_side(1e5)),  # a curvature scale too large
        part(106, "curvature", scaled_side(-1.0)),  # negative scales: unsettled, checked
        part(107, "curvature", scaled_side(float("nan"), first_only=False)),
        part(108, "curvature", scaled_side(1e30, first_only=False)),  # above MAX_ABS
        part(109, "delta", lambda k, v: v.half()),  # fp16: the Python path, accepted
        part(110, "delta", lambda k, v: v.t().contiguous().t() if v.dim() == 2 else v),
        part(111, "delta", lambda k, v: v.bfloat16()),  # fast, accepted
        part(112, "delta", lambda k, v: v[:1] if k == k0 else v),  # wrong shape
        part(113, "delta", lambda k, v: v.double()),
        replay(u, 114, num_examples=True),
        replay(u, 115, num_examples=0),
        replay(u, 116, round=u.round + 1),
        replay(u, 117, extras={k: v for k, v in u.extras.items() if k != f0}),
        replay(u, 118, extras={**u.extras, "x": torch.zeros(1)}),
        replay(u, 119, curvature={"kfac": u.curvature["kfac"]}),
        part(120, "curvature", lambda k, v: v.to(torch.int16) if k == "kfac" else v),
        part(121, "curvature", lambda k, v: v[:-1] if k == "kfac" else v),
        meta(122, floaty),
        meta(123, lambda m: dict(reversed(list(m.items())))),  # equal, other order: fast, accepted
        replay(u, 124, meta=[]),
        replay(u, 0),  # a second reply under id 0
        part(125, "delta", lambda k, v: v * 0.5),  # fast, accepted
        part(126, "extras", lambda k, v: v * 1e3),  # c_k is not norm-checked: fast, accepted
        part(127, "delta", lambda k, v: v.to_sparse() if k == k0 else v),
        part(128, "delta", lambda k, v: torch._neg_view(v) if k == k0 else v),
        part(129, "curvature", lambda k, v: v.reshape(2, -1) if k == "kfac" else v),  # 2-D q
    ]
    return out, {*range(len(ups)), 111, 123, 125, 126, 129}


def _round(
    state: Any, replies: list[ClientUpdate], fast: bool, total: int | None
) -> tuple[list[Any], Any, ServerRound]:
    rnd = ServerRound(state, total_examples=total)
    if not fast:
        rnd._summable_tried = True  # no plan: every reply takes the Python path
    verdicts = [rnd.add(copy.copy(r)) for r in replies]  # fresh: no cached norms
    probe = rnd.probe()
    assert probe is not None
    by_id = {r.client_id: r for r in replies}
    for cid in rnd.accepted_ids:
        assert rnd.add_reply(rnd.algo.answer_probe(by_id[cid], probe)).status == "accepted"
    return verdicts, rnd.finish()[0], rnd


@pytest.mark.parametrize("total", [False, True])
@pytest.mark.parametrize("rounds", [0, 1])
def test_fast_round_equals_the_python_round(
    total: bool, rounds: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same replies with the fast path and without: the same verdicts and reasons,
    bit-identical parameters, global curvature and logs; exactly the planned replies skipped
    the Python checks. Round 0 has no reference: the first replies are held (warm-up)."""
    state, ups = fed_round("fedng", {"aggregation": "summable"}, rounds=rounds)
    assert ("reference" in state.meta) == (rounds > 0)
    replies, fast_ids = _zoo(ups)
    checked = count_python_checks(monkeypatch)
    n = 10_000 if total else None
    v_fast, s_fast, rnd = _round(state, replies, True, n)
    assert rnd._summable is not None
    took_fast = {r.client_id for r in replies} - set(checked)
    first = 1 if rounds else 2  # the plan comes from reply 0; in round 0 reply 1 is held
    assert took_fast == fast_ids - set(range(first))
    v_slow, s_slow, _ = _round(state, replies, False, n)
    assert v_fast == v_slow
    assert {v.client_id for v in v_fast if v.status == "rejected"} >= {102, 103, 104, 105, 107}
    assert {109, 110, 111, 123, 125, 126, 129} <= set(s_fast.log["accepted"])
    for part in ("params", "buffers"):
        a, b = getattr(s_fast, part), getattr(s_slow, part)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    log_f = {k: v for k, v in s_fast.log.items() if k != "server_time_s"}
    log_s = {k: v for k, v in s_slow.log.items() if k != "server_time_s"}
    assert s_fast.meta == s_slow.meta and log_f == log_s


def _call(**change: Any) -> tuple[int, float, list[float], torch.Tensor]:
    """One `summable_check_fold` on a small synthetic reply (a 3 x 3 triangle payload)."""
    x = torch.tensor([3.0, 4.0])
    acc = torch.ones(2)
    q = torch.tensor([0, 64, 0, -10, 5, 0], dtype=torch.int8)
    side = torch.tensor([2.0, 1.0, 4.0, 0.01])  # D_i, then the certified delta
    acc8 = torch.zeros(6)
    args: dict[str, Any] = {
        "xs": [x.data_ptr()],
        "accs": [acc.data_ptr()],
        "n": [2],
        "bf16": [0],
        "ndelta": 1,
        "q": q.data_ptr(),
        "side": side.data_ptr(),
        "acc": acc8.data_ptr(),
        "nq": 6,
        "nside": 4,
        "nacc": 6,
        "segs": [0, 0, 0, 0, 3, 0],
        "chunk": 64,
        "max_abs": 1e18,
        "pairs": [0, -1],
        "divs": [3.0],
        "bounds": [math.nan],
        "weight": 0.5,
        "norm_bound": math.inf,
    }
    args.update(change)
    status, norm, sqs, scales = native.summable_check_fold(**args)
    if status in (0, 4):  # measured: the scale is the payload's trace over 3
        assert len(scales) == 1 and math.isfinite(scales[0])
    return status, norm, sqs, torch.cat([acc, acc8])


def test_check_fold_statuses_and_nothing_written_unless_folded() -> None:
    status, norm, sqs, sums = _call()
    assert (status, norm, sqs) == (0, 5.0, [25.0])
    assert sums[:2].tolist() == [2.5, 3.0] and sums[2:].abs().sum() > 0
    onep = torch.tensor(1.0) + torch.tensor(0.01)
    trace = sum(float(torch.tensor(d) * onep) for d in (2.0, 1.0, 4.0))  # float32 D_i (1 + delta)
    bad: dict[int, dict[str, Any]] = {
        3: {"norm_bound": 4.99},  # the norm is 5
        4: {"bounds": [trace / 3.0 * 0.999]},
        2: {"max_abs": trace * 0.5},
    }
    for want, change in bad.items():
        status, _, _, sums = _call(**change)
        assert status == want, change
        assert sums.tolist() == [1.0, 1.0] + [0.0] * 6, change  # untouched
    assert _call(bounds=[trace / 3.0 * 1.001])[0] == 0
    nan = torch.tensor([float("nan"), 1.0])
    assert _call(xs=[nan.data_ptr()])[0] == 1
    neg = torch.tensor([2.0, -1.0, 4.0, 0.01])
    assert _call(side=neg.data_ptr())[0] == 2
    cases: tuple[tuple[dict[str, Any], str], ...] = (
        ({"pairs": [1, -1]}, "out of range"),
        ({"pairs": [-1, 0]}, "out of range"),
        ({"bounds": []}, "'bounds'"),
        ({"ndelta": 2}, "ndelta"),
        ({"segs": []}, "int8 payload"),
        ({"nq": 5}, "runs past"),
        ({"nacc": 5}, "runs past"),
    )
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            _call(**change)


def test_check_fold_with_a_low_rank_segment_is_the_python_fold_and_scales() -> None:
    """A payload of a triangle and a low-rank ("lrtri") factor: the traces are
    `payload_traces`', each scale `(tr_a [* tr_b]) / div` flips between folded and rejected
    exactly at its bound (the Python float arithmetic), and the fold is `fold_update`'s."""
    gen = torch.Generator().manual_seed(1)
    segs = [("tri", 6), ("lrtri", 260)]
    mats = []
    for n in (6, 260):
        b = torch.randn(n, 40 if n > 6 else 3, generator=gen)
        mats.append(pack_triangle(b @ b.T / n))
    q, side = quantize(torch.cat(mats), segs)
    flat, nacc, nq, nside = fold_plan(segs)
    traces = payload_traces(q, side, flat, VEC_CHUNK)
    assert traces is not None and len(traces) == 2
    xs = [torch.randn(7, 3, generator=gen), torch.randn(5, generator=gen).bfloat16()]
    pairs, divs = [0, 1, 0, -1, 1, -1], [1.0, 6.0, 260.0]
    scales = [traces[0] * traces[1] / 1.0, traces[0] / 6.0, traces[1] / 260.0]

    def run(bounds: list[float]) -> tuple[int, torch.Tensor, torch.Tensor]:
        accs = [torch.ones(21), torch.ones(5)]
        acc8 = torch.ones(nacc)
        status, norm, sqs, measured = native.summable_check_fold(
            xs=[x.data_ptr() for x in xs],
            accs=[a.data_ptr() for a in accs],
            n=[21, 5],
            bf16=[0, 1],
            ndelta=1,
            q=q.data_ptr(),
            side=side.data_ptr(),
            acc=acc8.data_ptr(),
            nq=nq,
            nside=nside,
            nacc=nacc,
            segs=list(flat),
            chunk=VEC_CHUNK,
            max_abs=1e18,
            pairs=pairs,
            divs=divs,
            bounds=bounds,
            weight=0.25,
            norm_bound=math.inf,
        )
        assert sqs == sum_squares(xs)
        assert status != 0 or norm == math.sqrt(math.fsum(sqs[:1]))
        assert status != 0 or measured == scales  # `_scales_of`'s doubles, bit for bit
        return status, torch.cat(accs), acc8

    status, got, got8 = run(scales)  # value == bound passes
    assert status == 0
    accs = [torch.ones(21), torch.ones(5)]
    ref8 = torch.ones(nacc)
    fold_update(accs, [x.reshape(-1) for x in xs], 0.25, (ref8, q, side, flat, VEC_CHUNK))
    assert torch.equal(got, torch.cat(accs)) and torch.equal(got8, ref8)
    for i in range(3):
        below = list(scales)
        below[i] = math.nextafter(scales[i], 0.0)
        status, got, got8 = run(below)
        assert status == 4, i
        assert torch.equal(got8, torch.ones(nacc)) and torch.equal(got, torch.ones(26))


def test_streaming_simulation_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """`simulate(streaming=True)` with FedNG-summable (the default aggregation) over a few
    rounds: bit-identical losses and server logs with the fast path (which took most replies)
    and without it."""
    task = blobs_task(num_clients=5, n=40)
    cc, sc = make_configs("fedng", {"local_steps": 3, "aggregation": "summable"})
    folded: list[float] = []
    real = SummableFast.try_fold

    def counted(self: SummableFast, *a: Any) -> tuple[float, list[float]] | None:
        got = real(self, *a)
        if got is not None:
            folded.append(got[0])
        return got

    monkeypatch.setattr(SummableFast, "try_fold", counted)
    runs = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(server_round, "summable_plan", lambda *a: None)
        hist = simulate(task, cc, sc, rounds=4, participation=1.0, seed=3, streaming=True)
        runs.append(
            [
                (r.test_loss, {k: v for k, v in r.server_log.items() if k != "server_time_s"})
                for r in hist.rounds
            ]
        )
    assert runs[0] == runs[1]
    assert runs[0][-1][1]["aggregation"] == "summable"
    assert len(folded) >= 3 * 4  # rounds 1-3: all but the first reply (round 0: warm-up)


_MUTATIONS = ("none", "delta*", "ck*", "side*", "nan", "bf16", "fp16", "meta", "round")


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 4),
            st.sampled_from(_MUTATIONS),
            st.sampled_from([0.5, 30.0, 1e3, 1e5, -1.0]),
            st.integers(0, 7),
        ),
        min_size=1,
        max_size=12,
    ),
    st.booleans(),
)
def test_random_rounds_match_the_python_path(
    plan: list[tuple[int, str, float, int]], total: bool
) -> None:
    """Random replies (honest ones, scaled deltas / contributions / int8 scales, a NaN in any
    array, other dtypes, tweaked metadata, another round): the fast path and the Python path
    give the same verdicts and bit-identical parameters and global curvature."""
    state, ups = _summable_round()
    replies = []
    for cid, (src, what, factor, where) in enumerate(plan):
        r = replay(ups[src], cid)
        if what == "delta*":
            r.delta = {k: v * factor for k, v in r.delta.items()}
        elif what == "ck*":
            r.extras = {k: v * factor for k, v in r.extras.items()}
        elif what == "side*":
            r.curvature = {
                k: v * factor if k.endswith("/scale") else v for k, v in r.curvature.items()
            }
        elif what == "nan":
            arrays = [*r.delta.values(), *r.extras.values()]
            arrays[where % len(arrays)].view(-1)[0] = float("nan")
        elif what in ("bf16", "fp16"):
            dt = torch.bfloat16 if what == "bf16" else torch.float16
            r.delta = {k: v.to(dt) for k, v in r.delta.items()}
        elif what == "meta":
            r.meta["curv"]["rep_meta"]["kfac"]["x"] = where
        elif what == "round":
            r.round = r.round + where + 1
        replies.append(r)
    n = 10_000 if total else None
    outs = []
    for fast in (True, False):
        rnd = ServerRound(state, total_examples=n)
        if not fast:
            rnd._summable_tried = True
        verdicts = [rnd.add(copy.copy(r)) for r in replies]
        outs.append((verdicts, rnd.finish()[0]))
    (v_fast, s_fast), (v_slow, s_slow) = outs
    assert v_fast == v_slow
    for part in ("params", "buffers"):
        a, b = getattr(s_fast, part), getattr(s_slow, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert s_fast.meta == s_slow.meta


def test_streaming_floors_scale_references_and_keeps_the_peak_as_the_batch_round() -> None:
    """The streaming round applies the batch rule's floor (the run's peak round medians,
    `validate.curvature_floor`) on both paths, and leaves the next round the references the
    batch round does (`validate.reference_of`: median delta norm and the updated peak)."""
    state, ups = fed_round("fedng", {"aggregation": "summable"}, rounds=1)
    big = replay(ups[0], 50)
    big.curvature = {k: v * 300.0 if k.endswith("/scale") else v for k, v in big.curvature.items()}
    replies = [replay(u, i) for i, u in enumerate(ups)] + [big]
    outs = {}
    for floor in (False, True):
        st = state.copy()
        if floor:  # a peak 1e3 x every global scale: the outlier's bound rises 1e3-fold
            glob = ServerRound(state).scale_ref or {}
            st.meta[validate.REFERENCE_KEY] = {
                **st.meta[validate.REFERENCE_KEY],
                validate.PEAK_KEY: {k: 1e3 * v for k, v in glob.items()},
            }
        for fast in (True, False):
            rnd = ServerRound(st)
            if not fast:
                rnd._summable_tried = True
            verdicts = [rnd.add(copy.copy(r)).status for r in replies]
            outs[floor, fast] = (verdicts, rnd.finish()[0].meta[validate.REFERENCE_KEY])
        batch = server_step(st, [copy.copy(r) for r in replies])[0]
        assert outs[floor, True] == outs[floor, False]
        assert outs[floor, True][1] == batch.meta[validate.REFERENCE_KEY]
        assert (50 in batch.log["rejected"]) is not floor
    assert outs[False, True][0][-1] == "rejected" and outs[True, True][0][-1] == "accepted"
    peak = outs[False, True][1][validate.PEAK_KEY]  # the first peak: this round's medians
    assert set(peak) == set(ServerRound(state).scale_ref or {})


def _fuzz_streaming(cases: int, seed: int) -> Counter[str]:
    """Fuzzed summable replies (bit flips, truncation, junk metadata, mutated arrays, type
    confusion: `test_fed_fuzz`'s generators) after the honest ones of a streaming round: the
    fast path and the Python path give the same verdict and the same state, and never raise."""
    rng = random.Random(seed)
    state, ups = _summable_round()
    template = replay(ups[0], BAD_ID).to_bytes()
    outcomes: Counter[str] = Counter()
    for _ in range(cases):
        try:
            bad = fuzzed_update(rng, template)
        except wire.PayloadError:
            outcomes["decode rejected"] += 1
            continue
        got = []
        for fast in (True, False):
            rnd = ServerRound(state)
            if not fast:
                rnd._summable_tried = True
            for i, u in enumerate(ups):
                rnd.add(replay(u, i))
            verdict = rnd.add(copy.copy(bad))
            got.append((verdict, rnd.finish()[0]))
        (v_fast, s_fast), (v_slow, s_slow) = got
        assert v_fast == v_slow
        assert all(torch.equal(s_fast.params[k], s_slow.params[k]) for k in s_slow.params)
        assert all(torch.equal(s_fast.buffers[k], s_slow.buffers[k]) for k in s_slow.buffers)
        outcomes[v_fast.status] += 1
    return outcomes


def test_fuzzed_replies_match_the_python_path() -> None:
    outcomes = _fuzz_streaming(120, seed=0)
    assert outcomes["rejected"] and outcomes["accepted"]


@pytest.mark.slow
def test_fuzzed_replies_match_the_python_path_slow() -> None:
    outcomes = _fuzz_streaming(3000, seed=1)
    assert sum(outcomes.values()) == 3000


def test_a_replaced_sum_is_never_folded_into_through_a_stale_address() -> None:
    """Sums replaced by other tensors after the plan was made (no code path does it today):
    the fast path declines and the Python path folds into the new tensors — the same state."""
    state, ups = _summable_round()
    outs = []
    for fast in (True, False):
        rnd = ServerRound(state)
        if not fast:
            rnd._summable_tried = True
        rnd.add(replay(ups[0], 0))
        acc = rnd.acc
        assert isinstance(acc, CurvatureSums)
        for part in (acc.deltas, acc.contrib, acc.curv):
            part.sums = {k: v.clone() for k, v in part.sums.items()}
        verdicts = [rnd.add(replay(u, i)).status for i, u in enumerate(ups[1:], start=1)]
        assert verdicts == ["accepted"] * (len(ups) - 1)
        outs.append(rnd.finish()[0])
    for k in outs[1].params:
        assert torch.equal(outs[0].params[k], outs[1].params[k]), k
    assert all(torch.equal(outs[0].buffers[k], v) for k, v in outs[1].buffers.items())


def test_a_reply_aliasing_a_running_sum_takes_the_python_path(monkeypatch: Any) -> None:
    """An in-process reply whose array IS a running sum (the fast fold's order would change
    what it reads) is declined natively (`kAliased`) and folded by the Python path: the same
    verdicts and bit-identical sums with the fast path on or off."""
    state, ups = fed_round("fedng", {"aggregation": "summable"}, rounds=1)
    total = sum(u.num_examples for u in ups) * 2
    checked = count_python_checks(monkeypatch)

    def run(fast: bool) -> tuple[list[str], dict[str, torch.Tensor]]:
        rnd = ServerRound(state, total_examples=total)
        if not fast:
            rnd._summable_tried = True
        verdicts = [rnd.add(replay(u, i)).status for i, u in enumerate(ups[:3])]
        hostile = replay(ups[3], 50)
        key = list(hostile.delta)[-1]
        hostile.delta[key] = rnd.acc.contrib.sums[key]
        verdicts.append(rnd.add(hostile).status)
        sums = {n: t.clone() for s in (rnd.acc.deltas, rnd.acc.contrib) for n, t in s.sums.items()}
        return verdicts, sums

    (va, sa) = run(True)
    assert checked == [0, 50]  # the plan's first reply, then the aliasing one: Python checks
    (vb, sb) = run(False)
    assert va == vb and sa.keys() == sb.keys()
    assert all(torch.equal(sa[n], sb[n]) for n in sa)


def test_a_first_reply_in_another_key_order_leaves_the_fast_path_on(monkeypatch: Any) -> None:
    """The plan comes from the round's first reply; one whose curvature metadata lists its keys
    in another order (the same metadata) must not send every later reply through the Python
    checks; metadata that differs only in 1 vs 1.0 still does not match."""
    state, ups = fed_round("fedng", {"aggregation": "summable"}, rounds=1)
    checked = count_python_checks(monkeypatch)
    rnd = ServerRound(state)
    first = replay(ups[0], 0)
    first.meta["curv"] = dict(reversed(list(first.meta["curv"].items())))
    verdicts = [rnd.add(first)] + [rnd.add(replay(ups[i % 5], i)) for i in range(1, 12)]
    assert all(v.status == "accepted" for v in verdicts)
    assert checked == [0]
    odd = replay(ups[1], 40)
    layout = odd.meta["curv"]["layouts"][0]
    assert type(layout[2]) is int
    layout[2] = float(layout[2])  # equal as a dict, another type on the wire
    rnd.add(odd)
    assert checked == [0, 40]
