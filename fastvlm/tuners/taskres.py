"""TaskRes (docs/methods.md section 1): a trainable residual on the frozen text classifier.

    logits = s * norm(f) @ norm(base + alpha * residual).T,   residual initialised to zeros.

The head is a tuner layer (fastvlm/tuners/common.py) used on its own (on cached features) or attached to a
model with :func:`apply_taskres` (as ``model.taskres``, composing with the image-side tuners). Bypass gives
the zero-shot classifier (alpha = 0). There is no merge: the head is one matmul against
``norm(base + alpha * residual)`` already, with nothing to fold into.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import functional as FV
from ..models import encode_text
from ..templates import templates_for
from .common import TunerLayer, attach, config_from_dict, load_tuners, save_tuners, tuners_of


@dataclass
class TaskResConfig:
    alpha: float = 0.5  # 1.0 for Flowers102 in the paper
    logit_scale: float = 100.0


class TaskResHead(TunerLayer, nn.Module):
    """Frozen base classifier (a buffer) plus a trainable residual (a parameter, zeros at start)."""

    kind = "taskres"
    wraps = ""
    merge_note = "the head is one matmul against norm(base + alpha * residual) already"

    def __init__(self, base: torch.Tensor, config: TaskResConfig | None = None):
        super().__init__()
        if base.dim() != 2 or base.shape[0] < 1:
            raise ValueError(f"base must be a K x D classifier with K >= 1, got shape {tuple(base.shape)}")
        self.config = config or TaskResConfig()
        self.register_buffer("base", base.detach().clone())
        self.residual = nn.Parameter(torch.zeros_like(self.base))
        self.bypass = False

    def _alpha(self) -> float:
        return 0.0 if self.bypass else self.config.alpha

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return FV.residual_logits(features, self.base, self.residual, self._alpha(), self.config.logit_scale)

    def loss(self, features: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return FV.residual_cross_entropy(features, self.base, self.residual, target, self._alpha(),
                                         self.config.logit_scale, reduction)

    def save(self, path: str, **extra) -> str:
        """Just the residual and the config in the one tuner file format (the base is rebuilt from the model
        and class names)."""
        return save_tuners(self, path, **extra)

    def load_residual(self, path: str) -> dict:
        """The residual and the config of a file written by :meth:`save`; returns the file's metadata."""
        meta = load_tuners(self, path, kinds=["taskres"], what="checkpoint")
        self.config = config_from_dict(TaskResConfig, meta["tuners"]["taskres"]["config"])
        registry = self.__dict__.get("_registry")  # the model's, when attached by apply_taskres
        if registry is not None:
            registry.entries[self.kind].config = self.config
        return meta


def apply_taskres(model: nn.Module, base: torch.Tensor, config: TaskResConfig | None = None) -> TaskResHead:
    """Attach a TaskRes head to ``model`` as ``model.taskres`` (registered as the "taskres" tuner, so it saves,
    loads and bypasses with the model's other tuners); the backbone is frozen. Returns the head."""
    device = next(model.parameters()).device
    cfg = config or TaskResConfig()

    def patch():
        model.taskres = TaskResHead(base.to(device), cfg)

    attach(model, patch, "taskres", cfg)
    model.taskres.__dict__["_registry"] = tuners_of(model)  # so load_residual keeps the model's config in step
    return model.taskres


def taskres_config_of(meta: dict) -> TaskResConfig:
    """The TaskRes config recorded in a tuner file's metadata."""
    if "taskres" not in meta.get("tuners", {}):
        raise ValueError(f"the file holds {sorted(meta.get('tuners', {})) or 'no'} tuners, not 'taskres'")
    return config_from_dict(TaskResConfig, meta["tuners"]["taskres"]["config"])


@torch.no_grad()
def build_base_classifier(model, tokenizer, classnames: list[str], templates: list[str] | str | None = None,
                          batch_size: int = 256, device="cpu") -> torch.Tensor:
    """Raw (not normalised) text features of each class's prompts, averaged over templates: K x D, fp32.

    templates: a list of format strings with one ``{}``, or a dataset name ('ImageNet' gives the 8-template
    ensemble), or None for "a photo of a {}.".
    """
    if isinstance(templates, str) or templates is None:
        templates = templates_for(templates)
    if not classnames:
        raise ValueError("classnames must not be empty")
    for tpl in templates:
        if tpl.count("{}") != 1:
            raise ValueError(f"each template must contain one '{{}}', got {tpl!r}")
    was_training = model.training
    model.eval()
    rows = []
    try:
        for name in classnames:
            prompts = [tpl.format(name.replace("_", " ")) for tpl in templates]
            feats = [encode_text(model, tokenizer(prompts[i:i + batch_size]).to(device)).float()
                     for i in range(0, len(prompts), batch_size)]
            rows.append(torch.cat(feats).mean(dim=0))
    finally:  # the caller's mode also when the tokenizer or the encoder raises
        model.train(was_training)
    return torch.stack(rows)
