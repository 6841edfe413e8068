"""`NaturalGradient`: a natural-gradient preconditioner for any `torch.optim` optimizer."""

from fedng.optim.damping import DAMPING_MODES, LevenbergMarquardt
from fedng.optim.natural_gradient import NaturalGradient
from fedng.optim.source import SOURCES, PreconditionerSource

__all__ = [
    "DAMPING_MODES",
    "SOURCES",
    "LevenbergMarquardt",
    "NaturalGradient",
    "PreconditionerSource",
]
