"""OrthCR (METHODS.md section 3): block-diagonal orthogonal (Cayley) rotations of frozen weights.

Patches the MLP layers (``c_fc``, ``c_proj``) of both the image and the text encoder of an open_clip model by
default (attention projections as an option). Each layer ``y = x W^T + b`` becomes
``y = (x @ blockdiag(R)) W^T + b`` with R exact Cayley rotations of block size b (default 32), starting at
R = I: the patched model equals the original. ``bypass_rotations(model)`` runs the zero-shot network (no
second copy); ``merge_rotations`` folds R into W (``W <- W blockdiag(R)^T``) for zero-cost inference and
``unmerge_rotations`` undoes it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..io import load_checkpoint, save_checkpoint
from ..ops.orth import block_rotate, cayley, n_params, orthogonal_linear
from ._attention import ProjectedMultiheadAttention
from .common import WrapsLinear, attach, blocks_of, bypassed


@dataclass
class OrthConfig:
    block_size: int = 32
    mlp: bool = True
    attention: bool = False
    towers: tuple = ("visual", "text")
    neumann_terms: int | None = None  # None: exact Cayley transform


class _Rotated(nn.Module):
    def _init_rot(self, width: int, cfg: OrthConfig, where: str, device):
        b = cfg.block_size
        if width % b:
            raise ValueError(f"block_size={b} must divide the input width {width} of {where}")
        self.block_size, self.neumann_terms = b, cfg.neumann_terms
        self.bypass, self.merged = False, False
        return nn.Parameter(torch.zeros(width // b, n_params(b), device=device))

    def _rot(self, params):
        return cayley(params, self.block_size, self.neumann_terms)


class OrthLinear(WrapsLinear, _Rotated):
    def __init__(self, base: nn.Linear, cfg: OrthConfig, where: str = "layer"):
        super().__init__()
        self.base = base
        self.params = self._init_rot(base.in_features, cfg, where, base.weight.device)

    def forward(self, x):
        if self.bypass and self.merged:
            raise RuntimeError("cannot bypass merged rotations: unmerge_rotations(model) first")
        if self.bypass or self.merged:
            return self.base(x)
        return orthogonal_linear(x, self.base.weight, self.params, self.base.bias, self.block_size, self.neumann_terms)

    def rotated(self):
        return [(self.base.weight, self.params)]


class OrthAttention(ProjectedMultiheadAttention, _Rotated):
    def __init__(self, mha: nn.MultiheadAttention, cfg: OrthConfig, where: str = "attention"):
        ProjectedMultiheadAttention.__init__(self, mha)
        self.params = self._init_rot(mha.embed_dim, cfg, where, mha.in_proj_weight.device)
        self.params_out = self._init_rot(mha.embed_dim, cfg, where, mha.in_proj_weight.device)

    def in_proj(self, x):
        if self.bypass or self.merged:
            return super().in_proj(x)
        return orthogonal_linear(x, self.mha.in_proj_weight, self.params, self.mha.in_proj_bias, self.block_size,
                                 self.neumann_terms)

    def out_proj_fn(self, x):
        if self.bypass or self.merged:
            return super().out_proj_fn(x)
        o = self.mha.out_proj
        return orthogonal_linear(x, o.weight, self.params_out, o.bias, self.block_size, self.neumann_terms)

    def rotated(self):
        return [(self.mha.in_proj_weight, self.params), (self.mha.out_proj.weight, self.params_out)]


def apply_orth(model: nn.Module, config: OrthConfig | None = None) -> nn.Module:
    """Patch in place; only the rotation parameters (and other tuners' parameters) train. Returns the model."""
    cfg = config or OrthConfig()
    try:
        blocks = blocks_of(model, cfg.towers)
    except ValueError as e:
        raise ValueError(f"apply_orth: {e} (use towers=('text',) for ResNet models)") from None

    def patch():
        for where, blk in blocks:
            if cfg.mlp:
                blk.mlp.c_fc = OrthLinear(blk.mlp.c_fc, cfg, f"{where}.mlp.c_fc")
                blk.mlp.c_proj = OrthLinear(blk.mlp.c_proj, cfg, f"{where}.mlp.c_proj")
            if cfg.attention:
                blk.attn = OrthAttention(blk.attn, cfg, f"{where}.attn")

    attach(model, patch)
    model._fastvlm_orth_config = cfg
    return model


def rotated_layers(model) -> list[tuple[str, _Rotated]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _Rotated)]


def rotation_parameters(model) -> list[nn.Parameter]:
    return [p for _, m in rotated_layers(model) for _, p in m.rotated()]


def bypass_rotations(model):
    """Run the zero-shot (unrotated) network inside the block."""
    return bypassed(model, (m for _, m in rotated_layers(model)))


@torch.no_grad()
def merge_rotations(model) -> nn.Module:
    """``W <- W @ blockdiag(R)^T`` in every rotated layer: plain linear layers at inference."""
    for _, m in rotated_layers(model):
        if m.merged:
            continue
        for w, p in m.rotated():
            w.copy_(block_rotate(w, m._rot(p).to(w.dtype), transpose=True))
        m.merged = True
    return model


@torch.no_grad()
def unmerge_rotations(model) -> nn.Module:
    """Undo :func:`merge_rotations`: ``W <- W @ blockdiag(R)`` (R is orthogonal)."""
    for _, m in rotated_layers(model):
        if not m.merged:
            continue
        for w, p in m.rotated():
            w.copy_(block_rotate(w, m._rot(p).to(w.dtype)))
        m.merged = False
    return model


def save_orth(model, path: str, **extra) -> str:
    tensors = {}
    for name, m in rotated_layers(model):
        for i, (_, p) in enumerate(m.rotated()):
            tensors[f"{name}.{i}"] = p
    cfg = asdict(model._fastvlm_orth_config)
    cfg["towers"] = list(cfg["towers"])
    return save_checkpoint(path, tensors, {"kind": "orth", "config": cfg, **extra})


@torch.no_grad()
def load_orth(model, path: str) -> dict:
    tensors, meta = load_checkpoint(path, kind="orth")
    ours = {f"{name}.{i}": p for name, m in rotated_layers(model) for i, (_, p) in enumerate(m.rotated())}
    missing, extra = sorted(set(ours) - set(tensors)), sorted(set(tensors) - set(ours))
    if missing or extra:
        raise ValueError(f"rotation file {path!r} does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, p in ours.items():
        if tensors[k].shape != p.shape:
            raise ValueError(f"rotation {k!r} has shape {tuple(tensors[k].shape)}, the model needs {tuple(p.shape)}")
        p.copy_(tensors[k])
    return meta
