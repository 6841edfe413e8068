"""Client and server configs: the knobs every algorithm shares, plus the algorithm's own config.

Both round-trip through a flat dict of scalars (a Flower ConfigRecord): `to_dict()` writes the
common knobs and the algorithm's knobs side by side (every knob has one name), `from_dict()`
splits them again by the algorithm's config type.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, TypeVar

from fedng.curvature.fisher import LossType
from fedng.federated.config.base import AlgorithmConfig, Scalars, check, check_choice
from fedng.federated.config.catalog import config_type, owners
from fedng.federated.losses import canonical_loss
from fedng.federated.wire import FLOAT_WIRE

ROBUST_MODES = ("none", "norm-clip", "trimmed-mean", "median")
"""`ServerConfig.robust`: how a round's accepted updates are combined (`aggregation.robust`)."""
DP_MODES = ("central", "distributed")
"""`dp_mode`: where the DP noise is added (`aggregation.dp`)."""
CLIP_SCOPES = ("joint", "layer")
"""`dp_clip_scope`: an update clipped as one vector, or per layer (`aggregation.dp`)."""
DP_RELEASES = ("full", "input")
"""`dp_curvature_release`: what a client's released curvature holds (`aggregation.dp_metric`)."""
DP_POOLS = ("round", "mean")
"""`dp_curvature_pool`: what the server post-processes into its curvature under "input": the
round's noised release alone, or the running mean of every noised release so far."""
DP_METRICS = ("none", "curvature")
"""`ServerConfig.dp_metric`: the norm of the DP clip and the shape of its noise: Euclidean, or
the server's private global curvature (`aggregation.dp_metric`)."""

DEFAULT_OPTIONS = AlgorithmConfig()
"""`options` left out: the algorithm's own config with its defaults."""

_O = TypeVar("_O", bound=AlgorithmConfig)
_C = TypeVar("_C", bound="_Common")


class _Common(Scalars):
    """The flat-dict round trip and the typed access to `options` of both configs."""

    algorithm: str
    options: AlgorithmConfig

    @classmethod
    def common_names(cls) -> tuple[str, ...]:
        """The field names but `options`."""
        return tuple(n for n in cls.field_names() if n != "options")

    def to_dict(self) -> dict[str, Any]:
        """The common knobs and the algorithm's knobs as one flat dict of scalars."""
        return {**{n: getattr(self, n) for n in self.common_names()}, **self.options.to_dict()}

    @classmethod
    def from_dict(cls: type[_C], d: dict[str, Any]) -> _C:
        """Inverse of `to_dict`: the algorithm (key "algorithm", default "fedavg") decides which
        other keys are its own.

        Raises:
            ValueError: an unknown algorithm or key (named, with the valid ones).
        """
        kind = config_type(str(d.get("algorithm", "fedavg")), cls.__name__)
        common, own = set(cls.common_names()), set(kind.field_names())
        unknown = sorted(set(d) - common - own)
        if unknown:
            raise ValueError(
                f"{cls.__name__}: unknown keys {unknown}; expected some of {sorted(common | own)}"
            )
        kwargs: dict[str, Any] = {k: v for k, v in d.items() if k in common}
        kwargs["options"] = kind(**{k: v for k, v in d.items() if k in own})
        return cls(**kwargs)

    def options_as(self, kind: type[_O]) -> _O:
        """`options`, checked to be a `kind`.

        Raises:
            TypeError: `options` is another algorithm's config.
        """
        if not isinstance(self.options, kind):
            raise TypeError(
                f"{type(self).__name__}: the options of {self.algorithm!r} are a"
                f" {type(self.options).__name__}, not a {kind.__name__}"
            )
        return self.options

    def _resolve_options(self) -> None:
        """Checks `algorithm`; replaces `DEFAULT_OPTIONS` by the algorithm's defaults; checks the
        options' type."""
        where = type(self).__name__
        kind = config_type(self.algorithm, where)
        if type(self.options) is AlgorithmConfig:
            object.__setattr__(self, "options", kind())
        elif not isinstance(self.options, kind):
            raise ValueError(
                f"{where}: 'options' must be a {kind.__name__} for {self.algorithm!r}, got"
                f" {type(self.options).__name__}"
            )


def _moved_into_options(
    where: str,
    common: tuple[str, ...],
    algorithm: str,
    options: AlgorithmConfig | None,
    moved: dict[str, Any],
) -> AlgorithmConfig:
    """`options` with `moved` applied: keys that were flat fields of the configs before each
    algorithm owned its config (deprecated), or why they cannot be.

    Raises:
        ValueError: a key owned by another algorithm (naming it).
        TypeError: a key no config knows (naming the valid ones).
    """
    kind = config_type(algorithm, where)
    own = kind.field_names()
    for key in sorted(moved):
        if key in own:
            continue
        if owners(key):
            raise ValueError(
                f"{where}: '{key}' is a setting of {', '.join(owners(key))}, not of {algorithm}"
            )
        raise TypeError(f"{where}: unknown key '{key}'; expected one of {sorted({*common, *own})}")
    names = ", ".join(f"{k}=..." for k in sorted(moved))
    warnings.warn(
        f"{where}({names}) is deprecated: {sorted(moved)} moved to {kind.__name__}; pass"
        f" options={kind.__name__}({names}) or use make_configs({algorithm!r}, {{...}})",
        DeprecationWarning,
        stacklevel=3,
    )
    base = kind() if options is None or type(options) is AlgorithmConfig else options
    if not isinstance(base, kind):
        raise ValueError(f"{where}: 'options' must be a {kind.__name__} for {algorithm!r}")
    return base.replace(**moved)


def _accepts_moved_keys(cls: type[_C]) -> type[_C]:
    """Lets the constructor (and `replace`) take an algorithm's knobs as flat keywords, as the
    configs did before each algorithm owned its config: they go into `options`, with a
    DeprecationWarning."""
    init = cls.__init__
    common = cls.common_names()
    fields = cls.field_names()
    at = fields.index("options")

    @functools.wraps(init)
    def __init__(self: _C, *args: Any, **kwargs: Any) -> None:
        moved = {k: kwargs.pop(k) for k in [k for k in kwargs if k not in fields]}
        if moved:
            options = args[at] if len(args) > at else kwargs.get("options")
            algorithm = kwargs.get("algorithm", args[0] if args else "fedavg")
            kwargs["options"] = _moved_into_options(cls.__name__, common, algorithm, options, moved)
            args = args[:at]
        init(self, *args, **kwargs)

    setattr(cls, "__init__", __init__)  # noqa: B010 - mypy rejects assigning a method directly
    return cls


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_dp(cfg: ClientConfig | ServerConfig, c: str) -> None:
    """Range checks of the DP knobs both configs share."""
    for name in ("dp_clip", "dp_curvature_clip", "dp_noise_multiplier"):
        value = getattr(cfg, name)
        check(0 <= value < float("inf"), c, name, ">= 0 and finite", value)
    check_choice(c, "dp_mode", cfg.dp_mode, DP_MODES)
    check(
        _is_int(cfg.dp_clients) and cfg.dp_clients >= 1,
        c,
        "dp_clients",
        "an int >= 1",
        cfg.dp_clients,
    )
    check(_is_int(cfg.dp_seed), c, "dp_seed", "an int", cfg.dp_seed)
    check_choice(c, "dp_clip_scope", cfg.dp_clip_scope, CLIP_SCOPES)
    share = cfg.dp_curvature_share
    check(0 < share < 1, c, "dp_curvature_share", "in (0, 1)", share)
    check_choice(c, "dp_curvature_release", cfg.dp_curvature_release, DP_RELEASES)
    rank = cfg.dp_curvature_rank
    check(_is_int(rank) and rank >= 0, c, "dp_curvature_rank", "an int >= 0", rank)
    check_choice(c, "dp_curvature_pool", cfg.dp_curvature_pool, DP_POOLS)
    check_choice(c, "dp_metric", cfg.dp_metric, DP_METRICS)
    check(cfg.dp_metric_damping > 0, c, "dp_metric_damping", "> 0", cfg.dp_metric_damping)
    check(
        cfg.dp_metric == "none" or cfg.dp_mode == "central",
        c,
        "dp_metric",
        "'none' under distributed DP (the clients would need the server's metric)",
        cfg.dp_metric,
    )
    check(
        cfg.dp_metric == "none" or cfg.dp_clip == 0 or cfg.dp_curvature_clip > 0,
        c,
        "dp_metric",
        "'none' without a curvature clip (no curvature is released: the metric stays the identity)",
        cfg.dp_metric,
    )


@_accepts_moved_keys
@dataclass(frozen=True)
class ClientConfig(_Common):
    """What a client needs to run its local step.

    Attributes:
        algorithm: one of `ALGORITHMS`.
        lr: local learning rate.
        batch_size: local minibatch size.
        local_steps: local optimizer steps per round (equal local work across methods).
        momentum: local SGD momentum (reset every round).
        weight_decay: local L2 weight decay.
        loss: "cross_entropy" or "mse" ("ce" is accepted, deprecated).
        seed: root seed of the batch order (combined with round and client id).
        update_dtype: wire dtype of the model delta ("fp32", "bf16", "fp16").
        options: the algorithm's own config (e.g. `FedProxConfig`); left out, its defaults.
        dp_clip: differential privacy (`aggregation.dp`): the L2 bound C on the client's delta
            (with its extras); 0: no DP.
        dp_curvature_clip: the L2 bound C_F on the packed curvature payload; 0: under DP, no
            curvature leaves the client.
        dp_noise_multiplier: the noise multiplier z the run was calibrated for.
        dp_mode: "central" (the server adds the noise) or "distributed" (each client adds its
            share, std `z sqrt(parts) C / sqrt(dp_clients)`).
        dp_clients: the clients per round the noise is split across ("distributed").
        dp_seed: seed of the noise (< 0: the OS's randomness, as a deployment must use).
        dp_clip_scope: "joint" (the update clipped as one vector) or "layer" (each layer to
            `dp_clip * sqrt(d_l / d)`: the same sensitivity, see `aggregation.dp.clip_update`).
        dp_curvature_share: in a round that releases curvature, the share of the round's
            privacy budget (of `1 / z^2`) the curvature gets: its noise multiplier is
            `z / sqrt(share)`, the delta's `z / sqrt(1 - share)` (0.5: both `z sqrt(2)`).
        dp_curvature_release: what the released curvature holds: "full" (the packed payload
            as uploaded) or "input" (each K-FAC block's input factor as its unit-trace shape,
            nothing else; the server makes it `(A n / tr A) (x) I`, see
            `aggregation.dp_metric.input_shapes`).
        dp_curvature_rank: under "input", the server keeps each released input factor's top
            this many eigen-directions and makes the rest isotropic (denoising, post-processing;
            0: keeps all). At 20 clients only the top direction rises above the noise.
        dp_curvature_pool: under "input", what the server denoises: "round" (each round's
            noised release alone; the algorithm's `curvature_ema` averages the results) or
            "mean" (the running mean of every noised release so far, kept by the server:
            post-processing; the noise averages out before the rank-`dp_curvature_rank` cut).
        dp_metric: "none" (the clip is Euclidean, the noise isotropic) or "curvature" (central
            DP only: the server clips the deltas in the norm of its global curvature, which
            under DP is built from private releases only, and shapes the noise like its
            inverse; `aggregation.dp_metric`; the identity before any curvature was released).
            The client then clips its delta only to the Euclidean bound the metric clip implies
            (`dp_metric.euclidean_bound`), which changes nothing the server's clip keeps.
        dp_metric_damping: relative damping of that metric's factors (> 0).
    """

    algorithm: str = "fedavg"
    lr: float = 0.05
    batch_size: int = 32
    local_steps: int = 10
    momentum: float = 0.0
    weight_decay: float = 0.0
    loss: LossType = "cross_entropy"
    seed: int = 0
    update_dtype: str = "fp32"
    options: AlgorithmConfig = DEFAULT_OPTIONS
    dp_clip: float = 0.0
    dp_curvature_clip: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_mode: str = "central"
    dp_clients: int = 1
    dp_seed: int = -1
    dp_clip_scope: str = "joint"
    dp_curvature_share: float = 0.5
    dp_curvature_release: str = "full"
    dp_curvature_rank: int = 1
    dp_curvature_pool: str = "round"
    dp_metric: str = "none"
    dp_metric_damping: float = 1.0

    def __post_init__(self) -> None:
        c = "ClientConfig"
        self._resolve_options()
        check(self.lr > 0, c, "lr", "> 0", self.lr)
        check(self.batch_size >= 1, c, "batch_size", ">= 1", self.batch_size)
        check(self.local_steps >= 1, c, "local_steps", ">= 1", self.local_steps)
        check(0 <= self.momentum < 1, c, "momentum", "in [0, 1)", self.momentum)
        check(self.weight_decay >= 0, c, "weight_decay", ">= 0", self.weight_decay)
        object.__setattr__(self, "loss", canonical_loss(self.loss, c, stacklevel=5))
        check_choice(c, "update_dtype", self.update_dtype, FLOAT_WIRE)
        _check_dp(self, c)


@_accepts_moved_keys
@dataclass(frozen=True)
class ServerConfig(_Common):
    """What the server needs to aggregate.

    Attributes:
        algorithm: one of `ALGORITHMS`.
        server_lr: server learning rate eta_s (FedOpt: the Adam/Yogi/Adagrad step size).
        server_momentum: heavy-ball momentum on the aggregated update (FedAvgM, FedNG).
        num_clients: total number of clients N (SCAFFOLD's control-variate update).
        max_norm_ratio: a payload whose delta norm (or curvature scale: per block and K-FAC
            factor) exceeds this multiple of the round's median is rejected; with fewer than 3
            updates the reference is the previous round's median (or the server's curvature).
        max_num_examples: the largest `num_examples` (the aggregation weight) a client may claim.
        psd_tol: relative tolerance of the PSD / symmetry checks of curvature payloads.
        options: the algorithm's own config (e.g. `FedOptConfig`); left out, its defaults.
        robust: how the accepted updates of a round are combined (`aggregation.robust`): "none",
            "norm-clip" (each delta and curvature scale bounded by `robust_clip_ratio` x the
            round's median, then the algorithm's own aggregation), "trimmed-mean" or "median"
            (coordinate-wise on deltas, scale-invariant on curvature; every update is replaced by
            the round's robust one). The last two hold all of a round's updates in memory.
        robust_trim: the fraction trimmed at each end ("trimmed-mean"), in [0, 0.5).
        robust_clip_ratio: the "norm-clip" bound as a multiple of the round's median (> 0).
        robust_trust: robust modes leave out a client whose reputation (EMA of its delta's
            cosine with the round's trimmed mean) is below this multiple of the round's median
            reputation, at most `floor(robust_trim K)` clients; 0 turns reputation off. In [0, 1).
        robust_memory: the reputation EMA's weight of the past, in [0, 1).
        dp_clip, dp_curvature_clip, dp_noise_multiplier, dp_mode, dp_clients, dp_seed,
            dp_clip_scope, dp_curvature_share, dp_curvature_release, dp_curvature_rank,
            dp_curvature_pool, dp_metric, dp_metric_damping: as in
            `ClientConfig`; with `dp_clip` > 0 the server clips ("central"), averages uniformly
            and adds the noise ("central") before the algorithm aggregates.
    """

    algorithm: str = "fedavg"
    server_lr: float = 1.0
    server_momentum: float = 0.0
    num_clients: int = 1
    max_norm_ratio: float = 100.0
    max_num_examples: int = 1_000_000
    psd_tol: float = 1e-3
    options: AlgorithmConfig = DEFAULT_OPTIONS
    robust: str = "none"
    robust_trim: float = 0.2
    robust_clip_ratio: float = 1.0
    robust_trust: float = 0.6
    robust_memory: float = 0.95
    dp_clip: float = 0.0
    dp_curvature_clip: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_mode: str = "central"
    dp_clients: int = 1
    dp_seed: int = -1
    dp_clip_scope: str = "joint"
    dp_curvature_share: float = 0.5
    dp_curvature_release: str = "full"
    dp_curvature_rank: int = 1
    dp_curvature_pool: str = "round"
    dp_metric: str = "none"
    dp_metric_damping: float = 1.0

    def __post_init__(self) -> None:
        c = "ServerConfig"
        self._resolve_options()
        check(self.server_lr > 0, c, "server_lr", "> 0", self.server_lr)
        check(
            0 <= self.server_momentum < 1, c, "server_momentum", "in [0, 1)", self.server_momentum
        )
        check(self.num_clients >= 1, c, "num_clients", ">= 1", self.num_clients)
        check(self.max_norm_ratio > 1, c, "max_norm_ratio", "> 1", self.max_norm_ratio)
        check(
            not isinstance(self.max_num_examples, bool)
            and isinstance(self.max_num_examples, int)
            and self.max_num_examples >= 1,
            c,
            "max_num_examples",
            "an int >= 1",
            self.max_num_examples,
        )
        check(self.psd_tol > 0, c, "psd_tol", "> 0", self.psd_tol)
        check_choice(c, "robust", self.robust, ROBUST_MODES)
        check(0 <= self.robust_trim < 0.5, c, "robust_trim", "in [0, 0.5)", self.robust_trim)
        check(self.robust_clip_ratio > 0, c, "robust_clip_ratio", "> 0", self.robust_clip_ratio)
        check(0 <= self.robust_trust < 1, c, "robust_trust", "in [0, 1)", self.robust_trust)
        check(0 <= self.robust_memory < 1, c, "robust_memory", "in [0, 1)", self.robust_memory)
        _check_dp(self, c)
        check(
            self.robust == "none" or self.dp_clip == 0,
            c,
            "robust",
            "'none' under differential privacy (dp_clip > 0 bounds every update already)",
            self.robust,
        )


COMMON_KEYS: frozenset[str] = frozenset(
    ClientConfig.common_names() + ServerConfig.common_names()
) - {"algorithm"}
"""Every common knob of the two configs."""
