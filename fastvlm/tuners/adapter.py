"""Adapters (docs/methods.md section 4): ``h + s * up(act(down(h)))`` on the attention and/or MLP branch output
of each block of a ViT, ``up`` = 0 at start (the patched model equals the original).

In open_clip's block, ``x = x + ls_1(attn(ln_1(x)))`` and ``x = x + ls_2(mlp(ln_2(x)))``: the adapter wraps
``ls_1`` / ``ls_2`` (LayerScale or Identity), so it acts on each branch's output before the residual add.
timm's block is the same with ``ls1`` / ``ls2``; a transformers CLIP/SigLIP layer adds ``self_attn(...)``
(whose first output is the branch) and ``mlp(...)`` to its residual, so the adapter wraps those two. The
attribute names per architecture are the ``branches`` of fastvlm/tuners/targets.py. Adapters are nonlinear
(GELU) and cannot be merged into a weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._attention import route_attention
from .common import TunerLayer, attach, recompute_towers
from .targets import OPEN_CLIP, require_architecture


@dataclass
class AdapterConfig:
    bottleneck: int = 64
    scale: float = 1.0
    where: tuple = ("attn", "mlp")
    towers: tuple = ("visual",)
    seed: int = 0  # down is Kaiming-uniform from this seed; up starts at 0
    recompute: bool = False  # recompute each tuned block's activations in backward (open_clip's checkpointing)


class Adapter(TunerLayer, nn.Module):
    """``h + s * up(act(down(h)))`` with ``h = inner(...)``, the branch output (when ``inner`` returns a tuple,
    as transformers' attention does, its first element; the rest passes through)."""

    kind = "adapter"
    wraps = "inner"
    merge_note = "an adapter is nonlinear (GELU): it has no weight to fold into"

    def __init__(self, inner: nn.Module, dim: int, cfg: AdapterConfig, generator: torch.Generator, device=None):
        super().__init__()
        if cfg.bottleneck < 1:
            raise ValueError(f"bottleneck must be >= 1, got {cfg.bottleneck}")
        self.inner, self.config = inner, cfg
        self.bypass = False
        self.down = nn.Linear(dim, cfg.bottleneck, device=device)
        self.up = nn.Linear(cfg.bottleneck, dim, device=device)
        with torch.no_grad():
            bound = 1.0 / dim**0.5
            self.down.weight.uniform_(-bound, bound, generator=generator)
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()
        self.act = nn.GELU()
        self.scale = cfg.scale

    def forward(self, *args, **kwargs):
        h = self.inner(*args, **kwargs)
        if self.bypass:
            return h
        if isinstance(h, tuple):
            return (self._adapt(h[0]),) + h[1:]
        return self._adapt(h)

    def _adapt(self, h):
        return h + self.scale * self.up(self.act(self.down(h)))


def apply_adapters(model: nn.Module, config: AdapterConfig | None = None) -> nn.Module:
    cfg = config or AdapterConfig()
    if not cfg.where or any(w not in ("attn", "mlp") for w in cfg.where):
        raise ValueError(f"where must be a non-empty subset of ('attn', 'mlp'), got {cfg.where}")
    arch = require_architecture(model, "apply_adapters")
    blocks = arch.blocks(model, cfg.towers)
    if cfg.recompute and arch not in OPEN_CLIP:
        raise ValueError("apply_adapters: recompute=True uses open_clip's block checkpointing: open_clip models only")
    attn_branch, mlp_branch = arch.branches
    g = torch.Generator().manual_seed(cfg.seed)

    def patch():
        route_attention(blocks)
        if cfg.recompute:
            recompute_towers(model, cfg.towers)
        for _, blk in blocks:
            norm = getattr(blk, arch.norm)
            dim, dev = norm.normalized_shape[0], norm.weight.device
            if "attn" in cfg.where:
                setattr(blk, attn_branch, Adapter(getattr(blk, attn_branch), dim, cfg, g, dev))
            if "mlp" in cfg.where:
                setattr(blk, mlp_branch, Adapter(getattr(blk, mlp_branch), dim, cfg, g, dev))

    attach(model, patch, "adapter", cfg)
    return model
