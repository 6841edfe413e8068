"""The weighted mean of the clients' updates and the server step that applies it."""

from __future__ import annotations

import torch

from fedng._typing import Arrays
from fedng.federated.config.common import ServerConfig
from fedng.federated.messages import ClientUpdate, ServerState


def weights_of(updates: list[ClientUpdate]) -> list[float]:
    """Aggregation weights p_k = n_k / sum n (uniform if every n_k is 0)."""
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        return [1.0 / len(updates)] * len(updates)
    return [u.num_examples / total for u in updates]


def mean_delta(updates: list[ClientUpdate], key: str = "delta") -> Arrays:
    """sum_k p_k x_k in fp32 with p_k = n_k / sum n, for x = update.delta or update.extras."""
    ws = weights_of(updates)
    out: Arrays = {}
    for w, u in zip(ws, updates, strict=True):
        src = u.delta if key == "delta" else u.extras
        for k, v in src.items():
            out[k] = out[k] + w * v.float() if k in out else w * v.float()
    return out


def apply_server_step(state: ServerState[ServerConfig], step: Arrays) -> None:
    """theta += server_lr * (momentum buffer or step), heavy-ball momentum `server_momentum`.

    Args:
        state: the state to update in place (the caller's copy); momentum lives in `m/<param>`.
        step: the aggregated step per parameter.
    """
    cfg = state.config
    names = list(step)
    if not names:  # nothing to step (_foreach ops refuse an empty list)
        return
    params = [state.params[k] for k in names]
    ds = list(step.values())
    f32 = torch.float32
    if cfg.server_momentum <= 0 and all(t.dtype == f32 for t in (*params, *ds)):
        if cfg.server_lr != 1.0:  # `1.0 * d` is d exactly: skipped
            ds = list(torch._foreach_mul(ds, cfg.server_lr))
        # one dispatch for all parameters (small models are dispatch-bound): `p + lr * d`
        state.params.update(zip(names, torch._foreach_add(params, ds), strict=True))
        return
    for k, d in step.items():
        if cfg.server_momentum > 0:
            key = f"m/{k}"
            m = state.buffers.get(key)
            m = d.clone() if m is None else cfg.server_momentum * m + d
            state.buffers[key] = m
            d = m
        state.params[k] = state.params[k] + cfg.server_lr * d
