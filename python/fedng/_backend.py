"""Loads the native extension and decides how many threads a call may use."""

from __future__ import annotations

import importlib
import os

import torch

# OpenBLAS's worker threads busy-wait for a long time after each threaded call, taking the cores
# from torch's threads and from ours (a natural-gradient step measured 28 ms instead of 1.35 ms).
# Must be set before the library loads; a value the user set is kept.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

# Importing scipy_openblas32 first loads libscipy_openblas with RTLD_GLOBAL, so the extension
# resolves it even when installed somewhere its RPATH does not point to.
importlib.import_module("scipy_openblas32")

from fedng import _C  # noqa: E402

native = _C
"""The extension module, typed by `fedng/_C.pyi`: ops call it with keyword arguments only."""


def num_threads() -> int:
    """Threads a native call may use: exactly what torch is told to use (no oversubscription)."""
    return max(1, torch.get_num_threads())
