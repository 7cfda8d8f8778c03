"""Where tuners attach in an open_clip model, and the trainable-module bookkeeping they share."""

from __future__ import annotations

import contextlib

from torch import nn


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


def blocks_of(model: nn.Module, towers) -> list[tuple[str, nn.Module]]:
    """(dotted name, ResidualAttentionBlock) of every block in the named towers."""
    return [(f"{prefix}.resblocks.{i}", blk) for prefix, tr in towers_of(model, towers)
            for i, blk in enumerate(tr.resblocks)]


def attach(model: nn.Module, apply) -> list[nn.Parameter]:
    """Run ``apply()`` (which adds a tuner's modules to ``model``) and make exactly the tuners' parameters
    trainable: those it adds join the model's registry of tuner parameters, everything else is frozen.
    Parameters are tracked by identity, not name (a wrapper such as VPT's renames what it wraps), so tuners
    compose: masks + prompts, LoRA + TaskRes, ... Returns the new parameters."""
    before = {id(p) for p in model.parameters()}
    apply()
    new = [p for p in model.parameters() if id(p) not in before]
    ids = model.__dict__.setdefault("_fastvlm_trainable", set())
    ids.update(id(p) for p in new)
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return new


def names_of(model: nn.Module, params) -> list[str]:
    ids = {id(p) for p in params}
    return [n for n, p in model.named_parameters() if id(p) in ids]


@contextlib.contextmanager
def bypassed(model: nn.Module, layers):
    """Set ``bypass`` on every layer inside the block (the zero-shot network, no second copy), restore after."""
    layers = list(layers)
    old = [m.bypass for m in layers]
    for m in layers:
        m.bypass = True
    try:
        yield model
    finally:
        for m, b in zip(layers, old):
            m.bypass = b


class WrapsLinear:
    """Mixin for modules that wrap a frozen ``nn.Linear`` as ``self.base``: ``weight`` and ``bias`` stay
    readable, as open_clip reads ``mlp.c_fc.weight.dtype``."""

    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias
