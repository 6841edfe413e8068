"""The Fisher representations by name: the one list of curvature kinds.

A representation registers itself with `@register`; everything else (`CurvatureSet`, the
per-layer choice of `NaturalGradient`, payload decoding) looks kinds up here. Adding a kind is
one new module whose class is decorated with `@register` (and imported by `fedng.curvature`).
"""

from __future__ import annotations

from typing import TypeVar

import torch

from fedng.curvature.base import FisherRepresentation
from fedng.curvature.spec import Payload

_REGISTRY: dict[str, type[FisherRepresentation]] = {}

R = TypeVar("R", bound=type[FisherRepresentation])


def register(cls: R) -> R:
    """Class decorator: makes `cls` available under `cls.kind`.

    Raises:
        ValueError: the kind or the order is taken by another class.
    """
    for other in _REGISTRY.values():
        if other is not cls and (other.kind == cls.kind or other.order == cls.order):
            raise ValueError(
                f"register: {cls.__name__} (kind {cls.kind!r}, order {cls.order}) clashes with"
                f" {other.__name__} (kind {other.kind!r}, order {other.order})"
            )
    _REGISTRY[cls.kind] = cls
    return cls


def kinds() -> tuple[str, ...]:
    """The registered kinds, in their `order` (e.g. ("kfac", "diag", "lowrank"))."""
    return tuple(sorted(_REGISTRY, key=lambda k: _REGISTRY[k].order))


def representation(kind: object, where: str = "representation") -> type[FisherRepresentation]:
    """The class registered as `kind`.

    Raises:
        ValueError: naming `where` and the known kinds.
    """
    cls = _REGISTRY.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"{where}: kind must be one of {list(kinds())}, got {kind!r}")
    return cls


def from_payload(payload: Payload, dtype: torch.dtype = torch.float32) -> FisherRepresentation:
    """Rebuilds whichever representation a payload holds (float32 unless `dtype` says)."""
    if not isinstance(payload, Payload):
        raise TypeError(f"from_payload: 'payload' must be a Payload, got {type(payload).__name__}")
    return representation(payload.kind, "from_payload: 'payload.kind'").from_payload(payload, dtype)
