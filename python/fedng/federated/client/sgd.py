"""The local SGD loop every algorithm shares (equal local work), and its seeded batch order over
a client's data (tensors, a `Dataset` or a `DataLoader`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedng.federated.config.common import ClientConfig
from fedng.federated.losses import loss_fn
from fedng.federated.tasks.base import ClientData
from fedng.federated.tasks.data import TensorPair, as_pair, collate, sequential_batches


def round_seed(seed: int, round_: int, client_id: int) -> int:
    """A 63-bit seed from (config seed, round, client): the same on every run and machine."""
    return (seed * 1_000_003 + round_ * 10_007 + client_id * 101 + 17) % (2**63 - 1)


def batch_indices(n: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """`steps` minibatches of indices into n examples: epochs of seeded shuffles, drop-last free.

    Each epoch is a fresh permutation; a batch never straddles two epochs (the last batch of an
    epoch may be smaller). With batch_size >= n every batch is the whole (shuffled) data.

    Args:
        n: examples (>= 1).
        batch_size: examples per batch.
        steps: batches to yield.
        seed: the generator seed (see `round_seed`).

    Yields:
        int64 index tensors.
    """
    if n < 1:
        raise ValueError(f"batch_indices: 'n' must be >= 1, got {n}")
    gen = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=gen)
        for lo in range(0, n, batch_size):
            if done == steps:
                return
            yield perm[lo : lo + batch_size]
            done += 1


def training_batches(
    data: ClientData, batch_size: int, steps: int, seed: int
) -> Iterator[TensorPair]:
    """`steps` (inputs, targets) minibatches of a client's training data.

    Tensors and `Dataset`s follow `batch_indices(n, batch_size, steps, seed)` (a `Dataset` is
    read and collated one batch at a time); a `DataLoader` yields its own batches in its own
    order, restarted when exhausted (`batch_size` and `seed` do not apply).
    """
    source = data.materialize().train
    if source is None:
        for idx in batch_indices(data.num_examples, batch_size, steps, seed):
            yield data.x[idx], data.y[idx]
    elif isinstance(source, DataLoader):
        done = 0
        while done < steps:
            epoch_start = done
            for batch in source:
                yield as_pair(batch, "DataLoader")
                done += 1
                if done == steps:
                    return
            if done == epoch_start:
                raise ValueError(f"client {data.client_id}: its DataLoader yields no batch")
    else:
        for idx in batch_indices(data.num_examples, batch_size, steps, seed):
            yield collate(source, idx)


def ordered_batches(data: ClientData, batch_size: int) -> Iterator[TensorPair]:
    """Every training example once, in order, in batches of `batch_size` (a `DataLoader`: its
    own batches)."""
    source = data.materialize().train
    if source is not None:
        yield from sequential_batches(source, batch_size)
        return
    for lo in range(0, data.num_examples, batch_size):
        yield data.x[lo : lo + batch_size], data.y[lo : lo + batch_size]


GradHook = Callable[[int], None]
"""Called after `loss.backward()` with the step index; may rewrite `.grad` in place."""


def local_sgd(
    model: nn.Module,
    data: ClientData,
    config: ClientConfig,
    round_: int,
    *,
    grad_hook: GradHook | None = None,
    steps: int | None = None,
    before_backward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> dict[str, float]:
    """Runs the local SGD loop every algorithm shares (equal local work).

    `config.local_steps` steps (or `steps`) of `torch.optim.SGD(lr, momentum, weight_decay)` on
    minibatches from `batch_indices(..., round_seed(config.seed, round_, data.client_id))`.

    Args:
        model: the model, already holding the starting parameters.
        data: the client's data.
        config: the client config.
        round_: the server round (seeds the batch order).
        grad_hook: rewrites gradients between backward and the optimizer step (FedProx's
            proximal gradient, SCAFFOLD's correction, natural-gradient preconditioning).
        steps: overrides `config.local_steps`.
        before_backward: called with (inputs, targets, outputs) before backward (e.g. to record
            curvature).

    Returns:
        {"train_loss": mean minibatch loss, "steps": steps taken}.
    """
    crit = loss_fn(config.loss)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    k = config.local_steps if steps is None else steps
    total = 0.0
    seed = round_seed(config.seed, round_, data.client_id)
    model.train()
    for step, (x, y) in enumerate(training_batches(data, config.batch_size, k, seed)):
        opt.zero_grad(set_to_none=False)
        out = model(x)
        loss = crit(out, y)
        if before_backward is not None:
            before_backward(x, y, out)
        torch.autograd.backward(loss)
        if grad_hook is not None:
            grad_hook(step)
        opt.step()
        total += float(loss.detach())
    return {"train_loss": total / max(1, k), "steps": float(k)}
