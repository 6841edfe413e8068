"""Curvature: hooks that capture layer inputs and output gradients, and Fisher representations.

- `CurvatureCapture`: forward hooks (and grad pre-hooks on outputs while recording) on any module
  tree; Linear, Conv1d, Conv2d, Embedding, LayerNorm/BatchNorm/GroupNorm/RMSNorm and
  MultiheadAttention (in-projection and its functionally called out_proj). It yields one
  statistics object per block: `KronStats`, `EmbeddingStats` or `ElementwiseStats`.
- Fisher types: `empirical` (real labels) and `mc` (`sampled_loss`: labels from the model).
- Representations with one protocol (`FisherRepresentation`), found by kind through the
  registry (`kinds`, `representation`, `register`): `KFAC` ("kfac"), `DiagonalFisher` ("diag"),
  `LowRankFisher` ("lowrank").
- `CurvatureSet`: a model's block-diagonal curvature, one representation per kind, with its wire
  form; `BlockLayout` places each block among named parameters.
"""

from fedng.curvature.base import FisherRepresentation, InverseReport
from fedng.curvature.block_diagonal import CurvatureSet
from fedng.curvature.blocks import Block
from fedng.curvature.capture import CurvatureCapture, UnsupportedLayerWarning
from fedng.curvature.diagonal import DiagonalFisher
from fedng.curvature.fisher import FisherType, LossType, sample_targets, sampled_loss
from fedng.curvature.kfac import KFAC
from fedng.curvature.layout import BlockLayout, check_layouts, layouts_of, to_matrix, write_matrix
from fedng.curvature.lowrank import LowRankFisher
from fedng.curvature.registry import from_payload, kinds, register, representation
from fedng.curvature.spec import BlockSpec, Payload, pack_triangle, unpack_triangle
from fedng.curvature.stats import BlockStats, ElementwiseStats, EmbeddingStats, KronStats

__all__ = [
    "KFAC",
    "Block",
    "BlockLayout",
    "BlockSpec",
    "BlockStats",
    "CurvatureCapture",
    "CurvatureSet",
    "DiagonalFisher",
    "ElementwiseStats",
    "EmbeddingStats",
    "FisherRepresentation",
    "FisherType",
    "InverseReport",
    "KronStats",
    "LossType",
    "LowRankFisher",
    "Payload",
    "UnsupportedLayerWarning",
    "check_layouts",
    "from_payload",
    "kinds",
    "layouts_of",
    "pack_triangle",
    "register",
    "representation",
    "sample_targets",
    "sampled_loss",
    "to_matrix",
    "unpack_triangle",
    "write_matrix",
]
