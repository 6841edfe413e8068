"""Client and server configurations: flat dataclasses of scalars (a Flower ConfigRecord each).

Every field is a bool, int, float or str, so a config crosses any wire as a plain dict
(`to_dict` / `from_dict`) and one config object drives a simulation and a Flower deployment alike.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

from fedng.federated.serialize import FLOAT_WIRE

ALGORITHMS: tuple[str, ...] = (
    "fedavg",
    "fedavgm",
    "fedprox",
    "scaffold",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedng",
    "fedfisher",
)
"""Algorithm names understood by `client_step` / `server_step`."""

PRECONDITIONERS: tuple[str, ...] = ("global", "local", "global_local", "none")
CURVATURES: tuple[str, ...] = ("kfac", "diag", "lowrank")
AGGREGATIONS: tuple[str, ...] = ("mean", "fisher")

_C = TypeVar("_C", bound="_Config")


class _Config:
    """Shared dict round-trip and range checks of the two configs."""

    def to_dict(self) -> dict[str, Any]:
        """The config as a flat dict of scalars."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_C], d: dict[str, Any]) -> _C:
        """Builds a config from a flat dict, rejecting unknown keys.

        Raises:
            ValueError: an unknown key (named), or a value out of range.
        """
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"{cls.__name__}: unknown keys {unknown}; expected some of {sorted(names)}"
            )
        return cls(**d)

    def replace(self: _C, **changes: Any) -> _C:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _check(cond: bool, cls: str, name: str, expected: str, got: object) -> None:
    if not cond:
        raise ValueError(f"{cls}: '{name}' must be {expected}, got {got!r}")


def _choice(cls: str, name: str, value: str, options: tuple[str, ...]) -> None:
    _check(value in options, cls, name, f"one of {list(options)}", value)


def curvature_mapping(spec: str) -> dict[str, str]:
    """A curvature spec as the mapping `NaturalGradient(curvature=...)` takes:
    `"kfac,fc2=diag"` -> `{"default": "kfac", "fc2": "diag"}`."""
    default, overrides = parse_curvature(spec)
    return {"default": default, **overrides}


def parse_curvature(spec: str) -> tuple[str, dict[str, str]]:
    """Parses a curvature spec: a default kind, then optional per-layer overrides.

    `"kfac"` uses K-FAC everywhere; `"kfac,fc2=diag,fc1=lowrank"` uses K-FAC except for the named
    modules.

    Returns:
        (default kind, {module name: kind}).

    Raises:
        ValueError: an unknown kind or a malformed entry.
    """
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts or "=" in parts[0]:
        raise ValueError(f"'curvature' must start with a kind in {list(CURVATURES)}, got {spec!r}")
    default, overrides = parts[0], {}
    for p in parts[1:]:
        name, sep, kind = p.partition("=")
        if not sep or not name:
            raise ValueError(f"'curvature' entry must be MODULE=KIND, got {p!r} in {spec!r}")
        overrides[name.strip()] = kind.strip()
    for k in [default, *overrides.values()]:
        if k not in CURVATURES:
            raise ValueError(f"'curvature' kinds must be in {list(CURVATURES)}, got {k!r}")
    return default, overrides


@dataclass(frozen=True)
class ClientConfig(_Config):
    """What a client needs to run its local step.

    Attributes:
        algorithm: one of `ALGORITHMS`.
        lr: local learning rate.
        batch_size: local minibatch size.
        local_steps: local optimizer steps per round (equal local work across methods).
        momentum: local SGD momentum (reset every round).
        weight_decay: local L2 weight decay.
        loss: "ce" (cross-entropy) or "mse".
        seed: root seed of the batch order (combined with round and client id).
        update_dtype: wire dtype of the model delta ("fp32", "bf16", "fp16").
        prox_mu: FedProx proximal coefficient mu (FedProx only).
        precond: FedNG client preconditioner: "global" (the server's), "local" (own running
            curvature), "global_local" (the server's refreshed by the client's own), "none".
        curvature: FedNG curvature spec, e.g. "kfac" or "kfac,fc2=diag" (see `parse_curvature`).
        damping: Tikhonov damping of the client's preconditioner.
        fisher_type: "empirical" (real labels) or "mc" (sampled labels).
        local_mix: weight of the client's own curvature in "global_local" (0..1).
        inverse_every: local steps between re-inversions of a local / mixed preconditioner.
        curvature_decay: EMA decay of the client's running curvature across its local steps.
        payload_dtype: wire dtype of the curvature payload ("fp32", "bf16", "fp16").
        upload_every: upload curvature every R rounds (R >= 1).
        rank: sketch rank of low-rank curvature.
        sketch_seed: shared seed of the Gaussian sketch matrices.
        kl_clip: bound on the local natural-gradient step's KL estimate `lr^2 p.g` (0 = off).
        local_epochs: FedFisher only: local epochs of its one-shot local training (0 = use
            `local_steps`).
    """

    algorithm: str = "fedavg"
    lr: float = 0.05
    batch_size: int = 32
    local_steps: int = 10
    momentum: float = 0.0
    weight_decay: float = 0.0
    loss: str = "ce"
    seed: int = 0
    update_dtype: str = "fp32"
    prox_mu: float = 0.0
    precond: str = "global"
    curvature: str = "kfac"
    damping: float = 1e-2
    fisher_type: str = "empirical"
    local_mix: float = 0.5
    inverse_every: int = 5
    curvature_decay: float = 0.9
    payload_dtype: str = "fp32"
    upload_every: int = 1
    rank: int = 16
    sketch_seed: int = 1234
    kl_clip: float = 0.0
    local_epochs: float = 0.0

    def __post_init__(self) -> None:
        c = "ClientConfig"
        _choice(c, "algorithm", self.algorithm, ALGORITHMS)
        _check(self.lr > 0, c, "lr", "> 0", self.lr)
        _check(self.batch_size >= 1, c, "batch_size", ">= 1", self.batch_size)
        _check(self.local_steps >= 1, c, "local_steps", ">= 1", self.local_steps)
        _check(0 <= self.momentum < 1, c, "momentum", "in [0, 1)", self.momentum)
        _check(self.weight_decay >= 0, c, "weight_decay", ">= 0", self.weight_decay)
        _choice(c, "loss", self.loss, ("ce", "mse"))
        _choice(c, "update_dtype", self.update_dtype, FLOAT_WIRE)
        _check(self.prox_mu >= 0, c, "prox_mu", ">= 0", self.prox_mu)
        _choice(c, "precond", self.precond, PRECONDITIONERS)
        parse_curvature(self.curvature)
        _check(self.damping > 0, c, "damping", "> 0", self.damping)
        _choice(c, "fisher_type", self.fisher_type, ("empirical", "mc"))
        _check(0 <= self.local_mix <= 1, c, "local_mix", "in [0, 1]", self.local_mix)
        _check(self.inverse_every >= 1, c, "inverse_every", ">= 1", self.inverse_every)
        _check(
            0 <= self.curvature_decay < 1, c, "curvature_decay", "in [0, 1)", self.curvature_decay
        )
        _choice(c, "payload_dtype", self.payload_dtype, FLOAT_WIRE)
        _check(self.upload_every >= 1, c, "upload_every", ">= 1", self.upload_every)
        _check(self.rank >= 1, c, "rank", ">= 1", self.rank)
        _check(self.kl_clip >= 0, c, "kl_clip", ">= 0", self.kl_clip)
        _check(self.local_epochs >= 0, c, "local_epochs", ">= 0", self.local_epochs)


@dataclass(frozen=True)
class ServerConfig(_Config):
    """What the server needs to aggregate.

    Attributes:
        algorithm: one of `ALGORITHMS`.
        server_lr: server learning rate eta_s (FedOpt: the Adam/Yogi/Adagrad step size).
        server_momentum: heavy-ball momentum on the aggregated update (FedAvgM, FedNG).
        beta1: FedOpt first-moment decay.
        beta2: FedOpt second-moment decay.
        tau: FedOpt adaptivity epsilon.
        num_clients: total number of clients N (SCAFFOLD's control-variate update).
        aggregation: FedNG / FedFisher: "mean" or "fisher" (Fisher-weighted).
        fisher_damping: lambda of the Fisher-weighted aggregation, relative to the mean
            eigenvalue scale of each layer's aggregated curvature.
        fisher_center: the prior center of the Fisher-weighted aggregation's damping: "zero"
            (`(sum p F + lambda I)^-1 sum p F delta`) or "mean" (adds `lambda * mean delta` to
            the right-hand side: FedAvg where no curvature is seen).
        curvature_ema: decay of the global curvature EMA across rounds (0 = last round only).
        damping: Tikhonov damping of the broadcast global preconditioner.
        broadcast: FedNG: what the server sends with theta: "inverse" (the damped inverses of
            the global curvature; for clients with precond="global"), "factors" (the global
            curvature itself; for "global_local"), or "none".
        broadcast_dtype: wire dtype of the broadcast preconditioner.
        cg_iters: max conjugate-gradient iterations (K-FAC Fisher-weighted aggregation).
        cg_tol: relative residual at which CG stops.
        max_norm_ratio: a payload whose delta norm (or curvature trace) exceeds this multiple of
            the round's median is rejected.
        psd_tol: relative tolerance of the PSD / symmetry checks of curvature payloads.
    """

    algorithm: str = "fedavg"
    server_lr: float = 1.0
    server_momentum: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    num_clients: int = 1
    aggregation: str = "mean"
    fisher_damping: float = 1e-3
    fisher_center: str = "zero"
    curvature_ema: float = 0.5
    damping: float = 1e-2
    broadcast: str = "inverse"
    broadcast_dtype: str = "fp32"
    cg_iters: int = 100
    cg_tol: float = 1e-6
    max_norm_ratio: float = 100.0
    psd_tol: float = 1e-3

    def __post_init__(self) -> None:
        c = "ServerConfig"
        _choice(c, "algorithm", self.algorithm, ALGORITHMS)
        _check(self.server_lr > 0, c, "server_lr", "> 0", self.server_lr)
        _check(
            0 <= self.server_momentum < 1, c, "server_momentum", "in [0, 1)", self.server_momentum
        )
        _check(0 <= self.beta1 < 1, c, "beta1", "in [0, 1)", self.beta1)
        _check(0 <= self.beta2 < 1, c, "beta2", "in [0, 1)", self.beta2)
        _check(self.tau > 0, c, "tau", "> 0", self.tau)
        _check(self.num_clients >= 1, c, "num_clients", ">= 1", self.num_clients)
        _choice(c, "aggregation", self.aggregation, AGGREGATIONS)
        _check(self.fisher_damping > 0, c, "fisher_damping", "> 0", self.fisher_damping)
        _choice(c, "fisher_center", self.fisher_center, ("zero", "mean"))
        _check(0 <= self.curvature_ema < 1, c, "curvature_ema", "in [0, 1)", self.curvature_ema)
        _check(self.damping > 0, c, "damping", "> 0", self.damping)
        _choice(c, "broadcast", self.broadcast, ("inverse", "factors", "none"))
        _choice(c, "broadcast_dtype", self.broadcast_dtype, FLOAT_WIRE)
        _check(self.cg_iters >= 1, c, "cg_iters", ">= 1", self.cg_iters)
        _check(self.cg_tol > 0, c, "cg_tol", "> 0", self.cg_tol)
        _check(self.max_norm_ratio > 1, c, "max_norm_ratio", "> 1", self.max_norm_ratio)
        _check(self.psd_tol > 0, c, "psd_tol", "> 0", self.psd_tol)
