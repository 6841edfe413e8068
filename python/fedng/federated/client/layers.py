"""The one warning per run about layers the curvature clients leave alone.

The clients build their curvature capture afresh every round, silently (FedNG's
`NaturalGradient(warn_unsupported=False)`, `fisher_at`); the simulator asks the algorithm once
per run (`Algorithm.check_model`), and this says what gets no curvature.
"""

from __future__ import annotations

from torch import nn

from fedng.curvature import CurvatureCapture


def warn_unsupported_layers(model: nn.Module) -> None:
    """One `UnsupportedLayerWarning` listing the layers and parameters of `model` that get no
    curvature (their updates stay first-order); nothing when every layer is supported."""
    CurvatureCapture(model, warn=True).remove()
