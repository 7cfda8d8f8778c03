"""Pieces every recipe shares: the one training loop (:func:`run_epochs`) with its resumable state
(:class:`Checkpointer`), the epoch schedule, seeding, top-1 accuracy. The recipes themselves are in
docs/methods.md (sections 1-4); docs/tuners.md describes the loop."""

from __future__ import annotations

import math
import os
import random
import time

import numpy as np
import torch

from ..models import image_norm  # noqa: F401  (re-exported: the recipes and the CLI import it from here)


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
    from ..models import encode_image

    was = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(ImageDataset(samples, transform), batch_size=batch_size)
    correct = total = 0
    try:
        for img, y in loader:
            logits = scale * F.normalize(encode_image(model, img.to(device)), dim=-1) @ classifier.T
            correct += int((logits.argmax(1).cpu() == y).sum())
            total += y.numel()
    finally:  # the caller's mode also when an image cannot be read (a training run goes on after it)
        model.train(was)
    return 100.0 * correct / max(1, total)


def train_loader(samples, transform, batch_size: int, seed: int):
    """Shuffled, seeded loader over ``samples`` (the same order for the same seed)."""
    from ..data import ImageDataset

    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ImageDataset(samples, transform), batch_size=batch_size, shuffle=True,
                                       generator=g, drop_last=False)


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
    name), the optimizer, the epoch/step counters, the history (with its step times), the run's random
    generators (shuffle, cutout, ...) and torch's global RNG (used by the augmentations), so a resumed run
    reproduces the uninterrupted one bit for bit. ``generator`` is one ``torch.Generator`` or a list.

    With several ranks (``ranks``, a ``fastvlm.dist.Dist``) every rank holds the same state (the same averaged
    gradients, the same generators), so rank 0 alone writes it, atomically, and rank 0 alone reads it on
    resume and sends it to the others: --out need not be visible to every machine."""

    def __init__(self, path: str | None, kind: str, tensors: dict, optimizer, generator, ranks=None):
        from .. import dist as D

        self.path, self.kind, self.tensors, self.optimizer = path, kind, tensors, optimizer
        self.generators = list(generator) if isinstance(generator, (list, tuple)) else [generator]
        self.ranks = ranks if ranks is not None else D.Dist()

    def save(self, epoch: int, step: int, history: list) -> None:
        if self.path is None or not self.ranks.is_main:
            return
        from ..io import save_train_state

        save_train_state(self.path, {
            "kind": self.kind, "epoch": epoch, "step": step, "history": list(history),
            "step_times": list(getattr(history, "step_times", [])),
            "tensors": {k: v.detach().cpu().clone() for k, v in self.tensors.items()},
            "optimizer": self.optimizer.state_dict(), "generators": [g.get_state() for g in self.generators],
            "torch_rng": torch.get_rng_state()})

    @torch.no_grad()
    def restore(self) -> tuple[int, int, list]:
        """(next epoch, step, history) from the saved state; (0, 0, []) when there is none. The history is a
        :class:`History` carrying the saved step times."""
        from .. import dist as D
        from ..io import load_train_state

        if self.path is None:
            return 0, 0, History()
        st = D.from_main(self.ranks, lambda: load_train_state(self.path, self.kind) if os.path.exists(self.path)
                         else None)
        if st is None:
            return 0, 0, History()
        missing = sorted(set(self.tensors) ^ set(st["tensors"]))
        if missing:
            raise ValueError(f"training state {self.path!r} does not fit this run: tensors differ at {missing[:4]}")
        for k, t in self.tensors.items():
            if t.shape != st["tensors"][k].shape:
                raise ValueError(f"training state {self.path!r}: {k} has shape {tuple(st['tensors'][k].shape)}, "
                                 f"this run needs {tuple(t.shape)}")
            t.copy_(st["tensors"][k])
        self.optimizer.load_state_dict(st["optimizer"])
        states = st.get("generators", [st["generator"]] if "generator" in st else [])
        if len(states) != len(self.generators):
            raise ValueError(f"training state {self.path!r} holds {len(states)} random generators, this run has "
                             f"{len(self.generators)}")
        for g, state in zip(self.generators, states):
            g.set_state(state)
        torch.set_rng_state(st["torch_rng"])
        return st["epoch"] + 1, st["step"], History(st["history"], st.get("step_times", []))


class History(list):
    """One entry per epoch (a mean loss, or a dict of mean metrics), plus ``step_times``: the wall time of
    every step in seconds (the step call alone: waiting for the next batch is not in it), so a caller can
    report the step-time distribution (:func:`step_time_summary`)."""

    def __init__(self, entries=(), step_times=()):
        super().__init__(entries)
        self.step_times = list(step_times)


def set_epoch(loader, epoch: int) -> None:
    """Tell a loader's sampler and dataset the epoch, where they take it (``DistributedSampler`` permutes by
    seed + epoch; a seeded :class:`~fastvlm.data.ImageDataset` augments by seed, epoch and sample)."""
    for part in (getattr(loader, "sampler", None), getattr(loader, "dataset", None)):
        if hasattr(part, "set_epoch"):
            part.set_epoch(epoch)


def epochs_of(loader):
    """``batches(epoch)`` for :func:`run_epochs` over one loader: the loader, told the epoch first."""
    def batches(epoch):
        set_epoch(loader, epoch)
        return loader

    return batches


def step_time_summary(times) -> dict:
    """The distribution of step times (seconds): ``steps``, ``median``, ``p95`` (nearest rank: the
    ceil(0.95 n)-th smallest), ``max``, ``max_over_median`` (a stall shows as a large value here) and every
    step's ``seconds`` in order. With no steps: ``steps`` 0, the statistics None."""
    ts = [float(t) for t in times]
    if not ts:
        return {"steps": 0, "median": None, "p95": None, "max": None, "max_over_median": None, "seconds": []}
    srt = sorted(ts)
    n = len(srt)
    median = srt[n // 2] if n % 2 else 0.5 * (srt[n // 2 - 1] + srt[n // 2])
    return {"steps": n, "median": median, "p95": srt[math.ceil(0.95 * n) - 1], "max": srt[-1],
            "max_over_median": srt[-1] / median if median > 0 else None, "seconds": ts}


def run_epochs(name: str, *, epochs: int, batches, step, optimizer, tensors: dict, generators=(), lr_at,
               checkpoint: str | None = None, progress: bool = False, on_epoch_end=None,
               scalar: str | None = None, ranks=None, replicated: bool = False) -> History:
    """The one training loop of every recipe.

    batches(epoch) gives the epoch's batches; step(batch, step_index) runs one optimisation step and returns
    (metrics dict, weight); each epoch's entry is the weighted mean of the metrics (the value of ``scalar``
    alone when given). lr_at(epoch) sets the learning rate of every parameter group before the epoch. With
    ``checkpoint`` (a path) the state of ``tensors`` (name -> trainable tensor), the optimizer, ``generators``
    and the counters is saved after every epoch and a run resumes from it when it exists;
    ``on_epoch_end(epoch)`` is called after each save. The progress bar counts steps and is named ``name``;
    when the batches have a length it shows the steps of all epochs, a resumed run starting where it stopped.

    With several ranks (``ranks``, a ``fastvlm.dist.Dist``; ``step`` then trains on this rank's share of each
    global batch and syncs the gradients itself) each epoch's weighted sums and weights are added over the
    ranks before the mean, so the history is the one process's on the same global batches (up to float
    order: a step's weight is its sample count, or 1 for a mean over the batch, which equal-sized shares
    keep exact); rank 0 alone saves the state and shows the progress bar. ``replicated``: every rank runs the
    whole global batch instead (the same steps on the same data, so the same result on every rank); the
    history is then each rank's own, and ``ranks`` only says who writes."""
    from tqdm.auto import tqdm

    from .. import dist as D

    ranks = ranks if ranks is not None else D.Dist()
    ckpt = Checkpointer(checkpoint, name, tensors, optimizer, list(generators), ranks)
    start, step_index, history = ckpt.restore()
    bar = tqdm(desc=name, disable=not progress or not ranks.is_main, leave=False, unit="step")
    try:
        for epoch in range(start, epochs):
            set_lr(optimizer, lr_at(epoch))
            sums, weight = {}, 0.0
            bar.set_postfix(epoch=f"{epoch + 1}/{epochs}")
            epoch_batches = batches(epoch)
            if bar.total is None and hasattr(epoch_batches, "__len__"):  # the true progress, also on resume
                bar.total = len(epoch_batches) * epochs
                bar.n = bar.last_print_n = start * len(epoch_batches)
                bar.refresh()
            for batch in epoch_batches:
                t0 = time.perf_counter()
                metrics, w = step(batch, step_index)
                history.step_times.append(time.perf_counter() - t0)
                step_index += 1
                weight += w
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v * w
                bar.update(1)
            if ranks.enabled and not replicated:
                keys = list(sums)  # the same order on every rank: the steps return the same metrics
                *totals, weight = D.all_sum([sums[k] for k in keys] + [weight], ranks)
                sums = dict(zip(keys, totals))
            entry = {k: v / max(weight, 1e-30) if weight else 0.0 for k, v in sums.items()}
            history.append(entry.get(scalar, 0.0) if scalar else entry)
            ckpt.save(epoch, step_index, history)
            if on_epoch_end is not None:
                on_epoch_end(epoch)
    finally:
        bar.close()
    return history


def loader_generator(loader) -> torch.Generator:
    """The loader's shuffle generator (restored on resume), or a new one for loaders without."""
    g = getattr(loader, "generator", None)
    return g if isinstance(g, torch.Generator) else torch.Generator()
