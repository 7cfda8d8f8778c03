"""Small, atomic checkpoints: tensors in one safetensors file with the config as JSON metadata."""

from __future__ import annotations

import json
import os
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

META_KEY = "fastvlm"


def save_checkpoint(path: str, tensors: dict[str, torch.Tensor], config: dict) -> str:
    """Write atomically: a temporary file in the same folder, fsync, then rename over ``path``.

    An interrupted save never leaves a partial file at ``path``.
    """
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, tmp, metadata={META_KEY: json.dumps(config, sort_keys=True)})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str, kind: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Return (tensors, config). A missing, corrupt or foreign file fails with a clear error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path!r} is not a readable safetensors file ({e})") from None
    if META_KEY not in meta:
        raise ValueError(f"checkpoint {path!r} has no fastvlm config: not written by fastvlm")
    config = json.loads(meta[META_KEY])
    if kind is not None and config.get("kind") != kind:
        raise ValueError(f"checkpoint {path!r} holds a {config.get('kind')!r} checkpoint, expected {kind!r}")
    return tensors, config
