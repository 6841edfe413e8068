"""Federated LoRA fine-tuning: a model pre-trained centrally on part of digits, adapted
federatedly to a shifted domain on the rest.

The digits (8x8, scikit-learn's bundled copy) are split once by `seed`: `pretrain_fraction`
of them pre-train an MLP 64-128-128-10 centrally (full-batch Adam, in the original domain);
the rest are moved to a new domain — each image shifted one pixel to the right and its contrast
scaled by `contrast` (pixels `contrast * x + (1 - contrast) / 2`) — and split into a global test
set and `num_clients` clients with Dirichlet(alpha) label skew. The federated model is the frozen
pre-trained MLP with rank-`rank` LoRA adapters on its Linear layers (`tasks.lora.add_lora`):
only the adapters train and travel.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from fedng.federated.tasks.base import ClientData, FederatedTask, mlp, seeded_model
from fedng.federated.tasks.lora import LoraBackend, add_lora
from fedng.federated.tasks.partition import dirichlet_label_skew, holdout

_PRETRAIN_STEPS = 300
_SIZES = [64, 128, 128, 10]


def shift_domain(x: torch.Tensor, contrast: float) -> torch.Tensor:
    """The target domain of flattened 8x8 images x [n, 64] in [0, 1]: one pixel to the right
    (the left column black), contrast scaled about 0.5."""
    img = x.view(-1, 8, 8)
    moved = torch.zeros_like(img)
    moved[:, :, 1:] = img[:, :, :-1]
    return (contrast * moved + (1 - contrast) / 2).reshape(-1, 64)


@functools.lru_cache(maxsize=4)
def pretrained_base(seed: int, pretrain_fraction: float) -> dict[str, torch.Tensor]:
    """The state dict of the MLP pre-trained on the source part of the split `seed`."""
    x, y, src, _ = _split(seed, pretrain_fraction)
    model = seeded_model(lambda: mlp(_SIZES), seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(_PRETRAIN_STEPS):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[src]), y[src])
            torch.autograd.backward(loss)
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _split(
    seed: int, pretrain_fraction: float
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """(x [n, 64] in [0, 1], y [n], source indices, target indices) of the split `seed`."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the lora task needs scikit-learn: pip install scikit-learn") from err
    data = load_digits()
    x = torch.from_numpy(data.data / 16.0).float()
    y = torch.from_numpy(data.target.astype(np.int64))
    rng = np.random.default_rng(seed + 991)
    tgt, src = holdout(np.arange(len(y)), pretrain_fraction, rng)
    return x, y, src, tgt


def lora_model(
    seed: int,
    rank: int,
    pretrain_seed: int = 0,
    pretrain_fraction: float = 0.3,
    backend: LoraBackend = "fedng",
) -> nn.Module:
    """The pre-trained, frozen MLP with LoRA adapters (initialized from `seed`)."""

    def build() -> nn.Module:
        base = mlp(_SIZES)
        base.load_state_dict(pretrained_base(pretrain_seed, pretrain_fraction))
        return add_lora(base, rank, alpha=2.0 * rank, backend=backend)

    return seeded_model(build, seed)


def lora_task(
    num_clients: int = 10,
    alpha: float = 0.3,
    seed: int = 0,
    rank: int = 4,
    contrast: float = 0.6,
    pretrain_fraction: float = 0.3,
    test_fraction: float = 0.25,
    val_fraction: float = 0.1,
    backend: LoraBackend = "fedng",
) -> FederatedTask:
    """LoRA fine-tuning of a pre-trained digits MLP on a shifted domain (see the module doc).

    Args:
        num_clients: clients.
        alpha: Dirichlet concentration of the clients' label skew.
        seed: data seed (pre-training split, partition, pre-training itself).
        rank: LoRA rank (4-8 in the benchmark).
        contrast: contrast of the target domain (1 = only the pixel shift).
        pretrain_fraction: share of the digits used for central pre-training.
        test_fraction: share of the target-domain digits in the global test set.
        val_fraction: share of each client's part held out for validation.
        backend: "fedng" or "peft" adapters.

    Returns:
        The task (cross-entropy, accuracy).
    """
    x, y, _, tgt = _split(seed, pretrain_fraction)
    xt = shift_domain(x[tgt], contrast)
    yt = y[tgt]
    rng = np.random.default_rng(seed)
    train, test = holdout(np.arange(len(tgt)), test_fraction, rng)
    parts = dirichlet_label_skew(yt.numpy()[train], num_clients, alpha, rng)
    clients = []
    for k, p in enumerate(parts):
        keep, val = holdout(train[p], val_fraction, rng)
        clients.append(ClientData(k, xt[keep], yt[keep], xt[val], yt[val]))
    return FederatedTask(
        name=f"lora-digits(alpha={alpha:g},r={rank})",
        clients=clients,
        x_test=xt[test],
        y_test=yt[test],
        model_fn=lambda s: lora_model(s, rank, seed, pretrain_fraction, backend),
        loss="cross_entropy",
        metric="accuracy",
        num_classes=10,
        info={"alpha": alpha, "rank": rank, "contrast": contrast, "backend": backend},
    )
