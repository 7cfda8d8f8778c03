"""OrthCR (docs/methods.md section 3): block-diagonal orthogonal (Cayley) rotations of frozen weights.

Patches the MLP layers (open_clip ``c_fc``/``c_proj``, transformers ``fc1``/``fc2``, timm ``mlp.fc1``/``fc2``)
of both the image and the text encoder by default (attention projections as an option; the presets of
fastvlm/tuners/targets.py), or the ``nn.Linear`` / ``nn.MultiheadAttention`` modules ``target_modules``
names. Each layer ``y = x W^T + b`` becomes
``y = (x @ blockdiag(R)) W^T + b`` with R exact Cayley rotations of block size b (default 32), starting at
R = I: the patched model equals the original. ``bypass_rotations(model)`` runs the zero-shot network (no
second copy); ``merge_rotations`` folds R into W (``W <- W blockdiag(R)^T``) for zero-cost inference and
``unmerge_rotations`` undoes it by solving with R (exact for the series R of ``neumann_terms`` too, which is
not orthogonal).

Stacking (fastvlm/tuners/common.py): a rotation turns the input of whatever it wraps, ``inner(x R)``. On a
plain linear that is ``orthogonal_linear`` (the fused op, which may rotate the weight instead).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..functional import block_rotate, cayley, orthogonal_linear
from ..ops.orth import n_params
from ._attention import route_attention
from .common import (LINEAR_TYPES, TunerLayer, WrapsLinear, attach, blocks_of, bypassed, is_plain, load_tuners,
                     merge, recompute_towers, save_tuners, standalone_base, tuner_layers, unmerge)
from .targets import LINEAR_SITES, OPEN_CLIP, architecture_of, preset_targets, select


@dataclass
class OrthConfig:
    block_size: int = 32
    mlp: bool = True
    attention: bool = False
    towers: tuple = ("visual", "text")
    neumann_terms: int | None = None  # None: exact Cayley transform
    recompute: bool = False  # recompute each tuned block's activations in backward (open_clip's checkpointing)
    #: names / suffixes or a regular expression (fastvlm/tuners/targets.py); None: the preset from the flags
    target_modules: tuple | str | None = None


class OrthLinear(WrapsLinear, TunerLayer, nn.Module):
    """``inner(x @ blockdiag(R))``, R = cayley(params) of block size b, on any linear module ``base``."""

    kind = "orth"

    def __init__(self, base: nn.Module, cfg: OrthConfig, where: str = "layer"):
        super().__init__()
        self.base, self.config = base, cfg
        width = base.in_features
        b = cfg.block_size
        if width % b:
            raise ValueError(f"block_size={b} must divide the input width {width} of {where}")
        self.block_size, self.neumann_terms = b, cfg.neumann_terms
        self.bypass = self.merged = False
        self.params = nn.Parameter(torch.zeros(width // b, n_params(b), device=self.weight.device))

    @classmethod
    def from_linear(cls, linear: nn.Module, block_size: int = 32, neumann_terms: int | None = None,
                    freeze: bool = True):
        """A rotated layer on ``linear`` (held by reference, its weight not copied), R = I at start;
        ``freeze`` turns off the linear's own gradients, so only the rotation trains."""
        base = standalone_base(linear, LINEAR_TYPES, "linear", freeze)
        return cls(base, OrthConfig(block_size=block_size, neumann_terms=neumann_terms), "linear")

    def _rot(self, params=None):
        return cayley(self.params if params is None else params, self.block_size, self.neumann_terms)

    def forward(self, x):
        self._check_bypass()
        if self.bypass or self.merged:
            return self.base(x)
        if is_plain(self.base):
            return orthogonal_linear(x, self.base.weight, self.params, self.base.bias, self.block_size,
                                     self.neumann_terms)
        return self.base(block_rotate(x, self._rot().to(x.dtype)))

    def rotated(self):
        return [(self.weight, self.params)]

    @torch.no_grad()
    def merge(self):
        """``W <- W @ blockdiag(R)^T`` in the plain linear's weight."""
        if self.merged:
            return
        self._check_can_merge()
        w = self.weight
        w.copy_(block_rotate(w, self._rot().to(w.dtype), transpose=True))
        self._push_merge()

    @torch.no_grad()
    def unmerge(self):
        """``W <- W @ blockdiag(R)^-T``: per block, W_j = solve(R_j, W'_j^T)^T, in fp64 (R need not be
        orthogonal: the series transform is not)."""
        if not self.merged:
            return
        self._pop_merge()
        w = self.weight
        r = self._rot().double()  # [nb, b, b]
        nb, b, _ = r.shape
        wb = w.double().view(w.shape[0], nb, b).permute(1, 2, 0)  # [nb, b, N]: W_j^T
        w.copy_(torch.linalg.solve(r, wb).permute(2, 0, 1).reshape(w.shape).to(w.dtype))


def apply_orth(model: nn.Module, config: OrthConfig | None = None, target_modules=None) -> nn.Module:
    """Rotate the sites of ``config`` (``target_modules``, when given, replaces its targets); only the rotation
    parameters (and other tuners' parameters) train. Everything is checked before anything is patched.
    Returns the model."""
    cfg = config or OrthConfig()
    if target_modules is not None:
        cfg = dataclasses.replace(cfg, target_modules=target_modules)
    blocks = []

    def preset():
        roles = (("mlp_fc", "mlp_proj") if cfg.mlp else ()) + (("attn_in", "attn_out") if cfg.attention else ())
        try:
            names = preset_targets(model, roles, cfg.towers, "apply_orth")
            if architecture_of(model) in OPEN_CLIP:
                blocks.extend(blocks_of(model, cfg.towers))
        except ValueError as e:
            raise ValueError(f"apply_orth: {e} (use towers=('text',) for ResNet models)") from None
        return names

    sites = select(model, cfg.target_modules, preset, LINEAR_SITES, "apply_orth")
    for site in sites:
        if site.in_features % cfg.block_size:
            raise ValueError(f"block_size={cfg.block_size} must divide the input width {site.in_features} of "
                             f"{site.name}")
    if cfg.recompute and architecture_of(model) not in OPEN_CLIP:
        raise ValueError("apply_orth: recompute=True uses open_clip's block checkpointing: open_clip models only")

    def patch():
        route_attention(blocks)
        if cfg.recompute:
            recompute_towers(model, cfg.towers)
        for site in sites:
            site.wrap(lambda m: OrthLinear(m, cfg, site.name))

    attach(model, patch, "orth", cfg)
    return model


def rotated_layers(model) -> list[tuple[str, OrthLinear]]:
    return tuner_layers(model, "orth")


def rotation_parameters(model) -> list[nn.Parameter]:
    return [m.params for _, m in rotated_layers(model)]


def bypass_rotations(model):
    """Run the zero-shot (unrotated) network inside the block."""
    return bypassed(model, (m for _, m in rotated_layers(model)))


def merge_rotations(model) -> nn.Module:
    """``W <- W @ blockdiag(R)^T`` in every rotated layer: plain linear layers at inference."""
    return merge(model, "orth")


def unmerge_rotations(model) -> nn.Module:
    """Undo :func:`merge_rotations` (solving with R: exact whether or not R is orthogonal)."""
    return unmerge(model, "orth")


def save_orth(model, path: str, **extra) -> str:
    """The rotations in the one tuner file format (kind "orth")."""
    return save_tuners(model, path, kinds=["orth"], **extra)


def load_orth(model, path: str) -> dict:
    return load_tuners(model, path, kinds=["orth"], what="rotation file")
