"""The first round's held (warm-up) summable replies: once the first one has built the round's
plan, the others are folded by the native fast path, with the same sums as the Python fold."""

from __future__ import annotations

import pytest
import torch
from _fed import fed_round, replay
from fedng.federated import ServerRound
from fedng.federated.algorithms.fedng_server import CurvatureSums


def test_held_replies_after_the_first_take_the_native_fold(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    state, ups = fed_round("fedng", {"aggregation": "summable"}, n=5)
    assert "reference" not in state.meta  # round 0: the first replies are held
    python_folds: list[int] = []
    real = CurvatureSums.fold

    def counted(self: CurvatureSums, update: object, weight: float) -> None:
        python_folds.append(1)
        real(self, update, weight)  # type: ignore[arg-type]

    monkeypatch.setattr(CurvatureSums, "fold", counted)
    states = []
    for fast in (True, False):
        python_folds.clear()
        rnd = ServerRound(state, warmup=3)
        if not fast:
            rnd._summable_tried = True  # no plan: every reply takes the Python fold
        verdicts = [rnd.add(replay(u, i)).status for i, u in enumerate(ups)]
        assert verdicts == ["pending"] * 3 + ["accepted"] * 2
        assert len(python_folds) == (1 if fast else 5)
        probe = rnd.probe()
        assert probe is not None
        for i in rnd.accepted_ids:
            assert rnd.add_reply(rnd.algo.answer_probe(replay(ups[i], i), probe)).status == (
                "accepted"
            )
        states.append(rnd.finish()[0])
    a, b = states
    for part in ("params", "buffers"):
        for k in getattr(a, part):
            assert torch.equal(getattr(a, part)[k], getattr(b, part)[k]), k
    assert a.meta == b.meta
