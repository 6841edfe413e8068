"""Byzantine clients for evaluation: a fraction of the clients, chosen by seed, alter every upload.

An `Attack` is a `simulate(..., tamper=...)` hook, `(round, update) -> the update sent`. Kinds:

- "signflip": the delta times `SIGNFLIP` (-10): pushes the model back up the loss.
- "scale": the delta times `SCALE` (50): just under the default 100x-the-median norm check.
  Both scale the summable contribution `c_k = F_k delta_k` (extras `fd/<param>`) alike, as a
  consistent attacker would (an honest `c_k` beside a flipped delta is a weaker attack).
- "kron-rescale": every K-FAC block's `A * KRON_RESCALE`, `G / KRON_RESCALE` (50): the client's
  own `A (x) G` is unchanged, but the sums of A and of G across clients are not; the delta is
  left honest (FedAvg and the other first-order methods are unaffected).
- "noise": the delta (and `c_k`) replaced by Gaussian noise of `NOISE` (10) times its norm.

The strengths stay under validation's default `max_norm_ratio` (100) on purpose: larger ones are
simply rejected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from fedng.curvature import KFAC
from fedng.federated.aggregation.stage import decode
from fedng.federated.aggregation.summable import CONTRIB_PREFIX
from fedng.federated.messages import ClientUpdate

ATTACKS = ("signflip", "scale", "kron-rescale", "noise")
"""The attack kinds."""
SIGNFLIP = -10.0
SCALE = 50.0
KRON_RESCALE = 50.0
NOISE = 10.0


def choose_attackers(num_clients: int, fraction: float, seed: int) -> list[int]:
    """`round(fraction * num_clients)` distinct client ids drawn by `seed` (at least 1 when
    fraction > 0), sorted.

    Raises:
        ValueError: `num_clients` < 1 or `fraction` outside [0, 1].
    """
    if num_clients < 1:
        raise ValueError(f"choose_attackers: 'num_clients' must be >= 1, got {num_clients}")
    if not 0 <= fraction <= 1:
        raise ValueError(f"choose_attackers: 'fraction' must be in [0, 1], got {fraction}")
    n = 0 if fraction == 0 else max(1, round(fraction * num_clients))
    rng = np.random.default_rng([seed, 0xA77AC])
    return sorted(int(i) for i in rng.choice(num_clients, size=n, replace=False))


def _rescaled_curvature(update: ClientUpdate, c: float) -> ClientUpdate:
    cs = decode(update)
    rep = None if cs is None else cs.reps.get("kfac")
    if cs is None or not isinstance(rep, KFAC):
        return update
    rep.A = [a * c for a in rep.A]
    rep.G = [g / c for g in rep.G]
    dtype = next(iter(update.curvature.values())).dtype
    arrays, meta = cs.to_arrays(dtype if dtype.is_floating_point else torch.float32)
    update.curvature = arrays
    update.meta = {**update.meta, "curv": meta}
    return update


@dataclass
class Attack:
    """A tamper hook: the `attackers` alter every update they send.

    Attributes:
        kind: one of `ATTACKS`.
        attackers: the attacking client ids.
        seed: seeds the "noise" attack (with round and client id).
        sent: updates the attackers sent (counted as the hook runs).
    """

    kind: str
    attackers: frozenset[int]
    seed: int = 0
    sent: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise ValueError(f"Attack: 'kind' must be one of {list(ATTACKS)}, got {self.kind!r}")

    def __call__(self, rnd: int, update: ClientUpdate) -> ClientUpdate:
        """The update as the client sends it (the same object, altered, for an attacker)."""
        if update.client_id not in self.attackers:
            return update
        self.sent += 1
        if self.kind == "kron-rescale":
            return _rescaled_curvature(update, KRON_RESCALE)
        if self.kind == "noise":
            gen = torch.Generator().manual_seed(hash((self.seed, rnd, update.client_id)) % 2**62)
            update.delta = _noise_like(update.delta, gen)
            update.extras = {**update.extras, **_noise_like(_contrib(update), gen)}
            return update
        f = SIGNFLIP if self.kind == "signflip" else SCALE
        update.delta = _times(update.delta, f)
        update.extras = {**update.extras, **_times(_contrib(update), f)}
        return update


def _contrib(update: ClientUpdate) -> dict[str, torch.Tensor]:
    return {k: v for k, v in update.extras.items() if k.startswith(CONTRIB_PREFIX)}


def _times(x: dict[str, torch.Tensor], f: float) -> dict[str, torch.Tensor]:
    return {k: (v.float() * f).to(v.dtype) for k, v in x.items()}


def _noise_like(x: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Gaussian noise of `NOISE` times the norm of `x`, in its names, shapes and dtypes."""
    if not x:
        return {}
    norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in x.values()))
    noise = {k: torch.randn(v.shape, generator=gen) for k, v in x.items()}
    nn = math.sqrt(sum(float((v.double() ** 2).sum()) for v in noise.values())) or 1.0
    return {k: (noise[k] * (NOISE * norm / nn)).to(v.dtype) for k, v in x.items()}


def make_attack(kind: str, fraction: float, num_clients: int, seed: int) -> Attack:
    """The attack of `kind` by `choose_attackers(num_clients, fraction, seed)`."""
    return Attack(kind, frozenset(choose_attackers(num_clients, fraction, seed)), seed)
