"""Tiny random-init models of the architectures beyond open_clip that the tuners have presets for (no
download): transformers CLIPModel and SiglipModel (width 32, 2 layers, 32 px images, patch 8) and a timm ViT
(vit_tiny_patch16_224 narrowed to width 32, 2 blocks, 32 px, patch 8, no head). The same seed gives the same
weights, so a test compares a patched model with an unpatched twin."""

from __future__ import annotations

import pytest
import torch

ARCHS = ("hf_clip", "hf_siglip", "timm_vit")
IMAGE = 32
_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64,
             max_position_embeddings=8)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE,
               patch_size=8)


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "timm_vit":
        timm = pytest.importorskip("timm")
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMAGE, patch_size=8,
                                  num_classes=0, depth=2, embed_dim=32, num_heads=2)
        return model.eval()
    transformers = pytest.importorskip("transformers")
    text = dict(_TEXT, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if arch == "hf_clip":
        cfg = transformers.CLIPConfig(text_config=text, vision_config=_VISION, projection_dim=16)
        return transformers.CLIPModel(cfg).eval()
    if arch == "hf_siglip":
        cfg = transformers.SiglipConfig(text_config=text, vision_config=_VISION)
        return transformers.SiglipModel(cfg).eval()
    raise ValueError(arch)


def has_text(arch: str) -> bool:
    return arch != "timm_vit"


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def tokens(k: int = 3, seed: int = 2) -> torch.Tensor:
    """One 8-token prompt per class, ending in the eos id 1 (CLIP pools at the eos; SigLIP at the last token)."""
    t = torch.randint(2, 64, (k, 8), generator=torch.Generator().manual_seed(seed))
    t[:, -1] = 1
    return t
