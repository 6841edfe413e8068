"""`NaturalGradient`: a natural-gradient preconditioner for any `torch.optim` optimizer."""

from fedng.optim.damping import DAMPING_MODES, LevenbergMarquardt
from fedng.optim.natural_gradient import NaturalGradient

__all__ = ["DAMPING_MODES", "LevenbergMarquardt", "NaturalGradient"]
