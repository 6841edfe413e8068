"""Argument checks of `NaturalGradient` and the per-layer choice of Fisher representation."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from torch import nn

from fedng.curvature.blocks import Block

WHERE = "NaturalGradient"
CURVATURES: tuple[str, ...] = ("kfac", "diag", "lowrank")

CurvatureSpec = str | Mapping[str | type[nn.Module], str]
"""A representation name for every layer, or a mapping from a block name, a module name, a module
class (or its name) or "default" to a representation name."""


def positive_float(name: str, value: object, *, allow_none: bool = False) -> float | None:
    """A finite float > 0 (or None when allowed)."""
    if value is None and allow_none:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        want = "None or a finite float > 0" if allow_none else "a finite float > 0"
        raise ValueError(f"{WHERE}: '{name}' must be {want}, got {value!r}")
    return float(value)


def positive_int(name: str, value: object) -> int:
    """An int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{WHERE}: '{name}' must be an int >= 1, got {value!r}")
    return value


def learning_rate(value: object) -> Callable[[], float]:
    """A float > 0 or a callable returning one (e.g. reading an optimizer's current lr)."""
    if callable(value):
        return value  # type: ignore[return-value]
    lr = positive_float("lr", value)
    return lambda: lr  # type: ignore[return-value]


def default_kind(block: Block, choice: str) -> str:
    """The representation a block gets when the whole model asks for `choice`.

    Normalization layers are always diagonal; under "lowrank" embeddings are diagonal too (their
    sketch would have vocabulary x dim rows).
    """
    if block.spec.kind == "elementwise":
        return "diag"
    if choice == "lowrank" and block.spec.kind == "embedding":
        return "diag"
    return choice


def _check_value(key: object, value: object) -> str:
    if value not in CURVATURES:
        raise ValueError(
            f"{WHERE}: 'curvature[{key!r}]' must be one of {list(CURVATURES)}, got {value!r}"
        )
    return str(value)


def assign(blocks: Sequence[Block], curvature: CurvatureSpec) -> list[str]:
    """The representation name of each block.

    Lookup order for a mapping: the block's name, its module's name, its module's class (or a
    parent class), the class name, then the "default" entry ("kfac" when absent).

    Raises:
        ValueError: an unknown representation, a key that matches no layer, or a normalization
            layer asked for anything but "diag".
    """
    if isinstance(curvature, str):
        if curvature not in CURVATURES:
            raise ValueError(
                f"{WHERE}: 'curvature' must be one of {list(CURVATURES)} or a"
                f" mapping, got {curvature!r}"
            )
        return [default_kind(b, curvature) for b in blocks]
    if not isinstance(curvature, Mapping):
        raise TypeError(
            f"{WHERE}: 'curvature' must be a str or a mapping, got {type(curvature).__name__}"
        )
    table = {k: _check_value(k, v) for k, v in curvature.items()}
    fallback = table.get("default", "kfac")
    used: set[object] = {"default"}
    out = []
    for b in blocks:
        choice = None
        candidates: list[object] = [b.name, b.owner]
        if b.owner_type is not None:
            candidates += [c for c in b.owner_type.__mro__ if c in table]
            candidates.append(b.owner_type.__name__)
        for key in candidates:
            if key in table:
                choice = table[key]
                used.add(key)
                break
        if choice is None:
            out.append(default_kind(b, fallback))
            continue
        if b.spec.kind == "elementwise" and choice != "diag":
            raise ValueError(
                f"{WHERE}: 'curvature' asks {choice!r} for '{b.name}', a"
                " normalization layer; only 'diag' applies to it"
            )
        out.append(choice)
    unknown = [k for k in table if k not in used]
    if unknown:
        raise ValueError(
            f"{WHERE}: 'curvature' keys {unknown} match no layer with curvature;"
            f" layers are {[b.name for b in blocks]}"
        )
    return out
