"""The "auto" curvature policy: K-FAC or the diagonal Fisher per layer, chosen by its shape.

K-FAC's factors of an m x n block hold `n(n+1)/2 + m(m+1)/2` numbers against the block's `m n`
parameters: about as many for square layers, but many more for a wide-input, narrow-output
layer (a 61 -> 10 softmax head: 3.2x; a 513 -> 10 CNN head: 26x). Per round the curvature
travels twice (upload, and the server's broadcast back) as int8, one byte per entry: 2 bytes per
entry; the model travels twice too (theta down, delta up) in fp32: 8 bytes per parameter.
"auto" keeps K-FAC everywhere while the curvature's traffic stays within the model's, i.e.
while the factors hold at most `MAX_FACTOR_RATIO = 4` entries per parameter over the model;
beyond that the blocks with the largest entries-per-parameter ratio fall back to the diagonal
Fisher (one entry per parameter, and exact in the summable aggregation: no line search for
them), one at a time, until the model is within the ratio. Blocks that are not plain Kronecker
blocks keep their defaults.

Measured (bench_fl, synthetic(1, 1), 5 seeds): the softmax regression (3.2x) reaches the target
in 8 rounds with K-FAC against 15 with the diagonal, and with fewer bytes (1.71 vs 1.88 MB):
K-FAC's curvature pays for itself in rounds below the threshold. The CNNs' dense heads (16x,
26x) are 90% of their K-FAC payload; there the diagonal head (instead of K-FAC) slowed
digits-cnn from 4 to 9+ rounds to bench_fl's target, so the default keeps K-FAC and shrinks the
wire instead: the int8 codec (`fedng.curvature.quantize`) sends every factor at least
`LOWRANK_MIN` = 256 wide whose triangle outweighs its layer's parameters as a rank-32
truncation plus its tail's mean eigenvalue (the heads' 513- and 321-wide input factors; no
other bench layer is that wide): 2.89x FedAvg's bytes per round on digits-cnn instead of
5.41x, at K-FAC's rounds.
"""

from __future__ import annotations

from torch import nn

from fedng.curvature.discover import discover
from fedng.curvature.spec import BlockSpec, triangle_size

AUTO = "auto"
"""The curvature spec value (and the default kind of a spec) that asks for this policy."""

MAX_FACTOR_RATIO = 4.0
"""Most K-FAC curvature entries per parameter, over the model, that "auto" keeps."""


def factor_entries(spec: BlockSpec) -> int:
    """K-FAC payload entries of a Kronecker block: the A and G triangles."""
    return triangle_size(spec.n) + triangle_size(spec.m)


def auto_curvature(model: nn.Module, ratio: float = MAX_FACTOR_RATIO) -> dict[str, str]:
    """The block names of `model` that "auto" gives the diagonal Fisher (all others: K-FAC).

    Args:
        model: the model.
        ratio: the most K-FAC entries per parameter kept over the model (`MAX_FACTOR_RATIO`).

    Returns:
        {block name: "diag"} for the blocks switched (empty: K-FAC everywhere).
    """
    kron = [b.spec for b in discover(model).blocks if b.spec.kind == "kron"]
    params = sum(s.numel for s in kron)
    entries = sum(factor_entries(s) for s in kron)
    out: dict[str, str] = {}
    for s in sorted(kron, key=lambda s: factor_entries(s) / s.numel, reverse=True):
        if entries <= ratio * params:
            break
        entries += s.numel - factor_entries(s)
        out[s.name] = "diag"
    return out
