"""The configs of the curvature algorithms: FedNG and one-shot Fisher merging (FedFisher)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fedng.curvature import kinds
from fedng.curvature.fisher import FISHER_TYPES
from fedng.federated.config.base import AlgorithmConfig, check, check_choice
from fedng.federated.config.policy import AUTO, auto_curvature
from fedng.federated.wire import FLOAT_WIRE
from fedng.optim.config import DAMPING_SCALES

PRECONDITIONERS: tuple[str, ...] = ("global", "local", "global_local", "none")
AGGREGATIONS: tuple[str, ...] = ("mean", "summable", "fisher")
"""FedNG's server aggregations: the weighted mean; the summable Fisher-weighted step (the server
only sums, solves once with the pooled curvature, line search from a second summable phase;
memory flat in K); the exact Fisher-weighted merge (CG; holds every client's curvature)."""
BROADCASTS: tuple[str, ...] = ("auto", "inverse", "factors", "none")
FISHER_CENTERS: tuple[str, ...] = ("zero", "mean")
COMPRESSIONS: tuple[str, ...] = ("auto", "int8", "none")
CURVATURE_CHECKS: tuple[str, ...] = ("auto", "full", "fast")
"""How the server checks each received curvature payload: "full" (decoded; finite, symmetric,
PSD by one Cholesky per factor), "fast" (K-FAC / diagonal payloads read in place in one pass:
finite, bounded, non-negative diagonal, `||M||_F <= tr M`; the pooled sum gets the full PSD test
once per round), "auto" ("fast" where the server pools before solving, else "full")."""

LR_UNITS: tuple[str, ...] = ("natural", "sgd")
"""How FedNG's client reads `lr` (`FedNGConfig.lr_units`)."""

PROBE_WIRE: tuple[str, ...] = (*FLOAT_WIRE, "int8")
"""Wire dtypes of the summable line search's probe (int8: per-64-entry float32 scales)."""

_BROADCAST_FOR = {"global": "factors", "global_local": "factors"}
"""What the server sends for a client preconditioner ("auto" broadcast): the curvature itself,
int8 under compression (the client inverts it with its own damping rule, which is the server's):
about 4x fewer bytes than the fp32 inverses ("inverse")."""


def parse_curvature(spec: str) -> tuple[str, dict[str, str]]:
    """Parses a curvature spec: a default kind, then optional per-layer overrides; the kinds are
    those of the curvature registry (`fedng.curvature.kinds()`), and the default may be "auto"
    (K-FAC or the diagonal per layer by its shape, `fedng.federated.config.policy`).

    `"kfac"` uses K-FAC everywhere; `"kfac,fc2=diag,fc1=lowrank"` uses K-FAC except for the named
    modules; `"auto,fc1=kfac"` the policy except for `fc1`.

    Returns:
        (default kind, {module name: kind}).

    Raises:
        ValueError: an unknown kind or a malformed entry.
    """
    known = kinds()
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts or "=" in parts[0]:
        raise ValueError(f"'curvature' must start with a kind in {[AUTO, *known]}, got {spec!r}")
    default, overrides = parts[0], {}
    for p in parts[1:]:
        name, sep, kind = p.partition("=")
        if not sep or not name:
            raise ValueError(f"'curvature' entry must be MODULE=KIND, got {p!r} in {spec!r}")
        overrides[name.strip()] = kind.strip()
    if default not in known and default != AUTO:
        raise ValueError(f"'curvature' must start with a kind in {[AUTO, *known]}, got {spec!r}")
    for k in overrides.values():
        if k not in known:
            raise ValueError(f"'curvature' kinds must be in {list(known)}, got {k!r}")
    return default, overrides


def curvature_mapping(
    spec: str, model: nn.Module | None = None
) -> dict[str | type[nn.Module], str]:
    """A curvature spec as the mapping `NaturalGradient(curvature=...)` takes:
    `"kfac,fc2=diag"` -> `{"default": "kfac", "fc2": "diag"}`; "auto" resolves on `model`
    (`policy.auto_curvature`; the explicit overrides win).

    Raises:
        ValueError: "auto" without a model.
    """
    default, overrides = parse_curvature(spec)
    mapping: dict[str | type[nn.Module], str] = {"default": default}
    if default == AUTO:
        if model is None:
            raise ValueError("curvature_mapping: 'auto' needs the model")
        mapping = {"default": "kfac"}
        mapping.update(auto_curvature(model))
    mapping.update(overrides)
    return mapping


@dataclass(frozen=True)
class CurvatureConfig(AlgorithmConfig):
    """The knobs FedNG and FedFisher share: the curvature a client uploads, and the server's
    Fisher-weighted merge.

    Attributes:
        curvature: curvature spec, e.g. "kfac" or "kfac,fc2=diag" (see `parse_curvature`).
        fisher_type: "empirical" (real labels) or "mc" (sampled labels).
        rank: sketch rank of low-rank curvature.
        sketch_seed: shared seed of the Gaussian sketch matrices (and of the MC label draws).
        payload_dtype: wire dtype of the curvature payload ("fp32", "bf16", "fp16").
        fisher_damping: lambda of the Fisher-weighted merge, relative to the mean eigenvalue
            scale of each layer's aggregated curvature.
        fisher_center: the prior center of the merge's damping: "zero"
            (`(sum p F + lambda I)^-1 sum p F delta`) or "mean" (adds `lambda * mean delta` to
            the right-hand side: FedAvg where no curvature is seen).
        cg_iters: max conjugate-gradient iterations (K-FAC merge).
        cg_tol: relative residual at which CG stops.
        curvature_check: "auto", "full" or "fast" (see `CURVATURE_CHECKS`).
    """

    curvature: str = "kfac"
    fisher_type: str = "empirical"
    rank: int = 16
    sketch_seed: int = 1234
    payload_dtype: str = "fp32"
    fisher_damping: float = 0.1
    fisher_center: str = "mean"
    cg_iters: int = 100
    cg_tol: float = 1e-6
    curvature_check: str = "auto"

    def __post_init__(self) -> None:
        c = type(self).__name__
        parse_curvature(self.curvature)
        check_choice(c, "fisher_type", self.fisher_type, FISHER_TYPES)
        check(self.rank >= 1, c, "rank", ">= 1", self.rank)
        check(self.sketch_seed >= 0, c, "sketch_seed", ">= 0", self.sketch_seed)
        check_choice(c, "payload_dtype", self.payload_dtype, FLOAT_WIRE)
        check(self.fisher_damping > 0, c, "fisher_damping", "> 0", self.fisher_damping)
        check_choice(c, "fisher_center", self.fisher_center, FISHER_CENTERS)
        check(self.cg_iters >= 1, c, "cg_iters", ">= 1", self.cg_iters)
        check(self.cg_tol > 0, c, "cg_tol", "> 0", self.cg_tol)
        check_choice(c, "curvature_check", self.curvature_check, CURVATURE_CHECKS)

    def fast_check(self) -> bool:
        """Whether received payloads get the one-pass checks ("auto": only where the server
        pools before solving; a one-shot merge solves with every client's own curvature)."""
        return self.curvature_check == "fast"


@dataclass(frozen=True)
class FedNGConfig(CurvatureConfig):
    """FedNG (federated natural gradient); the defaults are the tuned configuration.

    Every client preconditions with the server's global curvature ("global": one metric for
    all clients, fixed for the round, so no preconditioner drift between heterogeneous clients;
    under 30% participation on synthetic(1, 1) the former "global_local" — the server's mixed
    with the client's own — ended up to 5 points below its best round and below FedAvg on 1 of
    5 seeds, "global" within 1.3 points and above FedAvg on 5 of 5; digits improved too,
    docs/natural_gradient.md), and the Fisher-weighted merge with its damping centered on the
    mean delta — computed by the summable
    aggregation (the server only sums; pooled solve + exact line search), which matched the
    exact merge on the bench tasks at a server cost close to FedAvg's
    (bench/bench_aggregation.py, bench/bench_server.py). The client's step is safe by default,
    as `NaturalGradient`'s: damping relative to each block's curvature scale (0.1 x its mean
    eigenvalue) and its adaptive trust region under the KL bound 1e-3 (carried across the
    client's rounds: `carry_trust`). NaturalGradient's own bound, 0.1 with the radius free to
    grow from 1e-3, helped pinn and lora-digits but made digits at full participation end
    6.7 points below its best round with `fisher_damping` 3 (bench_stability; 1e-3: 0.84), so
    the FedNG client keeps 1e-3 (`--set fedng.kl_clip=0.1` for those tasks,
    docs/natural_gradient.md). The former absolute
    damping 0.01 without a clip diverged
    on the CNN tasks (digits-cnn: 0.106 final accuracy after 30 rounds, FedAvg 0.914) and on
    mnist1d; with the safe defaults digits-cnn reaches 0.975 in 8 rounds
    (docs/natural_gradient.md, "FedNG clients"). The curvature travels as int8 with per-row
    scales when it outweighs the parameters (`compression="auto"`), about 4x fewer curvature
    bytes.

    Attributes:
        curvature: as in `CurvatureConfig` ("kfac"); "auto" picks K-FAC or the diagonal per
            layer by shape (`fedng.federated.config.policy`: the CNNs' dense heads get the
            diagonal, 2.7x fewer bytes per round on digits-cnn) — not the default: on
            digits-cnn at 30% participation the diagonal head ended 5 points below its best
            round (K-FAC: 0), and in bench_fl it took 9+ rounds to the target (K-FAC: 4).
        precond: the client's preconditioner: "global" (the server's), "local" (its own running
            curvature), "global_local" (the server's refreshed by the client's own), "none".
        damping: Tikhonov damping of the client's preconditioner and of the broadcast inverses:
            λ itself (`damping_scale="absolute"`) or its factor of each block's mean eigenvalue
            `tr(F_i) / d_i` (`"relative"`, the default: stable on any model without retuning).
        damping_scale: "relative" or "absolute" (how `damping` is read, as in
            `fedng.optim.NaturalGradient`).
        lr_units: how the client reads `lr`: "natural" (the step is `lr (F + λI)^-1 g`) or
            "sgd" (absolute damping only: `lr λ (F + λI)^-1 g = lr (F/λ + I)^-1 g`, so `lr`
            keeps SGD's meaning and λ moves the client from the natural gradient (small λ) to
            FedAvg's local SGD (λ → ∞) at the same `lr`). Under K-FAC's Tikhonov damping the
            factors get `sqrt(λ)` each, so a λ above the output factors' eigenvalues but near
            the input factors' leaves only the input-side whitening: the setting under
            client-level DP (`cli.DP_FEDNG`, docs/robustness_privacy.md, "Damping as the
            interpolation between NG and SGD").
        local_mix: weight of the client's own curvature in "global_local" (0..1).
        inverse_every: local steps between re-inversions of a local / mixed preconditioner.
        curvature_decay: EMA decay of the client's running curvature across its local steps.
        upload_every: upload curvature every R rounds (R >= 1).
        compression: the curvature on the wire (client uploads and broadcast factors): "int8"
            (K-FAC factors and diagonals as int8 with float32 per-row scales, PSD by
            construction, see `fedng.curvature.quantize`; factors at least 256 wide with more
            triangle entries than their layer's weights, such as a CNN's dense-head input, as a
            rank-32 truncation plus their tail's mean
            eigenvalue, 4x fewer bytes at 513 wide; low-rank sketches stay in
            `payload_dtype`), "none" (`payload_dtype` / `broadcast_dtype`), or "auto" (int8
            whenever that is the smaller payload: any factor wider than a few rows).
        contrib_dtype: wire dtype of the summable aggregation's `c_k = F_k delta_k` ("bf16"
            by default: half the bytes of fp32, rounding 2^-9 relative).
        probe_dtype: wire dtype of the summable line search's broadcast (M and d, on the
            probed blocks only): "fp32", "bf16", "fp16" or "int8" (the default: one float32
            scale per 64 entries, 0.58x bf16's bytes on mnist1d-cnn, 7% fewer bytes per round;
            bench_fl's rounds to target unchanged on synthetic and mnist1d-cnn). d is rounded as
            the clients decode it before the server's own parts, so the search stays exact along
            the d sent, up to M's rounding.
        kl_clip: bound on the local natural-gradient step's KL estimate `lr^2 p.g` (0 = off):
            the hard bound of `NaturalGradient`'s adaptive trust region, which starts at 1e-4
            under 0.1 and at `kl_clip` itself under any other value (the default 1e-3: the
            radius can only shrink).
        carry_trust: the client keeps its adaptive trust radius (and the evidence behind it)
            from one of its rounds to the next, in its `client_state` (never sent); off, every
            round starts at its start radius.
        aggregation: "mean", "summable" (Fisher-weighted from sums only: clients also upload
            `F_k delta_k` and answer a two-scalars-per-layer line search; streams, works under
            secure aggregation) or "fisher" (the exact Fisher-weighted merge by CG); the
            Fisher-weighted ones apply when every update carries curvature.
        curvature_ema: decay of the global curvature EMA across rounds (0 = last round only).
        broadcast: what the server sends with theta: "inverse" (the damped inverses of the
            global curvature), "factors" (the curvature itself, int8 under compression; the
            client inverts it), "none", or "auto" ("factors" for "global" and
            "global_local", else "none").
        broadcast_dtype: wire dtype of the broadcast preconditioner.
        sample_shrink: under partial participation, multiply the server step by the sampled
            mean delta's signal-to-noise (Wiener) factor `||M||^2 / (||M||^2 + v)`, v the
            variance of a mean of the sampled clients' deltas drawn without replacement
            (`fedng.federated.algorithms.sample_noise`; the server reads the sampled fraction
            the simulator or the Flower strategy gives `server_init`). Exactly 1 at full
            participation (the step untouched bit for bit), under DP and under secure
            aggregation (no individual deltas). Off by default: at 30% participation it
            steadies the late rounds (bench_stability, 5 seeds, largest drop below the best
            round: digits 2.23 -> 1.11, mnist1d 2.20 -> 1.60, mnist1d-cnn 4.90 -> 0.90;
            4 of 6 cells stable instead of 2), but regression stays unstable (13.46 -> 7.53),
            synthetic(1,1) gets worse (0.93 -> 4.95, final 88.6 -> 83.3): its sampled deltas
            disagree from the first round, the factor is 0.3-0.8 throughout, and bench_fl's
            synthetic at 50% participation then needs 8 rounds to its target instead of 5
            (0.57x of SCAFFOLD's 14, over the 0.5x target); docs/federated.md, "FedNG under
            partial participation".
        server_decay: the share of the run over which the server step decays (0 = never): the
            step keeps its size for the first `1 - server_decay` of the rounds the driver
            plans (`server_init(..., num_rounds)`; the simulator and the Flower strategy pass
            theirs), then follows a half cosine toward zero one round after the last
            (`fedng.federated.algorithms.step_schedule`). Without a planned number of rounds
            there is no decay. 0.5 by default: with a constant step the last rounds at 30%
            participation moved the model toward the few sampled clients' optimum and ended up
            to 11.7 points below its best round (regression; mnist1d-cnn 4.6, digits 2.2;
            digits-cnn at full participation 2.8); with the decay every cell of
            bench_stability (6 tasks, p = 1 and 0.3, 5 seeds, 30 rounds) ends within 1.7
            points of its best, at the cost of a lower final where a run is still climbing
            (mnist1d 1.5-2.3, mnist1d-cnn p=1 2.8 points; docs/federated.md, "The server
            step's decay"). bench_fl's rounds and bytes to the target (reached by round 10
            of 50) are those of the constant step, bit for bit, and its FedNG tuning picks
            the same configs.
        cg_iters: as in `CurvatureConfig`; 10 for FedNG's exact merge (preconditioned by the
            pooled Kronecker inverse, 10 iterations gave the accuracy of 100 on the bench tasks).
        fisher_damping: as in `CurvatureConfig`; 3.0 for FedNG (was 0.1). The summable step
            solves with the pooled K-FAC factors `(sum p A)(sum p G)`, which differ most from
            `sum p (A kron G)` in their small eigendirections: a light damping let those
            dominate the direction d, and the line search then cut every step to 0.1-0.3 of
            d. Relative damping 3 keeps d near the Fisher residual: bench_fl rounds to target
            synthetic(1,1) 8 -> 5, mnist1d-cnn 6 -> 5 (5 seeds), digits 3 -> 4 (3 seeds); in
            the stability protocol (30 rounds, 5 seeds) the largest drop below the best round
            fell on digits p=1 / p=0.3 from 2.79 / 2.23 to 1.67 / 1.67 points, on mnist1d
            p=0.3 from 2.10 to 1.90 and on synthetic p=0.3 from 2.10 to 0.72
            (docs/results/bench_fl_tasks.md).
    """

    precond: str = "global"
    damping: float = 1e-1
    damping_scale: str = "relative"
    lr_units: str = "natural"
    local_mix: float = 0.5
    inverse_every: int = 5
    curvature_decay: float = 0.9
    upload_every: int = 1
    compression: str = "auto"
    contrib_dtype: str = "bf16"
    probe_dtype: str = "int8"
    kl_clip: float = 1e-3
    carry_trust: bool = True
    aggregation: str = "summable"
    cg_iters: int = 10
    fisher_damping: float = 3.0
    curvature_ema: float = 0.5
    broadcast: str = "auto"
    broadcast_dtype: str = "fp32"
    sample_shrink: bool = False
    server_decay: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        c = "FedNGConfig"
        check_choice(c, "precond", self.precond, PRECONDITIONERS)
        check(self.damping > 0, c, "damping", "> 0", self.damping)
        check_choice(c, "damping_scale", self.damping_scale, DAMPING_SCALES)
        check_choice(c, "lr_units", self.lr_units, LR_UNITS)
        check(
            self.lr_units == "natural" or self.damping_scale == "absolute",
            c,
            "lr_units",
            '"natural" unless damping_scale is "absolute"',
            self.lr_units,
        )
        check(0 <= self.local_mix <= 1, c, "local_mix", "in [0, 1]", self.local_mix)
        check(self.inverse_every >= 1, c, "inverse_every", ">= 1", self.inverse_every)
        check(
            0 <= self.curvature_decay < 1, c, "curvature_decay", "in [0, 1)", self.curvature_decay
        )
        check(self.upload_every >= 1, c, "upload_every", ">= 1", self.upload_every)
        check_choice(c, "compression", self.compression, COMPRESSIONS)
        check_choice(c, "contrib_dtype", self.contrib_dtype, FLOAT_WIRE)
        check_choice(c, "probe_dtype", self.probe_dtype, PROBE_WIRE)
        check(self.kl_clip >= 0, c, "kl_clip", ">= 0", self.kl_clip)
        check_choice(c, "aggregation", self.aggregation, AGGREGATIONS)
        check(0 <= self.curvature_ema < 1, c, "curvature_ema", "in [0, 1)", self.curvature_ema)
        check_choice(c, "broadcast", self.broadcast, BROADCASTS)
        check_choice(c, "broadcast_dtype", self.broadcast_dtype, FLOAT_WIRE)
        check(0 <= self.server_decay <= 1, c, "server_decay", "in [0, 1]", self.server_decay)

    def fast_check(self) -> bool:
        """ "auto": the one-pass checks for the pooled aggregations ("mean", "summable"), whose
        pooled curvature gets the full PSD test once per round; the full checks for the exact
        merge, which solves with every client's own factors."""
        if self.curvature_check == "auto":
            return self.aggregation != "fisher"
        return self.curvature_check == "fast"

    def broadcast_mode(self) -> str:
        """`broadcast` with "auto" resolved: "inverse", "factors" or "none"."""
        if self.broadcast != "auto":
            return self.broadcast
        return _BROADCAST_FOR.get(self.precond, "none")


@dataclass(frozen=True)
class FedFisherConfig(CurvatureConfig):
    """One-shot Fisher merging: local training to (near) convergence, one Fisher upload.

    Attributes:
        local_epochs: local epochs of the one-shot local training (0 = `local_steps` steps).
    """

    curvature: str = "diag"
    fisher_damping: float = 1e-3
    fisher_center: str = "zero"
    local_epochs: float = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.local_epochs >= 0, "FedFisherConfig", "local_epochs", ">= 0", self.local_epochs)
