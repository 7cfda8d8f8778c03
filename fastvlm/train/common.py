"""Pieces every recipe shares: the epoch schedule, seeding, top-1 accuracy."""

from __future__ import annotations

import math
import random

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def warmup_cosine(epoch: int, epochs: int, base_lr: float, warmup_epochs: int = 0, warmup_lr: float = 1e-5) -> float:
    """Learning rate for ``epoch`` (0-based): a constant ``warmup_lr`` for the warm-up epochs, then cosine
    from ``base_lr`` to 0 over the remaining epochs (Dassl's ConstantWarmupScheduler + cosine)."""
    if epoch < warmup_epochs:
        return warmup_lr
    span = max(1, epochs - warmup_epochs)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / span))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (logits.argmax(dim=1) == labels).float().mean().item()


@torch.no_grad()
def evaluate_model(model, classifier: torch.Tensor, samples, transform, batch_size: int = 64, device="cpu",
                   scale: float = 100.0) -> float:
    """Top-1 accuracy (%) of ``scale * norm(encode_image) @ classifier.T`` over ``samples``."""
    import torch.nn.functional as F

    from ..data import ImageDataset

    was = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(ImageDataset(samples, transform), batch_size=batch_size)
    correct = total = 0
    for img, y in loader:
        logits = scale * F.normalize(model.encode_image(img.to(device)), dim=-1) @ classifier.T
        correct += int((logits.argmax(1).cpu() == y).sum())
        total += y.numel()
    model.train(was)
    return 100.0 * correct / max(1, total)


def train_loader(samples, transform, batch_size: int, seed: int):
    """Shuffled, seeded loader over ``samples`` (the same order for the same seed)."""
    from ..data import ImageDataset

    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ImageDataset(samples, transform), batch_size=batch_size, shuffle=True,
                                       generator=g, drop_last=False)


def image_norm(model):
    """(image size, mean, std) of an open_clip model's preprocessing."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return size, getattr(model.visual, "image_mean", None) or OPENAI_DATASET_MEAN, \
        getattr(model.visual, "image_std", None) or OPENAI_DATASET_STD


def train_transform(image_size: int, mean, std):
    """Random resized crop (scale 0.5-1) + horizontal flip: the RMT recipe's augmentation, used by every
    image tuner."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


class Checkpointer:
    """Saves a resumable state at the end of every epoch and restores it: the trainable tensors (by
    name), the optimizer, the epoch/step counters, the shuffle generator and torch's global RNG (used by the
    augmentations), so a resumed run reproduces the uninterrupted one bit for bit."""

    def __init__(self, path: str | None, kind: str, tensors: dict, optimizer, generator: torch.Generator):
        self.path, self.kind, self.tensors, self.optimizer, self.generator = path, kind, tensors, optimizer, generator

    def save(self, epoch: int, step: int, history: list) -> None:
        if self.path is None:
            return
        from ..io import save_train_state

        save_train_state(self.path, {
            "kind": self.kind, "epoch": epoch, "step": step, "history": history,
            "tensors": {k: v.detach().cpu().clone() for k, v in self.tensors.items()},
            "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state()})

    @torch.no_grad()
    def restore(self) -> tuple[int, int, list]:
        """(next epoch, step, history) from the saved state; (0, 0, []) when there is none."""
        import os

        from ..io import load_train_state

        if self.path is None or not os.path.exists(self.path):
            return 0, 0, []
        st = load_train_state(self.path, self.kind)
        missing = sorted(set(self.tensors) ^ set(st["tensors"]))
        if missing:
            raise ValueError(f"training state {self.path!r} does not fit this run: tensors differ at {missing[:4]}")
        for k, t in self.tensors.items():
            if t.shape != st["tensors"][k].shape:
                raise ValueError(f"training state {self.path!r}: {k} has shape {tuple(st['tensors'][k].shape)}, "
                                 f"this run needs {tuple(t.shape)}")
            t.copy_(st["tensors"][k])
        self.optimizer.load_state_dict(st["optimizer"])
        self.generator.set_state(st["generator"])
        torch.set_rng_state(st["torch_rng"])
        return st["epoch"] + 1, st["step"], st["history"]
