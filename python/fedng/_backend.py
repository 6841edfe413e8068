"""Loads the native extension and decides how many threads a call may use."""

from __future__ import annotations

import ctypes
import os
from typing import Any

import torch

# OpenBLAS's worker threads busy-wait for a long time after each threaded call, taking the cores
# from torch's threads and from ours (a natural-gradient step measured 28 ms instead of 1.35 ms).
# Must be set before the library loads; a value the user set is kept.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

# `_C` is not linked to OpenBLAS (no DT_NEEDED, no RPATH: CMakeLists.txt): its `scipy_*` BLAS and
# LAPACK symbols resolve from the library of the installed scipy-openblas32 package, loaded here
# into the global namespace before `_C` (the preloading scipy-openblas32 documents; importing it
# already does this, done explicitly so `_C` does not depend on that side effect).
import scipy_openblas32

_openblas = ctypes.CDLL(
    os.path.join(scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library(True)),
    mode=ctypes.RTLD_GLOBAL,
)

from fedng import _C  # noqa: E402

native = _C
"""The extension module, typed by `fedng/_C.pyi`: ops call it with keyword arguments only."""


def openblas_symbol(name: str) -> Any:
    """A LAPACK/BLAS routine of the loaded OpenBLAS library (`scipy_` prefix added), a ctypes
    function: for the few routines fedng calls from Python without a kernel of its own."""
    return getattr(_openblas, f"scipy_{name}")


def num_threads() -> int:
    """Threads a native call may use: exactly what torch is told to use (no oversubscription)."""
    return max(1, torch.get_num_threads())
