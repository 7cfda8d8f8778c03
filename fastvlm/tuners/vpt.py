"""VPT (docs/methods.md section 4): n learnable prompt tokens in an open_clip ViT image encoder, inserted right
after the class token. Shallow: at the first block's input only. Deep: at every block's input, replacing the
previous block's prompt outputs. The prompt tokens are removed after the last block, so the class-token
(or average) pooling sees exactly the tokens it saw before; they change the output through attention.

Prompts add tokens to the sequence, so they cannot be merged into any weight.

Init (seeded by ``seed``, as the VPT paper): uniform(-v, v) with v = sqrt(6 / (3 * patch^2 + width)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ._attention import route_attention
from .common import TunerLayer, attach, blocks_of


@dataclass
class VPTConfig:
    tokens: int = 10
    deep: bool = True
    seed: int = 0


class PromptedTransformer(TunerLayer, nn.Module):
    """Wraps an open_clip ``Transformer`` (input batch-first [B, L, D], class token first)."""

    kind = "vpt"
    wraps = "inner"
    merge_note = "prompts are extra tokens in the sequence, not a change of any weight"

    def __init__(self, inner: nn.Module, width: int, patch: int, cfg: VPTConfig, device=None):
        super().__init__()
        if cfg.tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {cfg.tokens}")
        self.inner, self.n, self.deep, self.config = inner, cfg.tokens, cfg.deep, cfg
        self.bypass = False
        depth = len(inner.resblocks) if cfg.deep else 1
        v = math.sqrt(6.0 / (3 * patch * patch + width))
        g = torch.Generator().manual_seed(cfg.seed)
        p = torch.empty(depth, cfg.tokens, width).uniform_(-v, v, generator=g)
        self.prompts = nn.Parameter(p.to(device))

    def __getattr__(self, name):  # width, batch_first, grad_checkpointing, resblocks... of the wrapped one
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)

    def _put(self, x, i):
        P = self.prompts[i].to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :1], P, x[:, 1 + self.n:]], dim=1)

    def forward(self, x, attn_mask=None):
        if attn_mask is not None:
            raise ValueError("VPT prompts do not support an attention mask in the image encoder")
        if self.bypass:
            return self.inner(x)
        x = torch.cat([x[:, :1], self.prompts[0].to(x.dtype).expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        bf = getattr(self.inner, "batch_first", True)
        for i, blk in enumerate(self.inner.resblocks):
            if i > 0 and self.deep:
                x = self._put(x, i)
            x = blk(x) if bf else blk(x.transpose(0, 1)).transpose(0, 1)
        return torch.cat([x[:, :1], x[:, 1 + self.n:]], dim=1)


def apply_vpt(model: nn.Module, config: VPTConfig | None = None) -> nn.Module:
    from open_clip.transformer import VisionTransformer

    cfg = config or VPTConfig()
    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"apply_vpt: cannot prompt an image encoder of type {type(visual).__name__}; "
                         "supported: open_clip VisionTransformer")
    width = visual.transformer.width
    patch = visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else visual.patch_size
    if isinstance(visual.transformer, PromptedTransformer):
        raise ValueError("apply_vpt: the image encoder already carries prompts")

    def prompt():
        route_attention(blocks_of(model, ("visual",)))
        visual.transformer = PromptedTransformer(visual.transformer, width, patch, cfg,
                                                 visual.class_embedding.device)

    attach(model, prompt, "vpt", cfg)
    return model
