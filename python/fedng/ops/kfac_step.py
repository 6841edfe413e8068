"""`kfac_step`: K-FAC's per-step work on Linear layers, factor update and preconditioning, fused.

Per layer i with batch inputs `x_i` [B_i, k_i] and output gradients `g_i` [B_i, m_i] (a bias folds
in as a ones column of the inputs, never materialized: n_i = k_i + 1, else n_i = k_i):

- update: `A_i <- decay_i A_i + a_scale_i [x 1]^T [x 1]`, `G_i <- decay_i G_i + g_scale_i g^T g`;
- then precondition: `out_i = G_inv_i grad_i A_inv_i` [m_i, n_i], by the batch form
  `(g G_inv)^T ([x 1] A_inv)` where it is cheaper (`B (m^2+n^2+mn) < m n (m+n)`) and the batch
  explains the gradient (`u^T grad v` against `(g u).([x 1] v)` for fixed probe vectors, the test
  `fedng.curvature.kfac` uses), else by the dense form.

One native call does every layer: on a small MLP the per-layer Python of separate calls (a
`torch.cat` for the bias column, the probe products, two ragged calls) costs more than the
kernels. `KfacStepPlan` is the internal entry (`NaturalGradient`'s fused step): it validates the
buffers that live across steps once and then passes pointers only.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedng import _backend
from fedng.ops import _validate as v
from fedng.ops import trusted

OP = "kfac_step"


_SHAPES = {
    "a_factors": "nn",
    "g_factors": "mm",
    "grads": "mn",
    "outs": "mn",
    "a_inv": "nn",
    "g_inv": "mm",
    "probe_u": "m",
    "probe_v": "n",
}
"""The shape of each per-layer buffer, in the layer's m and n."""


def _expected(name: str, m: int, n: int) -> tuple[int, ...]:
    return tuple(m if c == "m" else n for c in _SHAPES[name])


@dataclass
class KfacStep:
    """What `kfac_step` returns.

    Attributes:
        outs: the preconditioned gradients [m_i, n_i] (None without `a_inv`).
        form: per layer, 0 untouched, 1 dense form, 2 batch form.
        grad_sums: per layer, `sum(grads_i)` with `check_finite` (else 0).
        dots: per layer, `<outs_i, grads_i>` (NaN where not preconditioned).
    """

    outs: list[torch.Tensor] | None
    form: list[int]
    grad_sums: list[float]
    dots: list[float]


def kfac_step(
    inputs: Sequence[torch.Tensor],
    output_grads: Sequence[torch.Tensor],
    *,
    bias: Sequence[bool],
    a_factors: Sequence[torch.Tensor] | None = None,
    g_factors: Sequence[torch.Tensor] | None = None,
    decay: float | Sequence[float] = 0.0,
    a_scale: float | Sequence[float] = 1.0,
    g_scale: float | Sequence[float] = 1.0,
    grads: Sequence[torch.Tensor] | None = None,
    a_inv: Sequence[torch.Tensor] | None = None,
    g_inv: Sequence[torch.Tensor] | None = None,
    probe_u: Sequence[torch.Tensor] | None = None,
    probe_v: Sequence[torch.Tensor] | None = None,
    check_finite: bool = False,
) -> KfacStep:
    """Updates the Kronecker factors of N Linear layers, then preconditions their gradients.

    Args:
        inputs: N tensors [B_i, k_i], the layer inputs (without a ones column).
        output_grads: N tensors [B_i, m_i], the gradients w.r.t. the layer outputs.
        bias: N bools: whether layer i folds a bias (n_i = k_i + 1, else k_i).
        a_factors, g_factors: N tensors [n_i, n_i] and [m_i, m_i] updated in place (both or
            neither: None skips the update).
        decay, a_scale, g_scale: finite floats, scalars or one per layer (decay 0 overwrites).
        grads: N tensors [m_i, n_i], the gradients to precondition (with `a_inv`, `g_inv` and the
            probes; all None skips the preconditioning).
        a_inv, g_inv: N symmetric tensors [n_i, n_i] and [m_i, m_i].
        probe_u, probe_v: N tensors [m_i] and [n_i], the batch form's check vectors.
        check_finite: first sum every `grads_i`; if one sum is not finite, nothing is updated
            or preconditioned (the caller skips the step).

    Returns:
        `KfacStep`: new [m_i, n_i] outputs (None without preconditioning) and the form per layer.

    Raises:
        TypeError: non-tensors, mixed or non-float dtypes, non-CPU or non-contiguous tensors.
        ValueError: lengths or shapes that disagree, non-finite scalars, overlapping outputs.
    """
    xs = v.tensor_list(OP, "inputs", inputs)
    count = len(xs)
    gs = v.tensor_list(OP, "output_grads", output_grads, length=count)
    if isinstance(bias, (str, bytes, torch.Tensor)) or not isinstance(bias, Sequence):
        raise TypeError(f"{OP}: 'bias' must be a list of bools, got {type(bias).__name__}")
    if len(bias) != count or not all(isinstance(b, bool) for b in bias):
        raise ValueError(f"{OP}: 'bias' must hold {count} bools (one per layer), got {bias!r}")
    if (a_factors is None) != (g_factors is None):
        raise ValueError(f"{OP}: 'a_factors' and 'g_factors' must be given together")
    pre = [a_inv, g_inv, probe_u, probe_v]
    if any(p is None for p in pre) and not all(p is None for p in pre):
        raise ValueError(f"{OP}: 'a_inv', 'g_inv', 'probe_u' and 'probe_v' must be given together")
    precondition = a_inv is not None
    if (precondition or check_finite) != (grads is not None):
        raise ValueError(f"{OP}: 'grads' must be given exactly to precondition or check_finite")
    groups = {"inputs": xs, "output_grads": gs}
    ns = [x.shape[-1] + b for x, b in zip(xs, bias, strict=True)]
    for i in range(count):
        v.shape(OP, "inputs", i, xs[i], (None, None))
        v.shape(OP, "output_grads", i, gs[i], (xs[i].shape[0], None))
    ms = [g.shape[1] for g in gs]
    upd = a_factors is not None and g_factors is not None
    if upd:
        groups["a_factors"] = v.tensor_list(OP, "a_factors", a_factors, length=count)
        groups["g_factors"] = v.tensor_list(OP, "g_factors", g_factors, length=count)
    if grads is not None:
        groups["grads"] = v.tensor_list(OP, "grads", grads, length=count)
    if precondition:
        for name, value in zip(("a_inv", "g_inv", "probe_u", "probe_v"), pre, strict=True):
            groups[name] = v.tensor_list(OP, name, value, length=count)
    code = v.dtype_code(OP, groups)
    for name, items in groups.items():
        if name in _SHAPES:
            for i, t in enumerate(items):
                v.shape(OP, name, i, t, _expected(name, ms[i], ns[i]))
    decays = v.per_item(OP, "decay", decay, count)
    sa = v.per_item(OP, "a_scale", a_scale, count)
    sg = v.per_item(OP, "g_scale", g_scale, count)
    if upd:
        written = groups["a_factors"] + groups["g_factors"]
        read = [t for k, ts in groups.items() if k not in ("a_factors", "g_factors") for t in ts]
        v.no_alias(OP, "factors", written, "inputs", read)
    dtype = xs[0].dtype if xs else torch.float32
    outs = (
        [torch.empty(m, n, dtype=dtype) for m, n in zip(ms, ns, strict=True)]
        if precondition
        else None
    )
    zeros = [0] * count
    form = torch.zeros(count, dtype=torch.int8)
    sums = torch.zeros(2 * count, dtype=torch.float64)
    _backend.native.kfac_step(
        dtype=code,
        inputs=v.ptrs(xs),
        output_grads=v.ptrs(gs),
        grads=v.ptrs(groups["grads"]) if grads is not None else zeros,
        a_inv=v.ptrs(groups["a_inv"]) if outs is not None else zeros,
        g_inv=v.ptrs(groups["g_inv"]) if outs is not None else zeros,
        probe_u=v.ptrs(groups["probe_u"]) if outs is not None else zeros,
        probe_v=v.ptrs(groups["probe_v"]) if outs is not None else zeros,
        a_factors=v.ptrs(groups["a_factors"]) if upd else zeros,
        g_factors=v.ptrs(groups["g_factors"]) if upd else zeros,
        outs=v.ptrs(outs) if outs is not None else zeros,
        m=ms,
        n=ns,
        rows=[x.shape[0] for x in xs],
        bias=[int(b) for b in bias],
        decay=decays,
        a_scale=sa,
        g_scale=sg,
        update_factors=int(upd),
        precondition=int(outs is not None),
        check_finite=int(check_finite),
        form=form.data_ptr(),
        sums=sums.data_ptr(),
        nthreads=_backend.num_threads(),
    )
    values = sums.tolist()
    return KfacStep(outs, form.tolist(), values[:count], values[count:])


class KfacStepPlan:
    """The trusted entry for fixed layers: buffers that live across steps validated once.

    Args:
        a_factors, g_factors: the layers' factors [n_i, n_i], [m_i, m_i] (updated in place).
        grads, outs: [m_i, n_i] gradients and outputs (views of flat buffers, not overlapping).
        probe_u, probe_v: [m_i], [n_i] check vectors of the batch form.
        bias: whether each layer folds a bias.

    The contract of `__call__` (unchecked): `inputs[i]` [B_i, n_i - bias_i] and `output_grads[i]`
    [B_i, m_i] contiguous, of the plan's dtype; inverses [n_i, n_i] / [m_i, m_i] of that dtype,
    contiguous; the factors and buffers are the same tensors as at construction (`matches`).
    `fedng.ops.trusted.CHECK` routes each call through the validating `kfac_step`.
    """

    def __init__(
        self,
        a_factors: list[torch.Tensor],
        g_factors: list[torch.Tensor],
        grads: list[torch.Tensor],
        outs: list[torch.Tensor],
        probe_u: list[torch.Tensor],
        probe_v: list[torch.Tensor],
        bias: list[bool],
    ) -> None:
        count = len(a_factors)
        groups = {
            "a_factors": a_factors,
            "g_factors": g_factors,
            "grads": grads,
            "outs": outs,
            "probe_u": probe_u,
            "probe_v": probe_v,
        }
        for name, items in groups.items():
            v.tensor_list(OP, name, items, length=count)
        self.code = v.dtype_code(OP, groups)
        self.m = [g.shape[0] for g in g_factors]
        self.n = [a.shape[0] for a in a_factors]
        for name, items in groups.items():
            for i, t in enumerate(items):
                v.shape(OP, name, i, t, _expected(name, self.m[i], self.n[i]))
        v.no_alias(OP, "factors", a_factors + g_factors + outs, "grads", grads)
        self.factors = (list(a_factors), list(g_factors))
        self.grads, self.outs = list(grads), list(outs)
        self.probes = (list(probe_u), list(probe_v))
        self.bias = list(bias)
        self._bias_int = [int(b) for b in bias]
        self._ptrs = {k: v.ptrs(items) for k, items in groups.items()}
        self._zeros = [0] * count
        self._inv: tuple[list[int], list[int]] = (self._zeros, self._zeros)
        self._inv_held: list[torch.Tensor] = []
        self._null_ptrs: dict[tuple[str, str, tuple[int, ...]], tuple[list[int], list[int]]] = {}
        self.form = torch.zeros(count, dtype=torch.int8)
        self.sums = torch.zeros(2 * count, dtype=torch.float64)
        """After a call: the gradient sums (with `check_finite`), then `<outs_i, grads_i>`."""

    def matches(self, a_factors: list[torch.Tensor], g_factors: list[torch.Tensor]) -> bool:
        """Whether these are still the factor tensors the plan was built on."""
        a, g = self.factors
        return (
            len(a) == len(a_factors)
            and len(g) == len(g_factors)
            and all(map(operator.is_, a, a_factors))
            and all(map(operator.is_, g, g_factors))
        )

    def __call__(
        self,
        inputs: list[torch.Tensor],
        output_grads: list[torch.Tensor],
        decay: list[float],
        a_scale: list[float],
        g_scale: list[float],
        *,
        update: bool,
        inverses: tuple[list[torch.Tensor], list[torch.Tensor]] | None,
        check_finite: bool = False,
        skip: tuple[int, ...] = (),
        own: tuple[int, ...] = (),
        lower_only: bool = False,
    ) -> None:
        """Updates the factors (if `update`), then preconditions `grads` into `outs` with
        `inverses` = (A^-1 list, G^-1 list) if given; with `check_finite`, nothing happens
        unless every gradient sums to a finite value (see `sums`). Layers in `skip` (sorted)
        are updated only: no sum, no output (their dot reads 0). Layers in `own` (sorted) are
        not updated: the caller updates their factors. With `lower_only` the update may leave
        the factors' upper triangles as they were (the caller mirrors them before use:
        `fedng.curvature.kfac.KFAC.lower_only`)."""
        if trusted.CHECK:
            self._checked(
                inputs,
                output_grads,
                decay,
                a_scale,
                g_scale,
                update,
                inverses,
                check_finite,
                skip,
                own,
            )
            return
        if inverses is not None:
            # The tensors are held, so identity means the same memory (no id reuse).
            held = self._inv_held
            now = inverses[0] + inverses[1]
            if len(held) != len(now) or not all(map(operator.is_, held, now)):
                self._inv_held = now
                self._inv = (v.ptrs(inverses[0]), v.ptrs(inverses[1]))
        p, zeros = self._ptrs, self._zeros
        grads, outs = p["grads"], p["outs"]
        if skip:
            grads, outs = self._nulled("grads", "outs", skip)
        a_fac, g_fac = (p["a_factors"], p["g_factors"]) if update else (zeros, zeros)
        if update and own:
            a_fac, g_fac = self._nulled("a_factors", "g_factors", own)
        _backend.native.kfac_step(
            dtype=self.code,
            inputs=[t.data_ptr() for t in inputs],
            output_grads=[t.data_ptr() for t in output_grads],
            grads=grads,
            a_inv=self._inv[0] if inverses is not None else zeros,
            g_inv=self._inv[1] if inverses is not None else zeros,
            probe_u=p["probe_u"],
            probe_v=p["probe_v"],
            a_factors=a_fac,
            g_factors=g_fac,
            outs=outs,
            m=self.m,
            n=self.n,
            rows=[t.shape[0] for t in inputs],
            bias=self._bias_int,
            decay=decay,
            a_scale=a_scale,
            g_scale=g_scale,
            update_factors=(2 if lower_only else 1) if update else 0,
            precondition=int(inverses is not None),
            check_finite=int(check_finite),
            form=self.form.data_ptr(),
            sums=self.sums.data_ptr(),
            nthreads=_backend.num_threads(),
        )

    def _nulled(self, a: str, b: str, layers: tuple[int, ...]) -> tuple[list[int], list[int]]:
        """The pointers of buffers `a` and `b` with null at `layers` (cached)."""
        key = (a, b, layers)
        got = self._null_ptrs.get(key)
        if got is None:
            p = self._ptrs
            got = (
                [0 if i in layers else q for i, q in enumerate(p[a])],
                [0 if i in layers else q for i, q in enumerate(p[b])],
            )
            self._null_ptrs[key] = got
        return got

    def _checked(
        self,
        inputs: list[torch.Tensor],
        output_grads: list[torch.Tensor],
        decay: list[float],
        a_scale: list[float],
        g_scale: list[float],
        update: bool,
        inverses: tuple[list[torch.Tensor], list[torch.Tensor]] | None,
        check_finite: bool,
        skip: tuple[int, ...] = (),
        own: tuple[int, ...] = (),
    ) -> None:
        """The same call through the validating op (results copied into `outs`): the layers
        not skipped in one call, then (unless it stopped) the skipped ones' update. The
        caller's layers (`own`) are updated into scratch copies, thrown away."""
        keep = [i for i in range(len(self.m)) if i not in skip]
        a_fac, g_fac = self.factors
        if own:
            a_fac = [a.clone() if i in own else a for i, a in enumerate(a_fac)]
            g_fac = [g.clone() if i in own else g for i, g in enumerate(g_fac)]

        def sub(items: Sequence[object], idx: list[int]) -> list:  # type: ignore[type-arg]
            return [items[i] for i in idx]

        count = len(self.m)
        form, sums = [0] * count, [0.0] * count + [math.nan] * count
        for i in skip:
            sums[count + i] = 0.0 if inverses is not None else math.nan
        res = (
            None
            if not keep
            else kfac_step(
                sub(inputs, keep),
                sub(output_grads, keep),
                bias=sub(self.bias, keep),
                a_factors=sub(a_fac, keep) if update else None,
                g_factors=sub(g_fac, keep) if update else None,
                decay=sub(decay, keep),
                a_scale=sub(a_scale, keep),
                g_scale=sub(g_scale, keep),
                grads=None if inverses is None and not check_finite else sub(self.grads, keep),
                a_inv=None if inverses is None else sub(inverses[0], keep),
                g_inv=None if inverses is None else sub(inverses[1], keep),
                probe_u=None if inverses is None else sub(self.probes[0], keep),
                probe_v=None if inverses is None else sub(self.probes[1], keep),
                check_finite=check_finite,
            )
        )
        if res is not None:
            for j, i in enumerate(keep):
                form[i], sums[i], sums[count + i] = res.form[j], res.grad_sums[j], res.dots[j]
            for j, i in enumerate(keep if res.outs is not None else []):
                self.outs[i].copy_(res.outs[j])  # type: ignore[index]
        self.form.copy_(torch.tensor(form, dtype=torch.int8))
        self.sums.copy_(torch.tensor(sums, dtype=torch.float64))
        stopped = check_finite and not math.isfinite(sum(sums[:count]))
        if skip and update and not stopped:
            kfac_step(
                sub(inputs, list(skip)),
                sub(output_grads, list(skip)),
                bias=sub(self.bias, list(skip)),
                a_factors=sub(a_fac, list(skip)),
                g_factors=sub(g_fac, list(skip)),
                decay=sub(decay, list(skip)),
                a_scale=sub(a_scale, list(skip)),
                g_scale=sub(g_scale, list(skip)),
            )
