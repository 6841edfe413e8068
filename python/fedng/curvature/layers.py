"""Per-layer-type rules: which blocks a module has, and how its inputs/output-grads become stats.

A `Rule` owns one module. It declares its curvature blocks (bound to the module's parameters) and
its capture sites (a site is one (input, output) pair the hooks observe), installs the hooks, and
turns what a site recorded into per-block statistics (`fedng.curvature.stats`). Attention lives
in `attention.py`.

Supported here: `nn.Linear` (bias folded into A), `nn.Conv1d` and `nn.Conv2d` (patches via
unfold: KFC; any stride, dilation, padding mode and groups, one block per group; a Conv1d is a
Conv2d of height 1), `nn.Embedding` (diagonal A),
`nn.LayerNorm`, `nn.RMSNorm`, `nn.GroupNorm` and batch norms (diagonal).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from fedng.curvature.blocks import Block
from fedng.curvature.spec import BlockSpec
from fedng.curvature.stats import (
    BlockStats,
    ElementwiseStats,
    EmbeddingStats,
    KronStats,
    fisher_scale,
)

NormLayer = nn.LayerNorm | nn.GroupNorm | nn.RMSNorm | nn.modules.batchnorm._BatchNorm
"""The normalization layers (elementwise blocks)."""

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)


class Observer(Protocol):
    """What hooks report to (the capture)."""

    recording: bool

    def observe(self, site: int, x: torch.Tensor, y: torch.Tensor, extra: object = None) -> None:
        """Records the input `x` of a site and arranges to receive the gradient w.r.t. `y`."""


class Site:
    """One observed (input, output) pair of a module, feeding one or more blocks.

    Attributes:
        blocks: global indices of the blocks it feeds (set when the model is discovered).
    """

    def __init__(self) -> None:
        self.blocks: list[int] = []

    def stats(
        self,
        x: torch.Tensor,
        gf: torch.Tensor,
        gl: torch.Tensor,
        extra: object,
        dtype: torch.dtype,
        reduction: str,
    ) -> list[BlockStats]:
        """Stats for each of `self.blocks` from a recorded input and output gradients.

        Args:
            x: the recorded input.
            gf: gradient w.r.t. the output from the Fisher pass.
            gl: gradient w.r.t. the output from the loss pass (may be `gf` itself).
            extra: what the hook recorded besides (e.g. whether batch norm used batch stats).
            dtype: the curvature dtype.
            reduction: "mean" or "sum", how the loss reduced over the batch.
        """
        raise NotImplementedError


def _grads(
    gf: torch.Tensor, gl: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    f = gf.reshape(shape)
    f = f if f.dtype == dtype else f.to(dtype)
    if gl is gf:
        return f, f
    lo = gl.reshape(shape)
    return f, (lo if lo.dtype == dtype else lo.to(dtype))


_ONES: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor] = {}


def with_ones(x: torch.Tensor, bias: bool, dtype: torch.dtype) -> torch.Tensor:
    """`x` [B, T, k] in `dtype` (contiguous), with a column of ones appended when `bias`."""
    if x.dtype != dtype:
        x = x.to(dtype)
    if not bias:
        return x.contiguous()
    key = (tuple(x.shape[:-1]), dtype)
    ones = _ONES.get(key)
    if ones is None:
        if len(_ONES) > 64:
            _ONES.clear()
        ones = _ONES[key] = torch.ones(*key[0], 1, dtype=dtype)
    return torch.cat([x, ones], -1)


class LinearSite(Site):
    """`y = x W^T + b` on inputs [..., n] (the batch along `batch_dim`)."""

    def __init__(self, bias: bool, batch_dim: int = 0) -> None:
        super().__init__()
        self.bias, self.batch_dim = bias, batch_dim

    def stats(
        self,
        x: torch.Tensor,
        gf: torch.Tensor,
        gl: torch.Tensor,
        extra: object,
        dtype: torch.dtype,
        reduction: str,
    ) -> list[BlockStats]:
        b = 1  # an unbatched input is one sample
        if x.dim() >= self.batch_dim + 2:
            if self.batch_dim:
                same = gl is gf
                x, gf = x.movedim(self.batch_dim, 0), gf.movedim(self.batch_dim, 0)
                gl = gf if same else gl.movedim(self.batch_dim, 0)
            b = x.shape[0]
        a = with_ones(x.reshape(b, -1, x.shape[-1]), self.bias, dtype)
        g, g_loss = _grads(gf, gl, (b, a.shape[1], gf.shape[-1]), dtype)
        return [
            KronStats(
                batch_size=b, fisher_scale=fisher_scale(b, reduction), g=g, g_loss=g_loss, a=a
            )
        ]


class Conv2dSite(Site):
    """KFC: a convolution is a Linear layer applied to every patch of its (padded) input."""

    unbatched_dim = 3
    """The input's dim without a batch dimension ([C, H, W])."""

    def __init__(self, conv: nn.Conv2d | nn.Conv1d) -> None:
        super().__init__()
        self.conv = conv

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """Unfolded input patches [B, L, C*kh*kw] (channel-major, like `weight.view(out, -1)`)."""
        c = self.conv
        padding = c.padding
        pad: tuple[int, ...]
        if isinstance(padding, str) or c.padding_mode != "zeros":
            mode = "constant" if c.padding_mode == "zeros" else c.padding_mode
            x = F.pad(x, c._reversed_padding_repeated_twice, mode=mode)
            pad = (0, 0)
        else:
            pad = padding
        cols = F.unfold(x, c.kernel_size, dilation=c.dilation, padding=pad, stride=c.stride)
        return cols.transpose(1, 2)

    def stats(
        self,
        x: torch.Tensor,
        gf: torch.Tensor,
        gl: torch.Tensor,
        extra: object,
        dtype: torch.dtype,
        reduction: str,
    ) -> list[BlockStats]:
        if x.dim() == self.unbatched_dim:
            x, gf, gl = (
                x.unsqueeze(0),
                gf.unsqueeze(0),
                (gf.unsqueeze(0) if gl is gf else gl.unsqueeze(0)),
            )
        b = x.shape[0]
        cols = self.patches(x.to(dtype))
        groups, bias = self.conv.groups, self.conv.bias is not None
        k = cols.shape[-1] // groups
        out = gf.shape[1] // groups
        f = gf.to(dtype).flatten(2).transpose(1, 2)
        lo = f if gl is gf else gl.to(dtype).flatten(2).transpose(1, 2)
        stats: list[BlockStats] = []
        for grp in range(groups):
            a = with_ones(cols[:, :, grp * k : (grp + 1) * k], bias, dtype)
            gs = slice(grp * out, (grp + 1) * out)
            g = f[:, :, gs].contiguous()
            g_loss = g if lo is f else lo[:, :, gs].contiguous()
            scale = fisher_scale(b, reduction)
            stats.append(KronStats(batch_size=b, fisher_scale=scale, g=g, g_loss=g_loss, a=a))
        return stats


class Conv1dSite(Conv2dSite):
    """KFC for `nn.Conv1d`: its input [B, C, L] as a [B, C, 1, L] image, kernel (1, k)."""

    unbatched_dim = 2

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """Unfolded input patches [B, L_out, C*k] (channel-major, like `weight.view(out, -1)`)."""
        c = self.conv
        pad: tuple[int, ...]
        if isinstance(c.padding, str) or c.padding_mode != "zeros":
            mode = "constant" if c.padding_mode == "zeros" else c.padding_mode
            x = F.pad(x, c._reversed_padding_repeated_twice, mode=mode)
            pad = (0,)
        else:
            pad = c.padding
        cols = F.unfold(
            x.unsqueeze(2),
            (1, c.kernel_size[0]),
            dilation=(1, c.dilation[0]),
            padding=(0, pad[0]),
            stride=(1, c.stride[0]),
        )
        return cols.transpose(1, 2)


class EmbeddingSite(Site):
    """One-hot inputs: A is the diagonal of token frequencies."""

    def __init__(self, padding_idx: int | None) -> None:
        super().__init__()
        self.padding_idx = padding_idx

    def stats(
        self,
        x: torch.Tensor,
        gf: torch.Tensor,
        gl: torch.Tensor,
        extra: object,
        dtype: torch.dtype,
        reduction: str,
    ) -> list[BlockStats]:
        b = x.shape[0] if x.dim() > 1 else 1
        ids = x.reshape(b, -1)
        g, g_loss = _grads(gf, gl, (b, ids.shape[1], gf.shape[-1]), dtype)
        if self.padding_idx is not None:  # torch gives the padding row no gradient
            keep = (ids != self.padding_idx).unsqueeze(-1).to(dtype)
            g = g * keep
            g_loss = g if g_loss is g else g_loss * keep
        scale = fisher_scale(b, reduction)
        return [EmbeddingStats(batch_size=b, fisher_scale=scale, g=g, g_loss=g_loss, ids=ids)]


class NormSite(Site):
    """Normalization layers: per-sample gradients of the affine weight and bias, elementwise."""

    def __init__(self, norm: NormLayer) -> None:
        super().__init__()
        self.norm = norm

    def normalized(self, x: torch.Tensor, batch_stats: bool) -> tuple[torch.Tensor, int]:
        """(x-hat laid out [B, positions, C], C) without the affine part."""
        m = self.norm
        if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            shape = tuple(m.normalized_shape)
            xh = (
                F.layer_norm(x, shape, None, None, m.eps)
                if isinstance(m, nn.LayerNorm)
                else F.rms_norm(x, shape, None, m.eps)
            )
            c = math.prod(shape)
            b = x.shape[0] if x.dim() > len(shape) else 1
            return xh.reshape(b, -1, c), c
        if isinstance(m, nn.GroupNorm):
            xh = F.group_norm(x, m.num_groups, None, None, m.eps)
        else:
            xh = F.batch_norm(
                x,
                None if batch_stats else m.running_mean,
                None if batch_stats else m.running_var,
                None,
                None,
                batch_stats,
                0.0,
                m.eps,
            )
        c = x.shape[1]
        return xh.reshape(x.shape[0], c, -1).transpose(1, 2), c

    def stats(
        self,
        x: torch.Tensor,
        gf: torch.Tensor,
        gl: torch.Tensor,
        extra: object,
        dtype: torch.dtype,
        reduction: str,
    ) -> list[BlockStats]:
        xh, c = self.normalized(x.to(dtype), bool(extra))
        b = xh.shape[0]
        if isinstance(self.norm, (nn.LayerNorm, nn.RMSNorm)):
            g = gf.to(dtype).reshape(b, -1, c)
        else:
            g = gf.to(dtype).reshape(b, c, -1).transpose(1, 2)
        parts = [(g * xh).sum(1)]
        if getattr(self.norm, "bias", None) is not None:
            parts.append(g.sum(1))
        psg = torch.cat(parts, 1).unsqueeze(1)
        return [ElementwiseStats(batch_size=b, fisher_scale=fisher_scale(b, reduction), psg=psg)]


def _batch_stats(m: nn.Module) -> bool:
    """Whether a batch norm normalizes with the batch's own statistics in this forward."""
    return bool(
        m.training
        or (getattr(m, "running_mean", None) is None and getattr(m, "running_var", None) is None)
    )


class Rule:
    """One supported module: its blocks, its sites, and its hooks.

    Attributes:
        name: the module's qualified name.
        module: the module.
        blocks: its blocks (local order).
        sites: its capture sites; `site_blocks[i]` lists the local blocks site i feeds.
    """

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name, self.module = name, module
        self.blocks: list[Block] = []
        self.sites: list[Site] = []
        self.site_blocks: list[list[int]] = []

    @property
    def label(self) -> str:
        """`name (ClassName)` for messages."""
        return f"{self.name or '<root>'} ({type(self.module).__name__})"

    def params(self) -> list[torch.Tensor]:
        """The parameters the blocks cover."""
        out: list[torch.Tensor] = []
        for blk in self.blocks:
            for p in (blk.weight, blk.bias):
                if p is not None and all(p is not q for q in out):
                    out.append(p)
        return out

    def install(self, observer: Observer, site_ids: list[int]) -> list[RemovableHandle]:
        """Registers a forward hook that reports the module's input and output when recording."""
        sid = site_ids[0]
        extra: Callable[[nn.Module], object] = (
            _batch_stats
            if isinstance(self.module, nn.modules.batchnorm._BatchNorm)
            else lambda _m: None
        )

        def hook(module: nn.Module, args: tuple[object, ...], output: object) -> None:
            if observer.recording and torch.is_grad_enabled() and args:
                x = args[0]
                if isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor):
                    observer.observe(sid, x, output, extra(module))

        return [self.module.register_forward_hook(hook)]


def _trainable(p: object) -> torch.Tensor | None:
    """`p` if it is a parameter that requires grad, else None."""
    return p if isinstance(p, torch.Tensor) and p.requires_grad else None


def linear_rule(name: str, m: nn.Linear) -> Rule:
    """`nn.Linear`: one block [out, in (+1)]."""
    r = Rule(name, m)
    bias = _trainable(m.bias)
    r.blocks = [
        Block(
            BlockSpec(name, "kron", m.out_features, m.in_features + (bias is not None)),
            m.weight,
            bias,
        )
    ]
    r.sites, r.site_blocks = [LinearSite(bias is not None)], [[0]]
    return r


def conv2d_rule(name: str, m: nn.Conv2d | nn.Conv1d) -> Rule:
    """`nn.Conv2d` / `nn.Conv1d`: one block per group, [out/groups, in/groups*kh*kw (+1)]."""
    r = Rule(name, m)
    bias = _trainable(m.bias)
    og = m.out_channels // m.groups
    k = (m.in_channels // m.groups) * math.prod(m.kernel_size)
    for g in range(m.groups):
        rows = slice(g * og, (g + 1) * og) if m.groups > 1 else None
        suffix = f".g{g}" if m.groups > 1 else ""
        r.blocks.append(
            Block(
                BlockSpec(name + suffix, "kron", og, k + (bias is not None)),
                m.weight,
                bias,
                rows,
                rows,
            )
        )
    site = Conv1dSite(m) if isinstance(m, nn.Conv1d) else Conv2dSite(m)
    r.sites, r.site_blocks = [site], [list(range(m.groups))]
    return r


def embedding_rule(name: str, m: nn.Embedding) -> Rule:
    """`nn.Embedding`: one block [dim, vocabulary] with a diagonal A."""
    r = Rule(name, m)
    r.blocks = [
        Block(
            BlockSpec(name, "embedding", m.embedding_dim, m.num_embeddings),
            m.weight,
            transpose=True,
        )
    ]
    r.sites, r.site_blocks = [EmbeddingSite(m.padding_idx)], [[0]]
    return r


def norm_rule(name: str, m: NormLayer) -> Rule:
    """Normalization layers: one elementwise block holding the weight (and bias)."""
    r = Rule(name, m)
    weight = m.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{r.label}: 'weight' must be a parameter, got {type(weight).__name__}")
    bias = _trainable(getattr(m, "bias", None))
    n = weight.numel() + (bias.numel() if bias is not None else 0)
    r.blocks = [Block(BlockSpec(name, "elementwise", 1, n), weight, bias)]
    r.sites, r.site_blocks = [NormSite(m)], [[0]]
    return r


def unsupported_reason(m: nn.Module) -> str | None:
    """Why a module of a supported type still cannot be handled (None if it can)."""
    if isinstance(m, nn.Embedding) and (m.sparse or m.scale_grad_by_freq):
        return "sparse or scale_grad_by_freq embedding"
    weight = getattr(m, "weight", None)
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return "uninitialized lazy module"
    if weight is None:
        return "no weight"
    if (
        isinstance(m, NORM_TYPES)
        and getattr(m, "bias", None) is not None
        and m.bias.requires_grad != weight.requires_grad
    ):
        return "weight and bias differ in requires_grad"
    return None


def rule_for(name: str, m: nn.Module) -> Rule | None:
    """The rule of a supported module, or None for an unsupported type."""
    if isinstance(m, nn.Linear):
        return linear_rule(name, m)
    if isinstance(m, (nn.Conv2d, nn.Conv1d)):
        return conv2d_rule(name, m)
    if isinstance(m, nn.Embedding):
        return embedding_rule(name, m)
    if isinstance(m, NORM_TYPES):
        return norm_rule(name, m)
    return None
