"""A small model zoo for NaturalGradient's defaults: six seeded models with their offline data.

Each `Entry` has a model factory (seeded), its data (train/test tensors, built once and cached),
the loss name ("cross_entropy" or "mse", as `NaturalGradient(loss=...)` takes it) and a batch
size. `train` runs one optimizer on one entry for a number of steps on seeded minibatches and
reports the losses and whether anything became non-finite. `bench/bench_zoo.py` and
`tests/test_zoo.py` (which puts `bench/` on `sys.path`) both use it.

| name | model | data |
|---|---|---|
| mlp_mnist1d | MLP 40-100-100-10 (ReLU) | MNIST-1D (`generate_mnist1d`) |
| cnn_digits | Conv2d 1-16 / Conv2d 16-32 (stride 2) / Linear 512-10 | sklearn's 8x8 digits |
| cnn_bn_digits | the same with BatchNorm2d after each conv | sklearn's 8x8 digits |
| cnn1d_mnist1d | Conv1d 1-16 (k5 s2) / Conv1d 16-32 (k3 s2) / Linear 320-10 | MNIST-1D |
| transformer_mode | Embedding + MultiheadAttention + LayerNorm + MLP | mode token |
| mlp_regression | MLP 8-64-64-2 (tanh), MSE | a smooth seeded function of x |

The two CNNs are defined once, in `fedng.federated.tasks.models` (the federated tasks
"digits-cnn" and "mnist1d-cnn" train them too), and imported here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from fedng.federated.tasks.models import cnn1d_mnist1d, cnn_digits
from torch import nn

Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""(x_train, y_train, x_test, y_test)."""


@dataclass(frozen=True)
class Entry:
    """One zoo model.

    Attributes:
        name: its key in `ZOO`.
        build: the model, without seeding (use `model()`).
        load: the data (use `data()`, cached).
        loss: "cross_entropy" (y: int64 class ids [N]) or "mse" (y: float [N, out]).
        batch_size: minibatch size for training.
        seed: the model's initialization seed.
    """

    name: str
    build: Callable[[], nn.Module]
    load: Callable[[], Tensors]
    loss: str
    batch_size: int = 64
    seed: int = 0

    def model(self) -> nn.Module:
        """A fresh model, initialized from `seed` (the global RNG is left as it was)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self.build()

    def data(self) -> Tensors:
        """(x_train, y_train, x_test, y_test), generated once per process."""
        return _cached(self.name, self.load)

    def loss_fn(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss (mean over the batch)."""
        if self.loss == "mse":
            return F.mse_loss(out, y)
        return F.cross_entropy(out, y)


_CACHE: dict[str, Tensors] = {}


def _cached(name: str, load: Callable[[], Tensors]) -> Tensors:
    if name not in _CACHE:
        _CACHE[name] = load()
    return _CACHE[name]


# --- data -----------------------------------------------------------------------------------


@functools.cache
def mnist1d() -> Tensors:
    """MNIST-1D regenerated offline (2000 train / 500 test, seed 42), inputs [N, 40]."""
    from fedng.federated.tasks.mnist1d import generate_mnist1d

    x, y, xt, yt = generate_mnist1d(num_samples=2500, seed=42)
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(xt), torch.from_numpy(yt)


@functools.cache
def digits() -> Tensors:
    """sklearn's bundled 8x8 digits as images [N, 1, 8, 8] in [0, 1]; fixed 1437/360 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1437], y[:1437], x[1437:], y[1437:]


VOCAB, SEQ_LEN, MODE_CLASSES = 10, 16, 8


def mode_sequences(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences [n, SEQ_LEN] of tokens in [0, VOCAB); label: the most frequent token among the
    first `MODE_CLASSES` tokens (the others are distractors), unique by construction (rejection)."""
    gen = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    have = 0
    while have < n:
        x = torch.randint(0, VOCAB, (4 * n, SEQ_LEN), generator=gen)
        counts = F.one_hot(x, VOCAB).sum(1)[:, :MODE_CLASSES]  # [4n, classes]
        top2 = counts.topk(2, dim=1).values
        keep = top2[:, 0] > top2[:, 1]
        xs.append(x[keep])
        ys.append(counts[keep].argmax(1))
        have += int(keep.sum())
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


@functools.cache
def mode_task() -> Tensors:
    """The transformer's task: 2000 train / 500 test sequences (seeded)."""
    x, y = mode_sequences(2000, seed=1)
    xt, yt = mode_sequences(500, seed=2)
    return x, y, xt, yt


@functools.cache
def regression() -> Tensors:
    """x ~ N(0, I) [N, 8]; y [N, 2] a smooth nonlinear function of x plus noise (1500/500)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2000, 8, generator=gen)
    w = torch.randn(8, 2, generator=gen) / math.sqrt(8)
    y = (
        torch.sin(2.0 * x @ w)
        + 0.5 * (x[:, :2] * x[:, 2:4])
        + 0.05 * torch.randn(2000, 2, generator=gen)
    )
    return x[:1500], y[:1500], x[1500:], y[1500:]


# --- models ---------------------------------------------------------------------------------


def mlp(widths: list[int], act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear layers with `act` between them."""
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class TinyTransformer(nn.Module):
    """One post-norm encoder layer: token + position embeddings, self-attention, LayerNorm, MLP,
    mean pooling and a linear classifier. Input: token ids [B, T]; output: logits [B, classes]."""

    def __init__(self, vocab: int = VOCAB, classes: int = MODE_CLASSES, dim: int = 32) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(SEQ_LEN, dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = mlp([dim, 2 * dim, dim])
        self.norm2 = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        a, _ = self.attn(h, h, h, need_weights=False)
        h = self.norm1(h + a)
        h = self.norm2(h + self.mlp(h))
        out: torch.Tensor = self.head(h.mean(1))
        return out


ZOO: dict[str, Entry] = {
    e.name: e
    for e in [
        Entry("mlp_mnist1d", lambda: mlp([40, 100, 100, 10]), mnist1d, "cross_entropy"),
        Entry("cnn_digits", cnn_digits, digits, "cross_entropy"),
        Entry("cnn_bn_digits", lambda: cnn_digits(batch_norm=True), digits, "cross_entropy"),
        Entry("cnn1d_mnist1d", cnn1d_mnist1d, mnist1d, "cross_entropy"),
        Entry("transformer_mode", TinyTransformer, mode_task, "cross_entropy"),
        Entry("mlp_regression", lambda: mlp([8, 64, 64, 2], nn.Tanh), regression, "mse"),
    ]
}
"""Every zoo model by name."""


def float64(entry: Entry) -> Entry:
    """`entry` in float64 (model and inputs; class ids stay int64), its own data cache: to tell
    a float32 round-off effect from a real one."""

    def load() -> Tensors:
        x, y, xt, yt = entry.data()
        cast = (lambda t: t.double()) if entry.loss == "mse" else (lambda t: t)
        return _double(x), cast(y), _double(xt), cast(yt)

    return Entry(
        f"{entry.name}_f64",
        lambda: entry.build().double(),
        load,
        entry.loss,
        entry.batch_size,
        entry.seed,
    )


def _double(t: torch.Tensor) -> torch.Tensor:
    """Floating inputs in float64; token ids (the transformer's) unchanged."""
    return t.double() if t.is_floating_point() else t


# --- training -------------------------------------------------------------------------------


@dataclass
class Run:
    """What `train` observed.

    Attributes:
        losses: the training loss of every step's batch (before its update).
        final_loss: the mean training loss over the whole training set after the last step
            (inf when not finite).
        test_metric: test accuracy (classification) or test MSE (regression).
        nonfinite_losses: steps whose batch loss was not finite.
        nonfinite_params: whether any parameter ended non-finite.
        extra: optimizer-specific counters (e.g. NaturalGradient's `stats`).
    """

    losses: list[float]
    final_loss: float
    test_metric: float
    nonfinite_losses: int
    nonfinite_params: bool
    extra: dict[str, Any]


StepHook = Callable[[], None]


def evaluate(entry: Entry, model: nn.Module) -> tuple[float, float]:
    """(training-set loss, test metric) in eval mode."""
    x, y, xt, yt = entry.data()
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            train_loss = float(entry.loss_fn(model(x), y))
            out = model(xt)
            metric = (
                float(F.mse_loss(out, yt))
                if entry.loss == "mse"
                else float((out.argmax(1) == yt).float().mean())
            )
    finally:
        model.train(was)
    return (train_loss if math.isfinite(train_loss) else math.inf), metric


def train(
    entry: Entry,
    make: Callable[[nn.Module], tuple[torch.optim.Optimizer, StepHook | None]],
    steps: int,
    seed: int = 0,
) -> Run:
    """Trains a fresh `entry.model()` for `steps` minibatch steps.

    Args:
        entry: the zoo model.
        make: model -> (optimizer, hook run between backward and `optimizer.step()`, e.g.
            `NaturalGradient.step`, or None).
        steps: optimizer steps.
        seed: the minibatch order (epochs of a seeded permutation).

    Returns:
        `Run`; training stops early (remaining losses counted non-finite) once the parameters
        are non-finite.
    """
    model = entry.model()
    opt, hook = make(model)
    x, y, _, _ = entry.data()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=gen)
    pos, losses, bad = 0, [], 0
    for t in range(steps):
        if pos + entry.batch_size > len(x):
            order, pos = torch.randperm(len(x), generator=gen), 0
        idx = order[pos : pos + entry.batch_size]
        pos += entry.batch_size
        opt.zero_grad()
        loss = entry.loss_fn(model(x[idx]), y[idx])
        loss.backward()
        if hook is not None:
            hook()
        opt.step()
        value = float(loss.detach())
        losses.append(value)
        bad += not math.isfinite(value)
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            bad += steps - t - 1
            break
    nonfinite_params = not all(bool(torch.isfinite(p).all()) for p in model.parameters())
    final, metric = evaluate(entry, model)
    extra = getattr(hook, "__self__", None)
    stats = dict(getattr(extra, "stats", {}) or {})
    return Run(losses, final, metric, bad, nonfinite_params, stats)
