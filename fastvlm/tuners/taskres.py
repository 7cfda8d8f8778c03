"""TaskRes (METHODS.md section 1): a trainable residual on the frozen text classifier.

    logits = s * norm(f) @ norm(base + alpha * residual).T,   residual initialised to zeros.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .. import functional as FV
from ..io import load_checkpoint, save_checkpoint
from ..templates import templates_for


@dataclass
class TaskResConfig:
    alpha: float = 0.5  # 1.0 for Flowers102 in the paper
    logit_scale: float = 100.0


class TaskResHead(nn.Module):
    """Frozen base classifier (a buffer) plus a trainable residual (a parameter, zeros at start)."""

    def __init__(self, base: torch.Tensor, config: TaskResConfig | None = None):
        super().__init__()
        if base.dim() != 2 or base.shape[0] < 1:
            raise ValueError(f"base must be a K x D classifier with K >= 1, got shape {tuple(base.shape)}")
        self.config = config or TaskResConfig()
        self.register_buffer("base", base.detach().clone())
        self.residual = nn.Parameter(torch.zeros_like(self.base))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return FV.residual_logits(features, self.base, self.residual, self.config.alpha, self.config.logit_scale)

    def loss(self, features: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return FV.residual_cross_entropy(features, self.base, self.residual, target, self.config.alpha,
                                         self.config.logit_scale, reduction)

    def save(self, path: str, **extra) -> str:
        """Just the residual and the config (the base is rebuilt from the model and class names)."""
        cfg = {"kind": "taskres", **asdict(self.config), "shape": list(self.residual.shape), **extra}
        return save_checkpoint(path, {"residual": self.residual}, cfg)

    def load_residual(self, path: str) -> dict:
        tensors, cfg = load_checkpoint(path, kind="taskres")
        r = tensors["residual"]
        if tuple(r.shape) != tuple(self.residual.shape):
            raise ValueError(f"checkpoint residual has shape {tuple(r.shape)}, this head needs {tuple(self.residual.shape)}")
        with torch.no_grad():
            self.residual.copy_(r)
        self.config = TaskResConfig(alpha=cfg["alpha"], logit_scale=cfg["logit_scale"])
        return cfg


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
    for name in classnames:
        prompts = [tpl.format(name.replace("_", " ")) for tpl in templates]
        feats = [model.encode_text(tokenizer(prompts[i:i + batch_size]).to(device)).float()
                 for i in range(0, len(prompts), batch_size)]
        rows.append(torch.cat(feats).mean(dim=0))
    model.train(was_training)
    return torch.stack(rows)
