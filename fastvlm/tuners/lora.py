"""LoRA (docs/methods.md section 4): ``W + (alpha / r) * B @ A`` on chosen linear layers of an open_clip ViT,
B = 0 at start (the patched model equals the original). While training, the low-rank path runs beside the
frozen layer (``F.linear(x, W, b) + s * (x @ A^T) @ B^T``): the merged weight is never built. ``merge``
folds it in for inference and ``unmerge`` takes it out again.

Stacking (fastvlm/tuners/common.py): LoRA adds beside whatever it wraps, so it goes on top of the site's
chain; it merges once every layer under it is merged.

Targets: ``attn_in`` (the packed QKV ``in_proj_weight`` of ``nn.MultiheadAttention``), ``attn_out``,
``mlp_fc``, ``mlp_proj``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._attention import patched_attention
from .common import TunerLayer, WrapsLinear, attach, blocks_of, merge, unmerge, wrap_site

TARGETS = ("attn_in", "attn_out", "mlp_fc", "mlp_proj")


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple = ("attn_in", "attn_out")
    towers: tuple = ("visual",)
    seed: int = 0  # A is Kaiming-uniform from this seed (as peft); B starts at 0


class LoRAPair(nn.Module):
    """The low-rank factors of one weight [N, K]: A [r, K], B [N, r]; delta = (alpha / r) * B @ A."""

    def __init__(self, n_out: int, n_in: int, cfg: LoRAConfig, generator: torch.Generator, device=None):
        super().__init__()
        if cfg.rank < 1:
            raise ValueError(f"rank must be >= 1, got {cfg.rank}")
        self.scale = cfg.alpha / cfg.rank
        a = torch.empty(cfg.rank, n_in)
        bound = 1.0 / math.sqrt(n_in)  # kaiming_uniform_(a=sqrt(5)) as nn.Linear / peft
        a.uniform_(-bound, bound, generator=generator)
        self.A = nn.Parameter(a.to(device))
        self.B = nn.Parameter(torch.zeros(n_out, cfg.rank, device=device))
        self.merged = False

    def forward(self, x):  # the low-rank path alone
        return F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype)) * self.scale

    def delta(self):
        return (self.B @ self.A) * self.scale


class LoRALinear(WrapsLinear, TunerLayer, nn.Module):
    """``inner(x) + (alpha / r) * (x A^T) B^T`` beside any linear module ``base`` (additive: wraps anything)."""

    kind = "lora"

    def __init__(self, base: nn.Module, cfg: LoRAConfig, generator):
        super().__init__()
        self.base, self.config = base, cfg
        self.bypass = self.merged = False
        self.lora = LoRAPair(self.out_features, self.in_features, cfg, generator, self.weight.device)

    def forward(self, x):
        self._check_bypass()
        y = self.base(x)
        return y if (self.merged or self.bypass) else y + self.lora(x)

    @torch.no_grad()
    def merge(self):
        """``W <- W + (alpha/r) B A`` (valid once every layer under it on the site is merged)."""
        if not self.merged:
            self._check_can_merge()
            w = self.weight
            w.add_(self.lora.delta().to(w.dtype))
            self._push_merge()
            self.lora.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self._pop_merge()
            w = self.weight
            w.sub_(self.lora.delta().to(w.dtype))
            self.lora.merged = False


def apply_lora(model: nn.Module, config: LoRAConfig | None = None) -> nn.Module:
    """Put LoRA on the targets of every block of the towers; only tuner parameters train. Returns the model."""
    cfg = config or LoRAConfig()
    bad = [t for t in cfg.targets if t not in TARGETS]
    if bad or not cfg.targets:
        raise ValueError(f"targets must be a non-empty subset of {TARGETS}, got {cfg.targets}")
    g = torch.Generator().manual_seed(cfg.seed)
    blocks = blocks_of(model, cfg.towers)

    def patch():
        for _, blk in blocks:
            if "attn_in" in cfg.targets or "attn_out" in cfg.targets:
                attn = patched_attention(blk)
                if "attn_in" in cfg.targets:
                    wrap_site(attn, "in_proj", lambda m: LoRALinear(m, cfg, g))
                if "attn_out" in cfg.targets:
                    wrap_site(attn, "out_proj", lambda m: LoRALinear(m, cfg, g))
            if "mlp_fc" in cfg.targets:
                wrap_site(blk.mlp, "c_fc", lambda m: LoRALinear(m, cfg, g))
            if "mlp_proj" in cfg.targets:
                wrap_site(blk.mlp, "c_proj", lambda m: LoRALinear(m, cfg, g))

    attach(model, patch, "lora", cfg)
    return model


def merge_lora(model):
    """W <- W + (alpha/r) B A in every LoRA layer (inference at no extra cost)."""
    return merge(model, "lora")


def unmerge_lora(model):
    return unmerge(model, "lora")
