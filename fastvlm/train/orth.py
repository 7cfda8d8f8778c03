"""OrthCR recipe (docs/methods.md section 3; the loss details are unpublished, this is the library's reading):

    L = CE(clean) + CE(cutout) + l1 * KL(p_zs(clean) || p(clean)) + l2 * KL(p_zs(cutout) || p(cutout))

with p_zs from the same network with the rotations bypassed (no second model copy), logits
``100 * norm(f) @ norm(t)^T`` where the text features t come through the (rotated) text encoder every step.
Cutout: one square hole, side 1/2 of the image side by default, centre uniform over the image, clipped at
the border, filled with 0. Evaluation protocol base-to-new: train on the base half of the classes, report
base, new and their harmonic mean.

Optimiser defaults (unpublished in the paper; the library's choice): Adam, lr 1e-3, weight decay 0, cosine,
10 epochs, batch 32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models import encode_image, encode_text
from ..tuners.orth import bypass_rotations, rotated_layers
from .common import epochs_of, loader_generator, run_epochs, warmup_cosine


@dataclass
class OrthRecipe:
    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: int = 10
    batch_size: int = 32
    lambda1: float = 1.0
    lambda2: float = 1.0
    cutout_ratio: float = 0.5
    logit_scale: float = 100.0


def cutout(images: torch.Tensor, ratio: float = 0.5, generator: torch.Generator | None = None,
           ranks=None) -> torch.Tensor:
    """A copy of ``images`` [B, C, H, W] with one square hole per image (side ``ratio`` x the shorter side).

    ranks (a ``fastvlm.dist.Dist`` of N processes): ``images`` is this rank's share of a global batch of
    B * N, the samples at positions rank, rank + N, ... (``fastvlm.data.shuffled_loader``). Every rank draws
    the centres of the whole global batch from its copy of ``generator`` (the same on every rank) and keeps
    those of its positions, so each image gets the hole it gets in one process, and the generators stay
    in step for a resume with any N."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"cutout ratio must be in (0, 1], got {ratio}")
    B, _, H, W = images.shape
    side = max(1, int(round(ratio * min(H, W))))
    rank, world = (ranks.rank, ranks.world_size) if ranks is not None else (0, 1)
    cy = torch.randint(0, H, (B * world,), generator=generator)[rank::world]
    cx = torch.randint(0, W, (B * world,), generator=generator)[rank::world]
    ys = torch.arange(H)[None, :, None]
    xs = torch.arange(W)[None, None, :]
    y0, x0 = (cy - side // 2)[:, None, None], (cx - side // 2)[:, None, None]
    hole = (ys >= y0) & (ys < y0 + side) & (xs >= x0) & (xs < x0 + side)
    return images.masked_fill(hole[:, None].to(images.device), 0.0)


def text_classifier(model, tokens: torch.Tensor) -> torch.Tensor:
    """Normalised text features of one prompt per class, through the (possibly rotated) text encoder."""
    return F.normalize(encode_text(model, tokens), dim=-1)


def _logits(model, images, cls, scale):
    return scale * F.normalize(encode_image(model, images), dim=-1) @ cls.T


def orthcr_loss(model, images, labels, tokens, recipe: OrthRecipe, generator=None,
                ranks=None) -> tuple[torch.Tensor, dict]:
    """(L, its parts as numbers) of one batch; ``ranks``: this rank's share of the global batch (:func:`cutout`)."""
    cut = cutout(images, recipe.cutout_ratio, generator, ranks)
    with torch.no_grad(), bypass_rotations(model):
        cls_zs = text_classifier(model, tokens)
        p_zs = _logits(model, images, cls_zs, recipe.logit_scale).softmax(-1)
        p_zs_cut = _logits(model, cut, cls_zs, recipe.logit_scale).softmax(-1)
    cls = text_classifier(model, tokens)
    lp = _logits(model, images, cls, recipe.logit_scale).log_softmax(-1)
    lp_cut = _logits(model, cut, cls, recipe.logit_scale).log_softmax(-1)
    ce, ce_cut = F.nll_loss(lp, labels), F.nll_loss(lp_cut, labels)
    kl = F.kl_div(lp, p_zs, reduction="batchmean")  # KL(p_zs || p)
    kl_cut = F.kl_div(lp_cut, p_zs_cut, reduction="batchmean")
    loss = ce + ce_cut + recipe.lambda1 * kl + recipe.lambda2 * kl_cut
    return loss, {"loss": loss.item(), "ce": ce.item(), "ce_cutout": ce_cut.item(), "kl": kl.item(),
                  "kl_cutout": kl_cut.item()}


class OrthCRLoss(torch.nn.Module):
    """forward(images, labels) = :func:`orthcr_loss`: the module ``DistributedDataParallel`` wraps, so that
    its hooks average the rotations' gradients over the ranks (the update is linear in them)."""

    def __init__(self, model, tokens, recipe: OrthRecipe, generator, ranks=None):
        super().__init__()
        self.model, self.recipe, self.generator, self.ranks = model, recipe, generator, ranks
        self.register_buffer("tokens", tokens, persistent=False)

    def forward(self, images, labels):
        return orthcr_loss(self.model, images, labels, self.tokens, self.recipe, self.generator, self.ranks)


def train_orth(model, tokens, loader, recipe: OrthRecipe, device="cpu", seed=0, progress=False,
               checkpoint: str | None = None, on_epoch_end=None, ranks=None) -> list[dict]:
    """Adam over the rotations, cosine per epoch; returns each epoch's mean losses (a History, with the step
    times). With ``checkpoint`` the state is saved after every epoch and a run resumes from it (the cutout
    and shuffle generators and the augmentation RNG are restored). ranks (a ``fastvlm.dist.Dist``): the
    loader gives this rank's share of each global batch; the loss runs under ``DistributedDataParallel``."""
    from .distributed import data_parallel

    named = {f"{n}.params": m.params for n, m in rotated_layers(model)}
    opt = torch.optim.Adam(list(named.values()), lr=recipe.lr, weight_decay=recipe.weight_decay)
    g = torch.Generator().manual_seed(seed)
    loss_of = data_parallel(OrthCRLoss(model, tokens, recipe, g, ranks), ranks)

    def step(batch, _):
        images, labels = batch
        loss, parts = loss_of(images.to(device), labels.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return parts, 1

    return run_epochs("orthcr", epochs=recipe.epochs, batches=epochs_of(loader), step=step, optimizer=opt,
                      tensors=named, generators=[g, loader_generator(loader)],
                      lr_at=lambda e: warmup_cosine(e, recipe.epochs, recipe.lr), checkpoint=checkpoint,
                      progress=progress, on_epoch_end=on_epoch_end, ranks=ranks)


def base_to_new(samples, classnames):
    """Split classes into base (first half, rounded up) and new; relabel each half from 0.

    Returns ((base_samples, base_names), (new_samples, new_names))."""
    K = len(classnames)
    nb = (K + 1) // 2
    base = [(p, y, c) for p, y, c in samples if y < nb]
    new = [(p, y - nb, c) for p, y, c in samples if y >= nb]
    return (base, classnames[:nb]), (new, classnames[nb:])


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)
