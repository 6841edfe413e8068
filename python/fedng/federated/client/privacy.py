"""The client's side of differential privacy (`fedng.federated.aggregation.dp`): clip the update
before it leaves, and under "distributed" DP add this client's share of the noise.

The delta and the extras are clipped jointly to L2 norm `dp_clip` (as one vector, or per layer:
`dp_clip_scope`); the packed curvature payload
to `dp_curvature_clip`, or dropped when that is 0 (the curvature then never leaves the client,
and neither does FedNG's summable contribution `c_k = F_k delta_k`, which is of no use without
the pooled curvature and would take a share of the clip). Under "distributed" DP (an untrusted
server) nothing else about the client's data leaves either: its local metrics (training loss)
are dropped and its `num_examples` reported as 1 (the server averages uniformly over
`dp_clients` anyway), so the noised vectors are the only release, the one the accountant counts.
"""

from __future__ import annotations

import torch

from fedng.curvature import CurvatureSet
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
from fedng.federated.aggregation.dp_metric import euclidean_bound, input_shapes
from fedng.federated.aggregation.summable import CONTRIB_PREFIX
from fedng.federated.config.common import ClientConfig
from fedng.federated.messages import ClientUpdate


def private_only(extra: str) -> bool:
    """Whether an extra derives from the client's curvature (kept on the client under DP
    without a curvature release)."""
    return extra.startswith(CONTRIB_PREFIX)


def privatize_update(update: ClientUpdate, config: ClientConfig) -> None:
    """Clips (and under "distributed" DP noises) `update` in place; nothing without DP.

    Args:
        update: the client's unsealed update.
        config: its config (`dp_*` knobs).
    """
    if config.dp_clip == 0:
        return
    every = int(getattr(config.options, "upload_every", 1))
    releases_curv = curvature_round(config.dp_curvature_clip, every, update.round)
    f_delta, f_curv = budget_fractions(releases_curv, config.dp_curvature_share)
    if config.dp_curvature_clip == 0:
        update.extras = {k: v for k, v in update.extras.items() if not private_only(k)}
    noisy = config.dp_mode == "distributed"
    if noisy:  # the accountant counts the noised vectors only: nothing else may leave
        update.metrics = {}
        update.num_examples = 1
    gen = noise_generator(config.dp_seed, update.round, update.client_id)
    z, m = config.dp_noise_multiplier, config.dp_clients
    joint = {
        **{f"d/{k}": v for k, v in update.delta.items()},
        **{f"e/{k}": v for k, v in update.extras.items()},
    }
    bound = config.dp_clip
    if config.dp_metric != "none":  # the server clips in its metric (central DP only)
        bound = euclidean_bound(bound, config.dp_metric_damping)
    clipped = clip_update(joint, bound, config.dp_clip_scope)
    if noisy:
        clipped = add_noise(clipped, noise_std(z, config.dp_clip, f_delta, m), gen)
    update.delta = {k: clipped[f"d/{k}"].to(v.dtype) for k, v in update.delta.items()}
    update.extras = {k: clipped[f"e/{k}"].to(v.dtype) for k, v in update.extras.items()}
    if not update.curvature:
        return
    if config.dp_curvature_clip == 0:
        update.curvature = {}
        update.meta.pop("curv", None)
        return
    # int8 kinds are clipped and noised as float32 (and sent so: noise is not int8-shaped)
    floats, update.meta["curv"] = float_payload(update.curvature, update.meta["curv"])
    if config.dp_curvature_release == "input":  # the input factors' shapes only
        cs = CurvatureSet.from_arrays(
            {k: v.float() for k, v in floats.items()}, update.meta["curv"]
        )
        input_shapes(cs)
        floats, update.meta["curv"] = cs.to_arrays(torch.float32)
    curv, _ = clip_l2({k: v.float() for k, v in floats.items()}, config.dp_curvature_clip)
    if noisy:
        curv = add_noise(curv, noise_std(z, config.dp_curvature_clip, f_curv, m), gen)
    update.curvature = {k: curv[k].to(v.dtype) for k, v in floats.items()}
