"""VPT (docs/methods.md section 4): n learnable prompt tokens in a ViT image encoder, inserted right after the
class token (after every prefix token: none in SigLIP, the class and register tokens in timm). Shallow: at
the first block's input only. Deep: at every block's input, replacing the previous block's prompt outputs.
The prompt tokens are removed after the last block, so the class-token (or average) pooling sees exactly
the tokens it saw before; they change the output through attention.

open_clip: :class:`PromptedTransformer` wraps the whole transformer (prompts ``visual.transformer.prompts``
[depth, n, D]). transformers CLIP/SigLIP and timm ViTs: :class:`PromptedBlock` wraps each block (prompts
``<block>.prompts`` [n, D], in the first block only when shallow), the first inserting, the last removing.
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
from .targets import OPEN_CLIP_VIT, require_architecture


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


class PromptedBlock(TunerLayer, nn.Module):
    """One block of a token sequence [B, L, D] (first argument) with prompts: before it, the block's own
    prompts [n, D] (None: none) go in after the ``prefix`` first tokens, inserted (``first``) or in place of
    the previous block's prompt outputs; after it (``last``) the n prompt tokens come out again. A block's
    tuple output (hidden states first) keeps its other elements."""

    kind = "vpt"
    wraps = "inner"
    merge_note = PromptedTransformer.merge_note

    def __init__(self, inner: nn.Module, prompts, tokens: int, prefix: int, first: bool, last: bool, cfg: VPTConfig):
        super().__init__()
        self.inner, self.config, self.n, self.prefix = inner, cfg, tokens, prefix
        self.first, self.last, self.bypass = first, last, False
        self.prompts = None if prompts is None else nn.Parameter(prompts)

    def forward(self, x, *args, **kwargs):
        if self.bypass:
            return self.inner(x, *args, **kwargs)
        k = self.prefix
        if self.prompts is not None:
            P = self.prompts.to(x.dtype).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :k], P, x[:, k if self.first else k + self.n:]], dim=1)
        y = self.inner(x, *args, **kwargs)
        if not self.last:
            return y
        h = y[0] if isinstance(y, tuple) else y
        h = torch.cat([h[:, :k], h[:, k + self.n:]], dim=1)
        return (h,) + y[1:] if isinstance(y, tuple) else h


def apply_vpt(model: nn.Module, config: VPTConfig | None = None) -> nn.Module:
    from open_clip.transformer import VisionTransformer

    cfg = config or VPTConfig()
    visual = getattr(model, "visual", None)
    if visual is None and require_architecture(model, "apply_vpt") is not OPEN_CLIP_VIT:
        return _apply_vpt_blocks(model, cfg)
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


def _apply_vpt_blocks(model: nn.Module, cfg: VPTConfig) -> nn.Module:
    """VPT through :class:`PromptedBlock` on the image tower's blocks of a transformers or timm ViT."""
    if cfg.tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {cfg.tokens}")
    arch = require_architecture(model, "apply_vpt")
    path = arch.towers(model, ("visual",))["visual"]
    seq = model.get_submodule(path)
    if any(isinstance(b, PromptedBlock) for b in seq):
        raise ValueError("apply_vpt: the image encoder already carries prompts")
    blocks = [b for _, b in arch.blocks(model, ("visual",))]
    norm = getattr(blocks[0], arch.norm)
    width, patch, prefix = norm.normalized_shape[0], arch.patch_size(model), arch.prefix_tokens(model)
    depth = len(blocks) if cfg.deep else 1
    v = math.sqrt(6.0 / (3 * patch * patch + width))  # the same draws as PromptedTransformer's [depth, n, D]
    p = torch.empty(depth, cfg.tokens, width).uniform_(-v, v, generator=torch.Generator().manual_seed(cfg.seed))
    p = p.to(norm.weight.device)

    def prompt():
        for i in range(len(seq)):
            seq[i] = PromptedBlock(seq[i], p[i].clone() if i < depth else None, cfg.tokens, prefix,
                                   first=i == 0, last=i == len(seq) - 1, cfg=cfg)

    attach(model, prompt, "vpt", cfg)
    return model
