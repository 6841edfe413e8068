"""The one check that Flower is installed, with a one-line error naming the extra."""

from __future__ import annotations

import importlib.metadata

FLWR_VERSION = "1.41.0"
"""The Flower release fedng.flower is built and tested against (the `flower` extra pins it);
another patch release of 1.41 is accepted."""

MISSING = (
    "fedng.flower needs Flower {want} (Python >= 3.11): pip install 'fedng[flower]'"
    " (or pip install flwr=={want}); {why}"
)


def require_flwr() -> str:
    """The installed flwr version.

    Raises:
        ImportError: flwr is missing or not the pinned release (one line: what to install).
    """
    try:
        got = importlib.metadata.version("flwr")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(MISSING.format(want=FLWR_VERSION, why="flwr is not installed")) from None
    if got.split(".")[:2] != FLWR_VERSION.split(".")[:2]:
        raise ImportError(MISSING.format(want=FLWR_VERSION, why=f"found flwr {got}"))
    return got
