"""Payload fuzzing of the server: bit flips, truncation, malformed metadata, planted arrays and
type confusion. Nothing escapes `server_step`; every rejected case leaves the round exactly as
it is without it; every accepted one leaves a finite state."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
import torch
from fedng.federated import wire
from fedng.federated.messages import ClientUpdate
from fedng.federated.round import server_step
from test_fed_robust import assert_same, make_round

BAD_ID = 9

JUNK: list[object] = [
    None, True, False, 0, -1, 2**70, 2.7, 1e9, float("inf"), "", "kfac", "x" * 300, [], [1, "a"],
    {}, {"kfac": {}}, [[None] * 9], {"a": [1, {"b": None}]},
]  # fmt: skip


def _junk(rng: random.Random) -> object:
    return rng.choice(JUNK)


def _set_path(meta: dict[str, Any], rng: random.Random) -> None:
    """Replaces one random node of the metadata tree (not `type` / `client_id`) with junk."""
    node: Any = meta
    keys = [k for k in meta if k not in ("type", "client_id")]
    key: Any = rng.choice(keys)
    while rng.random() < 0.7 and isinstance(node[key], (dict, list)) and node[key]:
        node = node[key]
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
    node[key] = _junk(rng)


def _mutate_arrays(arrays: dict[str, torch.Tensor], rng: random.Random) -> None:
    name = rng.choice(sorted(arrays))
    t = arrays[name].clone()
    op = rng.randrange(9)
    if op == 0:
        t = t * 10.0 ** rng.randint(-30, 38)
    elif op == 1 and t.numel():
        # int8 curvature (compressed payloads) cannot hold NaN: its extremes instead
        bad = [float("nan"), float("inf"), 3e38] if t.is_floating_point() else [-128, 127]
        t.view(-1)[rng.randrange(t.numel())] = rng.choice(bad)
    elif op == 2:
        t = t.double()
    elif op == 3:
        t = torch.ones(t.shape, dtype=torch.int64)
    elif op == 4:
        t = t.reshape(-1)[: max(0, t.numel() - rng.randint(1, 3))].clone()
    elif op == 5:
        del arrays[name]
        return
    elif op == 6:
        arrays[name + "x"] = t
        return
    elif op == 7:
        t = -t
    else:
        t = t * rng.uniform(0.5, 2.0)
    arrays[name] = t


def _bytes_case(rng: random.Random, data: bytes) -> bytes:
    kind = rng.randrange(4)
    out = bytearray(data)
    if kind == 0:  # 1-3 bit flips anywhere
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(len(out))
            out[pos] ^= 1 << rng.randrange(8)
    elif kind == 1:  # a flip in the prefix or header
        pos = rng.randrange(min(len(out), 400))
        out[pos] ^= 1 << rng.randrange(8)
    elif kind == 2:
        return bytes(out[: rng.randrange(len(out))])
    else:
        return bytes(out) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(out)


def _object_case(rng: random.Random, u: ClientUpdate) -> ClientUpdate:
    """Type confusion on the decoded object (what an in-process caller could pass)."""
    field = rng.choice(["num_examples", "round", "delta", "curvature", "extras", "meta"])
    if field in ("delta", "curvature", "extras") and rng.random() < 0.5:
        d = dict(getattr(u, field)) or {"k": torch.zeros(1)}
        d[rng.choice(sorted(d))] = _junk(rng)
        setattr(u, field, d)
    else:
        setattr(u, field, _junk(rng))
    return u


def fuzzed_update(rng: random.Random, template: bytes) -> ClientUpdate:
    """One planted payload made from an honest update's bytes: bit flips or truncation, junk
    metadata, mutated arrays, or type confusion on the decoded object (chosen by `rng`).

    Raises:
        wire.PayloadError: the planted bytes do not decode (the server's first rejection).
    """
    kind = rng.choice(["bytes", "meta", "arrays", "object"])
    if kind == "bytes":
        return ClientUpdate.from_bytes(_bytes_case(rng, template))
    if kind in ("meta", "arrays"):
        p = wire.unpack(template)
        arrays, meta = dict(p.arrays), dict(p.meta)
        if kind == "meta":
            _set_path(meta, rng)
        else:
            _mutate_arrays(arrays, rng)
        return ClientUpdate.from_bytes(wire.pack(arrays, meta=meta))
    return _object_case(rng, ClientUpdate.from_bytes(template))


def run_fuzz(cases: int, seed: int = 0) -> Counter[str]:
    """Runs `cases` planted payloads against one FedNG round; returns the outcome counts."""
    torch.set_num_threads(1)
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    setups = [make_round(extra={"aggregation": "fisher"}, rounds=r) for r in (0, 1)]
    refs = []
    for state, ups in setups:
        ups[3].client_id = BAD_ID
        template = ups[3].to_bytes()
        ref, _ = server_step(state, ups[:3])
        snapshot = state.copy()
        refs.append((state, ups[:3], template, ref, snapshot))
    for _ in range(cases):
        state, good, template, ref, snapshot = refs[rng.randrange(2)]
        try:
            bad = fuzzed_update(rng, template)
        except wire.PayloadError:
            outcomes["decode rejected"] += 1
            continue
        new, _ = server_step(state, [*good, bad])  # must never raise
        if BAD_ID in new.log["rejected"]:
            outcomes["validation rejected"] += 1
            assert new.log["accepted"] == [0, 1, 2], new.log
            assert_same(new, ref)
        else:
            outcomes["accepted"] += 1
            arrays_after = {**new.params, **new.buffers}.values()
            assert all(bool(torch.isfinite(v).all()) for v in arrays_after)
        assert_same(state, snapshot)
    return outcomes


def _report(outcomes: Counter[str]) -> None:
    print("fuzz outcomes:", dict(sorted(outcomes.items())))


def test_fuzz_default() -> None:
    outcomes = run_fuzz(300)
    _report(outcomes)
    assert sum(outcomes.values()) == 300
    assert outcomes["decode rejected"] and outcomes["validation rejected"]


@pytest.mark.slow
def test_fuzz_slow() -> None:
    outcomes = run_fuzz(10_000, seed=1)
    _report(outcomes)
    assert sum(outcomes.values()) == 10_000
