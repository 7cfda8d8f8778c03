"""Loading open_clip models: a known architecture with pretrained weights (an open_clip tag such as
'openai', or a local checkpoint file), or random initialisation (``pretrained=None``).

Also registers ``fastvlm-tiny-vit``, a 2-block ViT at 32 px, and ``fastvlm-tiny-rn``, a one-block-per-stage
ModifiedResNet at 64 px, used by the tests, the quick benchmarks and the
CLI demos, so everything runs on a CPU with no downloads.
"""

from __future__ import annotations

import os

import open_clip
import torch

TINY = "fastvlm-tiny-vit"
TINY_RN = "fastvlm-tiny-rn"
_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": _TEXT,
}
TINY_RN_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
    "text_cfg": _TEXT,
}


def _register() -> None:
    from open_clip import factory

    factory._MODEL_CONFIGS.setdefault(TINY, TINY_CONFIG)
    factory._MODEL_CONFIGS.setdefault(TINY_RN, TINY_RN_CONFIG)


_register()


def load_clip(model: str, pretrained: str | None = None, device: str | torch.device = "cpu"):
    """Return (model, preprocess_train, preprocess_eval, tokenizer), the model in eval mode.

    pretrained: None or 'none' for random init; a path to a local checkpoint file; otherwise an open_clip
    pretrained tag (e.g. 'openai'), which open_clip downloads on first use.
    """
    if model not in open_clip.list_models():
        raise ValueError(f"model must be an open_clip architecture (open_clip.list_models()), got {model!r}")
    tag = None if pretrained in (None, "", "none", "None") else pretrained
    if tag is not None and not os.path.exists(tag):
        known = {t for m, t in open_clip.list_pretrained() if m == model}
        if tag not in known and (os.sep in tag or tag.endswith((".pt", ".bin", ".safetensors"))):
            raise FileNotFoundError(f"pretrained checkpoint {tag!r} does not exist")
        if tag not in known:
            raise ValueError(f"pretrained must be a file or one of {sorted(known)} for {model}, got {tag!r}")
    m, pre_train, pre_eval = open_clip.create_model_and_transforms(model, pretrained=tag, device=device)
    m.eval()
    return m, pre_train, pre_eval, open_clip.get_tokenizer(model)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model
