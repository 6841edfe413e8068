"""Where `NaturalGradient`'s preconditioner comes from: its own curvature, a given one, or a mix.

- "local": the optimizer's own running curvature, re-inverted every `inverse_every` steps; a block
  with curvature but no inverse yet (e.g. first seen between two inverse steps) gets its
  representation inverted at once, so that it is preconditioned from its first step.
- "global": a curvature given from outside (`set_global(curvature)`, e.g. a federated server's),
  used with exactly the inverses it holds; it is never re-inverted (the own curvature still
  accumulates).
- "mixed": `(1 - w) F_global + w F_local` (`set_global(curvature, mix=w)`), rebuilt and
  re-inverted on the first step after `set_global` and every `inverse_every` steps.
- "none": the gradients are left alone (the own curvature still accumulates).

An optimizer starts "local" or "none"; `set_global` turns a "local" one "global" or "mixed".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from fedng.curvature.base import InverseReport
from fedng.curvature.block_diagonal import CurvatureSet, Damping
from fedng.optim.config import WHERE, unit_interval

Source = Literal["local", "global", "mixed", "none"]

SOURCES: tuple[Source, ...] = ("local", "global", "mixed", "none")
"""Every source; an optimizer is created with one of `INITIAL_SOURCES`."""

INITIAL_SOURCES: tuple[Source, ...] = ("local", "none")

DampingRule = Damping | Callable[[CurvatureSet], Damping]
"""λ, or a function of the curvature about to be inverted returning λ (per kind, per block)."""


class PreconditionerSource:
    """The curvature a step preconditions with.

    Args:
        mode: one of `INITIAL_SOURCES`.
        local: the optimizer's own curvature.

    Attributes:
        mode: the source.
        local: the own curvature (updated by the optimizer).
        given: the curvature from `set_global` (None before).
        mix: the weight w of the own curvature in "mixed" (0 otherwise).
        mixed: the last combination `(1 - w) F_global + w F_local`, with its inverses.
    """

    def __init__(self, mode: Source, local: CurvatureSet) -> None:
        self.mode: Source = mode
        self.local = local
        self.given: CurvatureSet | None = None
        self.mix = 0.0
        self.mixed: CurvatureSet | None = None
        self._stale = False

    def set_global(self, curvature: CurvatureSet, mix: float | None = None) -> None:
        """Preconditions with `curvature` from now on: source "global" (`mix` None) or "mixed"
        (`mix` = w, the weight of the own curvature).

        Raises:
            ValueError: source "none", or a curvature over other blocks or kinds.
            TypeError: not a `CurvatureSet`, or (for "mixed") of another dtype.
        """
        where = f"{WHERE}.set_global"
        if self.mode == "none":
            raise ValueError(f"{where}: source='none' leaves the gradients alone")
        if not isinstance(curvature, CurvatureSet):
            raise TypeError(
                f"{where}: 'curvature' must be a CurvatureSet, got {type(curvature).__name__}"
            )
        specs = [lay.spec for lay in self.local.layouts]
        if curvature.kinds != self.local.kinds or [x.spec for x in curvature.layouts] != specs:
            raise ValueError(
                f"{where}: 'curvature' must cover this model's blocks with the same kinds"
                f" ({len(specs)} blocks, kinds {sorted(set(self.local.kinds))})"
            )
        if mix is not None and curvature.dtype != self.local.dtype:
            raise TypeError(
                f"{where}: 'curvature' has dtype {curvature.dtype}, this optimizer's curvature"
                f" has {self.local.dtype}"
            )
        self.mix = 0.0 if mix is None else unit_interval("mix", mix)
        self.mode = "global" if mix is None else "mixed"
        self.given = curvature
        self.mixed = None
        self._stale = True

    def current(
        self, inverse_step: bool, damping: DampingRule, factored: bool
    ) -> tuple[CurvatureSet | None, InverseReport | None]:
        """The curvature to precondition this step with (None: leave the gradients alone), after
        inverting whatever is due, and the report of that inversion (None if none was due).

        `damping` is λ, or a function of the set about to be inverted (called only then).

        Raises:
            ValueError: "global" or "mixed" before `set_global`.
        """
        if self.mode == "none":
            return None, None
        if self.mode == "local":
            if not inverse_step and not self.local.pending:
                return self.local, None
            lam = damping(self.local) if callable(damping) else damping
            if inverse_step:
                return self.local, self.local.inverse(lam, factored=factored)
            return self.local, self.local.inverse_pending(lam, factored=factored)
        if self.given is None:
            raise ValueError(
                f"{WHERE}.step: source={self.mode!r} needs set_global(curvature) before stepping"
            )
        if self.mode == "global":
            return self.given, None
        report = None
        if inverse_step or self._stale or self.mixed is None:
            w = self.mix
            self.mixed = CurvatureSet.combine([self.given, self.local], [1.0 - w, w])
            lam = damping(self.mixed) if callable(damping) else damping
            report = self.mixed.inverse(lam, factored=factored)
            self._stale = False
        return self.mixed, report

    def state_dict(self) -> dict[str, Any]:
        """The mix weight and the mixed curvature with its inverses (the given one is external:
        `set_global` again after loading)."""
        return {
            "mix": self.mix,
            "mixed": None
            if self.mixed is None
            else {k: r.state_dict() for k, r in self.mixed.reps.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores `state_dict()`'s output (call `set_global` first for "global"/"mixed")."""
        mixed = state.get("mixed")
        if mixed is None:
            return
        self.mixed = CurvatureSet.combine([self.local], [0.0])  # zeros shaped like the own set
        for kind, rep in self.mixed.reps.items():
            rep.load_state_dict(mixed[kind])
        self.mix = float(state["mix"])
        self._stale = False
