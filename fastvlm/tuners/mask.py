"""RMT mask tuning (docs/methods.md section 2): binary masks over frozen weights of the image encoder, learned
through real-valued scores with a straight-through estimator.

ViT image encoders: the patch-embedding conv (stride = kernel: a matmul over patches), every block's
attention QKV (``in_proj_weight``) and output projection, and optionally the MLP. These run the fused
``masked_linear`` (gradient dropout inside the score-gradient kernel). ResNet image encoders: every conv and
the attention-pool projections, masked through ``torch.nn.utils.parametrize`` (the unfused reference path;
gradient dropout applied after the backward).

Scores start at ``init`` = 1e-2 > tau = 5e-3: every mask starts at 1 and the patched model equals the
original. ``bypass_masks(model)`` runs the unmasked network (the zero-shot teacher) with no second copy.
A mask changes the weight, so it always sits directly on the plain linear of its site, under any other tuner
there (the stacking rule, fastvlm/tuners/common.py). Masks merge one way (:func:`merge_masks`): the
masked-off weights are zeroed, so there is no unmerge.

The two-pass gradient dropout of the RMT step goes through :func:`gradient_dropout`, the one entry point
to the private hand-off between the passes (see its docstring).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..functional import grad_dropout
from ..ops.masked import GradSlot, _StraightThrough, binary_mask, masked_linear_slotted  # the two-pass hand-off
from ._attention import patched_attention, unpatch_attention
from .common import (TunerLayer, WrapsLinear, attach, bypassed, load_tuners, register_codec, save_tuners,
                     tuner_layers, tuners_of, wrap_site)

@dataclass
class MaskConfig:
    threshold: float = 5e-3
    init: float = 1e-2
    patch_embed: bool = True
    attention: bool = True
    mlp: bool = False  # off in the published recipe


_NO_UNMERGE = "merging zeroes the masked-off weights, which cannot come back (merge_masks is one-way)"


class _Masked(TunerLayer, nn.Module):
    """Common state of a fused masked layer: its scores, the teacher bypass, and the private two-pass slot."""

    kind = "masks"
    merge_note = _NO_UNMERGE

    def _init_mask(self, weight: torch.Tensor, cfg: MaskConfig):
        self.config = cfg
        self.threshold = cfg.threshold
        self.scores = nn.Parameter(torch.full(weight.shape, cfg.init, dtype=torch.float32, device=weight.device))
        self.bypass = self.merged = False
        self._slot = GradSlot()

    def _ml(self, x, weight, scores, bias):
        return masked_linear_slotted(x, weight, scores, bias, self.threshold, self._slot)

    @torch.no_grad()
    def merge(self):
        """``W <- W * [S > tau]`` in the frozen weight; the layer then computes its plain linear."""
        if not self.merged:
            w = self.base.weight
            w.mul_(binary_mask(self.scores, self.threshold).view(w.shape).to(w.dtype))
            self._push_merge()


class MaskedLinear(WrapsLinear, _Masked):
    """``x (W * [S > tau])^T + b`` on the plain linear ``base`` (an ``nn.Linear`` or an attention projection)."""

    def __init__(self, base: nn.Module, cfg: MaskConfig):
        super().__init__()
        self.base = base
        self._init_mask(base.weight, cfg)

    def forward(self, x):
        self._check_bypass()
        if self.bypass or self.merged:
            return self.base(x)
        return self._ml(x, self.base.weight, self.scores, self.base.bias)


class MaskedPatchEmbed(_Masked):
    """A stride = kernel conv as a masked matmul over flattened patches (bit-for-bit the same contraction)."""

    def __init__(self, base: nn.Conv2d, cfg: MaskConfig):
        super().__init__()
        if base.stride != base.kernel_size or base.padding not in ((0, 0), 0) or base.groups != 1 or base.dilation != (1, 1):
            raise ValueError("patch embedding must be a conv with stride = kernel, no padding, groups=1, dilation=1")
        self.base = base
        self._init_mask(base.weight, cfg)

    def forward(self, x):
        self._check_bypass()
        if self.bypass or self.merged:
            return self.base(x)
        B, C, H, W = x.shape
        ph, pw = self.base.kernel_size
        gh, gw = H // ph, W // pw
        x = x[:, :, : gh * ph, : gw * pw]
        patches = x.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * ph * pw)
        w = self.base.weight
        y = self._ml(patches, w.view(w.shape[0], -1), self.scores.view(w.shape[0], -1), self.base.bias)
        return y.permute(0, 2, 1).reshape(B, w.shape[0], gh, gw)


class ScoreMask(TunerLayer, nn.Module):
    """A parametrization ``W -> W * [S > tau]`` (straight-through to S), for weights used directly (ResNet).
    Merged by :func:`merge_masks`, which removes the parametrization."""

    kind = "masks"
    wraps = ""
    merge_note = "a parametrized (ResNet) mask merges through merge_masks(model); " + _NO_UNMERGE

    def __init__(self, weight: torch.Tensor, cfg: MaskConfig):
        super().__init__()
        self.config = cfg
        self.threshold = cfg.threshold
        self.scores = nn.Parameter(torch.full(weight.shape, cfg.init, dtype=torch.float32, device=weight.device))
        self.bypass = self.merged = False

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
                    attn = patched_attention(blk)
                    wrap_site(attn, "in_proj", lambda m: MaskedLinear(m, cfg), innermost_only=True)
                    wrap_site(attn, "out_proj", lambda m: MaskedLinear(m, cfg), innermost_only=True)
                if cfg.mlp:
                    wrap_site(blk.mlp, "c_fc", lambda m: MaskedLinear(m, cfg), innermost_only=True)
                    wrap_site(blk.mlp, "c_proj", lambda m: MaskedLinear(m, cfg), innermost_only=True)
        else:
            for name, mod in list(visual.named_modules()):
                if isinstance(mod, (nn.Conv2d, nn.Linear)):
                    parametrize.register_parametrization(mod, "weight", ScoreMask(mod.weight, cfg))

    # the frozen weights moved under parametrizations (ResNet) are not tuner parameters: attach freezes them
    attach(model, patch, "masks", cfg)
    return model


def masked_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return tuner_layers(model, "masks")


def mask_entries(model: nn.Module) -> list[tuple[str, torch.Tensor, nn.Parameter]]:
    """(name, frozen weight, scores) of every mask in the model, in a stable order; the name is the masked
    layer's (for a ResNet parametrization: ``<module>.parametrizations.weight.0``)."""
    out = []
    for name, m in masked_layers(model):
        if isinstance(m, ScoreMask):
            owner = model.get_submodule(name.rsplit(".parametrizations", 1)[0])
            out.append((name, owner.parametrizations.weight.original, m.scores))
        else:
            out.append((name, m.base.weight, m.scores))
    return out


def score_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [s for _, _, s in mask_entries(model)]


def bypass_masks(model: nn.Module):
    """Run the original (unmasked) network inside the block: the zero-shot teacher, no second copy."""
    return bypassed(model, (m for _, m in masked_layers(model)))


@torch.no_grad()
def sparsity(model: nn.Module) -> float:
    """Share of mask entries that are off."""
    threshold = tuners_of(model).config("masks").threshold
    off = total = 0
    for _, _, s in mask_entries(model):
        off += int((~binary_mask(s, threshold)).sum())
        total += s.numel()
    return off / max(1, total)


# ---------------------------------------------------------------------------------------------------------
# the two-pass gradient dropout of the RMT step
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def gradient_dropout(model: nn.Module, ratio: float, seed_of, reg: float = 0.0):
    """The hand-off between the two backward passes of the RMT step (docs/methods.md section 2)::

        l_kl.backward(retain_graph=True)                      # pass 1: g_b lands in every scores.grad
        with gradient_dropout(model, ratio, seed_of, reg):
            ce.backward()                                     # pass 2: scores.grad = dropout(g_a, g_b)

    On entry each layer's pass-1 gradient g_b is taken out of ``scores.grad``. Fused layers (ViT) get it in
    their private slot: pass 2's score-gradient kernel adds ``reg * S / ||S||`` (the gradient of the
    regulariser ``reg * ||S||_2``, so dropout sees all of g_a), drops it against g_b with seed ``seed_of(i)``
    and writes the result into g_b's own storage: no second N x K buffer per layer. Parametrized (ResNet)
    layers keep g_b aside and are dropped on exit, after the backward. Layer i counts fused layers first,
    in model order, then the parametrized ones.

    On exit every slot is empty again, also when the body raises. A fused layer whose slot was not consumed
    (it ran under ``torch.compile``, which cannot carry the slot) is an error: its gradient was not dropped.
    """
    layers = [m for _, m in masked_layers(model)]
    fused = [m for m in layers if isinstance(m, _Masked)]
    unfused = [m for m in layers if isinstance(m, ScoreMask)]
    g_b = []
    try:
        for i, m in enumerate(fused):
            slot, s = m._slot, m.scores
            slot.ref, s.grad = s.grad, None  # handed over, not copied
            slot.ratio, slot.seed, slot.reg = float(ratio), int(seed_of(i)), float(reg)
        for m in unfused:
            g_b.append(m.scores.grad)
            m.scores.grad = None
        yield
        unused = sum(m._slot.ref is not None for m in fused)
        if unused:
            raise RuntimeError(f"gradient dropout was not applied in {unused} masked layers (they ran under "
                               "torch.compile, which cannot hand pass 1's gradient over): run the RMT step eagerly")
        for j, (m, gb) in enumerate(zip(unfused, g_b)):
            s = m.scores
            g = s.grad if s.grad is not None else torch.zeros_like(s)
            g = g + reg * s.detach() / torch.linalg.vector_norm(s.detach()).clamp_min(1e-12)
            s.grad = grad_dropout(g, gb if gb is not None else torch.zeros_like(s), ratio, seed_of(len(fused) + j))
    finally:
        for m in fused:
            m._slot.ref, m._slot.ratio, m._slot.seed, m._slot.reg = None, 0.0, 0, 0.0


def _slots_empty(model: nn.Module) -> bool:
    """True when no fused masked layer holds a hand-off (the state outside :func:`gradient_dropout`)."""
    return all(m._slot.ref is None and m._slot.ratio == 0.0 and m._slot.reg == 0.0
               for _, m in masked_layers(model) if isinstance(m, _Masked))


# ---------------------------------------------------------------------------------------------------------
# save/load (bit-packed in the one tuner file), merging
# ---------------------------------------------------------------------------------------------------------


def _encode_bits(model, scores):
    threshold = _mask_config(model).threshold
    return torch.from_numpy(np.packbits(binary_mask(scores, threshold).cpu().numpy().reshape(-1)))


def _decode_bits(model, stored, scores):
    """Scores become init where the mask is on and 0 where it is off: the model computes exactly what the
    tuned one did."""
    cfg = _mask_config(model)
    bits = np.unpackbits(stored.numpy(), count=scores.numel()).astype(bool)
    on = torch.from_numpy(bits).view(scores.shape).to(scores.device)
    scores.copy_(torch.where(on, torch.full_like(scores, max(cfg.init, 2 * cfg.threshold)), torch.zeros_like(scores)))


def _mask_config(model) -> MaskConfig:
    return model.config if isinstance(model, TunerLayer) else tuners_of(model).config("masks")


register_codec("masks", "bits", _encode_bits, _decode_bits)


def export_masks(model: nn.Module, path: str, **extra) -> str:
    """Save every binary mask bit-packed (1 bit per weight) in the one tuner file format (kind "masks")."""
    return save_tuners(model, path, kinds=["masks"], sparsity=sparsity(model), **extra)


def load_masks(model: nn.Module, path: str) -> dict:
    """Load packed masks onto a model patched with :func:`apply_masks` (see the codec above)."""
    return load_tuners(model, path, kinds=["masks"], what="mask file")


@torch.no_grad()
def merge_masks(model: nn.Module) -> nn.Module:
    """Multiply the masks into the frozen weights and take the mask layers out (zero inference cost); where
    no other tuner remains on an attention, the plain ``nn.MultiheadAttention`` comes back. One-way."""
    for _, m in masked_layers(model):
        if isinstance(m, _Masked):
            m.merge()
    for parent in list(model.modules()):
        for attr, child in list(parent._modules.items()):
            if isinstance(child, _Masked):
                setattr(parent, attr, child.base)
    for name, mod in list(model.named_modules()):
        if parametrize.is_parametrized(mod, "weight") and any(
                isinstance(p, ScoreMask) for p in mod.parametrizations.weight):
            w = mod.parametrizations.weight
            mask = binary_mask(w[0].scores, w[0].threshold)
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
            mod.weight.mul_(mask.to(mod.weight.dtype))
    unpatch_attention(model)
    reg = tuners_of(model)
    del reg.entries["masks"]
    return model
