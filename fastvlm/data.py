"""Few-shot data: image folders, CoOp split files, k-shot sampling by seed, and the image-feature cache.

A sample is ``(path, label, classname)``, the CoOp split-file row.

- Image folder: ``root/<class>/<image>``; class names are folder names with ``_`` read as spaces, labels in
  sorted folder order. A root with ``train/`` and ``test/`` (or ``val/``) subfolders gives those splits.
- CoOp split: ``split_zhou_<Dataset>.json`` with ``train``/``val``/``test`` lists of ``[path, label,
  classname]``, paths relative to the image root.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict

import torch
from PIL import Image

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
Sample = tuple  # (path, label, classname)


def image_folder(root: str) -> list[Sample]:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root!r} has no class subfolders (expected root/<class>/<image>)")
    out = []
    for label, c in enumerate(classes):
        for fn in sorted(os.listdir(os.path.join(root, c))):
            if fn.lower().endswith(IMAGE_EXTS):
                out.append((os.path.join(root, c, fn), label, c.replace("_", " ")))
    if not out:
        raise ValueError(f"image folder {root!r} holds no images with extensions {IMAGE_EXTS}")
    return out


def coop_split(path: str, image_root: str | None = None) -> dict[str, list[Sample]]:
    """Read a CoOp ``split_zhou_<Dataset>.json``; paths are joined to ``image_root`` (default: its folder)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"split file {path!r} does not exist")
    with open(path) as fh:
        try:
            raw = json.load(fh)
        except ValueError as e:
            raise ValueError(f"split file {path!r} is not valid JSON ({e})") from None
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    if not isinstance(raw, dict):
        raise ValueError(f"split file {path!r} must hold a JSON object with train/val/test lists")
    out = {}
    for split in ("train", "val", "test"):
        if split not in raw:
            raise ValueError(f"split file {path!r} has no {split!r} list")
        if split != "val" and not raw[split]:
            raise ValueError(f"split file {path!r} has an empty {split!r} list")
        rows = []
        for i, row in enumerate(raw[split]):
            if len(row) != 3:
                raise ValueError(f"split file {path!r}: {split}[{i}] must be [path, label, classname], got {row!r}")
            rows.append((os.path.join(root, row[0]), int(row[1]), str(row[2])))
        out[split] = rows
    return out


def classnames(samples: list[Sample]) -> list[str]:
    """Class names indexed by label (labels must be 0..K-1, each with one name)."""
    if not samples:
        raise ValueError("no samples: the class names come from the training samples")
    names: dict[int, str] = {}
    for _, label, name in samples:
        if names.setdefault(label, name) != name:
            raise ValueError(f"label {label} has two class names: {names[label]!r} and {name!r}")
    K = max(names) + 1
    missing = [k for k in range(K) if k not in names]
    if missing:
        raise ValueError(f"labels must cover 0..{K - 1}; missing {missing[:5]}")
    return [names[k] for k in range(K)]


def few_shot(samples: list[Sample], shots: int, seed: int) -> list[Sample]:
    """``shots`` samples per class, drawn without replacement by ``seed`` (all of a class if it has fewer)."""
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    by_class = defaultdict(list)
    for s in samples:
        by_class[s[1]].append(s)
    rng = random.Random(seed)
    out = []
    for label in sorted(by_class):
        items = by_class[label]
        out.extend(rng.sample(items, min(shots, len(items))))
    return out


def split_holdout(samples: list[Sample], shots: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """k-shot train samples and the rest of the folder as the test set (for a folder without splits)."""
    train = few_shot(samples, shots, seed)
    chosen = {s[0] for s in train}
    return train, [s for s in samples if s[0] not in chosen]


def load_splits(data: str, split_file: str | None = None) -> dict[str, list[Sample]]:
    """Resolve ``--data``/``--split`` into train and test sample lists (and val where there is one)."""
    if split_file is not None:
        return coop_split(split_file, data)
    if os.path.isfile(data) and data.endswith(".json"):
        return coop_split(data)
    if os.path.isfile(data):
        raise ValueError(f"{data!r} is a file: give an image folder (root/<class>/<image>, or with train/ and "
                         "test/) or a CoOp split .json")
    splits = {}
    for name in ("train", "val", "test"):
        p = os.path.join(data, name)
        if os.path.isdir(p):
            splits[name] = image_folder(p)
    if "train" in splits:
        if "test" not in splits:
            if "val" not in splits:
                raise ValueError(f"{data!r} has train/ but neither test/ nor val/")
            splits["test"] = splits["val"]
        return splits
    return {"all": image_folder(data)}


def count_per_class(samples: list[Sample]) -> dict[str, int]:
    """Number of samples of each class, by class name, in label order."""
    counts: dict[int, list] = {}
    for _, label, name in samples:
        counts.setdefault(label, [name, 0])[1] += 1
    return {counts[k][0]: counts[k][1] for k in sorted(counts)}


class UnreadableImage(ValueError):
    """An image file that PIL cannot open or decode; the message names the file."""


def _probe(path: str) -> str | None:
    """None when ``path`` opens as an image and its data verifies, else the reason."""
    try:
        with Image.open(path) as im:
            im.verify()  # reads the whole file for PNG/GIF/BMP (CRCs); for JPEG only the header
        return None
    except Exception as e:  # PIL raises many kinds: UnidentifiedImageError, OSError, SyntaxError, ...
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def check_images(samples: list[Sample], progress: bool = False) -> list[tuple[str, str]]:
    """(path, reason) for every sample whose file is missing, empty or not a readable image, in order."""
    from tqdm.auto import tqdm

    bad = []
    for path, _, _ in tqdm(samples, desc="checking images", disable=not progress, leave=False, unit="img"):
        reason = _probe(path)
        if reason is not None:
            bad.append((path, reason))
    return bad


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s random augmentation in ``epoch``: a function of the three numbers alone,
    so the augmented image is the same whichever process, worker or batch position draws it."""
    import numpy as np

    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] % (2**63))


class ImageDataset(torch.utils.data.Dataset):
    """``(image, label)`` of each sample, through ``transform``. With ``augment_seed`` the transform's random
    draws (torch's global generator, as torchvision's transforms use it) come from
    :func:`augmentation_seed` of (augment_seed, the epoch set by :meth:`set_epoch`, the sample's index), inside
    a forked generator state: a sample is augmented identically by one process or by whichever of N ranks
    holds it, and the caller's generator is left untouched."""

    def __init__(self, samples: list[Sample], transform=None, augment_seed: int | None = None):
        self.samples = list(samples)
        self.transform = transform
        self.augment_seed, self.epoch = augment_seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label, _ = self.samples[i]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except Exception as e:  # a file that passed check_images can still fail to decode (truncated JPEG)
            raise UnreadableImage(f"image {path!r} cannot be read ({type(e).__name__}: {e})") from None
        if self.transform is None:
            return img, label
        if self.augment_seed is None:
            return self.transform(img), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(augmentation_seed(self.augment_seed, self.epoch, i))
            return self.transform(img), label


def shuffled_loader(samples: list[Sample], transform, batch_size: int, seed: int, num_workers: int = 0,
                    ranks=None):
    """The training loader of the command line's image tuners, for one process or each of N ranks.

    Order: torch's ``DistributedSampler`` permutes the samples by ``seed + epoch`` (the same permutation on
    every rank) and gives rank r the samples at positions r, r + N, ...; ``batch_size`` is this rank's share
    of the global batch (``fastvlm.dist.local_batch``), so step i's global batch is positions
    ``[i*B, (i+1)*B)`` of the permutation whatever N is, when N divides the dataset (otherwise torch pads
    each rank's share by repeating samples). Augmentation: seeded per sample and epoch
    (:class:`ImageDataset`), so neither N nor ``num_workers`` nor the timing changes an image. Call
    ``set_epoch(loader, epoch)`` (``fastvlm.train.common``) before each epoch; the training loop does. Both
    depend on the seed and the epoch alone, so a resumed run (any N) reproduces the uninterrupted one."""
    from . import dist as D

    ranks = ranks if ranks is not None else D.Dist()
    dataset = ImageDataset(samples, transform, augment_seed=seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=D.sampler(dataset, ranks, seed),
                                       drop_last=False, num_workers=num_workers)


@torch.no_grad()
def cache_features(model, samples: list[Sample], transform, batch_size: int = 64, device="cpu",
                   num_workers: int = 0, progress: bool = True,
                   desc: str = "caching image features") -> tuple[torch.Tensor, torch.Tensor]:
    """Run the frozen image encoder once over ``samples``: (features [N, D] fp32, labels [N])."""
    from tqdm.auto import tqdm

    from .models import encode_image

    if not samples:
        raise ValueError("no images to encode")
    loader = torch.utils.data.DataLoader(ImageDataset(samples, transform), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers)
    feats, labels = [], []
    was_training = model.training
    model.eval()
    for img, y in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
        feats.append(encode_image(model, img.to(device)).float().cpu())
        labels.append(y)
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)
