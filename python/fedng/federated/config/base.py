"""What every config shares: a frozen dataclass of scalars that round-trips through a flat dict
(a Flower ConfigRecord), and the range checks of the constructors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

_S = TypeVar("_S", bound="Scalars")


def check(cond: bool, cls: str, name: str, expected: str, got: object) -> None:
    """Raises `ValueError("{cls}: '{name}' must be {expected}, got {got!r}")` unless `cond`."""
    if not cond:
        raise ValueError(f"{cls}: '{name}' must be {expected}, got {got!r}")


def check_choice(cls: str, name: str, value: str, options: tuple[str, ...]) -> None:
    """Raises `ValueError` unless `value` is one of `options`."""
    check(value in options, cls, name, f"one of {list(options)}", value)


@dataclass(frozen=True)
class Scalars:
    """A frozen dataclass whose fields are bool, int, float or str."""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The field names, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        """The config as a flat dict of scalars."""
        return {name: getattr(self, name) for name in self.field_names()}

    @classmethod
    def from_dict(cls: type[_S], d: dict[str, Any]) -> _S:
        """Builds a config from a flat dict, rejecting unknown keys.

        Raises:
            ValueError: an unknown key (named, with the valid ones), or a value out of range.
        """
        names = cls.field_names()
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(
                f"{cls.__name__}: unknown keys {unknown}; expected some of {sorted(names)}"
            )
        return cls(**d)

    def replace(self: _S, **changes: Any) -> _S:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class AlgorithmConfig(Scalars):
    """Base of the per-algorithm configs: the hyperparameters one algorithm owns.

    The bare base, `AlgorithmConfig()`, stands for "the algorithm's defaults" in `ClientConfig` and
    `ServerConfig`.
    """
