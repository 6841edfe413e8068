"""Fisher types: the empirical Fisher (real labels) and the Monte-Carlo true Fisher (sampled
labels).

The empirical Fisher uses the gradients of the loss being trained. The true Fisher
`E_x E_{y ~ p(y|x)} [grad log p(y|x) grad log p(y|x)^T]` is estimated with labels drawn from the
model's own predictive distribution, at the cost of one extra backward pass:

- cross-entropy: `y ~ Categorical(softmax(logits))` along the last axis of the outputs;
- MSE (a unit-variance Gaussian likelihood): `y ~ N(outputs, I)`, per-sample loss
  `0.5 * ||outputs - y||^2`, whose gradient is `-eps` with `eps ~ N(0, I)`.

Convention: the Fisher is that of the per-sample loss (summed over a sample's positions), and the
sampled loss is reduced over the batch like the training loss ("mean" divides by the batch size
B = outputs.shape[0]), so both passes give gradients on the same scale.
"""

from __future__ import annotations

from typing import Literal, TypeVar

import torch
import torch.nn.functional as F

FisherType = Literal["empirical", "mc"]
LossType = Literal["cross_entropy", "mse"]
Reduction = Literal["mean", "sum"]

FISHER_TYPES: tuple[FisherType, ...] = ("empirical", "mc")
LOSS_TYPES: tuple[LossType, ...] = ("cross_entropy", "mse")
REDUCTIONS: tuple[Reduction, ...] = ("mean", "sum")

C = TypeVar("C", bound=str)


def check_choice(where: str, name: str, value: object, choices: tuple[C, ...]) -> C:
    """The one of `choices` that `value` is (typed as the choices are), else ValueError naming
    the argument."""
    for c in choices:
        if value == c:
            return c
    raise ValueError(f"{where}: '{name}' must be one of {list(choices)}, got {value!r}")


def sample_targets(
    outputs: torch.Tensor, loss: LossType, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Labels drawn from the model's predictive distribution (no gradient flows through them).

    Args:
        outputs: model outputs [..., C]: logits for cross-entropy, means for MSE.
        loss: "cross_entropy" or "mse".
        generator: the random stream (the caller's, for reproducible resumes).

    Returns:
        int64 class indices [...] for cross-entropy; a float tensor shaped like `outputs` for MSE.
    """
    out = outputs.detach().float()
    if loss == "cross_entropy":
        probs = torch.softmax(out.reshape(-1, out.shape[-1]), dim=-1)
        # A diverged model's non-finite logits give NaN rows that multinomial refuses: draw those
        # uniformly (the loss stays non-finite, so the optimizer skips the step and counts it).
        ok = torch.isfinite(probs).all(dim=-1, keepdim=True)
        probs = torch.where(ok, probs, torch.full_like(probs, 1.0 / probs.shape[-1]))
        return torch.multinomial(probs, 1, generator=generator).reshape(out.shape[:-1])
    noise = torch.randn(out.shape, generator=generator, dtype=out.dtype)
    return out + noise


def sampled_loss(
    outputs: torch.Tensor,
    loss: LossType,
    reduction: Reduction = "mean",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The loss of `outputs` against labels sampled from the model itself (see module docstring).

    Args:
        outputs: model outputs [B, ..., C] (or [C] for one unbatched sample).
        loss: "cross_entropy" or "mse".
        reduction: "mean" (divide by B) or "sum".
        generator: the random stream.

    Returns:
        A scalar whose backward pass gives the Monte-Carlo Fisher's output gradients.
    """
    where = "sampled_loss"
    check_choice(where, "loss", loss, LOSS_TYPES)
    check_choice(where, "reduction", reduction, REDUCTIONS)
    if not isinstance(outputs, torch.Tensor) or not outputs.is_floating_point():
        raise TypeError(
            f"{where}: 'outputs' must be a floating-point tensor, got {type(outputs).__name__}"
        )
    target = sample_targets(outputs, loss, generator)
    out = outputs.float()
    if loss == "cross_entropy":
        total = F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1), reduction="sum")
    else:
        total = 0.5 * (out - target).square().sum()
    batch = outputs.shape[0] if outputs.dim() > 1 else 1
    return total / batch if reduction == "mean" else total
