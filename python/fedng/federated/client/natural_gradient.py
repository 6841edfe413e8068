"""FedNG's client: local natural-gradient steps under a chosen preconditioner, and the local
curvature it accumulates on the way (what it uploads).

The steps are `fedng.optim.NaturalGradient` over the shared local SGD loop; the preconditioner
mode (`FedNGConfig.precond`) picks its source:
- "global": the server's damped inverses, fixed for the round (every client moves in the same
  metric: no preconditioner drift): `set_global` with the broadcast inverses, or with the
  broadcast curvature inverted under the client's damping. Until the server has curvature
  (round 0), "local".
- "local": the client's own running curvature, re-inverted every `inverse_every` steps.
- "global_local": `(1 - w) F_global + w F_local` (w = `local_mix`), re-inverted every
  `inverse_every` steps (`set_global(..., mix=w)`); needs the server to broadcast factors (falls
  back to "global" when it sent inverses only).
- "none": plain SGD (curvature is still accumulated for the upload).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedng.curvature import CurvatureSet
from fedng.curvature.block_diagonal import Damping
from fedng.curvature.quantize import META_KEY, dequantize_arrays
from fedng.federated.client.sgd import local_sgd, round_seed
from fedng.federated.config.common import ClientConfig
from fedng.federated.config.curvature import FedNGConfig, curvature_mapping
from fedng.federated.messages import ServerMessage
from fedng.federated.tasks.base import ClientData
from fedng.optim import NaturalGradient
from fedng.optim.trust import carried, resume

RELATIVE_FLOOR = 1e-8
"""The least λ of relative damping (`NaturalGradient`'s lower damping bound)."""

TRUST_KEY = "trust"
"""The client's `client_state` key of its carried trust region (`FedNGConfig.carry_trust`)."""

PRECOND_MODES: tuple[str, ...] = ("none", "local", "global", "global_local")
"""The modes a client can end up in; `metrics["precond_mode"]` is the index of the one used."""


@dataclass
class LocalResult:
    """What the local natural-gradient loop produced.

    Attributes:
        metrics: training loss, steps, the preconditioner mode actually used, KL-clipped steps,
            the trust radius at the end.
        curvature: the client's curvature accumulated over its local steps.
        trust: the trust region to carry to the client's next round (`trust.carried`), or None
            (`carry_trust` off, or no adaptive trust region).
    """

    metrics: dict[str, float]
    curvature: CurvatureSet
    trust: torch.Tensor | None = None


def global_curvature(
    message: ServerMessage, local: CurvatureSet, options: FedNGConfig
) -> tuple[CurvatureSet | None, bool]:
    """The server's curvature from a message: (set, has factors). None when it sent none.

    Inverses (`inv/...` extras) are installed into an empty set over `local`'s blocks; factors
    (`curv/...` extras with `meta["curv"]`) are decoded as a full set in `local`'s dtype.
    """
    inv = {k[4:]: v for k, v in message.extras.items() if k.startswith("inv/")}
    fac = {k[5:]: v for k, v in message.extras.items() if k.startswith("curv/")}
    if fac and "curv" in message.meta:
        meta = message.meta["curv"]
        arrays = dequantize_arrays(fac, meta) if META_KEY in meta else fac
        return CurvatureSet.from_arrays(arrays, meta, local.dtype), True
    if inv:
        glob = CurvatureSet.empty(
            local.layouts, local.kinds, options.rank, options.sketch_seed, local.dtype
        )
        glob.load_inverse_arrays(inv)
        return glob, False
    return None, False


def client_damping(curvature: CurvatureSet, options: FedNGConfig) -> Damping:
    """The damping the client (or the server, for broadcast inverses) inverts `curvature` with:
    `options.damping` itself, or (relative) per block that factor of the block's mean eigenvalue,
    at least `RELATIVE_FLOOR` (a block without curvature is damped at the floor)."""
    if options.damping_scale == "absolute":
        return options.damping
    lams = curvature.relative_damping(options.damping)
    return {
        k: [v if math.isfinite(v) and v > RELATIVE_FLOOR else RELATIVE_FLOOR for v in vals]
        for k, vals in lams.items()
    }


def step_config(config: ClientConfig, options: FedNGConfig) -> ClientConfig:
    """`config` with the learning rate the local steps apply to the preconditioned gradient:
    `lr` itself, or `lr λ` under `lr_units="sgd"` (the step `lr (F/λ + I)^-1 g`, SGD's at the
    same `lr` as λ grows), with the weight decay `wd / λ` so that it still decays by `lr wd`
    (gradients left plain are divided by λ after each step: `unscale_plain`)."""
    if options.lr_units == "sgd":
        lam = options.damping
        return config.replace(lr=config.lr * lam, weight_decay=config.weight_decay / lam)
    return config


def outside_blocks(ng: NaturalGradient, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters among `params` that no curvature block of `ng` covers."""
    covered = {id(q) for b in ng.capture.blocks for q in (b.weight, b.bias) if q is not None}
    return [p for p in params if id(p) not in covered]


def unscale_plain(ng: NaturalGradient, loose: Sequence[torch.Tensor], lam: float) -> None:
    """Divides by `lam` the gradients `ng`'s last step left plain (the `loose` parameters outside
    every curvature block, and blocks not preconditioned: a skipped step, a fallback,
    `precond="none"`), so that under `lr_units="sgd"`'s `lr λ` they take plain SGD's `lr g`.

    Args:
        ng: the natural-gradient preconditioner, right after `step()`.
        loose: the trained parameters outside every block (`outside_blocks`).
        lam: the absolute damping λ.
    """
    done = set(ng.last.get("preconditioned", ()))
    plain = [p.grad for p in loose if p.grad is not None]
    for block in ng.capture.blocks:
        views = block.grad_views() if block.name not in done else None
        if views is not None:
            plain.extend(v for v in views if v is not None)
    if plain:
        torch._foreach_div_(plain, lam)


def use_preconditioner(ng: NaturalGradient, message: ServerMessage, options: FedNGConfig) -> str:
    """Points `ng` at the preconditioner `options.precond` asks for, as far as the message allows.

    Returns:
        The mode actually used (one of `PRECOND_MODES`).
    """
    mode = options.precond
    if mode not in ("global", "global_local"):
        return mode
    glob, has_factors = global_curvature(message, ng.local_curvature, options)
    if glob is None:
        return "local"
    if mode == "global_local" and has_factors:
        ng.set_global(glob, mix=options.local_mix)
        return mode
    if has_factors:
        glob.inverse(client_damping(glob, options))
    ng.set_global(glob)
    return "global"


def natural_gradient_local(
    model: nn.Module,
    data: ClientData,
    message: ServerMessage,
    config: ClientConfig,
    options: FedNGConfig,
    *,
    steps: int | None = None,
    trust: torch.Tensor | None = None,
) -> LocalResult:
    """Runs FedNG's local loop on `model` (already holding theta_t).

    Per step of `local_sgd`: forward (recorded), an optional Monte-Carlo Fisher pass, backward,
    then `NaturalGradient.step` (the batch folded into the local curvature, the gradients
    preconditioned and optionally KL-clipped) before `torch.optim.SGD` steps.

    Args:
        model: the model (its parameters are trained in place).
        data: the client's data.
        message: the round's broadcast (theta_t and possibly the global curvature).
        config: the client config.
        options: FedNG's config.
        steps: overrides `config.local_steps`.
        trust: the trust region carried from this client's last round (`LocalResult.trust`;
            used when `options.carry_trust`).

    Returns:
        `LocalResult`.
    """
    config = step_config(config, options)
    ng = NaturalGradient(
        model,
        curvature=curvature_mapping(options.curvature, model),
        damping=options.damping,
        damping_scale=options.damping_scale,
        inverse_every=options.inverse_every,
        curvature_decay=options.curvature_decay,
        kl_clip=options.kl_clip if options.kl_clip > 0 else None,
        lr=config.lr,
        fisher_type=options.fisher_type,
        loss=config.loss,
        rank=options.rank,
        sketch_seed=options.sketch_seed,
        source="none" if options.precond == "none" else "local",
        warn_unsupported=False,  # the simulator warns once per run (`Algorithm.check_model`)
    )
    region = ng.trust if options.carry_trust else None
    if region is not None and trust is not None:
        resume(region, trust)
    try:
        mode = use_preconditioner(ng, message, options)
        gen = torch.Generator().manual_seed(
            round_seed(options.sketch_seed, message.round, data.client_id)
        )
        clipped = 0

        def fisher_pass(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> None:
            if options.fisher_type == "mc":
                ng.mc_backward(out, gen)

        loose = outside_blocks(ng, [p for p in model.parameters() if p.requires_grad])

        def precondition(step: int) -> None:
            nonlocal clipped
            ng.step()
            clipped += 0.0 < ng.last["kl_scale"] < 1.0  # 0: a skipped step, not a clip
            if options.lr_units == "sgd":
                unscale_plain(ng, loose, options.damping)

        metrics = local_sgd(
            model,
            data,
            config,
            message.round,
            grad_hook=precondition,
            steps=steps,
            before_backward=fisher_pass,
        )
        metrics["precond_mode"] = float(PRECOND_MODES.index(mode))
        metrics["kl_clipped_steps"] = float(clipped)
        if ng.trust is not None:
            metrics["trust_radius"] = ng.trust.radius
        return LocalResult(metrics, ng.local_curvature, None if region is None else carried(region))
    finally:
        ng.remove()
