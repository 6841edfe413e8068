"""`nn.MultiheadAttention`: its q/k/v in-projections and its functionally called out_proj.

`nn.MultiheadAttention.forward` applies the in-projection and `out_proj` inside
`F.multi_head_attention_forward`, so no module hook ever sees their inputs or output gradients
(`out_proj`'s own hooks never fire). When recording, a forward hook recomputes the attention with
the four projections as explicit `F.linear` calls whose inputs are recorded and whose outputs get
gradient hooks, and returns that recomputation as the module's output (identical values; the core
is `F.multi_head_attention_forward` itself with identity projections, so masks, dropout, bias_k/v,
add_zero_attn and the returned attention weights behave exactly as in torch). When not recording
the hook returns at once and the module runs untouched.

Blocks: `<name>.q`, `<name>.k`, `<name>.v` (rows of `in_proj_weight`, or the separate
`q/k/v_proj_weight`, with the matching slices of `in_proj_bias`) and `<name>.out_proj`.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from fedng.curvature.blocks import Block
from fedng.curvature.layers import LinearSite, Observer, Rule, _trainable
from fedng.curvature.spec import BlockSpec

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


class AttentionRule(Rule):
    """Rule for `nn.MultiheadAttention` (4 blocks, 4 sites: q, k, v, out_proj)."""

    def __init__(self, name: str, m: nn.MultiheadAttention) -> None:
        super().__init__(name, m)
        self.mha = m
        e = m.embed_dim
        in_bias = _trainable(m.in_proj_bias)
        out_bias = _trainable(m.out_proj.bias)
        for i, (tag, dim) in enumerate((("q", e), ("k", m.kdim), ("v", m.vdim))):
            rows = slice(i * e, (i + 1) * e)
            if m._qkv_same_embed_dim:
                weight, w_rows = m.in_proj_weight, rows
            else:
                weight, w_rows = getattr(m, f"{tag}_proj_weight"), None
            spec = BlockSpec(f"{name}.{tag}", "kron", e, dim + (in_bias is not None))
            self.blocks.append(Block(spec, weight, in_bias, w_rows, rows))
        self.blocks.append(
            Block(
                BlockSpec(f"{name}.out_proj", "kron", e, e + (out_bias is not None)),
                m.out_proj.weight,
                out_bias,
            )
        )
        self.sites = [LinearSite(in_bias is not None, batch_dim=1) for _ in range(3)]
        self.sites.append(LinearSite(out_bias is not None, batch_dim=1))
        self.site_blocks = [[0], [1], [2], [3]]
        self._eye: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def _identity(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (self.mha.embed_dim, dtype)
        if key not in self._eye or self._eye[key].device != device:
            self._eye[key] = torch.eye(self.mha.embed_dim, dtype=dtype, device=device)
        return self._eye[key]

    def _projection(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        blk = self.blocks[i]
        w = blk.weight if blk.w_rows is None else blk.weight[blk.w_rows]
        m = self.mha
        b = (
            None
            if m.in_proj_bias is None
            else m.in_proj_bias[i * m.embed_dim : (i + 1) * m.embed_dim]
        )
        return w, b

    def recompute(
        self,
        observer: Observer,
        site_ids: list[int],
        args: tuple[object, ...],
        kwargs: dict[str, object],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The module's forward with explicit, observed projections.

        Args:
            observer: where the four sites are reported.
            site_ids: the global ids of the q, k, v and out_proj sites.
            args: the positional arguments of the call.
            kwargs: the keyword arguments of the call.

        Returns:
            `(attn_output, attn_weights)` exactly as `nn.MultiheadAttention.forward` returns them.
        """
        m = self.mha
        bound = _SIGNATURE.bind(m, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        query, key, value = a["query"], a["key"], a["value"]
        batched = query.dim() == 3
        if m.batch_first and batched:
            query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        projected = []
        for i, x in enumerate((query, key, value)):
            w, b = self._projection(i)
            y = F.linear(x, w, b)
            observer.observe(site_ids[i], x, y)
            projected.append(y)
        q, k, v = projected
        eye = self._identity(q.dtype, q.device)
        core, weights = F.multi_head_attention_forward(
            q,
            k,
            v,
            m.embed_dim,
            m.num_heads,
            None,
            None,
            m.bias_k,
            m.bias_v,
            m.add_zero_attn,
            m.dropout,
            eye,
            None,
            training=m.training,
            key_padding_mask=a["key_padding_mask"],
            need_weights=a["need_weights"],
            attn_mask=a["attn_mask"],
            use_separate_proj_weight=True,
            q_proj_weight=eye,
            k_proj_weight=eye,
            v_proj_weight=eye,
            average_attn_weights=a["average_attn_weights"],
            is_causal=a["is_causal"],
        )
        out = F.linear(core, m.out_proj.weight, m.out_proj.bias)
        observer.observe(site_ids[3], core, out)
        if m.batch_first and batched:
            out = out.transpose(1, 0)
        return out, weights

    def install(self, observer: Observer, site_ids: list[int]) -> list[RemovableHandle]:
        """A forward hook that, when recording, replaces the output by the observed recompute."""

        def hook(
            module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object], output: object
        ) -> object:
            if not (observer.recording and torch.is_grad_enabled()):
                return None
            return self.recompute(observer, site_ids, args, kwargs)

        return [self.mha.register_forward_hook(hook, with_kwargs=True)]


def attention_reason(m: nn.MultiheadAttention) -> str | None:
    """Why an attention module cannot be handled (None if it can)."""
    trainable = [p.requires_grad for p in m.parameters(recurse=True)]
    if not all(trainable) and any(trainable):
        return "partly frozen attention"
    return None
