"""Capture hooks: what they record must reproduce the gradients and the explicit per-layer math.

The central identity: for a Kronecker block, `sum_rows g_r a_r^T` over the recorded rows equals
the block's gradient exactly. It holds for every layer type only if inputs, patches, bias
columns, output gradients and tied uses are all captured right.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from fedng.curvature.capture import CurvatureCapture, UnsupportedLayerWarning
from fedng.curvature.stats import BlockStats
from torch import nn

F64 = torch.float64
TOL = {"rows": 1e-10, "fp32": 1e-5}


def run(model: nn.Module, *inputs: torch.Tensor, loss_fn=None) -> list[BlockStats | None]:
    """One recorded forward/backward; returns the capture's per-block stats."""
    cap = CurvatureCapture(model, dtype=F64)
    cap.recording = True
    model.zero_grad()
    out = model(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    loss = loss_fn(out) if loss_fn else out.square().sum() / out.shape[0]
    loss.backward()
    stats = cap.collect()
    run.cap = cap  # type: ignore[attr-defined]
    return stats


def assert_rows_match_grads(cap: CurvatureCapture, stats: list[BlockStats | None]) -> None:
    for blk, st in zip(cap.blocks, stats, strict=True):
        assert st is not None, f"block {blk.name} was not captured"
        grad = blk.grad_matrix(F64)
        if st.kind == "kron":
            rebuilt = st.g_rows().T @ st.a_rows()
        elif st.kind == "embedding":
            onehot = F.one_hot(st.ids.reshape(-1), blk.spec.n).to(F64)
            rebuilt = st.g_rows().T @ onehot
        else:
            rebuilt = st.psg.sum(0)
        torch.testing.assert_close(
            rebuilt, grad, rtol=TOL["rows"], atol=TOL["rows"], msg=f"block {blk.name}"
        )


@pytest.mark.parametrize("bias", [True, False])
def test_linear_sequence_rows_reproduce_grad(bias: bool) -> None:
    model = nn.Sequential(nn.Linear(5, 7, bias=bias), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(4, 6, 5, dtype=F64)  # [B, T, n]
    stats = run(model, x)
    cap = run.cap
    assert [b.spec.n for b in cap.blocks] == [5 + bias, 8]
    assert stats[0].batch_size == 4 and stats[0].a.shape == (4, 6, 5 + bias)
    if bias:
        assert torch.all(stats[0].a[..., -1] == 1)
    torch.testing.assert_close(stats[0].a[..., :5], x)
    assert_rows_match_grads(cap, stats)


def test_inplace_activation_after_layer() -> None:
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 2)).double()
    stats = run(model, torch.randn(9, 5, dtype=F64))
    assert_rows_match_grads(run.cap, stats)


@pytest.mark.parametrize("op", ["relu_", "add_"])
def test_inplace_op_after_a_layer_whose_output_is_a_view(op: str) -> None:
    """nn.Linear on [B, T, n] returns a view of its 2-D product; an in-place op after it takes
    the view's node out of the graph: the rows still match the per-sample gradients."""
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 2)).double()
    if op == "add_":
        model[1] = _AddInPlace()
    stats = run(model, torch.randn(4, 3, 5, dtype=F64))
    assert all(s.g is not None for s in stats) and len(stats) == 2
    assert_rows_match_grads(run.cap, stats)


class _AddInPlace(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.add_(1.0).tanh()


def explicit_patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """[B, L, C*kh*kw] patches by slicing a zero-padded input (no unfold)."""
    ph, pw = conv.padding
    xp = F.pad(x, (pw, pw, ph, ph))
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    oh = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    cols = []
    for i in range(oh):
        for j in range(ow):
            rows = slice(i * sh, i * sh + dh * (kh - 1) + 1, dh)
            cols_ = slice(j * sw, j * sw + dw * (kw - 1) + 1, dw)
            patch = xp[:, :, rows, cols_]
            cols.append(patch.reshape(x.shape[0], -1))
    return torch.stack(cols, 1)


@pytest.mark.parametrize(
    "cfg",
    [
        {"stride": 1, "padding": 1, "dilation": 1, "groups": 1, "bias": True},
        {"stride": 2, "padding": 0, "dilation": 2, "groups": 1, "bias": False},
        {"stride": 1, "padding": 1, "dilation": 1, "groups": 2, "bias": True},
    ],
)
def test_conv2d_patches_and_rows(cfg: dict[str, int]) -> None:
    conv = nn.Conv2d(4, 6, 3, **cfg).double()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).double()
    x = torch.randn(2, 4, 7, 8, dtype=F64)
    model(x)  # materialize the lazy layer
    stats = run(model, x)
    cap = run.cap
    groups = cfg["groups"]
    assert len([b for b in cap.blocks if b.owner == "0"]) == groups
    patches = explicit_patches(x, conv)
    k = patches.shape[-1] // groups
    for g in range(groups):
        torch.testing.assert_close(stats[g].a[..., :k], patches[..., g * k : (g + 1) * k])
    assert_rows_match_grads(cap, stats)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("mode", ["same", "reflect"])
def test_conv2d_padding_modes(mode: str) -> None:
    conv = (
        nn.Conv2d(3, 4, (3, 2), padding="same")
        if mode == "same"
        else nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    ).double()
    stats = run(conv, torch.randn(2, 3, 6, 5, dtype=F64))
    assert_rows_match_grads(run.cap, stats)


def test_embedding_rows_and_padding_idx() -> None:
    emb = nn.Embedding(11, 4, padding_idx=0).double()
    model = nn.Sequential(emb, nn.Tanh(), nn.Linear(4, 2)).double()
    ids = torch.tensor([[1, 0, 3, 3], [5, 10, 0, 1]])
    stats = run(model, ids)
    assert stats[0].kind == "embedding" and stats[0].ids.shape == (2, 4)
    assert_rows_match_grads(run.cap, stats)


def per_sample_grads(model: nn.Module, x: torch.Tensor, loss_fn) -> dict[str, torch.Tensor]:
    """torch.func per-sample gradients of `loss_fn(model(x_b))` (one sample at a time)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
        return loss_fn(torch.func.functional_call(model, p, (xb.unsqueeze(0),)))

    return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)


@pytest.mark.parametrize("norm", ["layer", "rms", "group", "batch_eval"])
def test_norm_per_sample_grads_match_torch_func(norm: str) -> None:
    layer = {
        "layer": nn.LayerNorm([3, 4]),
        "rms": nn.RMSNorm(4),
        "group": nn.GroupNorm(1, 3),
        "batch_eval": nn.BatchNorm2d(3),
    }[norm].double()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p))
    if norm == "batch_eval":
        layer.running_mean.copy_(torch.randn(3))
        layer.running_var.copy_(torch.rand(3) + 0.5)
        layer.eval()
    x = (
        torch.randn(5, 3, 4, 2, dtype=F64)
        if norm != "layer"
        else torch.randn(5, 2, 3, 4, dtype=F64)
    )
    if norm == "rms":
        x = torch.randn(5, 6, 4, dtype=F64)
    target = torch.randn_like(x[0])

    def loss_fn(out: torch.Tensor) -> torch.Tensor:
        return (out.squeeze(0).tanh() * target).sum()

    stats = run(layer, x, loss_fn=lambda out: (out.tanh() * target).sum())
    psg = per_sample_grads(layer, x, loss_fn)
    expected = torch.cat(
        [psg["weight"].reshape(5, -1)] + ([psg["bias"].reshape(5, -1)] if "bias" in psg else []), 1
    )
    torch.testing.assert_close(stats[0].psg[:, 0], expected)


def test_batchnorm_training_rows_sum_to_grad() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU()).double()
    stats = run(model, torch.randn(4, 2, 6, 6, dtype=F64))
    assert stats[1].kind == "elementwise"
    assert_rows_match_grads(run.cap, stats)


def attention_core(
    mha: nn.MultiheadAttention, q_in: torch.Tensor, kv_in: torch.Tensor
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V per head, batch-first [B, L, E], written out by hand."""
    e, h = mha.embed_dim, mha.num_heads
    w, b = mha.in_proj_weight, mha.in_proj_bias
    q, k, v = (
        t @ w[i * e : (i + 1) * e].T + b[i * e : (i + 1) * e]
        for i, t in enumerate((q_in, kv_in, kv_in))
    )
    bsz, lq, _ = q.shape
    split = lambda t: t.reshape(bsz, t.shape[1], h, e // h).transpose(1, 2)  # noqa: E731
    att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / (e // h) ** 0.5, -1)
    return (att @ split(v)).transpose(1, 2).reshape(bsz, lq, e)


class AttnModel(nn.Module):
    """Cross-attention block: query from x, keys/values from z."""

    def __init__(self, batch_first: bool, kdim: int | None = None) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.head = nn.Linear(8, 3)

    def forward(
        self, x: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not self.batch_first:
            x, z = x.transpose(0, 1), z.transpose(0, 1)
        out, _ = self.attn(x, z, z, key_padding_mask=mask, need_weights=mask is None)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(torch.tanh(out))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 5])
def test_attention_projections_and_functional_out_proj(batch_first: bool, kdim: int | None) -> None:
    model = AttnModel(batch_first, kdim).double()
    x = torch.randn(3, 4, 8, dtype=F64)
    z = torch.randn(3, 6, kdim or 8, dtype=F64)
    mask = torch.tensor([[False] * 6, [False] * 4 + [True] * 2, [False] * 5 + [True]])
    with torch.no_grad():
        reference = model(x, z, mask)
    stats = run(model, x, z, mask)
    cap = run.cap
    names = [b.name for b in cap.blocks]
    assert names == ["attn.q", "attn.k", "attn.v", "attn.out_proj", "head"]
    assert_rows_match_grads(cap, stats)
    assert stats[0].a.shape == (3, 4, 9) and stats[1].a.shape == (3, 6, (kdim or 8) + 1)
    with torch.no_grad():  # recording must not change what the model computes
        cap.recording = True
        torch.testing.assert_close(model(x, z, mask), reference)
        cap.recording = False


def test_attention_out_proj_input_is_the_attention_core() -> None:
    model = AttnModel(batch_first=True).double()
    x, z = torch.randn(2, 3, 8, dtype=F64), torch.randn(2, 5, 8, dtype=F64)
    stats = run(model, x, z)
    torch.testing.assert_close(stats[3].a[..., :8], attention_core(model.attn, x, z))
    torch.testing.assert_close(stats[0].a[..., :8], x)


class Functional(nn.Module):
    """Calls its second layer through F.linear: module hooks cannot see that use."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(self.a(x)), self.b.weight, self.b.bias)


def test_functional_call_is_not_captured() -> None:
    model = Functional().double()
    stats = run(model, torch.randn(6, 4, dtype=F64))
    assert [b.name for b in run.cap.blocks] == ["a", "b"]
    assert stats[0] is not None and stats[1] is None


class Tied(nn.Module):
    """One layer used twice, and two modules sharing one weight and bias."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.twin = nn.Linear(4, 4)
        self.twin.weight, self.twin.bias = self.shared.weight, self.shared.bias
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.shared(x))
        h = torch.tanh(self.shared(h))
        return self.out(torch.tanh(self.twin(h)))


def test_tied_weights_accumulate_over_uses() -> None:
    model = Tied().double()
    stats = run(model, torch.randn(5, 4, dtype=F64))
    cap = run.cap
    assert [b.name for b in cap.blocks] == ["shared", "out"]
    assert stats[0].a.shape == (5, 3, 5)  # three uses, each a row per sample
    assert_rows_match_grads(cap, stats)
    assert not cap.unsupported


class CrossTied(nn.Module):
    """An embedding tied to an output projection (different roles), plus unsupported layers."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.gru = nn.GRU(6, 6, batch_first=True)
        self.scale = nn.Parameter(torch.ones(6))
        self.proj = nn.Linear(6, 10, bias=False)
        self.proj.weight = self.emb.weight
        self.mid = nn.Linear(6, 6)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.gru(self.emb(ids))
        return self.proj(self.mid(h) * self.scale)


def test_unsupported_layers_one_warning_and_no_crash() -> None:
    model = CrossTied().double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cap = CurvatureCapture(model, dtype=F64)
    ours = [w for w in caught if issubclass(w.category, UnsupportedLayerWarning)]
    assert len(ours) == 1
    text = str(ours[0].message)
    for name in ("emb (Embedding)", "proj (Linear)", "gru (GRU)", "scale"):
        assert name in text, name
    assert [b.name for b in cap.blocks] == ["mid"]
    cap.recording = True
    model(torch.randint(0, 10, (3, 4))).sum().backward()
    stats = cap.collect()
    assert stats[0] is not None
    assert_rows_match_grads(cap, stats)


def test_partially_shared_parameters_are_left_out() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].weight = model[0].weight  # same weight, different biases
    with pytest.warns(UnsupportedLayerWarning, match="shares parameters"):
        cap = CurvatureCapture(model)
    assert cap.blocks == []


def test_not_recording_costs_nothing() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    cap = CurvatureCapture(model)
    out = model(torch.randn(2, 3))
    assert cap.num_records == 0
    hidden = model[0](torch.randn(2, 3))
    assert not hidden._backward_hooks  # no tensor hook attached
    out.sum().backward()
    assert cap.collect() == [None, None]
    cap.recording = True
    with torch.no_grad():
        model(torch.randn(2, 3))
    assert cap.num_records == 0  # nothing to backpropagate: nothing recorded


def test_autocast_bf16_stats_are_float32() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))
    cap = CurvatureCapture(model)
    cap.recording = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(4, 6))
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    stats = cap.collect()
    for st in stats:
        assert st.a.dtype == torch.float32 and st.g.dtype == torch.float32
    for blk, st in zip(cap.blocks, stats, strict=True):
        rebuilt = st.g_rows().T @ st.a_rows()
        grad = blk.grad_matrix(torch.float32)
        assert float((rebuilt - grad).abs().max()) <= 2e-2 * float(grad.abs().max())


def test_remove_detaches_hooks() -> None:
    model = nn.Linear(3, 2)
    cap = CurvatureCapture(model)
    cap.recording = True
    cap.remove()
    model(torch.randn(2, 3)).sum().backward()
    assert cap.num_records == 0


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize(
    "cfg",
    [
        {"stride": 1, "padding": 1, "dilation": 1, "groups": 1, "bias": True},
        {"stride": 2, "padding": 0, "dilation": 2, "groups": 1, "bias": False},
        {"stride": 1, "padding": 2, "dilation": 1, "groups": 2, "bias": True},
        {"padding": "same", "bias": True},
        {"padding": 1, "padding_mode": "reflect", "bias": True},
    ],
)
def test_conv1d_kfac_factors_match_torch_func(cfg: dict[str, object]) -> None:
    """Conv1d (KFC): per-sample gradients G_b^T A_b from the captured rows equal torch.func's,
    and the K-FAC factor A is the mean outer product of the explicitly sliced patches."""
    conv = nn.Conv1d(4, 6, 3, **cfg).double()  # type: ignore[arg-type]
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).double()
    x = torch.randn(3, 4, 9, dtype=F64)
    model(x)  # materialize the lazy layer
    target = torch.randn(3, dtype=F64)

    def loss_fn(out: torch.Tensor) -> torch.Tensor:  # a sum over samples: per-sample grads add up
        return (out.sum(-1) - target[: out.shape[0]]).square().sum() / 2

    stats = run(model, x, loss_fn=loss_fn)
    cap = run.cap
    groups = conv.groups
    assert len([b for b in cap.blocks if b.owner == "0"]) == groups
    assert_rows_match_grads(cap, stats)
    # torch.func per-sample gradients of the conv's weight and bias (one sample at a time)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p: dict[str, torch.Tensor], xb: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, p, (xb.unsqueeze(0),))
        return (out.sum(-1) - tb).square().sum() / 2

    psg = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, x, target)
    # explicit patches [B, L_out, C*k]: the (mode-)padded input sliced position by position
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        xp = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    else:
        xp = F.pad(x, (conv.padding[0], conv.padding[0]))
    (k,), (s,), (d,) = conv.kernel_size, conv.stride, conv.dilation
    lout = (xp.shape[2] - d * (k - 1) - 1) // s + 1
    patches = torch.stack(
        [xp[:, :, i * s : i * s + d * (k - 1) + 1 : d].reshape(3, -1) for i in range(lout)], 1
    )
    kk, og = patches.shape[-1] // groups, conv.out_channels // groups
    for g in range(groups):
        st = stats[g]
        a = patches[..., g * kk : (g + 1) * kk]
        if conv.bias is not None:
            a = torch.cat([a, torch.ones_like(a[..., :1])], -1)
        torch.testing.assert_close(st.a, a)
        kfac_a = st.a_rows().T @ st.a_rows() / st.rows
        torch.testing.assert_close(kfac_a, torch.einsum("bli,blj->ij", a, a) / (3 * lout))
        rows = slice(g * og, (g + 1) * og)
        want = psg["0.weight"][:, rows].reshape(3, og, -1)
        if conv.bias is not None:
            want = torch.cat([want, psg["0.bias"][:, rows].unsqueeze(-1)], -1)
        got = torch.einsum("blm,bln->bmn", st.g_loss, st.a)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
