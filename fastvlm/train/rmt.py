"""RMT recipe (docs/methods.md section 2): the two-pass gradient-dropout step and the training loop.

    logits = 100 * norm(f) @ t.T          t = the fixed, normalised zero-shot text classifier
    L_a    = CE(logits, y) + 1e-4 * sum_layers ||S||_2          (not squared)
    L_kl   = soft cross-entropy from the zero-shot predictions (masks bypassed) to the tuned ones, T = 1
    g_b = grad_S L_kl (pass 1),  g = grad_dropout(grad_S L_a, g_b, lambda, seed) (pass 2),  Adam step.

Adam, lr 8e-5 (ImageNet 3e-5), weight decay 0, cosine, no warm-up, batch 32, 30 epochs (ImageNet 10);
random resized crop (scale 0.5-1) + horizontal flip. lambda (``drop_ratio``) is a per-run setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..dist import group_mean
from ..functional import grad_dropout
from ..models import encode_image
from ..tuners.mask import bypass_masks, gradient_dropout, score_parameters
from .common import epochs_of, loader_generator, run_epochs, warmup_cosine


@dataclass
class RMTRecipe:
    lr: float = 8e-5
    weight_decay: float = 0.0
    epochs: int = 30
    batch_size: int = 32
    drop_ratio: float = 1.0  # lambda; the paper's instructions give 0.3 and 1.0 for the same datasets
    reg: float = 1e-4
    logit_scale: float = 100.0
    seed: int = 0


def clip_logits(model, images, classifier, scale=100.0):
    """``scale * norm(encode_image(images)) @ classifier.T`` (classifier rows already normalised)."""
    return scale * F.normalize(encode_image(model, images), dim=-1) @ classifier.T


def layer_seed(seed: int, step: int, index: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + index * 104_729) % (2**62)


def rmt_losses(model, images, labels, classifier, recipe: RMTRecipe):
    """(CE, L_kl, reg, scores) of one batch: the zero-shot teacher is the same network with masks bypassed."""
    scores = score_parameters(model)
    with torch.no_grad(), bypass_masks(model):
        p_zs = clip_logits(model, images, classifier, recipe.logit_scale).softmax(dim=-1)
    logp = clip_logits(model, images, classifier, recipe.logit_scale).log_softmax(dim=-1)
    l_kl = -(p_zs * logp).sum(dim=-1).mean()
    ce = F.nll_loss(logp, labels)
    reg = recipe.reg * sum(torch.linalg.vector_norm(s) for s in scores)  # backpropagated directly only when
    # lambda = 0 (or in the distributed step): with the fused dropout its gradient enters through the slots
    return ce, l_kl, reg, scores


def rmt_step(model, images, labels, classifier, optimizer, recipe: RMTRecipe, step: int) -> dict:
    """One training step; returns the loss values. Pass 1 backpropagates L_kl; the mask tuner's
    :func:`~fastvlm.tuners.mask.gradient_dropout` then hands each layer's g_b to pass 2, whose gradient of
    CE + reg is dropped against it (fused layers inside their score-gradient kernel, in place)."""
    ce, l_kl, reg, _ = rmt_losses(model, images, labels, classifier, recipe)
    optimizer.zero_grad(set_to_none=True)
    if recipe.drop_ratio == 0.0:  # plain L_a
        (ce + reg).backward()
    else:
        l_kl.backward(retain_graph=True)  # pass 1: g_b into .grad
        with gradient_dropout(model, recipe.drop_ratio, lambda i: layer_seed(recipe.seed, step, i), recipe.reg):
            ce.backward()  # pass 2
    optimizer.step()
    return {"ce": ce.item(), "kl": l_kl.item(), "reg": reg.item(), "loss_a": ce.item() + reg.item()}


def rmt_step_distributed(model, images, labels, classifier, optimizer, recipe: RMTRecipe, step: int,
                         group=None) -> dict:
    """One two-pass RMT step on this rank's part of the batch, with gradient dropout on the rank-averaged
    gradients (identical seeds on every rank, so every rank applies the same update)."""
    ce, l_kl, reg, scores = rmt_losses(model, images, labels, classifier, recipe)
    g_b = list(torch.autograd.grad(l_kl, scores, retain_graph=True))
    g_a = list(torch.autograd.grad(ce + reg, scores))
    group_mean(g_b, group)
    group_mean(g_a, group)  # mean of the ranks' CE gradients + the reg gradient, the same on every rank
    for i, (s, ga, gb) in enumerate(zip(scores, g_a, g_b)):
        s.grad = grad_dropout(ga, gb, recipe.drop_ratio, layer_seed(recipe.seed, step, i)) if recipe.drop_ratio else ga
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"ce": ce.item(), "kl": l_kl.item(), "reg": reg.item(), "loss_a": ce.item() + reg.item()}


def train_rmt(model, classifier, loader, recipe: RMTRecipe, device="cpu", progress=False,
              checkpoint: str | None = None, on_epoch_end=None, ranks=None) -> list[dict]:
    """Adam over the scores, cosine per epoch; returns each epoch's mean losses (a History, with the step
    times). With ``checkpoint`` the state is saved after every epoch and a run resumes from it (same result
    as uninterrupted: the loader's shuffle generator, the augmentation RNG and the gradient-dropout step
    counter are restored).

    ranks (a ``fastvlm.dist.Dist``): the loader gives this rank's share of each global batch, and each step
    is :func:`rmt_step_distributed` (both gradients averaged over the ranks, then
    dropped, with the same seeds on every rank)."""
    from ..tuners.mask import mask_entries

    scores = score_parameters(model)
    opt = torch.optim.Adam(scores, lr=recipe.lr, weight_decay=recipe.weight_decay)
    one_step = rmt_step_distributed if ranks is not None and ranks.enabled else rmt_step

    def step(batch, index):
        images, labels = batch
        return one_step(model, images.to(device), labels.to(device), classifier, opt, recipe, index), 1

    return run_epochs("rmt", epochs=recipe.epochs, batches=epochs_of(loader), step=step, optimizer=opt,
                      tensors={n: s for n, _, s in mask_entries(model)}, generators=[loader_generator(loader)],
                      lr_at=lambda e: warmup_cosine(e, recipe.epochs, recipe.lr), checkpoint=checkpoint,
                      progress=progress, on_epoch_end=on_epoch_end, ranks=ranks)
