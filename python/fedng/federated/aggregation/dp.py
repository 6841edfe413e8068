"""Client-level differential privacy: clipping, Gaussian noise, and accounting.

The private release of a round is the sum over the participating clients of their clipped
delta (L2 norm <= C) and, when curvature is shared, of their clipped packed curvature payload
(L2 norm <= C_F over every array, symmetric matrices as triangles). With the round's budget
split into fractions `f_d + f_c = 1` (`budget_fractions`: `f_c` = `dp_curvature_share` in a
round with curvature, 0 without), adding or removing one client changes the vector
`(sum delta sqrt(f_d) / C, sum curvature sqrt(f_c) / C_F)` by at most 1 in L2 norm, so Gaussian
noise of standard deviation `z C / sqrt(f_d)` on the delta sum and `z C_F / sqrt(f_c)` on the
curvature sum is the Gaussian mechanism with noise multiplier `z` on sensitivity 1. The noise is
added either by the server to the sum ("central") or by each of the m clients to its own clipped
vectors with standard deviation `z C / sqrt(f_d m)` ("distributed": the sum then carries the
same noise, and only the sum needs to be seen, e.g. under secure aggregation). Everything after
the sum (the mean, a PSD projection of the curvature, FedNG's solve and broadcast) is
post-processing.

Accounting uses the `dp-accounting` package's RDP accountant (`pip install fedng[dp]`): T rounds
of the Gaussian mechanism, Poisson-subsampled at the participation rate q when q < 1 (the
simulator samples a fixed-size set each round; Poisson sampling at the same rate is the usual
approximation of DP-FedAvg). The adjacency is add/remove one client (user-level DP).
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from fedng._typing import Arrays
from fedng.federated.config.common import CLIP_SCOPES


def _norm(x: Mapping[str, torch.Tensor]) -> float:
    total = torch.zeros((), dtype=torch.float64)
    for v in x.values():
        total = total + (v.double() ** 2).sum()
    return float(torch.sqrt(total))


def clip_l2(x: Mapping[str, torch.Tensor], bound: float) -> tuple[Arrays, float]:
    """Scales named arrays jointly to L2 norm <= `bound` (a non-finite vector becomes zero).

    Args:
        x: named arrays.
        bound: the clipping norm C (> 0).

    Returns:
        (the clipped arrays, in their dtypes; the factor applied, in [0, 1]).

    Raises:
        ValueError: `bound` is not > 0.
    """
    if not bound > 0:
        raise ValueError(f"clip_l2: 'bound' must be > 0, got {bound}")
    n = _norm(x)
    f = 1.0 if n <= bound else (bound / n if math.isfinite(n) else 0.0)
    return {k: _scaled(v, f) for k, v in x.items()}, f


def layer_of(name: str) -> str:
    """The layer an array belongs to: its name without the last dotted part ("0.weight",
    "0.bias" -> "0"; a name without a dot is its own layer)."""
    return name.rsplit(".", 1)[0]


def clip_update(x: Mapping[str, torch.Tensor], bound: float, scope: str = "joint") -> Arrays:
    """Clips named arrays to joint L2 norm <= `bound`: as one vector ("joint", `clip_l2`) or
    each layer to `bound * sqrt(d_l / d)` ("layer", d_l its entries, d all entries).

    Per-layer bounds square-sum to `bound^2`, so the joint norm, and with it the sensitivity
    and the noise, are those of the joint clip; what changes is the share of the bound each
    layer gets: a layer's clipped part no longer shrinks when another layer's step is large
    (FedNG's first-layer steps along low-variance input directions outweigh the rest of its
    update), and the per-coordinate noise meets every layer's step at the same ratio.

    Raises:
        ValueError: `bound` is not > 0 or `scope` is unknown.
    """
    if scope == "joint":
        return clip_l2(x, bound)[0]
    if scope != "layer":
        raise ValueError(f"clip_update: 'scope' must be one of {list(CLIP_SCOPES)}, got {scope!r}")
    groups: dict[str, list[str]] = {}
    for k in x:
        groups.setdefault(layer_of(k), []).append(k)
    total = sum(v.numel() for v in x.values())
    out: Arrays = {}
    for names in groups.values():
        size = sum(x[k].numel() for k in names)
        if size == 0:
            out.update({k: x[k].clone() for k in names})
            continue
        part, _ = clip_l2({k: x[k] for k in names}, bound * math.sqrt(size / total))
        out.update(part)
    return out


def _scaled(v: torch.Tensor, f: float) -> torch.Tensor:
    """`v * f`; zero for f == 0 even where v is not finite."""
    return v.clone() if f == 1.0 else (torch.zeros_like(v) if f == 0 else v * f)


def noise_generator(seed: int, *stream: int) -> torch.Generator:
    """A torch generator for DP noise: seeded from `(seed, *stream)` when `seed` >= 0 (a
    reproducible simulation), else from the OS's randomness (a deployment: noise an observer
    could regenerate protects nothing)."""
    g = torch.Generator()
    if seed < 0:
        g.manual_seed(secrets.randbits(63))
    else:
        g.manual_seed(hash((seed, *stream)) & ((1 << 63) - 1))
    return g


def add_noise(x: Mapping[str, torch.Tensor], std: float, gen: torch.Generator) -> Arrays:
    """`x + N(0, std^2 I)` per array (in float32 or float64), names in sorted order."""
    out: Arrays = {}
    for k in sorted(x):
        v = x[k].to(torch.float64 if x[k].dtype == torch.float64 else torch.float32)
        out[k] = v + std * torch.randn(v.shape, generator=gen, dtype=v.dtype)
    return out


def noise_std(multiplier: float, clip: float, fraction: float = 1.0, share: int = 1) -> float:
    """The Gaussian noise's standard deviation on a sum of vectors clipped to `clip` that gets
    `fraction` of the round's budget (of `1 / z^2`): `z * clip / sqrt(fraction)`, divided by
    `sqrt(share)` when each of `share` clients adds its part."""
    return multiplier * clip / math.sqrt(fraction * share)


def curvature_round(curvature_clip: float, upload_every: int, rnd: int) -> bool:
    """Whether round `rnd` releases curvature: decided from public settings only (a curvature
    clip and the algorithm's upload schedule), never from which payloads arrived, so that one
    client's data cannot change the round's noise split."""
    return curvature_clip > 0 and rnd % upload_every == 0


def budget_fractions(curvature: bool, curvature_share: float) -> tuple[float, float]:
    """(The delta's, the curvature's) fractions of a round's budget: all of it to the delta in a
    round without a curvature release, else `(1 - share, share)`.

    The round's release `(sum delta / (C / sqrt(f_d)), sum curvature / (C_F / sqrt(f_c)))` moves
    by at most `sqrt(f_d + f_c) = 1` when one client is added or removed, and its noise is `z`
    times that unit in every coordinate: one Gaussian mechanism with multiplier z per round,
    whatever the split, so the accounting does not depend on it.
    """
    return (1.0 - curvature_share, curvature_share) if curvature else (1.0, 0.0)


# --- accounting (dp-accounting) -------------------------------------------------------------


def _accounting() -> Any:
    """The `dp_accounting` module, or a one-line ImportError naming the extra."""
    try:
        import dp_accounting  # optional dependency: only DP runs need it
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "differential privacy needs the 'dp-accounting' package: pip install 'fedng[dp]'"
        ) from err
    return dp_accounting


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Silences absl's per-order convergence warnings of the RDP accountant (an order it cannot
    compute is left out of the minimum, which only makes ε conservative)."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _check_run(rounds: int, sampling_rate: float, delta: float) -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"DP accounting: 'rounds' must be an int >= 1, got {rounds!r}")
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"DP accounting: 'sampling_rate' must be in (0, 1], got {sampling_rate}")
    if not 0 < delta < 1:
        raise ValueError(f"DP accounting: 'delta' must be in (0, 1), got {delta}")


def _event(dp: Any, multiplier: float, rounds: int, sampling_rate: float) -> Any:
    one = dp.GaussianDpEvent(multiplier)
    if sampling_rate < 1:
        one = dp.PoissonSampledDpEvent(sampling_rate, one)
    return dp.SelfComposedDpEvent(one, rounds)


def epsilon_spent(
    multiplier: float, delta: float, rounds: int, sampling_rate: float = 1.0
) -> float:
    """The ε of `rounds` rounds of the Gaussian mechanism with noise multiplier `multiplier`
    (sampled at `sampling_rate`) at `delta`, from the RDP accountant (inf for multiplier 0).

    Raises:
        ValueError: rounds < 1, a rate outside (0, 1], delta outside (0, 1), multiplier < 0.
        ImportError: dp-accounting is not installed.
    """
    _check_run(rounds, sampling_rate, delta)
    if not multiplier >= 0:
        raise ValueError(f"DP accounting: noise multiplier must be >= 0, got {multiplier}")
    if multiplier == 0:
        return math.inf
    dp = _accounting()
    acc = dp.rdp.RdpAccountant()
    acc.compose(_event(dp, multiplier, rounds, sampling_rate))
    with _quiet_absl():
        return float(acc.get_epsilon(delta))


def noise_multiplier_for(
    epsilon: float, delta: float, rounds: int, sampling_rate: float = 1.0
) -> float:
    """The smallest noise multiplier z (to 0.1%) whose `epsilon_spent` is <= `epsilon`,
    calibrated by dp-accounting's `calibrate_dp_mechanism` with the RDP accountant.

    Raises:
        ValueError: `epsilon` <= 0, or as `epsilon_spent`.
        ImportError: dp-accounting is not installed.
    """
    _check_run(rounds, sampling_rate, delta)
    if not 0 < epsilon < math.inf:
        raise ValueError(f"DP calibration: 'epsilon' must be > 0 and finite, got {epsilon}")
    dp = _accounting()
    make_event: Callable[[float], Any] = lambda z: _event(dp, z, rounds, sampling_rate)  # noqa: E731
    with _quiet_absl():
        z = dp.calibrate_dp_mechanism(
            dp.rdp.RdpAccountant,
            make_event,
            epsilon,
            delta,
            dp.LowerEndpointAndGuess(1e-3, 1.0),
            tol=1e-3,
        )
    return float(z)
