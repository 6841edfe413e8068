"""The stage between validation and an algorithm's aggregation: robust combining
(`ServerConfig.robust`, `aggregation.robust`) and client-level differential privacy
(`ServerConfig.dp_clip`, `aggregation.dp`) of a round's accepted updates.

Updates in, updates out, so that every algorithm's own aggregation (FedNG's weighted mean or
Fisher-weighted merge, SCAFFOLD's control variates, ...) runs unchanged afterwards:

- Robust modes keep every client's update apart, so that the algorithm's weighting (FedNG's
  Fisher-weighted merge above all) still works: "norm-clip" bounds each delta by
  `robust_clip_ratio` x the round's median norm; "trimmed-mean" clamps every coordinate of every
  delta into the round's trimmed range `[x_(b+1), x_(K-b)]`, `b = floor(robust_trim K)`
  (winsorizing: values an attacker pushes beyond the honest range count at its edge); "median"
  clamps to the middle value(s), so for odd K any weighted mean is the coordinate-wise median.
  In every mode each curvature block's scale product (invariant under `A * c, G / c`) is clipped
  to `robust_clip_ratio` x the round's median and its split between factors taken from the
  round's medians (`robust.clip_factor_scales`), so no client can steer the global factors by
  rescaling one against the other. All three need the round's updates at once (medians, sorted
  coordinates): the server holds a round's updates in memory. Before that, robust modes leave
  out the clients whose cross-round reputation (`screen`: EMA of each delta's cosine with the
  round's trimmed mean) is below `robust_trust` x the round's median: a consistent attacker
  steering the directions where its own curvature dominates the Fisher-weighted merge passes
  every per-round clamp.
- DP replaces every update by the round's one private update (clipped, summed, noised, averaged
  over `dp_clients`): any weighted mean of identical updates is that update, and FedNG's
  Fisher-weighted merge of identical updates is `(F + lambda I)^-1 (F delta + lambda center)`,
  i.e. the delta itself with its default `fisher_center="mean"`. Under the "input" curvature
  release with `dp_curvature_pool="mean"` the stage keeps the running mean of the noised
  releases in `state.buffers` (`pooled_release`: post-processing) and hands that on instead.

The input updates are never modified.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fedng._typing import Arrays
from fedng.curvature import KFAC, CurvatureSet, DiagonalFisher, FisherRepresentation, LowRankFisher
from fedng.curvature.quantize import float_payload
from fedng.federated.aggregation.dp import (
    add_noise,
    budget_fractions,
    clip_l2,
    clip_update,
    curvature_round,
    noise_generator,
    noise_std,
)
from fedng.federated.aggregation.dp_metric import Whitener, public_input_curvature, whitener
from fedng.federated.aggregation.robust import (
    alignment,
    clip_factor_scales,
    distrusted,
    norm_clip,
    trims,
    update_reputation,
    winsorize,
)
from fedng.federated.aggregation.summable import CONTRIB_PREFIX, contribution
from fedng.federated.config.common import ServerConfig
from fedng.federated.messages import ClientUpdate, ServerState

FACTOR_LISTS: dict[type[FisherRepresentation], tuple[str, ...]] = {
    KFAC: ("A", "G"),
    DiagonalFisher: ("diag",),
    LowRankFisher: ("Y",),
}
"""Per representation class, its per-block factor lists (attribute names), in factor order."""
REPUTATION_KEY = "reputation"
"""`state.meta` key of the robust modes' per-client reputation (client id -> EMA of its
alignment with the round's trimmed mean; checkpointed with the state)."""
DISTRUSTED_KEY = "distrusted"
"""`state.meta` key of the clients left out when last seen (their reputation is frozen)."""
MEDIAN_TRIM = 0.5 - 1e-9
"""The trim of "median": every coordinate clamped to the middle value(s) of the round."""


def decode(update: ClientUpdate) -> CurvatureSet | None:
    """The update's curvature (float32), or None without any."""
    if not update.curvature:
        return None
    arrays, meta = float_payload(update.curvature, update.meta["curv"])  # int8 dequantized
    return CurvatureSet.from_arrays({k: v.float() for k, v in arrays.items()}, meta)


def _attrs(rep: FisherRepresentation) -> tuple[str, ...]:
    for cls, names in FACTOR_LISTS.items():
        if isinstance(rep, cls):
            return names
    raise TypeError(f"robust aggregation: no factors known for {type(rep).__name__}")


def block_factors(rep: FisherRepresentation, i: int) -> list[torch.Tensor]:
    """Block i's factors in `rep` (K-FAC: [A, G]; diagonal: [D]; low-rank: [Y])."""
    return [getattr(rep, a)[i] for a in _attrs(rep)]


def set_block_factors(rep: FisherRepresentation, i: int, factors: Sequence[torch.Tensor]) -> None:
    """Replaces block i's factors in `rep` (in its dtype)."""
    for a, f in zip(_attrs(rep), factors, strict=True):
        getattr(rep, a)[i] = f.to(rep.dtype)


def per_block(
    sets: Sequence[CurvatureSet], fn: Callable[[list[list[torch.Tensor]]], list[list[torch.Tensor]]]
) -> None:
    """Applies `fn` (per client, one block's factors -> per output set, its factors) to every
    block of `sets`, writing output j into `sets[j]` in place."""
    for kind, rep in sets[0].reps.items():
        for i in range(len(rep.specs)):
            out = fn([block_factors(s.reps[kind], i) for s in sets])
            for s, factors in zip(sets, out, strict=False):
                set_block_factors(s.reps[kind], i, factors)


def _with(
    u: ClientUpdate, delta: Arrays, extras: Arrays, curvature: CurvatureSet | None
) -> ClientUpdate:
    """A copy of `u` with new delta, extras and curvature (float32 payload; None: none)."""
    meta = {k: v for k, v in u.meta.items() if k != "curv"}
    arrays: Arrays = {}
    if curvature is not None:
        arrays, meta["curv"] = curvature.to_arrays(torch.float32)
    return ClientUpdate(
        u.client_id,
        u.round,
        {k: v.float() for k, v in delta.items()},
        u.num_examples,
        curvature=arrays,
        extras={k: v.float() for k, v in extras.items()},
        metrics=dict(u.metrics),
        meta=meta,
        symmetric=u.symmetric,
        nbytes=u.nbytes,
    )


def _split_contrib(extras: Arrays) -> tuple[Arrays, bool]:
    """(The extras other than the summable contributions `fd/<param>`, whether it had any)."""
    rest = {k: v for k, v in extras.items() if not k.startswith(CONTRIB_PREFIX)}
    return rest, len(rest) < len(extras)


def _robust(cfg: ServerConfig, updates: list[ClientUpdate]) -> list[ClientUpdate]:
    """Each update's delta bounded by the round's median norm, and (trimmed-mean, median) then
    clamped into the round's trimmed range; each curvature block's scale clipped and its split
    made canonical; summable contributions `c_k` recomputed from the results."""
    ratio = cfg.robust_clip_ratio
    trim = cfg.robust_trim if cfg.robust == "trimmed-mean" else MEDIAN_TRIM

    def robust_arrays(xs: list[Arrays]) -> list[Arrays]:
        clipped = norm_clip(xs, ratio)[0]  # first: a far-out client is clamped from the median
        return clipped if cfg.robust == "norm-clip" else winsorize(clipped, trim)

    deltas = robust_arrays([u.delta for u in updates])
    split = [_split_contrib(u.extras) for u in updates]
    others = [x for x, _ in split]
    if any(others):
        others = robust_arrays(others)
    sets = [decode(u) for u in updates]
    live = [s for s in sets if s is not None]
    if live:
        per_block(live, lambda clients: clip_factor_scales(clients, ratio))
    extras = []
    for (_, had), rest, d, cs in zip(split, others, deltas, sets, strict=True):
        # c_k = F_k delta_k of the bounded delta and curvature, never the client's own c_k
        # (which it could send unlike both)
        fd = contribution(cs, d) if had and cs is not None else {}
        extras.append({**rest, **{f"{CONTRIB_PREFIX}{k}": v for k, v in fd.items()}})
    return [_with(u, d, e, s) for u, d, e, s in zip(updates, deltas, extras, sets, strict=True)]


# --- differential privacy -------------------------------------------------------------------


def psd_project(cs: CurvatureSet) -> None:
    """Makes noised curvature usable in place: K-FAC factors and diagonals get their negative
    eigenvalues (entries) set to 0 (post-processing: no privacy cost). Sketches are left as
    they are."""
    for rep in cs.reps.values():
        if isinstance(rep, LowRankFisher):
            continue
        for i in range(len(rep.specs)):
            out = []
            for f in block_factors(rep, i):
                if (
                    f.dim() == 2
                    and f.shape[0] == f.shape[1]
                    and not isinstance(rep, DiagonalFisher)
                ):
                    sym = 0.5 * (f + f.T).double()
                    w, v = torch.linalg.eigh(sym)
                    out.append((v * w.clamp(min=0)) @ v.T)
                else:
                    out.append(f.clamp(min=0))
            set_block_factors(rep, i, out)


def _joint(u: ClientUpdate, white: Whitener | None = None) -> Arrays:
    """The update's released vector: its delta (whitened by the DP metric, if any) and extras."""
    delta = u.delta if white is None else white.white(u.delta)
    return {
        **{f"d/{k}": v for k, v in delta.items()},
        **{f"e/{k}": v for k, v in u.extras.items()},
    }


GLOBAL_CURVATURE = "curv/"
"""`state.buffers` prefix of an algorithm's global curvature payloads (FedNG's
`fedng_server.GLOBAL_PREFIX`), with their layout in `state.meta["curv"]`."""


def dp_metric(state: ServerState[ServerConfig]) -> Whitener | None:
    """The round's public DP metric (`ServerConfig.dp_metric`): the whitener of the server's
    global curvature, or None (the identity: no metric asked for, or no curvature yet).

    Under DP the global curvature is built only from the private pooled releases of earlier
    rounds (this stage replaces every update's curvature by the noised sum), so it is public.
    """
    cfg = state.config
    if cfg.dp_metric == "none" or cfg.dp_clip == 0:
        return None
    arrays = {
        k[len(GLOBAL_CURVATURE) :]: v
        for k, v in state.buffers.items()
        if k.startswith(GLOBAL_CURVATURE)
    }
    meta = state.meta.get("curv")
    if not arrays or not isinstance(meta, dict):
        return None
    cs = CurvatureSet.from_arrays({k: v.float() for k, v in arrays.items()}, meta)
    return whitener(cs, cfg.dp_metric_damping)


def _floats(u: ClientUpdate) -> Arrays:
    """An update's curvature payload in float32 (int8 kinds dequantized)."""
    arrays = float_payload(u.curvature, u.meta["curv"])[0]
    return {k: v.float() for k, v in arrays.items()}


def _sum(xs: Sequence[Arrays]) -> Arrays:
    out: Arrays = {}
    for x in xs:
        for k, v in x.items():
            out[k] = out[k] + v.float() if k in out else v.float().clone()
    return out


POOL_PREFIX = "dp_pool/"
"""`state.buffers` prefix of the running mean of the noised curvature releases
(`dp_curvature_pool="mean"`); `state.meta[POOL_COUNT]` counts the releases in it."""
POOL_COUNT = "dp_pool_count"


def pooled_release(state: ServerState[ServerConfig], raw: Arrays) -> Arrays:
    """The running mean of the round's noised, averaged curvature release `raw` and every
    earlier one (`dp_curvature_pool="mean"`), kept in `state.buffers` / `state.meta`.

    Post-processing: it only averages releases already noised (public). A release whose
    arrays differ in names or shapes from the pool restarts it.
    """
    pool = {k[len(POOL_PREFIX) :]: v for k, v in state.buffers.items() if k.startswith(POOL_PREFIX)}
    n = state.meta.get(POOL_COUNT, 0)
    same = pool.keys() == raw.keys() and all(pool[k].shape == v.shape for k, v in raw.items())
    if not (same and isinstance(n, int) and n > 0):
        pool, n = {}, 0
    out = {
        k: v.float().clone() if n == 0 else pool[k] + (v.float() - pool[k]) / (n + 1)
        for k, v in raw.items()
    }
    for k in [k for k in state.buffers if k.startswith(POOL_PREFIX)]:
        del state.buffers[k]
    state.buffers.update({f"{POOL_PREFIX}{k}": v for k, v in out.items()})
    state.meta[POOL_COUNT] = n + 1
    return {k: v.clone() for k, v in out.items()}


def _private(
    cfg: ServerConfig,
    rnd: int,
    updates: list[ClientUpdate],
    white: Whitener | None = None,
    pool: Callable[[Arrays], Arrays] | None = None,
) -> list[ClientUpdate]:
    """Clipped ("central"), summed, noised ("central") and averaged over `dp_clients`; with a
    metric `white`, the deltas are clipped and noised whitened and mapped back after; with
    `pool`, the averaged curvature release is replaced by `pool` of it (post-processing)."""
    central = cfg.dp_mode == "central"
    share_curv = cfg.dp_curvature_clip > 0
    joints = [_joint(u, white) for u in updates]
    curvs = [_floats(u) for u in updates if u.curvature and share_curv]
    every = int(getattr(cfg.options, "upload_every", 1))
    f_delta, f_curv = budget_fractions(
        curvature_round(cfg.dp_curvature_clip, every, rnd), cfg.dp_curvature_share
    )
    if central:
        joints = [clip_update(j, cfg.dp_clip, cfg.dp_clip_scope) for j in joints]
        curvs = [clip_l2(c, cfg.dp_curvature_clip)[0] for c in curvs]
    total = _sum(joints)
    ctotal = _sum(curvs) if curvs else {}
    if central:
        gen = noise_generator(cfg.dp_seed, rnd, -1)
        total = add_noise(total, noise_std(cfg.dp_noise_multiplier, cfg.dp_clip, f_delta), gen)
        if ctotal:
            std = noise_std(cfg.dp_noise_multiplier, cfg.dp_curvature_clip, f_curv)
            ctotal = add_noise(ctotal, std, gen)
    m = float(cfg.dp_clients)
    delta = {k[2:]: v / m for k, v in total.items() if k.startswith("d/")}
    if white is not None:  # post-processing: the public metric's inverse root
        delta = white.unwhite(delta)
    extras = {k[2:]: v / m for k, v in total.items() if k.startswith("e/")}
    curv = None
    if ctotal:
        with_curv = next(u for u in updates if u.curvature)
        meta = float_payload(with_curv.curvature, with_curv.meta["curv"])[1]
        mean = {k: v / m for k, v in ctotal.items()}
        curv = CurvatureSet.from_arrays(mean if pool is None else pool(mean), meta)
        psd_project(curv)
        if cfg.dp_curvature_release == "input":
            public_input_curvature(curv, cfg.dp_curvature_rank)
    return [_with(u, delta, extras, curv if u.curvature else None) for u in updates]


def screen(state: ServerState[ServerConfig], updates: list[ClientUpdate]) -> list[ClientUpdate]:
    """The updates of the clients the server still trusts (robust modes, `robust_trust` > 0).

    Each client's alignment this round (`robust.alignment`: cosine of its norm-clipped delta
    with the round's trimmed mean) is folded into its reputation in `state.meta`
    (`REPUTATION_KEY`, an EMA with `robust_memory`); a client whose reputation is below
    `robust_trust` x the round's median is left out of the round, at most `floor(robust_trim K)`
    of them, and listed in `state.log["distrusted"]` and `state.meta` (`DISTRUSTED_KEY`).

    A left-out client's reputation is frozen until it is readmitted (the median falls, or more
    than the cap are distrusted): while it is out, the consensus it is scored against no longer
    holds its data, and the majority's updates push against its classes, so even a sign-flipper
    comes to look aligned (digits, 20% flippers: from 0.21-0.43 to 0.56-0.75 of the median in
    19 rounds). Writes `state.meta` and `state.log` (new values, never mutated in place).
    """
    cfg = state.config
    if cfg.robust == "none" or cfg.robust_trust == 0 or len(updates) < 3:
        return updates
    scores = alignment([u.delta for u in updates], cfg.robust_trim)
    ids = [u.client_id for u in updates]
    was_out = set(state.meta.get(DISTRUSTED_KEY, []))
    fresh = {c: s for c, s in zip(ids, scores, strict=True) if c not in was_out}
    rep = update_reputation(state.meta.get(REPUTATION_KEY, {}), fresh, cfg.robust_memory)
    for c, s in zip(ids, scores, strict=True):  # out but never scored (a state from elsewhere)
        rep.setdefault(c, s)
    out = distrusted(rep, ids, cfg.robust_trust, trims(len(ids), cfg.robust_trim))
    state.meta[REPUTATION_KEY] = rep
    state.meta[DISTRUSTED_KEY] = sorted(set(out) | (was_out - set(ids)))
    if out:
        state.log["distrusted"] = out
    return [u for u in updates if u.client_id not in out]


def holds_round(config: ServerConfig) -> bool:
    """Whether the server answers an algorithm's second phase itself, from the updates as this
    stage returns them (robust modes and DP): the clients' own answers would come from their
    unbounded (robust) or private (DP) curvature."""
    return config.robust != "none" or config.dp_clip > 0


def defend(state: ServerState[ServerConfig], updates: list[ClientUpdate]) -> list[ClientUpdate]:
    """The round's accepted updates as the algorithm should aggregate them (see the module
    docstring); the identity with `robust="none"` and no DP.

    Args:
        state: the server state (its config and round).
        updates: the accepted updates (validated; curvature signatures agree).

    Returns:
        The updates in order (new objects unless nothing applies); in robust modes without the
        clients `screen` distrusts (it records reputations in `state.meta`).
    """
    cfg = state.config
    if not updates or (cfg.robust == "none" and cfg.dp_clip == 0):
        return updates
    if cfg.dp_clip > 0:
        pooled = cfg.dp_curvature_release == "input" and cfg.dp_curvature_pool == "mean"
        pool = (lambda raw: pooled_release(state, raw)) if pooled else None
        return _private(cfg, state.round, updates, dp_metric(state), pool)
    return _robust(cfg, screen(state, updates))
