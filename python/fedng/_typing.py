"""Type aliases shared by every layer (defined once here)."""

from __future__ import annotations

import torch

Arrays = dict[str, torch.Tensor]
"""Named arrays: parameter (or payload) names to tensors; the unit of everything on the wire."""
