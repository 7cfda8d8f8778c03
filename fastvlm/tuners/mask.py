"""RMT mask tuning (METHODS.md section 2): binary masks over frozen weights of the image encoder, learned
through real-valued scores with a straight-through estimator.

ViT image encoders: the patch-embedding conv (stride = kernel: a matmul over patches), every block's
attention QKV (``in_proj_weight``) and output projection, and optionally the MLP. These run the fused
``masked_linear`` (gradient dropout inside the score-gradient kernel). ResNet image encoders: every conv and
the attention-pool projections, masked through ``torch.nn.utils.parametrize`` (the unfused reference path;
gradient dropout applied after the backward).

Scores start at ``init`` = 1e-2 > tau = 5e-3: every mask starts at 1 and the patched model equals the
original. ``bypass_masks(model)`` runs the unmasked network (the zero-shot teacher) with no second copy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..io import load_checkpoint, save_checkpoint
from ..ops.masked import GradSlot, _StraightThrough, binary_mask, masked_linear_slotted
from ._attention import ProjectedMultiheadAttention, replace_module
from .common import WrapsLinear, attach, bypassed


@dataclass
class MaskConfig:
    threshold: float = 5e-3
    init: float = 1e-2
    patch_embed: bool = True
    attention: bool = True
    mlp: bool = False  # off in the published recipe


class _MaskedBase(nn.Module):
    """Common state of a masked layer: its scores, the teacher bypass, and the two-pass GDR slot."""

    fused_gdr = True

    def _init_mask(self, weight: torch.Tensor, cfg: MaskConfig):
        self.threshold = cfg.threshold
        self.scores = nn.Parameter(torch.full(weight.shape, cfg.init, dtype=torch.float32, device=weight.device))
        self.bypass = False
        self.slot = GradSlot()

    def _ml(self, x, weight, scores, bias):
        return masked_linear_slotted(x, weight, scores, bias, self.threshold, self.slot)

    def mask_items(self):
        """(suffix, frozen weight, scores) of each mask this layer owns."""
        return [("", self.base.weight, self.scores)]


class MaskedLinear(WrapsLinear, _MaskedBase):
    def __init__(self, base: nn.Linear, cfg: MaskConfig):
        super().__init__()
        self.base = base
        self._init_mask(base.weight, cfg)

    def forward(self, x):
        if self.bypass:
            return self.base(x)
        return self._ml(x, self.base.weight, self.scores, self.base.bias)


class MaskedPatchEmbed(_MaskedBase):
    """A stride = kernel conv as a masked matmul over flattened patches (bit-for-bit the same contraction)."""

    def __init__(self, base: nn.Conv2d, cfg: MaskConfig):
        super().__init__()
        if base.stride != base.kernel_size or base.padding not in ((0, 0), 0) or base.groups != 1 or base.dilation != (1, 1):
            raise ValueError("patch embedding must be a conv with stride = kernel, no padding, groups=1, dilation=1")
        self.base = base
        self._init_mask(base.weight, cfg)

    def forward(self, x):
        if self.bypass:
            return self.base(x)
        B, C, H, W = x.shape
        ph, pw = self.base.kernel_size
        gh, gw = H // ph, W // pw
        x = x[:, :, : gh * ph, : gw * pw]
        patches = x.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * ph * pw)
        w = self.base.weight
        y = self._ml(patches, w.view(w.shape[0], -1), self.scores.view(w.shape[0], -1), self.base.bias)
        return y.permute(0, 2, 1).reshape(B, w.shape[0], gh, gw)


class MaskedAttention(ProjectedMultiheadAttention, _MaskedBase):
    def __init__(self, mha: nn.MultiheadAttention, cfg: MaskConfig):
        ProjectedMultiheadAttention.__init__(self, mha)
        self._init_mask(mha.in_proj_weight, cfg)
        self.scores_out = nn.Parameter(torch.full(mha.out_proj.weight.shape, cfg.init, dtype=torch.float32,
                                                  device=mha.out_proj.weight.device))
        self.slot_out = GradSlot()

    def in_proj(self, x):
        if self.bypass:
            return super().in_proj(x)
        return self._ml(x, self.mha.in_proj_weight, self.scores, self.mha.in_proj_bias)

    def out_proj_fn(self, x):
        if self.bypass:
            return super().out_proj_fn(x)
        o = self.mha.out_proj
        return masked_linear_slotted(x, o.weight, self.scores_out, o.bias, self.threshold, self.slot_out)

    def mask_items(self):
        return [("in_proj", self.mha.in_proj_weight, self.scores), ("out_proj", self.mha.out_proj.weight, self.scores_out)]


class ScoreMask(nn.Module):
    """A parametrization ``W -> W * [S > tau]`` (straight-through to S), for weights used directly."""

    fused_gdr = False

    def __init__(self, weight: torch.Tensor, cfg: MaskConfig):
        super().__init__()
        self.threshold = cfg.threshold
        self.scores = nn.Parameter(torch.full(weight.shape, cfg.init, dtype=torch.float32, device=weight.device))
        self.bypass = False

    def forward(self, w):
        if self.bypass:
            return w
        return w * _StraightThrough.apply(self.scores, self.threshold).to(w.dtype)


# ---------------------------------------------------------------------------------------------------------
# patching
# ---------------------------------------------------------------------------------------------------------


def apply_masks(model: nn.Module, config: MaskConfig | None = None) -> nn.Module:
    """Patch ``model.visual`` in place; only the scores (and other tuners' parameters) train. Returns the model."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    cfg = config or MaskConfig()
    if cfg.init <= cfg.threshold:
        raise ValueError(f"init ({cfg.init}) must exceed threshold ({cfg.threshold}) so masks start at 1")
    visual = getattr(model, "visual", None)
    if not isinstance(visual, (VisionTransformer, ModifiedResNet)):
        raise ValueError(f"apply_masks: cannot patch an image encoder of type {type(visual).__name__}; "
                         "supported: open_clip VisionTransformer and ModifiedResNet")

    def patch():
        if isinstance(visual, VisionTransformer):
            if cfg.patch_embed:
                visual.conv1 = MaskedPatchEmbed(visual.conv1, cfg)
            for blk in visual.transformer.resblocks:
                if cfg.attention:
                    blk.attn = MaskedAttention(blk.attn, cfg)
                if cfg.mlp:
                    blk.mlp.c_fc = MaskedLinear(blk.mlp.c_fc, cfg)
                    blk.mlp.c_proj = MaskedLinear(blk.mlp.c_proj, cfg)
        else:
            for name, mod in list(visual.named_modules()):
                if isinstance(mod, (nn.Conv2d, nn.Linear)):
                    parametrize.register_parametrization(mod, "weight", ScoreMask(mod.weight, cfg))

    attach(model, patch)
    # the frozen weights moved under parametrizations (ResNet) are still not tuner parameters: attach froze them
    model._fastvlm_mask_config = cfg
    return model


def masked_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (_MaskedBase, ScoreMask))]


def mask_entries(model: nn.Module) -> list[tuple[str, torch.Tensor, nn.Parameter]]:
    """(name, frozen weight, scores) of every mask in the model, in a stable order."""
    out = []
    for name, m in masked_layers(model):
        if isinstance(m, ScoreMask):
            # name is "<module>.parametrizations.weight.0"
            owner = model.get_submodule(name.rsplit(".parametrizations", 1)[0])
            out.append((name, owner.parametrizations.weight.original, m.scores))
        else:
            out += [(f"{name}.{sfx}" if sfx else name, w, s) for sfx, w, s in m.mask_items()]
    return out


def score_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [s for _, _, s in mask_entries(model)]


def bypass_masks(model: nn.Module):
    """Run the original (unmasked) network inside the block: the zero-shot teacher, no second copy."""
    return bypassed(model, (m for _, m in masked_layers(model)))


@torch.no_grad()
def sparsity(model: nn.Module) -> float:
    """Share of mask entries that are off."""
    off = total = 0
    for _, _, s in mask_entries(model):
        off += int((~binary_mask(s, model._fastvlm_mask_config.threshold)).sum())
        total += s.numel()
    return off / max(1, total)


# ---------------------------------------------------------------------------------------------------------
# export: bit-packed masks, loading, merging
# ---------------------------------------------------------------------------------------------------------


def export_masks(model: nn.Module, path: str, **extra) -> str:
    """Save every binary mask bit-packed (1 bit per weight) in one small safetensors file."""
    cfg = model._fastvlm_mask_config
    tensors, shapes = {}, {}
    for name, _, s in mask_entries(model):
        bits = binary_mask(s.detach(), cfg.threshold).cpu().numpy().reshape(-1)
        tensors[name] = torch.from_numpy(np.packbits(bits))
        shapes[name] = list(s.shape)
    meta = {"kind": "mask", "config": asdict(cfg), "shapes": shapes, "sparsity": sparsity(model), **extra}
    return save_checkpoint(path, tensors, meta)


@torch.no_grad()
def load_masks(model: nn.Module, path: str) -> dict:
    """Load packed masks onto a model patched with :func:`apply_masks`: scores become init where the mask
    is on and 0 where it is off, so the model computes exactly what the tuned one did."""
    tensors, meta = load_checkpoint(path, kind="mask")
    cfg = model._fastvlm_mask_config
    entries = {n: s for n, _, s in mask_entries(model)}
    missing = sorted(set(entries) - set(tensors))
    extra = sorted(set(tensors) - set(entries))
    if missing or extra:
        raise ValueError(f"mask file {path!r} does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, s in entries.items():
        if list(s.shape) != meta["shapes"][name]:
            raise ValueError(f"mask {name!r} has shape {meta['shapes'][name]}, the model needs {list(s.shape)}")
        bits = np.unpackbits(tensors[name].numpy(), count=s.numel()).astype(bool)
        on = torch.from_numpy(bits).view(s.shape).to(s.device)
        s.copy_(torch.where(on, torch.full_like(s, max(cfg.init, 2 * cfg.threshold)), torch.zeros_like(s)))
    return meta


@torch.no_grad()
def merge_masks(model: nn.Module) -> nn.Module:
    """Multiply the masks into the frozen weights and restore the original modules: zero inference cost."""
    cfg = model._fastvlm_mask_config
    for name, w, s in mask_entries(model):
        w.mul_(binary_mask(s, cfg.threshold).to(w.dtype))
    for name, m in masked_layers(model):
        if isinstance(m, ScoreMask):
            continue
        orig = m.mha if isinstance(m, MaskedAttention) else m.base
        replace_module(model, name, orig)
    for name, mod in list(model.named_modules()):
        if parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
    del model._fastvlm_mask_config
    return model

