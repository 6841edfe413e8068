"""The pooled direction's damping center: it enters only through the residual at M,
`R0 = S + lambda (c - M)`, so centering on zero is centering on the mean with `S - lambda M`."""

from __future__ import annotations

import torch
from _fed import fed_round
from fedng.curvature import CurvatureSet
from fedng.federated.aggregation import summable
from fedng.federated.aggregation.summable import CONTRIB_PREFIX
from fedng.federated.algorithms.curvature_payload import decoded_curvature


def test_zero_center_is_the_mean_center_of_a_shifted_contribution() -> None:
    _, ups = fed_round("fedng", {"aggregation": "summable"}, 3, 0)
    cs = decoded_curvature(ups[0])
    assert cs is not None
    pooled = CurvatureSet.from_arrays(*cs.to_arrays(torch.float32))
    delta = {k: v.float() for k, v in ups[1].delta.items()}
    contrib = {
        k[len(CONTRIB_PREFIX) :]: v.float()
        for k, v in ups[1].extras.items()
        if k.startswith(CONTRIB_PREFIX)
    }
    rel = 0.1
    zero = summable.pooled_direction(pooled, delta, contrib, rel, "zero", "fp32")
    lams = summable._flat_lams(pooled, rel)
    assert len(set(lams)) > 1  # per-block lambdas: the shift below is per block
    shifted = dict(contrib)
    for lay, lam in zip(pooled.layouts, lams, strict=True):
        for name in (lay.weight, lay.bias):
            if name is not None:
                shifted[name] = contrib[name] - lam * delta[name]
    mean = summable.pooled_direction(pooled, delta, shifted, rel, "mean", "fp32")
    assert zero.probed == mean.probed and zero.probed
    for a, b in zip(zero.blocks, mean.blocks, strict=True):
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert torch.equal(a, b)
    plain = summable.pooled_direction(pooled, delta, contrib, rel, "mean", "fp32")
    assert any(  # the center matters: the test above can fail
        a is not None and b is not None and not torch.allclose(a, b)
        for a, b in zip(zero.blocks, plain.blocks, strict=True)
    )
