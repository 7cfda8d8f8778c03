"""Which modules a tuner patches: targeting by name and type (peft's ``target_modules``), and one preset per
architecture for each tuner's defaults (docs/tuners.md, "Targeting and presets").

``target_modules`` selects **sites**, the modules a linear tuner can patch:

- every ``nn.Linear`` and ``nn.Conv2d``, under its module name;
- every ``nn.MultiheadAttention``, as its two projections ``<attention>.in_proj`` (the packed QKV
  ``in_proj_weight``) and ``<attention>.out_proj``; the attention's own name selects both;
- a site that already carries tuners (a chain of tuner layers around the plain module) under the plain
  module's name: names do not depend on stacking (as :func:`~fastvlm.tuners.common.tuner_names`).

It is either

- a list (or tuple) of strings, each an exact module name or a suffix of one at a dot boundary:
  ``"q_proj"`` and ``"layers.0.self_attn.q_proj"`` both select ``vision_model.encoder.layers.0.self_attn.q_proj``
  (peft's ``check_target_module_exists``: ``name == key or name.endswith("." + key)``); or
- one string, a regular expression matched against the whole name (``re.fullmatch``, as peft).

Every string of a list must select something, and a regular expression must; a name or a regular expression
that selects a module the tuner cannot patch (a ``LayerNorm``, a block, a ``Conv2d`` for LoRA) is an error
that names the module and its type. Targets are resolved and checked before anything is patched.

Presets: :func:`architecture_of` recognises open_clip ViT and ModifiedResNet CLIPs, ``transformers``
``CLIPModel`` and ``SiglipModel``, and timm ``VisionTransformer``s. An :class:`Architecture` names, per
tower, the block list and, per role (``patch_embed``, ``attn_in``, ``attn_out``, ``mlp_fc``, ``mlp_proj``),
the sites inside a block; a tuner's config picks roles and towers, and :func:`preset_targets` turns them into
the exact names of the sites, the same list a user could pass as ``target_modules``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from ._attention import ProjectedMultiheadAttention
from .common import TunerLayer, innermost, towers_of, wrap_site

#: the site types of the linear tuners (rotations, LoRA): what they can wrap
LINEAR_SITES = {"linear": "nn.Linear", "attn_in": "nn.MultiheadAttention", "attn_out": "nn.MultiheadAttention"}
ROLES = ("patch_embed", "attn_in", "attn_out", "mlp_fc", "mlp_proj")
ATTENTION_SITES = ("in_proj", "out_proj")

# ---------------------------------------------------------------------------------------------------------
# sites
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Site:
    """One patchable module: ``owner.<attr>`` (a linear or conv, possibly inside a tuner chain), or for an
    attention projection the attention at ``owner.<attr>`` and ``which`` of its two projections."""

    name: str
    owner: nn.Module
    attr: str
    type: str  # "linear", "conv", "attn_in", "attn_out", "attn_other" (see _projectable), "direct" (_reads_weights)
    which: str = ""  # "in_proj" / "out_proj" for an attention projection

    def plain_weight(self):
        """The frozen weight the site computes with (before any tuner is put on it)."""
        mod = getattr(self.owner, self.attr)
        if isinstance(mod, ProjectedMultiheadAttention):
            return innermost(getattr(mod, self.which)).weight
        if isinstance(mod, nn.MultiheadAttention):
            return mod.in_proj_weight if self.which == "in_proj" else mod.out_proj.weight
        return innermost(mod).weight

    @property
    def in_features(self) -> int:
        return self.plain_weight().shape[1]

    def _slot(self):
        """(module, attribute) where the site's chain hangs; an attention is routed through
        :class:`ProjectedMultiheadAttention` the first time one of its projections is wrapped."""
        if self.which:
            mod = getattr(self.owner, self.attr)
            if not isinstance(mod, ProjectedMultiheadAttention):
                mod = ProjectedMultiheadAttention(mod)
                setattr(self.owner, self.attr, mod)
            return mod, self.which
        return self.owner, self.attr

    def wrap(self, make, innermost_only: bool = False) -> nn.Module:
        """Put ``make(current)`` on the site (``wrap_site``'s stacking rule)."""
        owner, attr = self._slot()
        return wrap_site(owner, attr, make, innermost_only)


@dataclass
class Survey:
    """Every site of a model and every other named module (a match on one of those is an error)."""

    sites: list = field(default_factory=list)
    attentions: dict = field(default_factory=dict)  # attention name -> its two sites
    others: list = field(default_factory=list)  # (name, module)


def survey(model: nn.Module) -> Survey:
    out = Survey()

    def visit(owner, attr, name):
        child = owner._modules[attr]
        if isinstance(child, TunerLayer) and child.wraps == "inner":  # VPT, adapters: the wrapped module's name
            visit(child, "inner", name)
            return
        if isinstance(child, (nn.MultiheadAttention, ProjectedMultiheadAttention)):
            ok = isinstance(child, ProjectedMultiheadAttention) or _projectable(child)
            pair = [Site(f"{name}.{w}", owner, attr, "attn_" + w.split("_")[0] if ok else "attn_other", w)
                    for w in ATTENTION_SITES]
            out.sites += pair
            out.attentions[name] = pair
            return
        plain = innermost(child)
        if isinstance(plain, (nn.Linear, nn.Conv2d)):
            kind = "conv" if isinstance(plain, nn.Conv2d) else "direct" if _reads_weights(owner) else "linear"
            out.sites.append(Site(name, owner, attr, kind))
            return
        out.others.append((name, child))
        if isinstance(child, TunerLayer):  # a tuner's own modules (an adapter's down/up) are no targets
            return
        for n, c in child._modules.items():
            if c is not None:
                visit(child, n, f"{name}.{n}")

    for n, c in model._modules.items():
        if c is not None:
            visit(model, n, n)
    return out


def _projectable(mha: nn.MultiheadAttention) -> bool:
    """What :class:`ProjectedMultiheadAttention` takes: one packed ``in_proj_weight`` (q, k, v of one width),
    no ``bias_k`` / ``bias_v``, no ``add_zero_attn``."""
    return mha._qkv_same_embed_dim and mha.in_proj_weight is not None and mha.bias_k is None and not mha.add_zero_attn


def _reads_weights(owner: nn.Module) -> bool:
    """Whether ``owner`` uses its linear children's weights without calling them (open_clip's attention pool
    passes them to ``F.multi_head_attention_forward``): a wrapper there would be skipped, only a
    parametrization of the weight takes effect."""
    from open_clip.modified_resnet import AttentionPool2d

    return isinstance(owner, AttentionPool2d)


def _matcher(target_modules, exact=False):
    """(patterns, match(pattern, name)) for a list of names / suffixes (``exact``: names only) or one regular
    expression."""
    if isinstance(target_modules, str):
        try:
            rx = re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regular expression: {e}") from None
        return [target_modules], lambda _, name: rx.fullmatch(name) is not None
    if isinstance(target_modules, (list, tuple)) and target_modules and all(isinstance(t, str) for t in target_modules):
        if exact:
            return list(target_modules), lambda p, name: name == p
        return list(target_modules), lambda p, name: name == p or name.endswith("." + p)
    raise TypeError("target_modules must be a non-empty list of module names / name suffixes or one regular "
                    f"expression (a string), got {target_modules!r}")


def resolve(model: nn.Module, target_modules, supported: dict[str, str], who: str, exact: bool = False) -> list[Site]:
    """The sites ``target_modules`` selects, in the order of the first pattern that selects each, then in model
    order (a preset's list of names keeps its tower order, so LoRA's seeded factors come out as before), each
    of a type in ``supported`` (site type -> what to call it in errors). Raises ValueError naming every
    pattern that selects nothing and every selected module the tuner cannot patch; nothing is changed
    either way. ``exact``: the list holds whole names only (a preset's: open_clip's text tower names
    ``transformer.resblocks.N...`` are suffixes of the image tower's ``visual.transformer.resblocks.N...``)."""
    patterns, match = _matcher(target_modules, exact)
    found = survey(model)
    chosen, unmatched, unsupported = {}, [], []  # chosen: site name -> index of the first pattern selecting it
    kinds = ", ".join(dict.fromkeys(supported.values()))
    for i, p in enumerate(patterns):
        hit = False
        for s in found.sites:
            if match(p, s.name):
                hit = True
                if s.type in supported:
                    chosen.setdefault(s.name, i)
                else:
                    unsupported.append(f"{s.name} ({_type_name(s)})")
        for name, pair in found.attentions.items():
            if match(p, name):
                hit = True
                if all(s.type in supported for s in pair):
                    for s in pair:
                        chosen.setdefault(s.name, i)
                else:
                    unsupported.append(f"{name} (MultiheadAttention)")
        for name, mod in found.others:
            if match(p, name):
                hit = True
                unsupported.append(f"{name} ({type(mod).__name__})")
        if not hit:
            unmatched.append(p)
    problems = []
    if unmatched:
        problems.append(f"target_modules {unmatched} match no module of this {type(model).__name__}")
    if unsupported:
        shown = unsupported[:6] + (["..."] if len(unsupported) > 6 else [])
        problems.append(f"target_modules select modules {who} cannot patch: {', '.join(shown)} (it patches {kinds})")
    if problems:
        raise ValueError(f"{who}: " + "; ".join(problems))
    order = {s.name: j for j, s in enumerate(found.sites)}
    return sorted((s for s in found.sites if s.name in chosen), key=lambda s: (chosen[s.name], order[s.name]))


def select(model: nn.Module, target_modules, preset, supported: dict[str, str], who: str) -> list[Site]:
    """:func:`resolve` of ``target_modules``, or with None of the names ``preset()`` gives (a preset that
    gives none, every role turned off, patches nothing; an empty ``target_modules`` is an error)."""
    if target_modules is None:
        names = preset()
        return resolve(model, names, supported, who, exact=True) if names else []
    return resolve(model, target_modules, supported, who)


def _type_name(site: Site) -> str:
    mod = getattr(site.owner, site.attr)
    name = type(innermost(mod) if not site.which else mod).__name__
    return f"{name} whose weight {type(site.owner).__name__} reads directly" if site.type == "direct" else name


# ---------------------------------------------------------------------------------------------------------
# architectures and presets
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """Where the tuners' defaults sit in one model family.

    ``towers(model)``: tower ("visual", "text") -> the dotted name of its list of blocks; a tower the model
    lacks raises ValueError (open_clip: a ResNet has no visual blocks) or is absent (an image-only model has
    no "text"). ``roles``: role -> regular expression of the role's sites relative to one block.
    ``patch_embed``: the name of the patch-embedding conv. For adapters and VPT: ``branches`` (the block's
    attributes whose outputs are its attention and MLP branches, before the residual add), ``norm`` (the
    block's first norm: its width is the token width), ``prefix_tokens(model)`` (tokens before the patch
    tokens, where VPT inserts its prompts) and ``patch_size(model)``."""

    name: str
    towers: object
    roles: dict
    patch_embed: str = ""
    branches: tuple = ()
    norm: str = ""
    prefix_tokens: object = None
    patch_size: object = None

    def blocks(self, model: nn.Module, towers) -> list[tuple[str, nn.Module]]:
        """(name, block) of every block of the named towers, in tower order; a block wrapped by a tuner
        (VPT) is given as the block itself."""
        have = self.towers(model, towers)
        out = []
        for tower in towers:
            if tower not in have:
                continue
            path = have[tower]
            for i, blk in enumerate(model.get_submodule(path)):
                while isinstance(blk, TunerLayer) and blk.wraps == "inner":
                    blk = blk.inner
                out.append((f"{path}.{i}", blk))
        return out


def _check_towers(towers):
    bad = [t for t in towers if t not in ("visual", "text")]
    if bad or not towers:
        raise ValueError(f"towers must name 'visual' and/or 'text', got {tuple(towers)}")


def _open_clip_towers(model, towers):
    _check_towers(towers)
    return {t: f"{prefix}.resblocks" for t, (prefix, _) in zip(towers, towers_of(model, towers))}


def _hf_towers(model, towers):
    _check_towers(towers)
    return {t: f"{p}.encoder.layers" for t, p in (("visual", "vision_model"), ("text", "text_model")) if t in towers}


def _timm_towers(model, towers):
    _check_towers(towers)
    return {"visual": "blocks"} if "visual" in towers else {}  # an image model: no text tower


OPEN_CLIP_VIT = Architecture(
    "open_clip ViT", _open_clip_towers,
    {"attn_in": r"attn\.in_proj", "attn_out": r"attn\.out_proj", "mlp_fc": r"mlp\.c_fc", "mlp_proj": r"mlp\.c_proj"},
    patch_embed="visual.conv1", branches=("ls_1", "ls_2"), norm="ln_1")
OPEN_CLIP_RESNET = Architecture("open_clip ModifiedResNet", _open_clip_towers, OPEN_CLIP_VIT.roles,
                                branches=OPEN_CLIP_VIT.branches, norm="ln_1")
_HF_ROLES = {"attn_in": r"self_attn\.(q|k|v)_proj", "attn_out": r"self_attn\.out_proj", "mlp_fc": r"mlp\.fc1",
             "mlp_proj": r"mlp\.fc2"}
HF_CLIP = Architecture(
    "transformers CLIPModel", _hf_towers, _HF_ROLES, patch_embed="vision_model.embeddings.patch_embedding",
    branches=("self_attn", "mlp"), norm="layer_norm1", prefix_tokens=lambda m: 1,
    patch_size=lambda m: m.config.vision_config.patch_size)
HF_SIGLIP = Architecture(
    "transformers SiglipModel", _hf_towers, _HF_ROLES, patch_embed="vision_model.embeddings.patch_embedding",
    branches=("self_attn", "mlp"), norm="layer_norm1", prefix_tokens=lambda m: 0,  # no class token
    patch_size=lambda m: m.config.vision_config.patch_size)
TIMM_VIT = Architecture(
    "timm VisionTransformer", _timm_towers,
    {"attn_in": r"attn\.qkv", "attn_out": r"attn\.proj", "mlp_fc": r"mlp\.fc1", "mlp_proj": r"mlp\.fc2"},
    patch_embed="patch_embed.proj", branches=("ls1", "ls2"), norm="norm1",
    prefix_tokens=lambda m: m.num_prefix_tokens, patch_size=lambda m: m.patch_embed.patch_size[0])


#: the open_clip architectures (their text towers, checkpointing and attention routing are open_clip's)
OPEN_CLIP = (OPEN_CLIP_VIT, OPEN_CLIP_RESNET)


def architecture_of(model: nn.Module) -> Architecture | None:
    """The preset architecture of ``model``, or None when it has none (then tuners need ``target_modules``)."""
    visual = getattr(model, "visual", None)
    if visual is not None:
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.transformer import VisionTransformer

        if isinstance(visual, VisionTransformer):
            return OPEN_CLIP_VIT
        if isinstance(visual, ModifiedResNet):
            return OPEN_CLIP_RESNET
    module = type(model).__module__
    if module.startswith("transformers."):
        return {"CLIPModel": HF_CLIP, "SiglipModel": HF_SIGLIP}.get(type(model).__name__)
    if module.startswith("timm.") and type(model).__name__ == "VisionTransformer":
        return TIMM_VIT
    return None


def require_architecture(model: nn.Module, who: str) -> Architecture:
    """:func:`architecture_of`, or a ValueError saying which models have presets."""
    arch = architecture_of(model)
    if arch is not None:
        return arch
    visual = getattr(model, "visual", None)
    if visual is not None:
        raise ValueError(f"{who}: cannot patch an image encoder of type {type(visual).__name__}; supported: "
                         "open_clip VisionTransformer and ModifiedResNet (or give target_modules)")
    raise ValueError(f"{who}: no preset for a {type(model).__name__} (presets: open_clip CLIP, transformers "
                     "CLIPModel and SiglipModel, timm VisionTransformer): give target_modules")


def preset_targets(model: nn.Module, roles, towers, who: str) -> list[str]:
    """The exact names of the sites of ``roles`` in the blocks of ``towers`` (``patch_embed``: the image
    tower's patch embedding), towers in the given order, each in model order."""
    arch = require_architecture(model, who)
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise ValueError(f"{who}: roles must be among {ROLES}, got {bad}")
    block_roles = [arch.roles[r] for r in roles if r != "patch_embed"]
    names = []
    sites = [s.name for s in survey(model).sites]
    if "patch_embed" in roles and arch.patch_embed and "visual" in towers:
        names.append(arch.patch_embed)
    if block_roles:
        paths = arch.towers(model, towers)
        for tower in towers:
            if tower in paths:
                rx = re.compile(rf"{re.escape(paths[tower])}\.\d+\.({'|'.join(block_roles)})")
                names += [n for n in sites if rx.fullmatch(n)]
    return names
