"""Argument checks of `NaturalGradient`, its deprecated keywords, and the per-layer choice of
Fisher representation."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence

from torch import nn

from fedng.curvature.blocks import Block
from fedng.curvature.diagonal import DiagonalFisher
from fedng.curvature.kfac import KFAC
from fedng.curvature.registry import kinds, representation
from fedng.curvature.spec import BlockKind

WHERE = "NaturalGradient"

DEFAULT_DAMPING = 1e-2
"""λ when `damping_scale="absolute"` and no `damping` is given."""

DEFAULT_RELATIVE_DAMPING = 1e-1
"""The factor of each block's mean curvature eigenvalue when `damping_scale="relative"` (the
default) and no `damping` is given."""

DEFAULT_KL_CLIP = 1e-1
"""The default hard bound on a step's KL estimate `lr^2 p^T g` (`kl_clip`). With the default
`trust="adaptive"` the bound in force is a radius that starts at 1e-4 and grows towards this one
only while the observed loss keeps falling along the steps (`fedng.optim.trust`); with
`trust="fixed"` it is the bound itself (the former default was a fixed 1e-3)."""

DAMPING_SCALES: tuple[str, ...] = ("absolute", "relative")
"""How `damping` is read: λ itself, or a factor of each block's curvature scale."""

CurvatureSpec = (
    str | Mapping[str, str] | Mapping[type[nn.Module], str] | Mapping[str | type[nn.Module], str]
)
"""A representation name for every layer, or a mapping from a block name, a module name, a module
class (or its name) or "default" to a representation name."""

RENAMED: dict[str, str] = {
    "factor_decay": "curvature_decay",
    "fisher": "fisher_type",
    "seed": "sketch_seed",
}
"""Deprecated keyword -> its name now."""

_BLOCK_WORDS: dict[BlockKind, str] = {
    "kron": "linear-like layer",
    "embedding": "embedding",
    "elementwise": "normalization layer",
}


def renamed_keywords(given: Mapping[str, object]) -> dict[str, object]:
    """The deprecated keywords in `given` under their new names (one DeprecationWarning each).

    Raises:
        TypeError: a keyword that is neither current nor deprecated.
    """
    unknown = sorted(set(given) - set(RENAMED))
    if unknown:
        raise TypeError(f"{WHERE}: unexpected keyword arguments {unknown}")
    out = {}
    for old, value in given.items():
        new = RENAMED[old]
        warnings.warn(
            f"{WHERE}: '{old}' is deprecated, use '{new}'", DeprecationWarning, stacklevel=3
        )
        out[new] = value
    return out


def _finite_positive(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return v if math.isfinite(v) and v > 0 else None


def positive_float(name: str, value: object) -> float:
    """A finite float > 0 (ValueError naming `name` otherwise)."""
    v = _finite_positive(value)
    if v is None:
        raise ValueError(f"{WHERE}: '{name}' must be a finite float > 0, got {value!r}")
    return v


def optional_positive_float(name: str, value: object) -> float | None:
    """None, or a finite float > 0 (ValueError naming `name` otherwise)."""
    if value is None:
        return None
    v = _finite_positive(value)
    if v is None:
        raise ValueError(f"{WHERE}: '{name}' must be None or a finite float > 0, got {value!r}")
    return v


def positive_int(name: str, value: object) -> int:
    """An int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{WHERE}: '{name}' must be an int >= 1, got {value!r}")
    return value


def nonnegative_int(name: str, value: object) -> int:
    """An int >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{WHERE}: '{name}' must be an int >= 0, got {value!r}")
    return value


def ema_decay(name: str, value: object) -> float | None:
    """None (a running mean) or a float in [0, 1)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{WHERE}: '{name}' must be None or a float in [0, 1), got {value!r}")
    return float(value)


def unit_interval(name: str, value: object) -> float:
    """A float in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{WHERE}: '{name}' must be a float in [0, 1], got {value!r}")
    return float(value)


def learning_rate(value: float | Callable[[], float]) -> Callable[[], float]:
    """A float > 0 or a callable returning one (e.g. reading an optimizer's current lr)."""
    if callable(value):
        return value
    lr = positive_float("lr", value)
    return lambda: lr


def resolve_damping(damping: object, scale: object) -> tuple[str, float]:
    """(scale, value) from the `damping` and `damping_scale` arguments.

    `damping_scale=None` means "relative" when `damping` is None too (the defaults) and
    "absolute" when `damping` is given (a λ passed explicitly keeps its old meaning); a missing
    `damping` takes the scale's default (`DEFAULT_RELATIVE_DAMPING` or `DEFAULT_DAMPING`).
    """
    if scale is None:
        scale = "relative" if damping is None else "absolute"
    if not isinstance(scale, str) or scale not in DAMPING_SCALES:
        raise ValueError(
            f"{WHERE}: 'damping_scale' must be None or one of {list(DAMPING_SCALES)}, got {scale!r}"
        )
    if damping is None:
        damping = DEFAULT_RELATIVE_DAMPING if scale == "relative" else DEFAULT_DAMPING
    return scale, positive_float("damping", damping)


def check_damping_bounds(value: object) -> tuple[float, float]:
    """A tuple (min, max) with 0 < min <= max (max may be inf)."""
    if (
        not isinstance(value, tuple)
        or len(value) != 2
        or _finite_positive(value[0]) is None
        or isinstance(value[1], bool)
        or not isinstance(value[1], (int, float))
        or not value[0] <= value[1]
    ):
        raise ValueError(
            f"{WHERE}: 'damping_bounds' must be a tuple (min, max) with"
            f" 0 < min <= max, got {value!r}"
        )
    return float(value[0]), float(value[1])


def default_kind(block: Block, choice: str) -> str:
    """The representation a block gets when the whole model asks for `choice`: `choice` for the
    block kinds it takes by default (`default_block_kinds`), else the diagonal Fisher (e.g.
    normalization layers; embeddings under "lowrank", whose sketch would have vocabulary x dim
    rows)."""
    if block.spec.kind in representation(choice, WHERE).default_block_kinds:
        return choice
    return DiagonalFisher.kind


def _check_value(key: object, value: object) -> str:
    if not isinstance(value, str) or value not in kinds():
        raise ValueError(
            f"{WHERE}: 'curvature[{key!r}]' must be one of {list(kinds())}, got {value!r}"
        )
    return value


def assign(blocks: Sequence[Block], curvature: CurvatureSpec) -> list[str]:
    """The representation name of each block.

    Lookup order for a mapping: the block's name, its module's name, its module's class (or a
    parent class), the class name, then the "default" entry ("kfac" when absent).

    Raises:
        ValueError: an unknown representation, a key that matches no layer, or a layer asked for
            a representation that cannot hold its kind (e.g. K-FAC for a normalization layer).
    """
    if isinstance(curvature, str):
        if curvature not in kinds():
            raise ValueError(
                f"{WHERE}: 'curvature' must be one of {list(kinds())} or a"
                f" mapping, got {curvature!r}"
            )
        return [default_kind(b, curvature) for b in blocks]
    if not isinstance(curvature, Mapping):
        raise TypeError(
            f"{WHERE}: 'curvature' must be a str or a mapping, got {type(curvature).__name__}"
        )
    table = {k: _check_value(k, v) for k, v in curvature.items()}
    fallback = table.get("default", KFAC.kind)
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
        if b.spec.kind not in representation(choice, WHERE).block_kinds:
            able = [k for k in kinds() if b.spec.kind in representation(k).block_kinds]
            raise ValueError(
                f"{WHERE}: 'curvature' asks {choice!r} for '{b.name}', a"
                f" {_BLOCK_WORDS[b.spec.kind]}; only {able} apply to it"
            )
        out.append(choice)
    unknown = [k for k in table if k not in used]
    if unknown:
        raise ValueError(
            f"{WHERE}: 'curvature' keys {unknown} match no layer with curvature;"
            f" layers are {[b.name for b in blocks]}"
        )
    return out
