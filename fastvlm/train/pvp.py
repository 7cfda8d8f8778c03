"""PVP (docs/methods.md section 4): train parameter-efficient modules upstream, pack them, and start downstream
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

from ..models import encode_image
from .common import epochs_of, loader_generator, run_epochs, warmup_cosine


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


class ModulesLoss(nn.Module):
    """forward(images, labels) = CE(head(encode_image(images)), labels): the module
    ``DistributedDataParallel`` wraps, so that its hooks average the modules' (and the head's) gradients."""

    def __init__(self, model, head: nn.Module):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, images, labels):
        return F.cross_entropy(self.head(encode_image(self.model, images)), labels)


def train_modules(model, params, head: nn.Module, loader, recipe: PVPRecipe, device="cpu", progress=False,
                  checkpoint: str | None = None, on_epoch_end=None, name: str | None = None,
                  ranks=None) -> list[float]:
    """Train ``params`` (and the head's own parameters) with CE; returns each epoch's mean loss (a History,
    with the step times). With ``checkpoint`` the state is saved after every epoch and a run resumes from
    it. The progress bar and the state are named ``name``, by default after the tuner kinds that own
    ``params`` (e.g. "lora"). ranks (a ``fastvlm.dist.Dist``): the loader gives this rank's share of each
    global batch; the loss runs under ``DistributedDataParallel``."""
    from ..tuners.common import names_of, tuners_of
    from .distributed import data_parallel

    params = list(params)
    head_params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params + head_params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if name is None:
        reg, ids = tuners_of(model), {id(p) for p in params}
        kinds = [k for k in reg.kinds() if ids & {id(p) for p in reg.parameters(k)}] if reg is not None else []
        name = "+".join(kinds) or "pvp"
    tensors = dict(zip(names_of(model, params), params))
    tensors.update({f"head.{n}": p for n, p in head.named_parameters() if p.requires_grad})
    loss_of = data_parallel(ModulesLoss(model, head), ranks)

    def step(batch, _):
        images, labels = batch
        images, labels = images.to(device), labels.to(device)
        loss = loss_of(images, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item()}, labels.numel()

    return run_epochs(name, epochs=recipe.epochs, batches=epochs_of(loader), step=step, optimizer=opt,
                      tensors=tensors, generators=[loader_generator(loader)],
                      lr_at=lambda e: warmup_cosine(e, recipe.epochs, recipe.lr), checkpoint=checkpoint,
                      progress=progress, on_epoch_end=on_epoch_end, scalar="loss", ranks=ranks)


@torch.no_grad()
def evaluate_head_on_images(model, head, samples, transform, batch_size=64, device="cpu") -> float:
    from ..data import ImageDataset

    was = model.training
    model.eval()
    correct = total = 0
    for img, y in torch.utils.data.DataLoader(ImageDataset(samples, transform), batch_size=batch_size):
        correct += int((head(encode_image(model, img.to(device))).argmax(1).cpu() == y).sum())
        total += y.numel()
    model.train(was)
    return 100.0 * correct / max(1, total)
