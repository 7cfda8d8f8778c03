"""``nn.MultiheadAttention`` with pluggable input and output projections, for tuners that change them
(masks, LoRA). It keeps the original module's parameters (no copies) and computes exactly what open_clip's
``self.attn(q, k, v, need_weights=False, attn_mask=...)`` does for self-attention, through
``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectedMultiheadAttention(nn.Module):
    """Self-attention of a wrapped ``nn.MultiheadAttention``; subclasses override :meth:`in_proj` and
    :meth:`out_proj_fn`. The original module stays reachable as ``.mha`` (its parameters are shared)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise ValueError("only attention with a packed in_proj_weight (q, k, v of one width) can be patched")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("attention with bias_k/bias_v or add_zero_attn cannot be patched")
        self.mha = mha
        self.embed_dim, self.num_heads, self.batch_first = mha.embed_dim, mha.num_heads, mha.batch_first

    def in_proj(self, x: torch.Tensor) -> torch.Tensor:  # [.., D] -> [.., 3D]
        return F.linear(x, self.mha.in_proj_weight, self.mha.in_proj_bias)

    def out_proj_fn(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha.out_proj(x)

    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("patched attention supports self-attention only (query is key is value)")
        if need_weights:
            raise ValueError("patched attention does not return attention weights (need_weights=False)")
        x = query if self.batch_first else query.transpose(0, 1)  # [B, L, D]
        B, L, D = x.shape
        H = self.num_heads
        q, k, v = self.in_proj(x).view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)  # each [B, H, L, d]
        mask = _merge_masks(attn_mask, key_padding_mask, B, H, L, x.dtype)
        drop = self.mha.dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, is_causal=is_causal and mask is None)
        o = self.out_proj_fn(o.transpose(1, 2).reshape(B, L, D))
        return (o if self.batch_first else o.transpose(0, 1)), None


def _merge_masks(attn_mask, key_padding_mask, B, H, L, dtype):
    """MultiheadAttention's masks (bool: True = masked out; float: additive) as one additive SDPA mask."""
    mask = None
    if attn_mask is not None:
        m = attn_mask
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, float("-inf"))
        m = m.to(dtype)
        mask = m.view(B, H, L, L) if m.dim() == 3 else m
    if key_padding_mask is not None:
        k = key_padding_mask
        if k.dtype == torch.bool:
            k = torch.zeros(k.shape, dtype=dtype, device=k.device).masked_fill_(k, float("-inf"))
        k = k.to(dtype).view(B, 1, 1, L)
        mask = k if mask is None else mask + k
    return mask


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Set the submodule at dotted path ``name`` of ``root`` to ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
