"""Data the tests make: a small image folder whose classes differ in colour and pattern."""

import os

import numpy as np
from PIL import Image


def make_image_folder(root, classes=4, per_class=10, size=32, seed=0, split_dirs=False):
    """root/<class>/<i>.png, or root/train/... and root/test/... when split_dirs. Returns class names."""
    rng = np.random.default_rng(seed)
    names = [f"class_{c}" for c in range(classes)]
    palette = rng.uniform(0, 255, size=(classes, 3))
    splits = [("train", per_class), ("test", per_class)] if split_dirs else [("", per_class)]
    for split, n in splits:
        for c, name in enumerate(names):
            d = os.path.join(root, split, name)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                img = np.clip(palette[c] + rng.normal(0, 25, size=(size, size, 3)), 0, 255)
                if c % 2:  # stripes on odd classes
                    img[:, ::4] = 255 - img[:, ::4]
                Image.fromarray(img.astype(np.uint8)).save(os.path.join(d, f"{i}.png"))
    return [n.replace("_", " ") for n in names]
