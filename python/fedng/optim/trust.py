"""Adaptive trust region of the natural-gradient step: the KL radius follows the observed loss
change along each step, without an extra forward pass.

The step's KL estimate `lr^2 s`, `s = g^T p` (p the preconditioned gradient), is bounded by a
radius r (the preconditioned gradients are scaled by `ν = min(1, sqrt(r / (lr^2 s)))`). With
`trust="adaptive"` r moves inside `[min_radius, kl_clip]` (the clip is the hard bound).

After step t moved the parameters by `δ = θ_{t+1} - θ_t` (whatever the optimizer did: its lr,
momentum), the next step's gradient gives the directional derivative along δ after the step; its
ratio to the one before the step,

    c_t = g_{t+1}^T δ / g_t^T δ,

is `1 - κ` on a quadratic, κ the step's length relative to the best length along δ: c ≈ 1 a
step far too short, c = 0 the exact line minimum, c < 0 an overshoot (c = -1: twice the best
length, the loss back where it started; the trapezoid rule's ratio of actual to predicted
reduction is `(1 + c) / (2 - κ)`). `g_{t+1}` comes from the next minibatch, so its noise has
mean zero but `g_t^T δ` carries the batch's own noise energy, which pulls c towards 0: the rule
acts on a significance test of c's exponential average (mean m, standard error se, a
Levenberg–Marquardt / trust-region rule as in Martens & Grosse 2015, §6.5, on the radius):

- the step was clipped and `m / se > z` (the loss still falls along δ after the step, beyond
  noise): grow, `r ← grow x r`;
- `m < overshoot` and `m / se < -z`, or one c below `blowup` or not finite: shrink,
  `r ← shrink x min(r, KL of the step taken)`, and the average restarts;
- r is above its start (`anchor`: growth earned by steps that were too short) and `m < earned`,
  `m / se < -z` (the steps now overshoot mildly): give the growth back, `r ← max(anchor, shrink x
  min(r, KL of the step taken))`. Below its start a mild overshoot keeps r: on some models the
  fastest steps overshoot the line minimum (the zoo's transformer: m ≈ -0.4, and shrinking there
  slows it 10x), while on a noise-dominated one (the zoo's MSE regression) a radius grown early
  would otherwise stay where the steps only add noise (3x the final loss);
- progress stopped at a noise floor (checked every `stall_window` observations: the KL estimate
  of the unclipped step, `lr^2 g^T p`, fell by less than `stall_drop` in log over the window,
  after the raw gradient energy `g^T g` had fallen to `progress` x its peak) while
  `m < earned`, `m / se < -z`: anneal, `r ← shrink x min(r, KL of the step taken)` (below the
  start too). With minibatch noise the loss a constant radius settles at is set by the radius;
  the flat step energy tells a noise floor from steady progress (the zoo's transformer, whose
  steps also overshoot, keeps its radius), the fallen gradient from a plateau at the start;
- otherwise r stays (a step near the line minimum, or noise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedng import _backend
from fedng.ops import trusted
from fedng.optim.config import DEFAULT_KL_CLIP, WHERE

TRUST_MODES: tuple[str, ...] = ("adaptive", "fixed")
"""`trust`: the radius adapts inside `[min_radius, kl_clip]`, or it is `kl_clip` itself."""

DEFAULT_INITIAL_RADIUS = 1e-4
"""Where the adaptive radius starts under the default hard bound `DEFAULT_KL_CLIP`; under any
other `kl_clip` it starts at that bound (where a fixed clip was), and adapts from there.

A trust region starts small and expands on evidence (x1.1 per step whose outcome earns it, so
1e-4 -> 1e-3 in ~25 steps): with the unit step of the default lr 1.0, the zoo's transformer's
first steps at a start of 1e-3 drive it onto the chance plateau (final loss 1.38 / 1.78 / 2.08
over three batch orders) and at 1e-4 they do not (6.6e-4 / 0.30 / 6.4e-4; `bench/bench_zoo.py`,
`docs/natural_gradient.md`)."""

MIN_RADIUS_FRACTION = 1e-3
"""The least adaptive radius, as a fraction of its start (three decades of annealing: the zoo's
MSE regression settles at a noise floor set by the radius)."""


def _ema_log(avg: float, x: float, decay: float) -> float:
    """The exponential average `avg` of log values updated with log(x) (unchanged when x is not
    a positive finite number; the first value starts it)."""
    if not (x > 0 and math.isfinite(x)):
        return avg
    return math.log(x) if math.isnan(avg) else decay * avg + (1 - decay) * math.log(x)


def _dots_f64(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    """`sum_i <xs_i, ys_i>` with products and sums in float64, in one native call (the kernel
    of `fedng.curvature.packed_fold.dots`, without its per-tensor conversions). The contract
    (unchecked; `fedng.ops.trusted.CHECK` checks it): contiguous float32 CPU tensors, `xs[i]`
    and `ys[i]` of equal sizes."""
    if trusted.CHECK:
        for x, y in zip(xs, ys, strict=True):
            for t in (x, y):
                if t.dtype != torch.float32 or not t.is_cpu or not t.is_contiguous():
                    raise TypeError(f"{WHERE}: trust dots expect contiguous float32 CPU tensors")
            if x.numel() != y.numel():
                raise ValueError(f"{WHERE}: trust dots of sizes {x.numel()} and {y.numel()}")
    return math.fsum(
        _backend.native.dots_f64(
            xs=[t.data_ptr() for t in xs],
            ys=[t.data_ptr() for t in ys],
            n=[t.numel() for t in xs],
        )
    )


def _native32(*groups: Sequence[torch.Tensor]) -> bool:
    """Whether every tensor is a contiguous float32 CPU tensor and the groups hold equally many
    tensors of equal sizes (what the native trust sums read)."""
    first = groups[0]
    return all(len(g) == len(first) for g in groups) and all(
        t.dtype == torch.float32 and t.is_cpu and t.is_contiguous() and t.numel() == r.numel()
        for g in groups
        for t, r in zip(g, first, strict=True)
    )


def _step_dots(
    params: Sequence[torch.Tensor],
    theta: Sequence[torch.Tensor],
    g_old: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
) -> tuple[float, float, float | None]:
    """`(<g_old, params - theta>, <grads, params - theta>, <grads, grads> or None)` in float64:
    one native pass over float32 tensors (no step tensors formed), else per tensor in torch."""
    if _native32(params, theta, g_old, grads):
        out = _backend.native.trust_dots(
            params=[t.data_ptr() for t in params],
            theta=[t.data_ptr() for t in theta],
            g_old=[t.data_ptr() for t in g_old],
            grads=[t.data_ptr() for t in grads],
            n=[t.numel() for t in params],
        )
        return out[0], out[1], out[2]
    delta = torch._foreach_sub([p.detach() for p in params], list(theta))
    return _dot(g_old, delta), _dot(list(grads), delta), None


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """`sum_i <a_i, b_i>` in float64: contiguous float32 CPU tensors in one native call (products
    and sums in float64, `_dots_f64`; per-tensor torch calls cost ~50 us a dot
    on a small MLP, a third of its SGD step over the three dots of a step), others per tensor
    (one sync)."""
    if not a:
        return 0.0
    a, b = list(a), list(b)
    if _native32(a, b):  # the native call's contract, sizes included
        return _dots_f64(a, b)
    parts = torch._foreach_mul(a, b)
    return float(torch.stack([p.sum(dtype=torch.float64) for p in parts]).sum())


@dataclass(frozen=True)
class TrustRule:
    """The radius update (pure arithmetic; see the module docstring).

    Attributes:
        max_radius: the hard bound (`kl_clip`).
        min_radius: the least radius.
        z: the significance (in standard errors) that grows or shrinks the radius.
        overshoot: the mean c below which a significant overshoot shrinks the radius.
        shrink: factor in (0, 1) on a shrink.
        grow: factor > 1 on a grow.
        decay: EMA decay of c (about `(1 + decay) / (1 - decay)` steps of memory).
        warmup: observations needed (since the start or the last shrink) before a decision.
        blowup: a single c below this (four times the best length along δ: the loss rose a
            lot) shrinks at once.
        earned: the mean c below which a significant overshoot gives back a radius above
            `anchor`.
        anchor: the radius's start; growth above it must keep being earned (inf: never).
        stall_window: observations between two progress checks (0: never anneal).
        stall_drop: the least fall of the log step energy over a window that is progress.
        stall_decay: EMA decay of the log energies.
        progress: the raw gradient energy must have fallen to this fraction of its peak
            before a stall can anneal (a plateau at the start is no noise floor).
    """

    max_radius: float
    min_radius: float
    z: float = 2.0
    overshoot: float = -0.5
    shrink: float = 0.5
    grow: float = 1.1
    decay: float = 0.9
    warmup: int = 5
    blowup: float = -3.0
    earned: float = -0.25
    anchor: float = math.inf
    stall_window: int = 50
    stall_drop: float = 0.1
    stall_decay: float = 0.95
    progress: float = 0.25

    def decide(self, mean: float, se: float, count: int, clipped: bool, radius: float = 0.0) -> int:
        """+1 (grow), -1 (shrink), -2 (shrink, not below `anchor`) or 0 from c's average
        `mean`, its standard error `se` over `count` observations, whether the last step was
        clipped, and the current `radius`."""
        if count < self.warmup:
            return 0
        if mean < self.overshoot and mean < -self.z * se:
            return -1
        if radius > self.anchor and mean < self.earned and mean < -self.z * se:
            return -2
        if clipped and mean > self.z * se:
            return 1
        return 0

    def bounded(self, radius: float) -> float:
        """`radius` within `[min_radius, max_radius]`."""
        return min(self.max_radius, max(self.min_radius, radius))


_Step = tuple[list[torch.Tensor], list[torch.Tensor], float, bool]
"""(parameters, raw gradients, KL estimate taken, clipped) of the previous step."""


@dataclass
class TrustRegion:
    """The adaptive radius of one optimizer, c's running average, and the previous step.

    Args:
        rule: the update rule.
        radius: the current radius.

    Attributes:
        c: the last step's continuation ratio (None before the first observation).
        grown, shrunk: how often the radius grew / shrank.
    """

    rule: TrustRule
    radius: float
    c: float | None = None
    grown: int = 0
    shrunk: int = 0
    _m: float = 0.0
    _v: float = 0.0
    _n: int = 0
    stalls: int = 0
    _energy: float = math.nan
    _log_step: float = math.nan
    _log_step_ref: float = math.nan
    _log_grad: float = math.nan
    _log_grad_peak: float = -math.inf
    _since: int = 0
    _prev: _Step | None = field(default=None, repr=False)

    def observe(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> float:
        """Updates the radius from the previous step's outcome; returns the radius for this step.

        Args:
            params: the parameters now (θ_{t+1}), in the order of the previous call's.
            grads: their raw gradients now (g_{t+1}), finite.
        """
        prev = self._prev
        if prev is None:
            return self.radius
        theta, g_old, taken, clipped = prev
        before, after, energy = _step_dots(params, theta, g_old, grads)
        if before == 0.0 and math.isfinite(after):
            return self.radius  # the optimizer did not move the parameters (lr 0): no evidence
        c = after / before if before < 0 and math.isfinite(after) else -math.inf
        self.c = c
        if not c >= self.rule.blowup:  # ascent, non-finite, or a wild overshoot: shrink now
            return self._shrink(taken)
        self._n += 1
        c = min(c, 1.0)  # a steeper slope after the step (a new batch's larger gradient) is no
        # more evidence of a short step than c = 1
        self._m = self.rule.decay * self._m + (1 - self.rule.decay) * c
        self._v = self.rule.decay * self._v + (1 - self.rule.decay) * c * c
        mean, se = self.average()
        stalled = self._stalled(grads, energy)  # feeds the energy averages every step
        settled = self._n >= self.rule.warmup  # as every decision, after the warm-up
        if stalled and settled and mean < self.rule.earned and mean < -self.rule.z * se:
            self.stalls += 1  # progress stopped at a noise floor: anneal
            return self._shrink(taken)
        move = self.rule.decide(mean, se, self._n, clipped, self.radius)
        if move == -2:  # give back growth the steps no longer earn, down to the anchor
            return self._shrink(taken, floor=self.rule.anchor)
        if move < 0:
            return self._shrink(taken)
        if move > 0:
            new = self.rule.bounded(self.radius * self.rule.grow)
            self.grown += new > self.radius
            self.radius = new
        return self.radius

    def _stalled(self, grads: Sequence[torch.Tensor], energy: float | None = None) -> bool:
        """Feeds the log energies' averages; True at the end of a window over which the step
        energy (the KL of the unclipped step) did not fall by `stall_drop`, once the raw
        gradient energy (`energy`: `<grads, grads>`, computed when None) has fallen to
        `progress` x its peak."""
        rule = self.rule
        if rule.stall_window <= 0:
            return False
        gg = _dot(grads, grads) if energy is None else energy
        self._log_step = _ema_log(self._log_step, self._energy, rule.stall_decay)
        self._log_grad = _ema_log(self._log_grad, gg, rule.stall_decay)
        if math.isfinite(self._log_grad):
            self._log_grad_peak = max(self._log_grad_peak, self._log_grad)
        self._since += 1
        if self._since < rule.stall_window:
            return False
        fell = self._log_step_ref - self._log_step
        self._log_step_ref, self._since = self._log_step, 0
        progressed = self._log_grad < self._log_grad_peak + math.log(rule.progress)
        return progressed and math.isfinite(fell) and fell < rule.stall_drop

    def average(self) -> tuple[float, float]:
        """c's bias-corrected exponential mean and its standard error."""
        if self._n == 0:
            return 0.0, math.inf
        d = self.rule.decay
        corr = 1.0 - d**self._n
        mean = self._m / corr
        var = max(self._v / corr - mean * mean, 0.0)
        return mean, math.sqrt(var * (1 - d) / (1 + d))

    def _shrink(self, taken: float, floor: float = 0.0) -> float:
        base = min(self.radius, taken) if taken > 0 else self.radius
        new = self.rule.bounded(max(floor, self.rule.shrink * base))
        self.shrunk += new < self.radius
        self.radius = new
        self._m = self._v = 0.0
        self._n = 0
        return self.radius

    def remember(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        taken: float,
        clipped: bool,
        energy: float = math.nan,
    ) -> None:
        """Keeps this step's parameters and raw gradients, the KL estimate of the step taken (in
        the radius's units), whether it was clipped and the KL estimate of the unclipped step
        (`energy`: NaN when unknown, never a stall), for the next `observe`."""
        old = self._prev
        if old is not None and len(old[0]) == len(params):
            torch._foreach_copy_(old[0], [p.detach() for p in params])
            torch._foreach_copy_(old[1], list(grads))
            theta, g = old[0], old[1]
        else:
            theta = [p.detach().clone() for p in params]
            g = [q.detach().clone() for q in grads]
        self._prev = (theta, g, taken, clipped)
        self._energy = energy

    def forget(self) -> None:
        """Drops the previous step (a skipped step: nothing to compare with)."""
        self._prev = None

    def state_dict(self) -> dict[str, Any]:
        """The radius, c's average, the counters and the previous step (copies)."""
        prev = self._prev
        return {
            "radius": self.radius,
            "c": self.c,
            "m": self._m,
            "v": self._v,
            "n": self._n,
            "grown": self.grown,
            "shrunk": self.shrunk,
            "stalls": self.stalls,
            "energy": [
                self._energy,
                self._log_step,
                self._log_step_ref,
                self._log_grad,
                self._log_grad_peak,
                self._since,
            ],
            "prev": None
            if prev is None
            else {
                "params": [t.clone() for t in prev[0]],
                "grads": [t.clone() for t in prev[1]],
                "taken": prev[2],
                "clipped": prev[3],
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores `state_dict()`: the next step observes the same previous step."""
        self.radius = self.rule.bounded(float(state.get("radius") or self.radius))
        c = state.get("c")
        self.c = None if c is None else float(c)
        self._m = float(state.get("m") or 0.0)
        self._v = float(state.get("v") or 0.0)
        self._n = int(state.get("n") or 0)
        self.grown = int(state.get("grown") or 0)
        self.shrunk = int(state.get("shrunk") or 0)
        self.stalls = int(state.get("stalls") or 0)
        e = state.get("energy")
        if isinstance(e, list | tuple) and len(e) == 6:
            self._energy, self._log_step, self._log_step_ref = (float(v) for v in e[:3])
            self._log_grad, self._log_grad_peak, self._since = float(e[3]), float(e[4]), int(e[5])
        prev = state.get("prev")
        self._prev = (
            None
            if not isinstance(prev, dict)
            else (
                [t.clone() for t in prev["params"]],
                [t.clone() for t in prev["grads"]],
                float(prev["taken"]),
                bool(prev["clipped"]),
            )
        )


_CARRIED: tuple[str, ...] = ("radius", "c", "m", "v", "n", "grown", "shrunk", "stalls")
"""The scalar fields of `TrustRegion.state_dict` that `carried` packs, in order (then the six
energy averages)."""


def carried(region: TrustRegion) -> torch.Tensor:
    """What of `region` outlives a run of steps (a FedNG client's rounds: the server moves the
    model in between, so the previous step is dropped): float64 [14], see `resume`."""
    state = region.state_dict()
    head = [math.nan if state[k] is None else float(state[k]) for k in _CARRIED]
    tail = [math.nan, *(float(v) for v in state["energy"][1:])]  # no step pending
    return torch.tensor(head + tail, dtype=torch.float64)


def resume(region: TrustRegion, state: torch.Tensor) -> None:
    """Restores `carried(...)` into `region` (with no previous step to compare with).

    Raises:
        ValueError: `state` is not a `carried` vector.
    """
    values = state.detach().reshape(-1).tolist()
    if len(values) != len(_CARRIED) + 6:
        raise ValueError(f"{WHERE}: a carried trust state has {len(_CARRIED) + 6} entries")
    loaded: dict[str, Any] = dict(zip(_CARRIED, values, strict=False))
    loaded["c"] = None if math.isnan(loaded["c"]) else loaded["c"]
    loaded["energy"] = values[len(_CARRIED) :]
    loaded["prev"] = None
    region.load_state_dict(loaded)


def trust_region(mode: object, kl_clip: float | None) -> TrustRegion | None:
    """The trust region of `NaturalGradient(trust=mode, kl_clip=kl_clip)`: None when the bound
    is fixed (`mode="fixed"`) or there is none (`kl_clip` None).

    Raises:
        ValueError: an unknown `mode`.
    """
    if not isinstance(mode, str) or mode not in TRUST_MODES:
        raise ValueError(f"{WHERE}: 'trust' must be one of {list(TRUST_MODES)}, got {mode!r}")
    if mode == "fixed" or kl_clip is None:
        return None
    # An explicit bound keeps the fixed clip's start (and the results measured with it).
    start = DEFAULT_INITIAL_RADIUS if kl_clip == DEFAULT_KL_CLIP else kl_clip
    rule = TrustRule(max_radius=kl_clip, min_radius=start * MIN_RADIUS_FRACTION, anchor=start)
    return TrustRegion(rule, radius=start)
