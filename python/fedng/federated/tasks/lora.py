"""LoRA adapters on a frozen base model: fedng's own small `LoRALinear`, or Hugging Face `peft`.

Federated fine-tuning needs nothing special from either: every fedng algorithm exchanges the
model's *trainable* parameters only (`client.params.get_params`), so with a frozen base just the
adapters travel, and the curvature hooks capture the adapters' `lora_A` / `lora_B` like any
`nn.Linear` (frozen layers are left out). `LoRALinear` has peft's layout (`base_layer`,
`lora_A`, `lora_B`) and initialization (A Kaiming-uniform, B zero, scaling alpha / r).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

LoraBackend = Literal["fedng", "peft"]
"""Which implementation `add_lora` uses."""


class LoRALinear(nn.Module):
    """`y = base(x) + (alpha / r) B(A(x))` with `base` frozen.

    Args:
        base: the layer to adapt (its parameters are frozen here).
        rank: r, the adapter rank.
        alpha: the scaling numerator.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRALinear: 'rank' must be >= 1, got {rank}")
        self.base_layer = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + scaling * B(A(x)); x [..., in_features] -> [..., out_features]."""
        out: torch.Tensor = self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling
        return out


def linear_names(model: nn.Module) -> list[str]:
    """The names of the model's `nn.Linear` submodules (the default LoRA targets)."""
    return [k for k, m in model.named_modules() if isinstance(m, nn.Linear)]


def add_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    targets: list[str] | None = None,
    backend: LoraBackend = "fedng",
) -> nn.Module:
    """Freezes `model` and adds LoRA adapters to its Linear layers `targets` (default: all).

    Args:
        model: the base model (modified in place for backend "fedng").
        rank: adapter rank r.
        alpha: LoRA alpha (scaling alpha / r).
        targets: names of Linear submodules to adapt.
        backend: "fedng" (`LoRALinear`) or "peft" (`peft.get_peft_model` with a `LoraConfig`;
            needs the optional extra `fedng[lora]`).

    Returns:
        The adapted model; only the adapters are trainable.

    Raises:
        ValueError: an unknown backend or target, or a target that is not an nn.Linear.
        ImportError: backend "peft" without peft installed.
    """
    names = linear_names(model) if targets is None else list(targets)
    modules = dict(model.named_modules())
    for t in names:
        if not isinstance(modules.get(t), nn.Linear):
            raise ValueError(f"add_lora: target {t!r} is not an nn.Linear of the model")
    if backend == "peft":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "add_lora: backend 'peft' needs peft: pip install fedng[lora]"
            ) from err
        cfg = LoraConfig(r=rank, lora_alpha=int(alpha), target_modules=names, lora_dropout=0.0)
        out: nn.Module = get_peft_model(model, cfg)
        return out
    if backend != "fedng":
        raise ValueError(f"add_lora: 'backend' must be 'fedng' or 'peft', got {backend!r}")
    model.requires_grad_(False)
    for t in names:
        parent_name, _, child = t.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        base = modules[t]
        if not isinstance(base, nn.Linear):
            raise TypeError(f"add_lora: {t!r} is a {type(base).__name__}, not an nn.Linear")
        setattr(parent, child, LoRALinear(base, rank, alpha))
    return model
