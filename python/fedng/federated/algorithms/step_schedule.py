"""FedNG's server-step schedule: constant, then a cosine decay over the last rounds of the run.

Warmup-stable-decay without the warmup: the server step keeps its size for the first
`1 - fraction` of the rounds the server was told it will run (`server_init(..., num_rounds=R)`),
then shrinks along a half cosine that would reach zero one round after the last:

    rho(r)    = min(1, (R - r) / (fraction * R))   (the share of the decay still ahead)
    factor(r) = (1 - cos(pi * rho(r))) / 2         (1 before the decay, ~(pi rho / 2)^2 at the end)

for the 0-based round r (a round past the plan keeps the last round's factor). Under partial
participation a late round moves the model toward the few sampled clients' optimum and away from
the others': at a constant step the run ends wherever its last samples threw it, up to 13 points
below its best round on the regression task at 30% participation. The shrinking steps average the
last samples instead (bench_stability; docs/federated.md, "The server step's decay"). The rounds
before the decay are untouched, so a run that reaches its target early reaches it in the same
rounds, bit for bit. Without a plan (`num_rounds=None`) or with `fraction` 0 there is no schedule.
"""

from __future__ import annotations

import math

NUM_ROUNDS_KEY = "num_rounds"
"""`ServerState.meta` key of the number of rounds the server was told the run has (absent:
unknown, no schedule)."""


def decay_factor(round_: int, num_rounds: int, fraction: float) -> float:
    """The server step's factor at round `round_` (0-based) of a run planned for `num_rounds`.

    Args:
        round_: the round being applied (0-based; past the plan, the last round's factor).
        num_rounds: the rounds the run was planned for (>= 1).
        fraction: the share of the run over which the step decays, in [0, 1] (0: never).

    Returns:
        1.0 before the decay (and whenever `fraction` is 0), then the half cosine above: in
        (0, 1], non-increasing in `round_`.
    """
    if fraction <= 0 or num_rounds < 1:
        return 1.0
    ahead = num_rounds - min(round_, num_rounds - 1)
    rho = ahead / (fraction * num_rounds)
    if rho >= 1.0:
        return 1.0
    return 0.5 * (1.0 - math.cos(math.pi * rho))
