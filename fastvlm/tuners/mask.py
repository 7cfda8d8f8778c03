"""RMT mask tuning (docs/methods.md section 2): binary masks over frozen weights of the image encoder, learned
through real-valued scores with a straight-through estimator.

Default targets (the presets of fastvlm/tuners/targets.py, image tower only): the patch-embedding conv
(stride = kernel: a matmul over patches), every block's attention QKV and output projection, and optionally
the MLP, in open_clip ViTs, transformers CLIP/SigLIP and timm ViTs. These run the fused ``masked_linear``
(gradient dropout inside the score-gradient kernel). ``target_modules`` picks any ``nn.Linear``,
``nn.Conv2d`` or ``nn.MultiheadAttention`` instead. A conv other than stride = kernel runs the unfused
reference path, ``conv2d(x, W * [S > tau])`` (gradient dropout applied after the backward). open_clip ResNet
image encoders: every conv and the attention-pool projections, masked through ``torch.nn.utils.parametrize``
(the attention pool reads its projection weights without calling the modules, so a wrapper would be
skipped), also on the reference path.

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
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..functional import grad_dropout
from ..ops.masked import GradSlot, _StraightThrough, binary_mask, masked_linear_slotted  # the two-pass hand-off
from ._attention import patched_attention, unpatch_attention
from .common import (LINEAR_TYPES, TunerLayer, WrapsLinear, attach, bypassed, load_tuners, register_codec,
                     save_tuners, standalone_base, tuner_layers, tuners_of)
from .targets import OPEN_CLIP_RESNET, architecture_of, preset_targets, require_architecture, select, survey

@dataclass
class MaskConfig:
    threshold: float = 5e-3
    init: float = 1e-2
    patch_embed: bool = True
    attention: bool = True
    mlp: bool = False  # off in the published recipe
    #: names / suffixes or a regular expression (fastvlm/tuners/targets.py); None: the preset from the flags
    target_modules: tuple | str | None = None


_NO_UNMERGE = "merging zeroes the masked-off weights, which cannot come back (merge_masks is one-way)"


class _Masked(TunerLayer, nn.Module):
    """Common state of a masked layer on a plain module ``base``: its scores, the teacher bypass, and the private
    two-pass slot. ``fused``: the layer runs the fused ``masked_linear``, whose score-gradient kernel applies
    gradient dropout through the slot (else dropout is applied after the backward)."""

    kind = "masks"
    merge_note = _NO_UNMERGE
    fused = True

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
        """``W <- W * [S > tau]`` in the frozen weight; the layer then computes its plain module."""
        if not self.merged:
            w = self.base.weight
            w.mul_(binary_mask(self.scores, self.threshold).view(w.shape).to(w.dtype))
            self._push_merge()


class MaskedLinear(WrapsLinear, _Masked):
    """``x (W * [S > tau])^T + b`` on the plain linear ``base`` (an ``nn.Linear`` or an attention projection),
    through the fused ``masked_linear``."""

    def __init__(self, base: nn.Module, cfg: MaskConfig):
        super().__init__()
        self.base = base
        self._init_mask(base.weight, cfg)

    @classmethod
    def from_linear(cls, linear: nn.Module, threshold: float = 5e-3, init: float = 1e-2, freeze: bool = True):
        """A masked layer on ``linear`` (held by reference, its weight not copied), every mask on (scores =
        ``init`` > ``threshold``); ``freeze`` turns off the linear's own gradients, so only the scores train."""
        _check_init(init, threshold)
        return cls(standalone_base(linear, LINEAR_TYPES, "linear", freeze), MaskConfig(threshold=threshold, init=init))

    def forward(self, x):
        self._check_bypass()
        if self.bypass or self.merged:
            return self.base(x)
        return self._ml(x, self.base.weight, self.scores, self.base.bias)


def is_patch_conv(conv: nn.Conv2d) -> bool:
    """stride = kernel, no padding, one group, no dilation: the conv is a matmul over disjoint patches."""
    return (tuple(conv.stride) == tuple(conv.kernel_size) and conv.padding in ((0, 0), 0, "valid")
            and conv.groups == 1 and tuple(conv.dilation) == (1, 1))


class MaskedConv2d(WrapsLinear, _Masked):
    """``conv2d(x, W * [S > tau], b)`` on the plain ``nn.Conv2d`` ``base``. A patch conv (stride = kernel, no
    padding, one group, no dilation; a ViT patch embedding) runs as the fused masked matmul over flattened
    patches (bit for bit the same contraction); any other conv runs the reference path, the conv of the
    straight-through masked weight (``fused`` is False: gradient dropout is applied after the backward)."""

    def __init__(self, base: nn.Conv2d, cfg: MaskConfig):
        super().__init__()
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"base must be an nn.Conv2d, got {type(base).__name__}")
        self.base = base
        self.fused = is_patch_conv(base)
        self._init_mask(base.weight, cfg)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, threshold: float = 5e-3, init: float = 1e-2, freeze: bool = True):
        """A masked layer on ``conv`` (held by reference, no copy); see :meth:`MaskedLinear.from_linear`."""
        _check_init(init, threshold)
        return cls(standalone_base(conv, (nn.Conv2d,), "conv", freeze), MaskConfig(threshold=threshold, init=init))

    def forward(self, x):
        self._check_bypass()
        if self.bypass or self.merged:
            return self.base(x)
        w = self.base.weight
        if not self.fused:
            mask = _StraightThrough.apply(self.scores, self.threshold).to(w.dtype)
            return self.base._conv_forward(x, w * mask, self.base.bias)
        B, C, H, W = x.shape
        ph, pw = self.base.kernel_size
        gh, gw = H // ph, W // pw
        x = x[:, :, : gh * ph, : gw * pw]
        patches = x.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * ph * pw)
        y = self._ml(patches, w.view(w.shape[0], -1), self.scores.view(w.shape[0], -1), self.base.bias)
        return y.permute(0, 2, 1).reshape(B, w.shape[0], gh, gw)


MaskedPatchEmbed = MaskedConv2d  # the patch-embedding name, kept for callers that use it


def _check_init(init, threshold):
    if init <= threshold:
        raise ValueError(f"init ({init}) must exceed threshold ({threshold}) so masks start at 1")


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


#: the site types masks patch (fastvlm/tuners/targets.py); "direct": a linear whose parent reads its weight
#: without calling it (open_clip's attention pool), masked through a parametrization
SUPPORTED = {"linear": "nn.Linear", "conv": "nn.Conv2d", "attn_in": "nn.MultiheadAttention",
             "attn_out": "nn.MultiheadAttention", "direct": "nn.Linear"}


def mask_sites(model: nn.Module, cfg: MaskConfig):
    """The sites ``cfg`` selects: its ``target_modules``, else the preset of the model's architecture (the
    image tower's patch embedding, attention and MLP as the flags say; an open_clip ResNet: every conv and
    linear of ``model.visual``)."""
    def preset():
        arch = require_architecture(model, "apply_masks")
        if arch is OPEN_CLIP_RESNET:
            return [s.name for s in survey(model).sites if s.name.startswith("visual.")]
        roles = (("patch_embed",) if cfg.patch_embed else ()) + (("attn_in", "attn_out") if cfg.attention else ()) \
            + (("mlp_fc", "mlp_proj") if cfg.mlp else ())
        return preset_targets(model, roles, ("visual",), "apply_masks")

    return select(model, cfg.target_modules, preset, SUPPORTED, "apply_masks")


def apply_masks(model: nn.Module, config: MaskConfig | None = None, target_modules=None) -> nn.Module:
    """Put masks on the sites of ``config`` (``target_modules``, when given, replaces its targets); only the
    scores (and other tuners' parameters) train. Everything is checked before anything is patched. Returns
    the model."""
    cfg = config or MaskConfig()
    if target_modules is not None:
        cfg = dataclasses.replace(cfg, target_modules=target_modules)
    _check_init(cfg.init, cfg.threshold)
    sites = mask_sites(model, cfg)
    resnet = "visual." if architecture_of(model) is OPEN_CLIP_RESNET else None

    def patch():
        for site in sites:
            if site.type == "direct" or (resnet and site.name.startswith(resnet)):
                mod = getattr(site.owner, site.attr)
                parametrize.register_parametrization(mod, "weight", ScoreMask(mod.weight, cfg))
            elif site.type == "conv":
                site.wrap(lambda m: MaskedConv2d(m, cfg), innermost_only=True)
            else:
                site.wrap(lambda m: MaskedLinear(m, cfg), innermost_only=True)

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
    and writes the result into g_b's own storage: no second N x K buffer per layer. Unfused layers (ResNet
    parametrizations, convs other than stride = kernel) keep g_b aside and are dropped on exit, after the
    backward. Layer i counts fused layers first, in model order, then the unfused ones.

    On exit every slot is empty again, also when the body raises. A fused layer whose slot was not consumed
    (it ran under ``torch.compile``, which cannot carry the slot) is an error: its gradient was not dropped.
    """
    layers = [m for _, m in masked_layers(model)]
    fused = [m for m in layers if isinstance(m, _Masked) and m.fused]
    unfused = [m for m in layers if not (isinstance(m, _Masked) and m.fused)]
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
