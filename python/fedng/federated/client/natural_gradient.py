"""FedNG's client: local natural-gradient steps under a chosen preconditioner, and the local
curvature it accumulates on the way (what it uploads).

Preconditioner modes (`FedNGConfig.precond`):
- "global": the server's damped inverses, fixed for the round (every client moves in the same
  metric: no preconditioner drift). Until the server has curvature (round 0), "local".
- "local": the client's own running curvature, re-inverted every `inverse_every` steps.
- "global_local": `(1 - w) F_global + w F_local` (w = `local_mix`), re-inverted every
  `inverse_every` steps; needs the server to broadcast factors (falls back to "global" when it
  sent inverses only).
- "none": plain SGD (curvature is still accumulated for the upload).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fedng.curvature import CurvatureCapture, sampled_loss
from fedng.federated.client.sgd import local_sgd, round_seed
from fedng.federated.config.common import ClientConfig
from fedng.federated.config.curvature import FedNGConfig, curvature_mapping
from fedng.federated.curvature_set import CurvatureSet
from fedng.federated.layout import layouts_of
from fedng.federated.messages import ServerMessage
from fedng.federated.tasks.base import ClientData
from fedng.optim.config import assign


@dataclass
class LocalResult:
    """What the local natural-gradient loop produced.

    Attributes:
        metrics: training loss, steps, the preconditioner mode actually used.
        curvature: the client's curvature accumulated over its local steps.
    """

    metrics: dict[str, float]
    curvature: CurvatureSet


def global_curvature(
    message: ServerMessage, local: CurvatureSet
) -> tuple[CurvatureSet | None, bool]:
    """The server's curvature from a message: (set, has factors). None when it sent none.

    Inverses (`inv/...` extras) are installed into an empty set shaped like `local`; factors
    (`curv/...` extras with `meta["curv"]`) are decoded as a full set.
    """
    inv = {k[4:]: v for k, v in message.extras.items() if k.startswith("inv/")}
    fac = {k[5:]: v for k, v in message.extras.items() if k.startswith("curv/")}
    if fac and "curv" in message.meta:
        return CurvatureSet.from_arrays(fac, message.meta["curv"]), True
    if inv:
        glob = CurvatureSet.empty(local.layouts, local.kinds, _rank(local), _seed(local))
        glob.load_inverse_arrays(inv)
        return glob, False
    return None, False


def _rank(cs: CurvatureSet) -> int:
    rep = cs.reps.get("lowrank")
    return int(getattr(rep, "rank", 16))


def _seed(cs: CurvatureSet) -> int:
    rep = cs.reps.get("lowrank")
    return int(getattr(rep, "seed", 0))


def natural_gradient_local(
    model: nn.Module,
    data: ClientData,
    message: ServerMessage,
    config: ClientConfig,
    options: FedNGConfig,
    *,
    steps: int | None = None,
) -> LocalResult:
    """Runs FedNG's local loop on `model` (already holding theta_t).

    Per step: forward (recorded by a `CurvatureCapture`), an optional Monte-Carlo Fisher pass,
    backward, the batch's statistics folded into the local curvature (one ragged native call per
    representation), the gradients preconditioned (one call per representation) and optionally
    KL-clipped, then `torch.optim.SGD` steps.

    Args:
        model: the model (its parameters are trained in place).
        data: the client's data.
        message: the round's broadcast (theta_t and possibly the global curvature).
        config: the client config.
        options: FedNG's config.
        steps: overrides `config.local_steps`.

    Returns:
        `LocalResult`.
    """
    cap = CurvatureCapture(model, warn=False)
    try:
        blocks = cap.blocks
        layouts = layouts_of(model, blocks)
        kinds = assign(blocks, curvature_mapping(options.curvature))
        local = CurvatureSet.empty(layouts, kinds, options.rank, options.sketch_seed)
        glob, has_factors = (None, False)
        if options.precond in ("global", "global_local"):
            glob, has_factors = global_curvature(message, local)
        mode = options.precond
        if mode in ("global", "global_local") and glob is None:
            mode = "local"
        if mode == "global_local" and not has_factors:
            mode = "global"
        if mode == "global" and glob is not None and has_factors:
            glob.inverse(options.damping)
        state: dict[str, CurvatureSet | None] = {"p": glob if mode == "global" else None}
        gen = torch.Generator().manual_seed(
            round_seed(options.sketch_seed, message.round, data.client_id)
        )
        clipped = [0]

        def fisher_pass(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> None:
            if options.fisher_type == "mc":
                cap.fisher_backward(sampled_loss(out, config.loss, "mean", gen))

        def precondition(step: int) -> None:
            stats = cap.collect(options.fisher_type)
            local.update(stats, options.curvature_decay)
            if mode == "none":
                return
            if step % options.inverse_every == 0 and mode in ("local", "global_local"):
                if mode == "local":
                    local.inverse(options.damping)
                    state["p"] = local
                else:
                    if glob is None:
                        raise ValueError("global preconditioner missing from the server message")
                    mixed = CurvatureSet.combine(
                        [glob, local], [1.0 - options.local_mix, options.local_mix]
                    )
                    mixed.inverse(options.damping)
                    state["p"] = mixed
            pset = state["p"]
            if pset is None:
                return
            grads = [b.grad_matrix(torch.float32) for b in blocks]
            pre = pset.precondition(grads, stats)
            scale = 1.0
            if options.kl_clip > 0:
                gp = sum(
                    float((p * g).sum())
                    for p, g in zip(pre, grads, strict=True)
                    if p is not None and g is not None
                )
                if gp > 0:
                    scale = min(1.0, math.sqrt(options.kl_clip / (config.lr**2 * gp)))
                    clipped[0] += scale < 1.0
            for b, p in zip(blocks, pre, strict=True):
                if p is not None:
                    b.write_grad(p if scale == 1.0 else p * scale)

        with cap.record(True):
            metrics = local_sgd(
                model,
                data,
                config,
                message.round,
                grad_hook=precondition,
                steps=steps,
                before_backward=fisher_pass,
            )
        metrics["precond_mode"] = float(("none", "local", "global", "global_local").index(mode))
        metrics["kl_clipped_steps"] = float(clipped[0])
        return LocalResult(metrics, local)
    finally:
        cap.remove()
