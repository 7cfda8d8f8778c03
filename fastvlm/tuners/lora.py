"""LoRA (METHODS.md section 4): ``W + (alpha / r) * B @ A`` on chosen linear layers of an open_clip ViT,
B = 0 at start (the patched model equals the original). While training, the low-rank path runs beside the
frozen layer (``F.linear(x, W, b) + s * (x @ A^T) @ B^T``): the merged weight is never built. ``merge``
folds it in for inference and ``unmerge`` takes it out again.

Targets: ``attn_in`` (the packed QKV ``in_proj_weight`` of ``nn.MultiheadAttention``), ``attn_out``,
``mlp_fc``, ``mlp_proj``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._attention import ProjectedMultiheadAttention
from .common import WrapsLinear, blocks_of

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


class LoRALinear(WrapsLinear, nn.Module):
    def __init__(self, base: nn.Linear, cfg: LoRAConfig, generator):
        super().__init__()
        self.base = base
        self.lora = LoRAPair(base.out_features, base.in_features, cfg, generator, base.weight.device)

    def forward(self, x):
        y = self.base(x)
        return y if self.lora.merged else y + self.lora(x)

    def pairs(self):
        return [("", self.base.weight, self.lora)]


class LoRAAttention(ProjectedMultiheadAttention):
    def __init__(self, mha: nn.MultiheadAttention, cfg: LoRAConfig, generator):
        super().__init__(mha)
        D = mha.embed_dim
        dev = mha.in_proj_weight.device
        self.lora_in = LoRAPair(3 * D, D, cfg, generator, dev) if "attn_in" in cfg.targets else None
        self.lora_out = LoRAPair(D, D, cfg, generator, dev) if "attn_out" in cfg.targets else None

    def in_proj(self, x):
        y = super().in_proj(x)
        return y if self.lora_in is None or self.lora_in.merged else y + self.lora_in(x)

    def out_proj_fn(self, x):
        y = super().out_proj_fn(x)
        return y if self.lora_out is None or self.lora_out.merged else y + self.lora_out(x)

    def pairs(self):
        out = []
        if self.lora_in is not None:
            out.append(("in", self.mha.in_proj_weight, self.lora_in))
        if self.lora_out is not None:
            out.append(("out", self.mha.out_proj.weight, self.lora_out))
        return out


def apply_lora(model: nn.Module, config: LoRAConfig | None = None) -> nn.Module:
    cfg = config or LoRAConfig()
    bad = [t for t in cfg.targets if t not in TARGETS]
    if bad or not cfg.targets:
        raise ValueError(f"targets must be a non-empty subset of {TARGETS}, got {cfg.targets}")
    g = torch.Generator().manual_seed(cfg.seed)
    for _, blk in blocks_of(model, cfg.towers):
        if "attn_in" in cfg.targets or "attn_out" in cfg.targets:
            blk.attn = LoRAAttention(blk.attn, cfg, g)
        if "mlp_fc" in cfg.targets:
            blk.mlp.c_fc = LoRALinear(blk.mlp.c_fc, cfg, g)
        if "mlp_proj" in cfg.targets:
            blk.mlp.c_proj = LoRALinear(blk.mlp.c_proj, cfg, g)
    return model


def _pairs(model):
    return [(w, p) for m in model.modules() if isinstance(m, (LoRALinear, LoRAAttention)) for _, w, p in m.pairs()]


@torch.no_grad()
def merge_lora(model):
    """W <- W + (alpha/r) B A in every LoRA layer (inference at no extra cost)."""
    for w, p in _pairs(model):
        if not p.merged:
            w.add_(p.delta().to(w.dtype))
            p.merged = True
    return model


@torch.no_grad()
def unmerge_lora(model):
    for w, p in _pairs(model):
        if p.merged:
            w.sub_(p.delta().to(w.dtype))
            p.merged = False
    return model
