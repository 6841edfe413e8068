"""Exceptions raised by fedng."""

from __future__ import annotations


class FedngError(Exception):
    """Base class of every fedng-specific error."""


class BackendUnavailable(FedngError, RuntimeError):
    """The requested device has no kernels in this build (e.g. CUDA tensors on a CPU-only wheel)."""


class NumericalError(FedngError, ArithmeticError):
    """A numerical operation failed and the caller asked for an exception instead of a status."""


class CurvatureWarning(RuntimeWarning):
    """A natural-gradient step fell back to something safer: an inverse needed more damping,
    a block was preconditioned with its diagonal or not at all, or a step was skipped because a
    gradient was not finite. Each kind is warned once per optimizer and counted in its `stats`."""
