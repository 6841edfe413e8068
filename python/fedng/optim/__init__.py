"""`NaturalGradient`: a natural-gradient preconditioner for any `torch.optim` optimizer."""

from fedng.optim.damping import DAMPING_MODES, LevenbergMarquardt
from fedng.optim.natural_gradient import DEFAULT_LR, NaturalGradient
from fedng.optim.source import SOURCES, PreconditionerSource

__all__ = [
    "DAMPING_MODES",
    "DEFAULT_LR",
    "SOURCES",
    "LevenbergMarquardt",
    "NaturalGradient",
    "PreconditionerSource",
]
