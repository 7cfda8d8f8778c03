"""LoRA (docs/methods.md section 4): ``W + (alpha / r) * B @ A`` on chosen linear layers of a model,
B = 0 at start (the patched model equals the original). While training, the low-rank path runs beside the
frozen layer (``F.linear(x, W, b) + s * (x @ A^T) @ B^T``): the merged weight is never built. ``merge``
folds it in for inference and ``unmerge`` takes it out again.

Stacking (fastvlm/tuners/common.py): LoRA adds beside whatever it wraps, so it goes on top of the site's
chain; it merges once every layer under it is merged.

Targets: the roles ``attn_in`` (open_clip: the packed QKV ``in_proj_weight`` of ``nn.MultiheadAttention``;
transformers: ``q_proj``, ``k_proj``, ``v_proj``; timm: the fused ``qkv``), ``attn_out``, ``mlp_fc``,
``mlp_proj`` in the blocks of ``towers`` (the presets of fastvlm/tuners/targets.py), or any ``nn.Linear`` /
``nn.MultiheadAttention`` that ``target_modules`` names.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import LINEAR_TYPES, TunerLayer, WrapsLinear, attach, merge, standalone_base, unmerge
from .targets import LINEAR_SITES, preset_targets, select

TARGETS = ("attn_in", "attn_out", "mlp_fc", "mlp_proj")


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple = ("attn_in", "attn_out")
    towers: tuple = ("visual",)
    seed: int = 0  # A is Kaiming-uniform from this seed (as peft); B starts at 0
    #: names / suffixes or a regular expression (fastvlm/tuners/targets.py); None: the preset of targets/towers
    target_modules: tuple | str | None = None


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

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int = 8, alpha: float = 16.0, seed: int = 0, freeze: bool = True):
        """LoRA beside ``linear`` (held by reference, its weight not copied), A Kaiming-uniform from ``seed``,
        B = 0; ``freeze`` turns off the linear's own gradients, so only A and B train."""
        base = standalone_base(linear, LINEAR_TYPES, "linear", freeze)
        return cls(base, LoRAConfig(rank=rank, alpha=alpha, seed=seed), torch.Generator().manual_seed(seed))

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


def apply_lora(model: nn.Module, config: LoRAConfig | None = None, target_modules=None) -> nn.Module:
    """Put LoRA on the sites of ``config`` (``target_modules``, when given, replaces its targets); only tuner
    parameters train. Everything is checked before anything is patched. Returns the model."""
    cfg = config or LoRAConfig()
    if target_modules is not None:
        cfg = dataclasses.replace(cfg, target_modules=target_modules)
    bad = [t for t in cfg.targets if t not in TARGETS]
    if bad or not cfg.targets:
        raise ValueError(f"targets must be a non-empty subset of {TARGETS}, got {cfg.targets}")
    sites = select(model, cfg.target_modules, lambda: preset_targets(model, cfg.targets, cfg.towers, "apply_lora"),
                   LINEAR_SITES, "apply_lora")
    g = torch.Generator().manual_seed(cfg.seed)

    def patch():
        for site in sites:  # in order: each site's A comes from the next draws of g
            site.wrap(lambda m: LoRALinear(m, cfg, g))

    attach(model, patch, "lora", cfg)
    return model


def merge_lora(model):
    """W <- W + (alpha/r) B A in every LoRA layer (inference at no extra cost)."""
    return merge(model, "lora")


def unmerge_lora(model):
    return unmerge(model, "lora")
