"""PVP (METHODS.md section 4): train parameter-efficient modules upstream, pack them, and start downstream
few-shot tuning from the pack instead of from scratch.

Both stages train only the modules (and a linear head when one is used) with cross-entropy on
``logit_scale * norm(f) @ t^T`` (the zero-shot text classifier, when class names are known) or on a linear
head over the image features. Optimiser defaults (the paper leaves them to the user; the library's choice):
AdamW, lr 1e-3, weight decay 1e-4, cosine, 10 epochs, batch 32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import set_lr, warmup_cosine


@dataclass
class PVPRecipe:
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 10
    batch_size: int = 32
    logit_scale: float = 100.0


class ZeroShotHead(nn.Module):
    """``scale * norm(f) @ classifier^T`` with a fixed, normalised text classifier."""

    def __init__(self, classifier: torch.Tensor, scale: float = 100.0):
        super().__init__()
        self.register_buffer("classifier", F.normalize(classifier.detach(), dim=-1))
        self.scale = scale

    def forward(self, f):
        return self.scale * F.normalize(f, dim=-1) @ self.classifier.T


def train_modules(model, params, head: nn.Module, loader, recipe: PVPRecipe, device="cpu", progress=False) -> list[float]:
    """Train ``params`` (and the head's own parameters) with CE; returns each epoch's mean loss."""
    from tqdm.auto import trange

    trainable = list(params) + [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=recipe.lr, weight_decay=recipe.weight_decay)
    history = []
    for epoch in trange(recipe.epochs, desc="pvp", disable=not progress, leave=False):
        set_lr(opt, warmup_cosine(epoch, recipe.epochs, recipe.lr))
        total, n = 0.0, 0
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            loss = F.cross_entropy(head(model.encode_image(images)), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * labels.numel()
            n += labels.numel()
        history.append(total / max(1, n))
    return history


@torch.no_grad()
def evaluate_head_on_images(model, head, samples, transform, batch_size=64, device="cpu") -> float:
    from ..data import ImageDataset

    was = model.training
    model.eval()
    correct = total = 0
    for img, y in torch.utils.data.DataLoader(ImageDataset(samples, transform), batch_size=batch_size):
        correct += int((head(model.encode_image(img.to(device))).argmax(1).cpu() == y).sum())
        total += y.numel()
    model.train(was)
    return 100.0 * correct / max(1, total)
