"""Kernel-benchmark workloads: layer shapes as plain data, plus seeded tensor builders.

Protocol: docs/architecture.md, "Benchmark protocols".

A workload is a list of layers. Each layer has a K-FAC input factor A of size `n_in` (input
features, +1 when the bias is folded in; `C_in * 9 + 1` for a 3x3 conv) and an output-gradient
factor G of size `n_out`, both estimated from `rows` rows per batch (samples, tokens or spatial
positions).
The factor list of a workload is `[A_0, G_0, A_1, G_1, ...]`.

Every builder is deterministic: the same (workload, dtype, seed) gives the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

DEFAULT_SEED = 1234


@dataclass(frozen=True)
class Layer:
    """One weight matrix [n_out, n_in] and the rows its factor statistics are estimated from."""

    name: str
    n_in: int
    n_out: int
    rows: int
    bias: bool = True


@dataclass(frozen=True)
class Workload:
    """A named list of layers; `tiny` workloads are benchmarked as loose matrices, not layers."""

    name: str
    description: str
    layers: tuple[Layer, ...]
    tiny: bool = False

    @property
    def factor_dims(self) -> list[int]:
        """Factor sizes in order A_0, G_0, A_1, G_1, ..."""
        return [d for layer in self.layers for d in (layer.n_in, layer.n_out)]

    @property
    def factor_rows(self) -> list[int]:
        """Rows of the input to each factor's SYRK, in `factor_dims` order."""
        return [layer.rows for layer in self.layers for _ in (0, 1)]

    @property
    def n_params(self) -> int:
        """Parameters of all layers (biases included)."""
        return sum(layer.n_in * layer.n_out for layer in self.layers)

    def summary(self) -> str:
        """One line: layer count, factor count and the factor size range."""
        dims = self.factor_dims
        return (
            f"{len(self.layers)} layers, {len(dims)} factors of sizes {min(dims)}..{max(dims)},"
            f" {self.n_params / 1e6:.2f}M params"
        )


# --- the kernel benchmark workloads ------------------------------------------------------------


def mlp(batch: int = 256) -> Workload:
    """MLP 784-1024-1024-1024-10, batch 256; A factors include the bias (785, 1025, ...)."""
    widths = [784, 1024, 1024, 1024, 10]
    layers = tuple(Layer(f"fc{i}", widths[i] + 1, widths[i + 1], batch) for i in range(4))
    return Workload("mlp", "MLP 784-1024-1024-1024-10, batch 256", layers)


def transformer(d: int = 256, blocks: int = 4, tokens: int = 512) -> Workload:
    """Pre-norm transformer, d=256, 4 blocks; per block attention in/out projections and a 4x MLP.

    `tokens` rows per batch (8 sequences of 64 tokens); biases folded into the A factors.
    """
    layers: list[Layer] = []
    for b in range(blocks):
        layers += [
            Layer(f"block{b}.attn.in_proj", d + 1, 3 * d, tokens),
            Layer(f"block{b}.attn.out_proj", d + 1, d, tokens),
            Layer(f"block{b}.mlp.fc1", d + 1, 4 * d, tokens),
            Layer(f"block{b}.mlp.fc2", 4 * d + 1, d, tokens),
        ]
    return Workload(
        "transformer", f"transformer d={d}, {blocks} blocks, {tokens} tokens", tuple(layers)
    )


def resnet(widths: Sequence[int] = (32, 64, 128, 256), images: int = 8, side: int = 32) -> Workload:
    """ResNet-18-like conv net on 32x32 inputs, kept CPU-sized.

    Widths 32-64-128-256 (a quarter of ResNet-18's 64-512), 2 basic blocks of two 3x3 convs per
    stage, 1x1 downsample shortcuts, a 10-way linear head. A conv's A factor is C_in * 9 + 1
    (unfolded 3x3 patches plus the bias), its G factor C_out; its rows are the spatial positions of
    a batch of `images` images (8 x H x W).
    """
    layers = [Layer("stem", 3 * 9 + 1, widths[0], images * side * side)]
    c_in, hw = widths[0], side
    for s, c in enumerate(widths):
        if s:
            hw //= 2
        rows = images * hw * hw
        for blk in range(2):
            first = blk == 0
            layers.append(Layer(f"layer{s + 1}.{blk}.conv1", c_in * 9 + 1, c, rows))
            layers.append(Layer(f"layer{s + 1}.{blk}.conv2", c * 9 + 1, c, rows))
            if first and c_in != c:
                layers.append(Layer(f"layer{s + 1}.{blk}.downsample", c_in + 1, c, rows))
            c_in = c
    layers.append(Layer("fc", widths[-1] + 1, 10, images))
    name = "-".join(str(w) for w in widths)
    return Workload(
        "resnet", f"ResNet-18-like conv net, widths {name}, {images} images 32x32", tuple(layers)
    )


def lora(adapters: int = 100, rank: int = 8, d: int = 768, tokens: int = 256) -> Workload:
    """100 LoRA adapters (rank 8, d=768): each adapter's A [8, 768] and B [768, 8] weight."""
    layers: list[Layer] = []
    for a in range(adapters):
        layers.append(Layer(f"lora{a}.A", d, rank, tokens, bias=False))
        layers.append(Layer(f"lora{a}.B", rank, d, tokens, bias=False))
    return Workload("lora", f"{adapters} LoRA adapters, rank {rank}, d={d}", tuple(layers))


def tiny(
    count: int = 4096, low: int = 8, high: int = 64, rows: int = 32, seed: int = DEFAULT_SEED
) -> Workload:
    """`count` tiny ragged matrices of seeded sizes in [low, high], as `count // 2` layers."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(low, high + 1, (count,), generator=gen).tolist()
    layers = tuple(
        Layer(f"tiny{i}", sizes[2 * i], sizes[2 * i + 1], rows, bias=False)
        for i in range(count // 2)
    )
    return Workload("tiny", f"{count} tiny ragged matrices, sizes {low}..{high}", layers, tiny=True)


WORKLOAD_NAMES: tuple[str, ...] = ("mlp", "transformer", "resnet", "lora", "tiny")


def get(name: str, quick: bool = False) -> Workload:
    """The workload `name`; `quick` shrinks all but the MLP for smoke runs.

    Quick sizes: transformer 1 block, ResNet widths 8-16-32-64 on 1 image, 10 LoRA adapters,
    512 tiny matrices. The MLP keeps its full size, so its targets stay meaningful.
    """
    if name == "mlp":
        return mlp()
    if name == "transformer":
        return transformer(blocks=1) if quick else transformer()
    if name == "resnet":
        return resnet(widths=(8, 16, 32, 64), images=1) if quick else resnet()
    if name == "lora":
        return lora(adapters=10) if quick else lora()
    if name == "tiny":
        return tiny(count=512) if quick else tiny()
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOAD_NAMES)}")


def select(names: Sequence[str] | None, quick: bool = False) -> list[Workload]:
    """Workloads by name (all of them if `names` is None or empty)."""
    return [get(n, quick) for n in (names or WORKLOAD_NAMES)]


# --- tensor builders --------------------------------------------------------------------------


def _gen(seed: int, *salt: int) -> torch.Generator:
    s = seed
    for x in salt:
        s = (s * 1_000_003 + x) % (2**63 - 1)
    return torch.Generator().manual_seed(s)


def activations(
    rows: int, n: int, *, bias: bool, seed: int, salt: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Activation-like rows [rows, n]: decaying feature scales, a few shared latent directions
    (correlated features), and a constant-1 last column when `bias`."""
    gen = _gen(seed, salt, rows, n)
    scale = 1.0 / torch.sqrt(1.0 + 8.0 * torch.arange(n, dtype=torch.float32) / max(n, 1))
    x = torch.randn(rows, n, generator=gen) * scale
    latent = min(4, n)
    x += 0.3 * torch.randn(rows, latent, generator=gen) @ torch.randn(latent, n, generator=gen)
    if bias and n:
        x[:, -1] = 1.0
    return x.to(dtype)


def kfac_inputs(
    wl: Workload, dtype: torch.dtype = torch.float32, seed: int = DEFAULT_SEED
) -> list[torch.Tensor]:
    """One batch of SYRK inputs [rows, n] per factor: layer inputs (A) and output grads (G)."""
    out = []
    for i, layer in enumerate(wl.layers):
        out.append(
            activations(layer.rows, layer.n_in, bias=layer.bias, seed=seed, salt=2 * i, dtype=dtype)
        )
        out.append(
            activations(layer.rows, layer.n_out, bias=False, seed=seed, salt=2 * i + 1, dtype=dtype)
            * 1e-2
        )
    return out


def spd_factor(
    n: int, *, seed: int, salt: int = 0, dtype: torch.dtype = torch.float32, ridge: float = 1e-4
) -> torch.Tensor:
    """A realistic K-FAC factor: `X^T X / k + ridge * mean(diag) * I` over k activation rows.

    k = clamp(n, 64, 256) rows (a factor of a few batches: rank-deficient above 256, hence the
    ridge); damped by 1e-3 x mean(diag) its float32 Cholesky succeeds comfortably (cond ~1e5).
    """
    k = min(max(n, 64), 256)
    x = activations(k, n, bias=False, seed=seed, salt=salt, dtype=torch.float32)
    f = (x.T @ x).div_(k)
    mean_diag = f.diagonal().mean() if n else torch.tensor(1.0)
    f.diagonal().add_(ridge * mean_diag)
    return f.to(dtype)


def spd_factors(
    wl: Workload, dtype: torch.dtype = torch.float32, seed: int = DEFAULT_SEED
) -> list[torch.Tensor]:
    """SPD factors of every size in `wl.factor_dims` (A_0, G_0, A_1, ...)."""
    return [spd_factor(n, seed=seed, salt=i, dtype=dtype) for i, n in enumerate(wl.factor_dims)]


def damping_for(mats: Sequence[torch.Tensor], rel: float = 1e-3) -> list[float]:
    """Per-matrix damping `rel x mean(diag)` (the benchmarks' default)."""
    return [rel * float(m.diagonal().double().mean()) if m.numel() else rel for m in mats]


def gradients(
    wl: Workload, dtype: torch.dtype = torch.float32, seed: int = DEFAULT_SEED
) -> list[torch.Tensor]:
    """Weight gradients [n_out, n_in] per layer (bias folded in as the last column)."""
    return [
        torch.randn(la.n_out, la.n_in, generator=_gen(seed, 7, i)).mul_(1e-2).to(dtype)
        for i, la in enumerate(wl.layers)
    ]


def batch_factors(
    wl: Workload, dtype: torch.dtype = torch.float32, seed: int = DEFAULT_SEED
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The batch's layer inputs [rows, n_in] and output gradients [rows, n_out] per layer."""
    xs = kfac_inputs(wl, dtype, seed)
    return xs[0::2], xs[1::2]


QUICK_MAX_D = 8_192
"""Quick mode caps the low-rank dimension d (parameters per layer) at this."""


def lowrank_dims(wl: Workload, rank: int = 32, max_d: int | None = None) -> list[tuple[int, int]]:
    """(d, r) per low-rank Fisher: d = the layer's parameter count (tiny: each matrix size),
    capped at `max_d` if given; r = min(rank, d // 4) (at least 1)."""
    ds = wl.factor_dims if wl.tiny else [la.n_in * la.n_out for la in wl.layers]
    if max_d is not None:
        ds = [min(d, max_d) for d in ds]
    return [(d, min(rank, max(1, d // 4))) for d in ds]


def psd_sketch(
    d: int,
    r: int,
    *,
    seed: int,
    salt: int = 0,
    samples: int = 64,
    dtype: torch.dtype = torch.float32,
    chunk: int = 1 << 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, Omega) with `Y = F Omega`, F = J^T J for `samples` per-sample gradients J [samples, d]
    whose rows decay as 1/(i+1) (a realistic eigenvalue decay); Omega is Gaussian [d, r].

    J is generated in column chunks twice (for J Omega, then for J^T (J Omega)), never whole.
    """
    om = torch.randn(d, r, generator=_gen(seed, 11, salt, d, r))
    row_scale = 1.0 / torch.arange(1, samples + 1, dtype=torch.float32)[:, None]

    def j_chunk(c: int, lo: int, hi: int) -> torch.Tensor:
        return torch.randn(samples, hi - lo, generator=_gen(seed, 13, salt, d, c)) * row_scale

    jo = torch.zeros(samples, r)
    for c, lo in enumerate(range(0, d, chunk)):
        hi = min(d, lo + chunk)
        jo += j_chunk(c, lo, hi) @ om[lo:hi]
    y = torch.empty(d, r)
    for c, lo in enumerate(range(0, d, chunk)):
        hi = min(d, lo + chunk)
        torch.mm(j_chunk(c, lo, hi).T, jo, out=y[lo:hi])
    return y.to(dtype), om.to(dtype)


def psd_sketches(
    dims: Sequence[tuple[int, int]], dtype: torch.dtype = torch.float32, seed: int = DEFAULT_SEED
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Sketches and test matrices for every (d, r) of `dims` (see `lowrank_dims`)."""
    ys, oms = [], []
    for i, (d, r) in enumerate(dims):
        y, om = psd_sketch(d, r, seed=seed, salt=i, samples=max(2 * r, 8), dtype=dtype)
        ys.append(y)
        oms.append(om)
    return ys, oms


def lowrank_factors(
    dims: Sequence[tuple[int, int]],
    dtype: torch.dtype = torch.float32,
    seed: int = DEFAULT_SEED,
    cols: int = 1,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(U [d, r] orthonormal, S [r] decaying > 0, V [d] or [d, cols]) per (d, r) of `dims`."""
    us, ss, vs = [], [], []
    for i, (d, r) in enumerate(dims):
        gen = _gen(seed, 17, i, d, r)
        u, _ = torch.linalg.qr(torch.randn(d, r, generator=gen))
        us.append(u.contiguous().to(dtype))
        ss.append((10.0 / torch.arange(1, r + 1, dtype=torch.float32) ** 2).to(dtype))
        v = torch.randn(d, cols, generator=gen) if cols > 1 else torch.randn(d, generator=gen)
        vs.append(v.to(dtype))
    return us, ss, vs


class LowRankJacobian:
    """Per-sample gradients `J = Z diag(sv) Q^T + sigma N` [rows, d], generated batch by batch.

    Q [d, latent] has N(0, 1/d) entries (nearly orthonormal), singular values decay as
    `sv_j = 1/(j+1)` so the eigenvalues of J^T J fall as 1/j^2 over `latent` directions above an
    isotropic noise floor set by `sigma`. Batch i depends only on (seed, i), so a streamed batch and
    the same rows of the stacked matrix are bit-identical.
    """

    def __init__(
        self,
        d: int,
        latent: int = 128,
        sigma: float = 2e-3,
        seed: int = DEFAULT_SEED,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.d, self.latent, self.sigma, self.seed, self.dtype = d, latent, sigma, seed, dtype
        sv = 1.0 / torch.arange(1, latent + 1, dtype=torch.float32)
        qt = torch.randn(latent, d, generator=_gen(seed, 19, d)).div_(math.sqrt(d))
        self.svqt = (sv[:, None] * qt).to(dtype)  # diag(sv) Q^T [latent, d]

    def batch(self, i: int, rows: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Batch `i` [rows, d], written into `out` (contiguous) when given: no other temporary."""
        gen = _gen(self.seed, 23, i, rows)
        if out is None:
            out = torch.empty(rows, self.d, dtype=self.dtype)
        torch.randn(rows, self.d, generator=gen, dtype=self.dtype, out=out)
        out.mul_(self.sigma)
        z = torch.randn(rows, self.latent, generator=gen, dtype=self.dtype)
        return out.addmm_(z, self.svqt)

    def stacked(self, batches: int, rows: int) -> torch.Tensor:
        """All `batches` batches stacked [batches * rows, d], filled in place."""
        j = torch.empty(batches * rows, self.d, dtype=self.dtype)
        for i in range(batches):
            self.batch(i, rows, out=j[i * rows : (i + 1) * rows])
        return j
