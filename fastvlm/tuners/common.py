"""The tuner contract (docs/tuners.md): what every tuner layer exposes, where tuners attach in an open_clip
model (other architectures and ``target_modules``: fastvlm/tuners/targets.py), the one registry of tuner
state on a model, and the one save/load format.

A tuner layer (:class:`TunerLayer`) is an ``nn.Module`` that

- has a class-level ``kind`` ("masks", "orth", "lora", "adapter", "vpt", "taskres"): the registry key;
- wraps the module it changes under the attribute named by ``wraps`` ("base" for linear layers, "inner" for
  the VPT transformer and the adapters' branch output); the wrapped module keeps the layer's name in
  :func:`tuner_names`, so a tuner's tensors have the same names whatever else is stacked on the same site;
- lists its own trainable tensors in :meth:`TunerLayer.tuner_parameters` (never those of what it wraps);
- computes exactly its wrapped module while ``bypass`` is set: the zero-shot network with no second copy;
- folds itself into the frozen weight with :meth:`TunerLayer.merge` and takes itself out again with
  :meth:`TunerLayer.unmerge` where the method allows it (LoRA, rotations; masks merge one way only, the
  masked-off weights are gone), and says why not where it does not (VPT adds tokens, an adapter is
  nonlinear, the TaskRes head has nothing to fold into);
- carries its config as ``config``.

Stacking rule (several tuners on one projection). Linear sites (attention QKV and output projections, MLP
layers) are chains of wrappers around one plain linear module. Weight-changing layers (masks) always sit
directly on the plain linear, whatever the order they were applied in: ``x (W * M)^T + b``. Every other
layer wraps whatever is there: a rotation transforms its input, ``inner(x R)``; LoRA adds beside,
``inner(x) + s x A^T B^T``. So masks compose with anything in either order to the same model, while the
order of a rotation and LoRA on one site decides whether the rotation also turns the LoRA path's input.
A layer merges only when everything between it and the plain linear is merged, and unmerges only when
nothing merged after it on the same weight (a last-in, first-out stack per weight).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field, is_dataclass

import torch
from torch import nn

from ._attention import ProjectionView

#: what a drop-in linear layer can be built on: an nn.Linear or one projection of a ProjectedMultiheadAttention
LINEAR_TYPES = (nn.Linear, ProjectionView)

# ---------------------------------------------------------------------------------------------------------
# where tuners attach
# ---------------------------------------------------------------------------------------------------------


def towers_of(model: nn.Module, towers) -> list[tuple[str, nn.Module]]:
    """(prefix, open_clip Transformer) for each named tower: 'visual' (a ViT) and/or 'text'."""
    from open_clip.transformer import VisionTransformer

    out = []
    for tower in towers:
        if tower == "visual":
            visual = getattr(model, "visual", None)
            if not isinstance(visual, VisionTransformer):
                raise ValueError(f"cannot patch an image encoder of type {type(visual).__name__}; "
                                 "supported: open_clip VisionTransformer")
            out.append(("visual.transformer", visual.transformer))
        elif tower == "text":
            if hasattr(model, "transformer"):
                out.append(("transformer", model.transformer))
            elif hasattr(getattr(model, "text", None), "transformer"):
                out.append(("text.transformer", model.text.transformer))
            else:
                raise ValueError("this model has no open_clip text transformer")
        else:
            raise ValueError(f"towers must name 'visual' and/or 'text', got {tower!r}")
    return out


def recompute_towers(model: nn.Module, towers) -> None:
    """Activation recomputation for the named towers, through open_clip's own ``grad_checkpointing``: each
    block keeps only its input for backward and runs its forward again there (torch.utils.checkpoint,
    non-reentrant). Trades one more forward of each block for the activations inside it."""
    for _, transformer in towers_of(model, towers):
        transformer.grad_checkpointing = True


def blocks_of(model: nn.Module, towers) -> list[tuple[str, nn.Module]]:
    """(dotted name, ResidualAttentionBlock) of every block in the named towers."""
    return [(f"{prefix}.resblocks.{i}", blk) for prefix, tr in towers_of(model, towers)
            for i, blk in enumerate(tr.resblocks)]


# ---------------------------------------------------------------------------------------------------------
# the layer contract
# ---------------------------------------------------------------------------------------------------------


class TunerLayer:
    """Mixin for every tuner layer (see the module docstring for the contract)."""

    kind: str = ""
    wraps: str = "base"
    merge_note: str = ""  # why merge is not possible, for the kinds that cannot merge

    bypass: bool = False
    merged: bool = False

    def tuner_parameters(self) -> list[nn.Parameter]:
        inner = getattr(self, self.wraps, None)
        skip = {id(p) for p in inner.parameters()} if isinstance(inner, nn.Module) else set()
        return [p for p in self.parameters() if id(p) not in skip]

    def merge(self) -> None:
        raise NotImplementedError(f"{self.kind} layers cannot be merged: {self.merge_note}")

    def unmerge(self) -> None:
        raise NotImplementedError(f"{self.kind} layers cannot be merged or unmerged: {self.merge_note}")

    # --- helpers for layers on a linear chain -----------------------------------------------------------

    def plain_linear(self) -> nn.Module:
        """The plain linear module at the bottom of this layer's chain."""
        return innermost(self)

    def _check_can_merge(self) -> None:
        m = getattr(self, self.wraps)
        while isinstance(m, TunerLayer):
            if not m.merged:
                raise RuntimeError(f"cannot merge this {self.kind} layer: the {m.kind} layer under it is not "
                                   f"merged (merge from the weight outwards)")
            m = getattr(m, m.wraps)

    def _push_merge(self) -> None:
        _merge_stack(self.plain_linear()).append(self)
        self.merged = True

    def _pop_merge(self) -> None:
        stack = _merge_stack(self.plain_linear())
        if not stack or stack[-1] is not self:
            top = stack[-1].kind if stack else "none"
            raise RuntimeError(f"cannot unmerge this {self.kind} layer: the {top} layer merged into the same "
                               "weight after it must be unmerged first")
        stack.pop()
        self.merged = False

    def _check_bypass(self) -> None:
        if self.bypass and self.merged:
            raise RuntimeError(f"cannot bypass a merged {self.kind} layer: unmerge it first")


def _merge_stack(linear: nn.Module) -> list:
    """The layers merged into ``linear``'s weight, in merge order (kept on the plain linear itself)."""
    return linear.__dict__.setdefault("_fastvlm_merge_stack", [])


def innermost(module: nn.Module) -> nn.Module:
    while isinstance(module, TunerLayer) and module.wraps == "base":
        module = module.base
    return module


def wrap_site(owner: nn.Module, attr: str, make, innermost_only: bool = False) -> nn.Module:
    """Replace ``owner.<attr>`` by ``make(current)``; with ``innermost_only`` the new layer goes directly on
    the plain linear at the bottom of the chain (the stacking rule for weight-changing layers)."""
    if innermost_only:
        while True:
            cur = getattr(owner, attr)
            if not (isinstance(cur, TunerLayer) and cur.wraps == "base"):
                break
            if cur.merged:
                raise RuntimeError(f"cannot put a layer under a merged {cur.kind} layer: unmerge it first")
            owner, attr = cur, "base"
    new = make(getattr(owner, attr))
    setattr(owner, attr, new)
    return new


class WrapsLinear:
    """Mixin for layers that wrap a linear module as ``self.base``: ``weight``, ``bias`` and the widths of the
    plain linear stay readable (open_clip reads ``mlp.c_fc.weight.dtype``)."""

    @property
    def weight(self):
        return innermost(self).weight

    @property
    def bias(self):
        return innermost(self).bias

    @property
    def in_features(self):
        return self.weight.shape[1]

    @property
    def out_features(self):
        return self.weight.shape[0]


def standalone_base(module: nn.Module, types: tuple, arg: str, freeze: bool) -> nn.Module:
    """Check the module a drop-in layer (``from_linear`` / ``from_conv``, fastvlm/nn.py) is built on and, with
    ``freeze``, turn off its own gradients so that only the new layer's parameters train. The module is kept
    as it is: the layer holds it, and so its weight, by reference."""
    if not isinstance(module, types):
        want = " or ".join(t.__name__ for t in types)
        raise TypeError(f"{arg} must be a {want}, got {type(module).__name__}")
    if freeze:
        for p in module.parameters():
            p.requires_grad_(False)
    return module


def is_plain(module: nn.Module) -> bool:
    """True when ``module`` is the plain linear of a site or a chain whose every layer is merged (so it
    computes ``F.linear(x, W, b)`` with its current weight)."""
    while isinstance(module, TunerLayer):
        if not module.merged:
            return False
        module = getattr(module, module.wraps)
    return True


# ---------------------------------------------------------------------------------------------------------
# the registry: all tuner state of one model in one object
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TunerEntry:
    config: object
    parameters: list = field(default_factory=list)


class Tuners:
    """Per kind, the config and the parameters (tracked by identity, so wrappers may rename them) of every
    tuner attached to a model. Kept in the model's ``__dict__`` (not a submodule: ``state_dict`` and
    ``parameters()`` stay those of the patched model)."""

    ATTR = "_fastvlm_tuners"

    def __init__(self):
        self.entries: dict[str, TunerEntry] = {}

    def kinds(self) -> list[str]:
        return list(self.entries)

    def config(self, kind: str):
        return self._entry(kind).config

    def parameters(self, kind: str) -> list[nn.Parameter]:
        return list(self._entry(kind).parameters)

    def trainable_ids(self) -> set[int]:
        return {id(p) for e in self.entries.values() for p in e.parameters}

    def _entry(self, kind):
        if kind not in self.entries:
            raise ValueError(f"the model carries no {kind!r} tuner (attached: {self.kinds() or 'none'})")
        return self.entries[kind]


def tuners_of(model: nn.Module, create: bool = False) -> Tuners | None:
    reg = model.__dict__.get(Tuners.ATTR)
    if reg is None and create:
        reg = model.__dict__[Tuners.ATTR] = Tuners()
    return reg


def attach(model: nn.Module, apply, kind: str, config=None) -> list[nn.Parameter]:
    """Run ``apply()`` (which adds one tuner's modules to ``model``), record the parameters it added under
    ``kind`` with ``config``, and make exactly the tuners' parameters trainable: everything else (the
    backbone, and the frozen weights a wrapper now holds) is frozen. Returns the new parameters."""
    reg = tuners_of(model, create=True)
    if kind in reg.entries:
        raise ValueError(f"the model already carries a {kind!r} tuner; apply each kind once")
    before = {id(p) for p in model.parameters()}
    apply()
    new = [p for p in model.parameters() if id(p) not in before]
    reg.entries[kind] = TunerEntry(config, new)
    ids = reg.trainable_ids()
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return new


def tuner_layers(model: nn.Module, kind: str | None = None) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every tuner layer of ``kind`` (all kinds: None), named as in :func:`tuner_names`."""
    names = tuner_names(model, modules=True)
    return [(names[id(m)], m) for m in model.modules()
            if isinstance(m, TunerLayer) and (kind is None or m.kind == kind)]


def tuner_names(model: nn.Module, modules: bool = False) -> dict[int, str]:
    """id -> stacking-independent name of every parameter (or, with ``modules``, every module): the dotted
    path with the wrapped-module segment of each tuner layer left out, so ``attn.in_proj.lora.A`` is the
    same whether or not a mask or a rotation also sits on ``attn.in_proj``."""
    out: dict[int, str] = {}

    def walk(mod, prefix):
        if modules:
            out.setdefault(id(mod), prefix[:-1])
        else:
            for n, p in mod._parameters.items():
                if p is not None:
                    out.setdefault(id(p), prefix + n)
        for n, child in mod._modules.items():
            if child is None:
                continue
            skip = isinstance(mod, TunerLayer) and n == mod.wraps
            walk(child, prefix if skip else f"{prefix}{n}.")

    walk(model, "")
    return out


def names_of(model: nn.Module, params) -> list[str]:
    """The stacking-independent names of ``params`` (see :func:`tuner_names`), in the given order."""
    names = tuner_names(model)
    return [names[id(p)] for p in params]


def named_tuner_parameters(model: nn.Module, kind: str) -> dict[str, nn.Parameter]:
    if isinstance(model, TunerLayer) and tuners_of(model) is None:  # a standalone layer (the TaskRes head)
        if model.kind != kind:
            raise ValueError(f"this is a {model.kind!r} layer, not {kind!r}")
        params = model.tuner_parameters()
    else:
        params = tuners_of(model, create=True).parameters(kind)
    return dict(zip(names_of(model, params), params))


def _kinds_and_configs(model) -> dict[str, object]:
    if isinstance(model, TunerLayer) and tuners_of(model) is None:
        return {model.kind: model.config}
    reg = tuners_of(model)
    return {k: reg.config(k) for k in reg.kinds()} if reg is not None else {}


# ---------------------------------------------------------------------------------------------------------
# bypass and merge, model-wide
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def bypassed(model: nn.Module, layers):
    """Set ``bypass`` on every layer inside the block (the zero-shot network, no second copy); the old values
    come back on exit, also when the body raises."""
    layers = list(layers)
    old = [m.bypass for m in layers]
    try:
        for m in layers:
            if getattr(m, "merged", False):
                raise RuntimeError(f"cannot bypass a merged {getattr(m, 'kind', 'tuner')} layer: unmerge it first")
            m.bypass = True
        yield model
    finally:
        for m, b in zip(layers, old):
            m.bypass = b


def bypass(model: nn.Module, kind: str | None = None):
    """Run the network without the tuners of ``kind`` (all tuners: None) inside the block."""
    return bypassed(model, (m for _, m in tuner_layers(model, kind)))


def _chain_depth(layer) -> int:
    d, m = 0, layer
    while isinstance(m, TunerLayer) and m.wraps == "base":
        d, m = d + 1, m.base
    return d


@torch.no_grad()
def merge(model: nn.Module, kind: str) -> nn.Module:
    """Merge every ``kind`` layer (those under it on the same weight must be merged already)."""
    for _, m in sorted(tuner_layers(model, kind), key=lambda nm: _chain_depth(nm[1])):
        if not m.merged:
            m.merge()
    return model


@torch.no_grad()
def unmerge(model: nn.Module, kind: str) -> nn.Module:
    for _, m in sorted(tuner_layers(model, kind), key=lambda nm: -_chain_depth(nm[1])):
        if m.merged:
            m.unmerge()
    return model


# ---------------------------------------------------------------------------------------------------------
# one save/load format for every kind
# ---------------------------------------------------------------------------------------------------------
#
# One safetensors file: tensors named by their stacking-independent names (unique across kinds, since they
# are different parameters of one model), and the JSON metadata
#     {"kind": "tuners", "tuners": {<kind>: {"config": {...}, "encoding": "raw" | "bits", "shapes": {...}}},
#      ...extra}
# "bits": a binary mask bit-packed (1 bit per weight, numpy.packbits order); the kind registers its codec.

FILE_KIND = "tuners"
_CODECS: dict[str, tuple] = {}


def register_codec(kind: str, encoding: str, encode, decode) -> None:
    """``encode(model, tensor) -> stored tensor`` and ``decode(model, stored, target)`` (copies into target)
    for a kind whose file form is not the raw tensor (masks: 1 bit per weight)."""
    _CODECS[kind] = (encoding, encode, decode)


def config_dict(cfg) -> dict:
    if cfg is None:
        return {}
    d = asdict(cfg) if is_dataclass(cfg) else dict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def config_from_dict(cls, d: dict):
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def save_tuners(model: nn.Module, path: str, /, kinds=None, **extra) -> str:
    """Save the tuner state of ``kinds`` (all attached kinds: None) of ``model`` (or of a standalone tuner
    layer such as the TaskRes head) in one file; ``extra`` goes into the metadata as is (any key but ``kinds``)."""
    from ..io import save_checkpoint

    have = _kinds_and_configs(model)
    kinds = list(have) if kinds is None else list(kinds)
    if not kinds:
        raise ValueError("the model carries no tuners to save")
    tensors, meta = {}, {}
    for kind in kinds:
        if kind not in have:
            raise ValueError(f"the model carries no {kind!r} tuner (attached: {sorted(have) or 'none'})")
        encoding, encode, _ = _CODECS.get(kind, ("raw", None, None))
        named = named_tuner_parameters(model, kind)
        for n, p in named.items():
            tensors[n] = encode(model, p.detach()) if encode else p.detach()
        meta[kind] = {"config": config_dict(have[kind]), "encoding": encoding,
                      "shapes": {n: list(p.shape) for n, p in named.items()}}
    return save_checkpoint(path, tensors, {"kind": FILE_KIND, "tuners": meta, **extra})


def read_tuners(path: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a file written by :func:`save_tuners`."""
    from ..io import load_checkpoint

    return load_checkpoint(path, kind=FILE_KIND)


@torch.no_grad()
def load_tuners(model: nn.Module, path: str, kinds=None, what: str = "tuner file", problems=None) -> dict:
    """Copy the tensors of ``kinds`` (all in the file: None) from ``path`` into the model's tuners of the same
    kinds (attached with a config that gives the same shapes); refuse with every misfit named."""
    tensors, meta = read_tuners(path)
    problems = list(problems or [])
    saved = meta.get("tuners", {})
    have = _kinds_and_configs(model)
    kinds = list(saved) if kinds is None else list(kinds)
    todo = []
    for kind in kinds:
        if kind not in saved:
            problems.append(f"kind: the file holds {sorted(saved)}, not {kind!r}")
            continue
        if kind not in have:
            problems.append(f"kind: the file holds {kind!r} tuners, the model has {sorted(have) or 'none'} attached")
            continue
        named = named_tuner_parameters(model, kind)
        shapes = saved[kind]["shapes"]
        missing, extra = sorted(set(named) - set(shapes)), sorted(set(shapes) - set(named))
        if missing:
            problems.append(f"missing in file: {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        if extra:
            problems.append(f"not in model: {extra[:4]}{' ...' if len(extra) > 4 else ''}")
        for n in sorted(set(named) & set(shapes)):
            if tuple(shapes[n]) != tuple(named[n].shape):
                problems.append(f"{n}: file {tuple(shapes[n])}, model {tuple(named[n].shape)}")
        todo.append((kind, named))
    if problems:
        raise ValueError(f"{what} {path!r} does not fit the model: " + "; ".join(problems))
    for kind, named in todo:
        _, _, decode = _CODECS.get(kind, ("raw", None, None))
        for n, p in named.items():
            if decode:
                decode(model, tensors[n], p)
            else:
                p.copy_(tensors[n])
    return meta
