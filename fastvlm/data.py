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


class ImageDataset(torch.utils.data.Dataset):
    def __init__(self, samples: list[Sample], transform=None):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label, _ = self.samples[i]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except Exception as e:  # a file that passed check_images can still fail to decode (truncated JPEG)
            raise UnreadableImage(f"image {path!r} cannot be read ({type(e).__name__}: {e})") from None
        if self.transform is not None:
            img = self.transform(img)
        return img, label


def shuffled_loader(samples: list[Sample], transform, batch_size: int, seed: int, num_workers: int = 0):
    """A shuffled training loader whose order is set by ``seed`` alone (the same batches of samples for any
    ``num_workers``; train.common.train_loader is this with no workers). With workers, each worker draws the
    augmentations from torch's generator seeded by the loader (base seed + worker index), so the augmented
    images depend on ``num_workers`` but not on the timing; the shuffle generator is ``loader.generator``,
    which a resumable training state saves, so an interrupted run resumes to the same result."""
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ImageDataset(samples, transform), batch_size=batch_size, shuffle=True,
                                       generator=g, drop_last=False, num_workers=num_workers)


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
