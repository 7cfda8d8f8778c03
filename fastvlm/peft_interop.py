"""peft interop: fastvlm LoRA and rotation states to and from peft adapter folders (docs/methods.md §3 and
docs/interop.md).

A peft adapter folder is ``adapter_config.json`` (a ``LoraConfig`` or ``OFTConfig``) plus
``adapter_model.safetensors``, whose tensors are named ``base_model.model.<module>.<tensor>`` after the
module of the base model they sit on. fastvlm's layers carry the same names (:func:`tuner_layers`, the
wrapped-module segments left out), so a layer on ``vision_model.encoder.layers.0.self_attn.q_proj`` of a
Hugging Face model is peft's layer on that module.

**LoRA** (peft ``lora_A.weight`` [r, K], ``lora_B.weight`` [N, r]): fastvlm's ``A`` and ``B``, the same
layout; ``y = x Wᵀ + b + s · (x Aᵀ) Bᵀ`` on both sides, with fastvlm's ``s = alpha / rank`` and peft's
``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``; per module through ``rank_pattern`` and
``alpha_pattern``). The values are copied bit for bit both ways.

**Rotations** (peft OFT ``oft_R.weight`` [r, b(b-1)/2]): both rotate the layer's input, ``x · blockdiag(R)``,
and build ``Q = U − Uᵀ`` from the strict upper triangle in ``torch.triu_indices(b, b, 1)`` order. For a
peft tensor p:

- peft's exact branch (``use_cayley_neumann=False``), ``(I − Q)(I + Q)⁻¹``, is fastvlm's exact
  ``cayley(-p)``: the parameters change sign;
- peft's series (``use_cayley_neumann=True``, ``num_cayley_neumann_terms=n``),
  ``I + 2Q + … + 2Q^(n−2) + Q^(n−1)``, is fastvlm's ``cayley(p, neumann_terms=n − 2)`` for n >= 4 (n = 3 is the
  same matrix as n = 4): the same sign. fastvlm's ``neumann_terms=1`` and peft's n <= 2 have no counterpart.

Exact both ways: LoRA on ``nn.Linear`` modules with ``bias="none"``, no DoRA, no LoRA bias, the default
initialisations (not PiSSA/OLoRA/LoftQ/EVA/CorDA, which change the base weights), no ``modules_to_save``
or ``trainable_token_indices``; OFT on ``nn.Linear`` with ``coft=False``, ``bias="none"`` and any block size
that divides the input width, ``block_share`` on import only (the one block is repeated). Dropout
(``lora_dropout``, ``module_dropout``) acts in training only and is not carried over. Every other setting is
refused, naming it.

Export needs the exported layers to be all the model's tuner layers (a TaskRes head aside), each directly
on a plain ``nn.Linear``, neither merged nor bypassed: the adapter then gives, on the same base model, what
the fastvlm model computes.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
import os
import re

import torch
from torch import nn

from .tuners.common import TunerLayer, attach, tuner_layers, wrap_site

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
KINDS = {"lora": "LORA", "orth": "OFT"}  # fastvlm kind -> peft_type
TENSORS = {"LORA": ("lora_A.weight", "lora_B.weight"), "OFT": ("oft_R.weight",)}

# Settings that leave the adapter's forward (in eval mode) what fastvlm computes, or that only select modules
# (the tensors name the modules anyway). Every other setting must have its default value.
_FREE = {"peft_type", "peft_version", "task_type", "base_model_name_or_path", "revision", "inference_mode",
         "auto_mapping", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"}
_FREE_LORA = _FREE | {"r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "lora_dropout",
                      "init_lora_weights"}
_FREE_OFT = _FREE | {"r", "oft_block_size", "use_cayley_neumann", "num_cayley_neumann_terms", "module_dropout",
                     "init_weights", "eps",  # eps acts with coft only, which must be False
                     "block_share"}  # imported by repeating the one shared block
_PLAIN_INITS = (True, False, "gaussian")  # LoRA inits that leave the base weights alone


def peft_terms(neumann_terms: int | None) -> int | None:
    """peft's ``num_cayley_neumann_terms`` for fastvlm's ``neumann_terms`` (None: the exact transform, peft's
    ``use_cayley_neumann=False``): k -> k + 2; k = 1 (``I + 2Q + Q²``) has no peft counterpart."""
    if neumann_terms is None:
        return None
    if neumann_terms < 2:
        raise ValueError(f"neumann_terms={neumann_terms} (I + 2Q + Q^2) has no peft OFT counterpart: peft's series "
                         "with n terms is fastvlm's neumann_terms = n - 2, so export needs neumann_terms >= 2 or "
                         "None (exact)")
    return neumann_terms + 2


def fastvlm_terms(use_cayley_neumann: bool, num_cayley_neumann_terms: int) -> int | None:
    """fastvlm's ``neumann_terms`` for peft's OFT branch (None: exact): n -> n - 2 for n >= 4, and 2 for n = 3
    (peft's series for 3 and 4 terms is the same matrix, ``I + 2Q + 2Q² + Q³``)."""
    if not use_cayley_neumann:
        return None
    n = num_cayley_neumann_terms
    if n < 3:
        raise ValueError(f"num_cayley_neumann_terms={n} (the series I{' + 2Q' if n == 2 else ''}) has no fastvlm "
                         "counterpart: fastvlm's series starts at I + 2Q + Q^2; use n >= 3 or use_cayley_neumann=False")
    return max(n - 2, 2)


# ---------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------


def _exported_layers(model: nn.Module, kind: str | None) -> tuple[str, list[tuple[str, nn.Module]]]:
    """(kind, layers) to export, refusing what an adapter on the plain base model cannot reproduce."""
    present = sorted({m.kind for _, m in tuner_layers(model)} - {"taskres"})
    if kind is None:
        if len(present) != 1:
            raise ValueError(f"kind: the model carries {present or 'no'} tuner layers; give kind='lora' or 'orth'"
                             if present else "the model carries no LoRA or rotation layers to export")
        kind = present[0]
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)} (the methods peft has), got {kind!r}")
    others = [k for k in present if k != kind]
    if others:
        raise ValueError(f"the model also carries {others} layers, which a peft {KINDS[kind]} adapter cannot hold: "
                         f"its outputs on the base model would differ; export a model with {kind!r} layers only")
    layers = tuner_layers(model, kind)
    if not layers:
        raise ValueError(f"the model carries no {kind!r} layers to export")
    for name, layer in layers:
        if layer.merged or layer.bypass:
            raise ValueError(f"layer {name!r} is {'merged' if layer.merged else 'bypassed'}: unmerge it / leave "
                             "the bypass before exporting (the adapter holds the layer beside the frozen weight)")
        if isinstance(layer.base, TunerLayer) or type(layer.base) is not nn.Linear:
            raise ValueError(f"layer {name!r} wraps a {type(layer.base).__name__}, not a plain nn.Linear: peft "
                             "adapters sit on the modules of the base model")
    return kind, layers


def _lora_config(layers):
    """LoraConfig fields for layers of possibly different (rank, alpha): the most common pair is the default,
    the others go to rank_pattern / alpha_pattern under their escaped full names (peft matches a pattern
    key k against a module name with ``(.*\\.)?(k)$``, so an escaped full name matches that module only)."""
    pairs = {name: (layer.lora.A.shape[0], layer.lora.scale * layer.lora.A.shape[0]) for name, layer in layers}
    (r, alpha), _ = Counter(pairs.values()).most_common(1)[0]
    rank_pattern = {re.escape(n): p[0] for n, p in pairs.items() if p[0] != r}
    alpha_pattern = {re.escape(n): p[1] for n, p in pairs.items() if p[1] != alpha}
    return dict(r=r, lora_alpha=alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


@torch.no_grad()
def export_peft(model: nn.Module, folder: str, kind: str | None = None,
                base_model_name_or_path: str | None = None) -> str:
    """Write the model's LoRA (kind "lora") or rotation (kind "orth") layers as a peft adapter folder that
    ``peft.PeftModel.from_pretrained(base_model, folder)`` loads onto the same base model with the same
    outputs. ``kind``: None when the model carries one of the two. ``base_model_name_or_path`` (recorded in
    the config, for peft's AutoPeftModel): by default the model's ``config._name_or_path`` when it has one.
    Returns the folder.

    Rotations go to OFT with ``oft_block_size = b``: the exact transform as ``use_cayley_neumann=False`` and
    the parameters negated, ``neumann_terms=k`` as ``num_cayley_neumann_terms = k + 2`` as they are. Every
    exported layer needs the same block size and series (one OFTConfig)."""
    from peft import LoraConfig, OFTConfig
    from safetensors.torch import save_file

    kind, layers = _exported_layers(model, kind)
    names = [n for n, _ in layers]
    tensors = {}
    if kind == "lora":
        for name, layer in layers:
            tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora.A.detach().clone().contiguous()
            tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora.B.detach().clone().contiguous()
        config = LoraConfig(target_modules=names, lora_dropout=0.0, bias="none", **_lora_config(layers))
    else:
        shapes = {(layer.block_size, layer.neumann_terms) for _, layer in layers}
        if len(shapes) > 1:
            raise ValueError(f"the rotation layers mix (block_size, neumann_terms) {sorted(shapes, key=str)}: one "
                             "peft OFTConfig holds one block size and one series")
        (b, k), = shapes
        n = peft_terms(k)
        for name, layer in layers:
            p = layer.params.detach()
            tensors[f"{PREFIX}{name}.oft_R.weight"] = (p if k is not None else -p).clone().contiguous()
        config = OFTConfig(r=0, oft_block_size=b, target_modules=names, use_cayley_neumann=n is not None,
                           **({"num_cayley_neumann_terms": n} if n is not None else {}), module_dropout=0.0,
                           coft=False, block_share=False, bias="none")
    config.base_model_name_or_path = base_model_name_or_path or \
        getattr(getattr(model, "config", None), "_name_or_path", None) or None
    os.makedirs(folder, exist_ok=True)
    config.save_pretrained(folder)
    save_file(tensors, os.path.join(folder, WEIGHTS_FILE), metadata={"format": "pt"})
    return folder


# ---------------------------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------------------------


def read_adapter(source, adapter_name: str = "default"):
    """(peft config, {module name: {tensor name: tensor}}) of a peft adapter folder or a ``PeftModel``."""
    from peft import PeftConfig, PeftModel, get_peft_model_state_dict

    if isinstance(source, PeftModel):
        if adapter_name not in source.peft_config:
            raise ValueError(f"adapter_name {adapter_name!r} is not in the PeftModel (it has "
                             f"{sorted(source.peft_config)})")
        config = source.peft_config[adapter_name]
        state = get_peft_model_state_dict(source, adapter_name=adapter_name)
        where = f"the PeftModel's adapter {adapter_name!r}"
    else:
        folder = os.fspath(source)
        if adapter_name != "default":  # peft saves every adapter but "default" in a subfolder of its name
            folder = os.path.join(folder, adapter_name)
        if not os.path.isfile(os.path.join(folder, CONFIG_FILE)):
            raise FileNotFoundError(f"source {folder!r} is not a peft adapter folder (no {CONFIG_FILE})")
        config = PeftConfig.from_pretrained(folder)
        state = _read_weights(folder)
        where = f"adapter folder {folder!r}"
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    if peft_type not in TENSORS:
        raise ValueError(f"{where} holds a peft {peft_type} adapter: fastvlm imports LORA and OFT")
    check_importable(config)  # before the tensors: a refused setting is named, not a tensor it brings
    suffixes = TENSORS[peft_type]
    modules: dict[str, dict] = {}
    for key, t in state.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        suffix = next((s for s in suffixes if name.endswith("." + s)), None)
        if suffix is None:
            raise ValueError(f"{where}: tensor {key!r} is not one of a {peft_type} layer's {list(suffixes)} "
                             "(modules_to_save, embedding or bias tensors have no fastvlm counterpart)")
        modules.setdefault(name[:-len(suffix) - 1], {})[suffix] = t
    if not modules:
        raise ValueError(f"{where} holds no tensors")
    return config, modules


def _read_weights(folder: str) -> dict:
    path = os.path.join(folder, WEIGHTS_FILE)
    if os.path.isfile(path):
        from safetensors.torch import load_file

        return load_file(path)
    legacy = os.path.join(folder, "adapter_model.bin")
    if os.path.isfile(legacy):
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"adapter folder {folder!r} has no {WEIGHTS_FILE}")


def check_importable(config) -> None:
    """Refuse a peft config whose forward fastvlm's layers do not compute, naming the setting."""
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    free = _FREE_LORA if peft_type == "LORA" else _FREE_OFT
    default = type(config)()
    for f in dataclasses.fields(config):
        if f.name in free or not hasattr(default, f.name):
            continue
        got, want = getattr(config, f.name), getattr(default, f.name)
        empty = (None, {}, [], ())  # peft writes an unset pattern or list as either
        if got != want and not (got in empty and want in empty):
            raise ValueError(f"peft setting {f.name}={got!r} has no fastvlm counterpart (only {want!r} imports "
                             "exactly)")
    if peft_type == "LORA" and config.init_lora_weights not in _PLAIN_INITS:
        raise ValueError(f"peft setting init_lora_weights={config.init_lora_weights!r} changes the base weights; "
                         "fastvlm imports adapters on the unchanged base model (convert it with peft first)")
    if peft_type == "OFT":
        fastvlm_terms(config.use_cayley_neumann, config.num_cayley_neumann_terms)


def _lora_values(config, name: str, t: dict, linear) -> tuple[dict, float]:
    """({"A": .., "B": ..}, scale) of one peft LoRA module, checked against the target's widths."""
    from peft.utils.other import get_pattern_key

    a, b = t.get("lora_A.weight"), t.get("lora_B.weight")
    if a is None or b is None:
        raise ValueError(f"module {name!r}: the adapter holds {sorted(t)}, not both lora_A and lora_B")
    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
    if a.shape[0] != r or b.shape[1] != r:
        raise ValueError(f"module {name!r}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not have the "
                         f"config's rank {r}")
    if (a.shape[1], b.shape[0]) != (linear.in_features, linear.out_features):
        raise ValueError(f"module {name!r}: the adapter is {a.shape[1]} -> {b.shape[0]}, the model's layer "
                         f"{linear.in_features} -> {linear.out_features}")
    scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    return {"A": a, "B": b}, scale


def _oft_values(config, name: str, t: dict, linear) -> tuple[torch.Tensor, int, int | None]:
    """(fastvlm params [K / b, b(b-1)/2], b, neumann_terms) of one peft OFT module."""
    w = t["oft_R.weight"]
    n = w.shape[-1]
    b = int(round((1 + math.sqrt(1 + 8 * n)) / 2))
    if w.dim() != 2 or b * (b - 1) // 2 != n:
        raise ValueError(f"module {name!r}: oft_R {tuple(w.shape)} is not [blocks, b(b-1)/2]")
    width = linear.in_features
    blocks = width // b
    if width % b or w.shape[0] not in ((1,) if config.block_share else (blocks,)):
        raise ValueError(f"module {name!r}: oft_R {tuple(w.shape)} (block size {b}) does not fit the input width "
                         f"{width}")
    if config.block_share:
        w = w.expand(blocks, n)
    k = fastvlm_terms(config.use_cayley_neumann, config.num_cayley_neumann_terms)
    return (w if k is not None else -w), b, k


@torch.no_grad()
def import_peft(model: nn.Module, source, adapter_name: str = "default") -> list[str]:
    """Load a peft LoRA or OFT adapter (a folder, or a ``PeftModel``) into fastvlm layers of ``model``, the
    plain base model (not wrapped by peft), so that it computes what the adapter computes on that model.
    ``adapter_name``: which of the PeftModel's adapters; in a folder, peft saves every adapter but "default"
    in a subfolder of its name. Returns the names of the layers filled.

    When the model already carries fastvlm layers of the kind ("lora" / "orth"), they must sit on exactly
    the adapter's modules with the same shapes and scale (block size and series for rotations); their
    tensors are overwritten. Otherwise a layer is attached on each of the adapter's modules (each a plain
    ``nn.Linear``) through the tuner registry, so it trains, saves, bypasses and merges like any other."""
    from .tuners.lora import LoRAConfig, LoRALinear
    from .tuners.orth import OrthConfig, OrthLinear

    config, modules = read_adapter(source, adapter_name)
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    kind = "lora" if peft_type == "LORA" else "orth"
    if any(hasattr(m, "base_layer") and hasattr(m, "active_adapters") for m in model.modules()):
        raise ValueError("model is wrapped by peft: give its base model (a fresh one, or peft_model.unload())")
    existing = dict(tuner_layers(model, kind)) or None
    if existing is not None:
        missing, extra = sorted(set(modules) - set(existing)), sorted(set(existing) - set(modules))
        if missing or extra:
            raise ValueError(f"the model's {kind!r} layers are not on the adapter's modules: no layer on "
                             f"{missing[:3]}, layers the adapter lacks on {extra[:3]}")
        targets = existing
    else:
        targets = {}
        for name in modules:
            try:
                m = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"the adapter's module {name!r} is not in the model: import onto the base model "
                                 "the adapter was trained on") from None
            if type(m) is not nn.Linear:
                raise ValueError(f"module {name!r} is a {type(m).__name__}, not an nn.Linear: fastvlm imports "
                                 "peft adapters on linear layers")
            targets[name] = m
    values = {}
    for name, t in modules.items():
        if kind == "lora":
            values[name] = _lora_values(config, name, t, targets[name])
        else:
            values[name] = _oft_values(config, name, t, targets[name])
    if existing is not None:
        for name, v in values.items():
            layer = existing[name]
            if kind == "lora":
                (ab, scale), have = v, layer.lora
                if have.A.shape != ab["A"].shape or not math.isclose(have.scale, scale, rel_tol=1e-12):
                    raise ValueError(f"layer {name!r}: rank {have.A.shape[0]} scale {have.scale:g} in the model, "
                                     f"rank {ab['A'].shape[0]} scale {scale:g} in the adapter")
            else:
                _, b, k = v
                if (layer.block_size, layer.neumann_terms) != (b, k):
                    raise ValueError(f"layer {name!r}: block_size {layer.block_size}, neumann_terms "
                                     f"{layer.neumann_terms} in the model, {b}, {k} in the adapter")
    else:
        configs = {name: LoRAConfig(rank=v[0]["A"].shape[0], alpha=v[1] * v[0]["A"].shape[0]) if kind == "lora"
                   else OrthConfig(block_size=v[1], neumann_terms=v[2]) for name, v in values.items()}
        made = {}

        def make(name, linear):
            if kind == "orth":
                return OrthLinear(linear, configs[name], name)
            layer = LoRALinear(linear, configs[name], torch.Generator())
            layer.lora.scale = values[name][1]  # peft's own float: alpha * r / r may round differently
            return layer

        def patch():
            for name in values:
                owner_name, _, attr = name.rpartition(".")
                owner = model.get_submodule(owner_name) if owner_name else model
                made[name] = wrap_site(owner, attr, lambda linear, name=name: make(name, linear))

        # the registry records one config per kind: the first module's (a rank_pattern's others are in the
        # layers' own configs)
        attach(model, patch, kind, configs[min(configs)])
        existing = made
    for name, v in values.items():
        layer = existing[name]
        if kind == "lora":
            layer.lora.A.copy_(v[0]["A"])
            layer.lora.B.copy_(v[0]["B"])
        else:
            layer.params.copy_(v[0])
    return sorted(values)

