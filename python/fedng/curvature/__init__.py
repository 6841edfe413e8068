"""Curvature: hooks that capture layer inputs and output gradients, and Fisher representations.

- `CurvatureCapture`: forward hooks (and tensor hooks on outputs while recording) on any module
  tree; Linear, Conv2d, Embedding, LayerNorm/BatchNorm/GroupNorm/RMSNorm and
  MultiheadAttention (in-projection and its functionally called out_proj).
- Fisher types: `empirical` (real labels) and `mc` (`sampled_loss`: labels from the model).
- Representations with one protocol: `KFAC`, `DiagonalFisher`, `LowRankFisher`.
"""

import torch

from fedng.curvature.base import FisherRepresentation, InverseReport
from fedng.curvature.blocks import Block
from fedng.curvature.capture import CurvatureCapture, UnsupportedLayerWarning
from fedng.curvature.diagonal import DiagonalFisher
from fedng.curvature.fisher import FisherType, LossType, sample_targets, sampled_loss
from fedng.curvature.kfac import KFAC
from fedng.curvature.lowrank import LowRankFisher
from fedng.curvature.spec import BlockSpec, Payload
from fedng.curvature.stats import BlockStats

REPRESENTATIONS: dict[str, type[FisherRepresentation]] = {
    "kfac": KFAC,
    "diag": DiagonalFisher,
    "lowrank": LowRankFisher,
}
"""Representation classes by the name `NaturalGradient(curvature=...)` uses."""


def from_payload(payload: Payload, dtype: torch.dtype | None = None) -> FisherRepresentation:
    """Rebuilds whichever representation a payload holds (float32 unless `dtype` says)."""
    if not isinstance(payload, Payload):
        raise TypeError(f"from_payload: 'payload' must be a Payload, got {type(payload).__name__}")
    if payload.kind not in REPRESENTATIONS:
        raise ValueError(
            f"from_payload: 'payload.kind' must be one of {list(REPRESENTATIONS)},"
            f" got {payload.kind!r}"
        )
    return REPRESENTATIONS[payload.kind].from_payload(payload, dtype or torch.float32)


__all__ = [
    "KFAC",
    "REPRESENTATIONS",
    "Block",
    "BlockSpec",
    "BlockStats",
    "CurvatureCapture",
    "DiagonalFisher",
    "FisherRepresentation",
    "FisherType",
    "InverseReport",
    "LossType",
    "LowRankFisher",
    "Payload",
    "UnsupportedLayerWarning",
    "from_payload",
    "sample_targets",
    "sampled_loss",
]
