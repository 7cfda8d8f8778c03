"""``nn.MultiheadAttention`` with its input and output projections as linear modules, the sites where
linear tuners (masks, rotations, LoRA) stack (see the stacking rule in fastvlm/tuners/common.py and
docs/tuners.md). It keeps the original module's parameters (no copies) and computes exactly what
open_clip's ``self.attn(q, k, v, need_weights=False, attn_mask=...)`` does for self-attention (and
cross-attention, as in SigLIP's pooling head), through ``F.scaled_dot_product_attention``. The wrapper is
made once per attention and shared by every tuner.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionView(nn.Module):
    """A linear module over parameters owned by an ``nn.MultiheadAttention``: ``which`` = "in" (the packed QKV
    ``in_proj_weight`` / ``in_proj_bias``) or "out" (``out_proj``). It registers no parameters (the attention
    wrapper owns ``mha``), so the model's parameter names and state dict stay those of the wrapper's ``mha``."""

    def __init__(self, mha: nn.MultiheadAttention, which: str):
        super().__init__()
        if which not in ("in", "out"):
            raise ValueError(f"which must be 'in' or 'out', got {which!r}")
        self.__dict__["_mha"] = mha  # a reference, not a submodule
        self.which = which

    @property
    def weight(self) -> torch.Tensor:
        m = self.__dict__["_mha"]
        return m.in_proj_weight if self.which == "in" else m.out_proj.weight

    @property
    def bias(self):
        m = self.__dict__["_mha"]
        return m.in_proj_bias if self.which == "in" else m.out_proj.bias

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"{self.which}_proj, in_features={self.in_features}, out_features={self.out_features}"


class ProjectedMultiheadAttention(nn.Module):
    """Self-attention of a wrapped ``nn.MultiheadAttention`` through the linear modules ``in_proj`` ([.., D] ->
    [.., 3D]) and ``out_proj``, which tuners wrap. The original module stays reachable as ``.mha``."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise ValueError("only attention with a packed in_proj_weight (q, k, v of one width) can be patched")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("attention with bias_k/bias_v or add_zero_attn cannot be patched")
        self.mha = mha
        self.in_proj = ProjectionView(mha, "in")
        self.out_proj = ProjectionView(mha, "out")
        self.embed_dim, self.num_heads, self.batch_first = mha.embed_dim, mha.num_heads, mha.batch_first

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, freeze: bool = True) -> "ProjectedMultiheadAttention":
        """The same attention (its parameters by reference) with ``in_proj`` / ``out_proj`` as linear modules a
        drop-in layer can replace: ``attn.in_proj = MaskedLinear.from_linear(attn.in_proj)`` and so on.
        ``freeze`` turns off the attention's own gradients (the projections own no parameters, so the layers
        put on them cannot)."""
        attn = cls(mha)
        if freeze:
            for p in mha.parameters():
                p.requires_grad_(False)
        return attn

    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        """Self-attention (``key`` and ``value`` None or the query itself): one ``in_proj`` of the query, split
        into q, k, v. Cross-attention (a pooling head's probe over the tokens): ``in_proj`` of each distinct
        input, q, k and v its first, second and third slices. Every tuner on ``in_proj`` is an affine map of
        its input, so a slice of ``in_proj(x)`` is exactly that projection of ``x``."""
        if need_weights:
            raise ValueError("patched attention does not return attention weights (need_weights=False)")
        key = query if key is None else key
        value = query if value is None else value
        seq = (lambda t: t) if self.batch_first else (lambda t: t.transpose(0, 1))
        x = seq(query)  # [B, L, D]
        B, L, D = x.shape
        H = self.num_heads
        if key is query and value is query:
            S = L
            q, k, v = self.in_proj(x).view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)  # each [B, H, L, d]
        else:
            S = seq(key).shape[1]
            kk = self.in_proj(seq(key))
            vv = kk if value is key else self.in_proj(seq(value))
            q = self.in_proj(x)[..., :D].reshape(B, L, H, D // H).transpose(1, 2)
            k = kk[..., D:2 * D].reshape(B, S, H, D // H).transpose(1, 2)
            v = vv[..., 2 * D:].reshape(B, S, H, D // H).transpose(1, 2)
        mask = _merge_masks(attn_mask, key_padding_mask, B, H, L, S, x.dtype)
        drop = self.mha.dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, is_causal=is_causal and mask is None)
        o = self.out_proj(o.transpose(1, 2).reshape(B, L, D))
        return (o if self.batch_first else o.transpose(0, 1)), None


def _merge_masks(attn_mask, key_padding_mask, B, H, L, S, dtype):
    """MultiheadAttention's masks (bool: True = masked out; float: additive) as one additive SDPA mask over
    L queries and S keys."""
    mask = None
    if attn_mask is not None:
        m = attn_mask
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, float("-inf"))
        m = m.to(dtype)
        mask = m.view(B, H, L, S) if m.dim() == 3 else m
    if key_padding_mask is not None:
        k = key_padding_mask
        if k.dtype == torch.bool:
            k = torch.zeros(k.shape, dtype=dtype, device=k.device).masked_fill_(k, float("-inf"))
        k = k.to(dtype).view(B, 1, 1, S)
        mask = k if mask is None else mask + k
    return mask


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Set the submodule at dotted path ``name`` of ``root`` to ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def patched_attention(block: nn.Module) -> ProjectedMultiheadAttention:
    """The block's attention as a :class:`ProjectedMultiheadAttention`, wrapping it the first time."""
    if not isinstance(block.attn, ProjectedMultiheadAttention):
        block.attn = ProjectedMultiheadAttention(block.attn)
    return block.attn


def route_attention(blocks) -> None:
    """Run each block's frozen attention through :class:`ProjectedMultiheadAttention`, for tuners that do not
    touch attention (rotations of the MLPs, prompts, adapters): open_clip's ``nn.MultiheadAttention``
    (batch-first) transposes to sequence-first and runs the packed QKV projection as a batched matmul with
    the weight broadcast over the sequence, forward and backward; the wrapper does one matmul per
    projection. Same parameters, same function (up to rounding); ``blocks``: (name, block) pairs."""
    for _, block in blocks:
        if isinstance(getattr(block, "attn", None), nn.MultiheadAttention):
            patched_attention(block)


def unpatch_attention(root: nn.Module) -> None:
    """Put back the plain ``nn.MultiheadAttention`` wherever both projections carry no tuner any more."""
    for name, m in list(root.named_modules()):
        if isinstance(m, ProjectedMultiheadAttention) and isinstance(m.in_proj, ProjectionView) \
                and isinstance(m.out_proj, ProjectionView):
            replace_module(root, name, m.mha)
