"""Walks a model: finds the supported layers, merges tied ones, lists what cannot be handled."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from fedng.curvature.attention import AttentionRule, attention_reason
from fedng.curvature.blocks import Block
from fedng.curvature.layers import Rule, Site, rule_for, unsupported_reason


@dataclass
class Discovery:
    """What `discover` found.

    Attributes:
        rules: the supported modules, in module order.
        blocks: the curvature blocks (tied layers share one).
        sites: every capture site; `sites[i].blocks` are indices into `blocks`.
        site_ids: for each rule, the global ids of its sites.
        unsupported: `name (Type): reason` for each module or parameter left out.
    """

    rules: list[Rule] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)
    site_ids: list[list[int]] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)


def _block_key(b: Block) -> tuple[object, ...]:
    return (
        id(b.weight),
        id(b.bias),
        b.spec.kind,
        b.spec.m,
        b.spec.n,
        None if b.w_rows is None else (b.w_rows.start, b.w_rows.stop),
    )


def _candidates(model: nn.Module, unsupported: list[str]) -> list[Rule]:
    rules: list[Rule] = []
    owned: set[int] = set()  # modules whose parameters a parent rule handles (attention out_proj)
    for name, m in model.named_modules():
        if id(m) in owned:
            continue
        direct = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if isinstance(m, nn.MultiheadAttention):
            owned.update(id(c) for c in m.modules() if c is not m)
            if not any(p.requires_grad for p in m.parameters()):
                continue
            reason = attention_reason(m)
            if reason:
                unsupported.append(f"{name} (MultiheadAttention): {reason}")
                continue
            rules.append(AttentionRule(name, m))
            continue
        if not direct:
            continue
        rule = rule_for(name, m)
        reason = (
            unsupported_reason(m)
            if rule is not None
            else (
                "unsupported layer type (parameters: "
                + ", ".join(k for k, p in m.named_parameters(recurse=False) if p.requires_grad)
                + ")"
            )
        )
        if rule is None or reason:
            unsupported.append(f"{name or '<root>'} ({type(m).__name__}): {reason}")
            continue
        rules.append(rule)
    return rules


def discover(model: nn.Module) -> Discovery:
    """Finds the curvature blocks of `model` (any module tree, not only `nn.Sequential`).

    Tied parameters: layers of the same type that share exactly the same weight and bias (or the
    same module called several times) feed one block, whose statistics accumulate over every use.
    Parameters shared between layers that would need different blocks (e.g. an embedding tied to
    an output projection) are left out, and listed, because no single Kronecker block fits both.
    Trainable parameters that no block covers (unsupported layers, attention's bias_k/bias_v) are
    listed too; their gradients are left as they are.
    """
    found = Discovery()
    rules = _candidates(model, found.unsupported)
    users: dict[int, list[Rule]] = {}
    for r in rules:
        for p in r.params():
            users.setdefault(id(p), []).append(r)
    keys: dict[tuple[object, ...], int] = {}
    for r in rules:
        shared = [o for p in r.params() for o in users[id(p)] if o is not r]
        clash = [
            o
            for o in shared
            if {_block_key(b) for b in o.blocks} != {_block_key(b) for b in r.blocks}
            or type(o) is not type(r)
        ]
        if clash:
            found.unsupported.append(
                f"{r.label}: shares parameters with {clash[0].label} in a different role"
            )
            continue
        local = []
        for b in r.blocks:
            b.owner, b.owner_type = r.name, type(r.module)
            k = _block_key(b)
            if k not in keys:
                keys[k] = len(found.blocks)
                found.blocks.append(b)
            local.append(keys[k])
        ids = []
        for site, targets in zip(r.sites, r.site_blocks, strict=True):
            site.blocks = [local[t] for t in targets]
            ids.append(len(found.sites))
            found.sites.append(site)
        found.rules.append(r)
        found.site_ids.append(ids)
    covered = {id(b.weight) for b in found.blocks} | {id(b.bias) for b in found.blocks}
    for name, p in model.named_parameters():
        owner = name.rsplit(".", 1)[0] if "." in name else "<root>"
        if (
            p.requires_grad
            and id(p) not in covered
            and not any(u.startswith(owner + " ") for u in found.unsupported)
        ):
            found.unsupported.append(f"{name}: parameter not covered by any supported layer")
    return found
