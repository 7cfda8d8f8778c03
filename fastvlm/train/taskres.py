"""TaskRes recipe on cached features (docs/methods.md section 1): Adam, lr 2e-3 (ImageNet 2e-4), wd 5e-4,
batch 256, 1 warm-up epoch at 1e-5 then cosine; 100 epochs for 1/2/4 shots, 200 for 8/16."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tuners.taskres import TaskResHead
from .common import accuracy, run_epochs, warmup_cosine


@dataclass
class TaskResRecipe:
    lr: float = 2e-3
    weight_decay: float = 5e-4
    batch_size: int = 256
    epochs: int | None = None  # None: 100 for <= 4 shots, 200 above
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5

    def resolved_epochs(self, shots: int) -> int:
        return self.epochs if self.epochs is not None else (100 if shots <= 4 else 200)


def train_taskres(head: TaskResHead, features: torch.Tensor, labels: torch.Tensor, recipe: TaskResRecipe,
                  shots: int, seed: int = 0, progress: bool = False, checkpoint: str | None = None,
                  on_epoch_end=None, ranks=None) -> list[float]:
    """Train only ``head.residual`` on cached features; returns the mean loss of each epoch (a
    :class:`~fastvlm.train.common.History`, with the step times).

    checkpoint: a path; the state is saved there after every epoch and, when it exists, training resumes
    from it (to the same result as an uninterrupted run). on_epoch_end(epoch) is called after each save.

    ranks (a ``fastvlm.dist.Dist``): every rank trains the whole head on the whole (gathered) features, and
    rank 0 alone writes the state. A step is one [B, D] x [D, K] product on cached features: an all-reduce
    of the K x D gradient every step would cost more than the step itself, while identical steps on
    identical data give every rank the one-process result exactly; the parallel part of TaskRes is the
    feature caching."""
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"features ({features.shape[0]}) and labels ({labels.shape[0]}) must have one row each")
    epochs = recipe.resolved_epochs(shots)
    opt = torch.optim.Adam([head.residual], lr=recipe.lr, weight_decay=recipe.weight_decay)
    g = torch.Generator().manual_seed(seed)
    n = features.shape[0]

    def batches(epoch):
        perm = torch.randperm(n, generator=g)
        return (perm[i:i + recipe.batch_size] for i in range(0, n, recipe.batch_size))

    def step(idx, _):
        loss = head.loss(features[idx], labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item()}, idx.numel()

    return run_epochs("taskres", epochs=epochs, batches=batches, step=step, optimizer=opt,
                      tensors={"residual": head.residual}, generators=[g],
                      lr_at=lambda e: warmup_cosine(e, epochs, recipe.lr, recipe.warmup_epochs, recipe.warmup_lr),
                      checkpoint=checkpoint, progress=progress, on_epoch_end=on_epoch_end, scalar="loss",
                      ranks=ranks, replicated=True)


@torch.no_grad()
def evaluate_head(head: TaskResHead, features: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    logits = torch.cat([head(features[i:i + batch_size]) for i in range(0, features.shape[0], batch_size)])
    return accuracy(logits, labels)
