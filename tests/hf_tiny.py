"""Tiny random-init Hugging Face models for the interop and ``hf:`` tests (built from configs: no download),
and the one place where the tests put fastvlm layers on a Hugging Face model's linear modules."""

from __future__ import annotations

import torch

# hidden 64, intermediate 128, 2 layers, 2 heads; images 32 px in 8 px patches; embeddings 32
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)
ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
MLP = ("fc1", "fc2")


def tiny_clip(seed: int = 0):
    """A random-init transformers CLIPModel (fp32, eval mode)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    return CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=32)).eval()


def linear_names(model, suffixes) -> list[str]:
    """Names of the nn.Linear modules of ``model`` whose last segment is in ``suffixes`` (peft's matching)."""
    return [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n.rpartition(".")[2] in suffixes]


def attach_layers(model, kind: str, suffixes, make) -> list[str]:
    """Put ``make(linear)`` (a fastvlm layer) on every nn.Linear named by ``suffixes``, registered as ``kind``
    through the tuner registry. Replace by ``apply_lora(model, target_modules=...)`` / ``apply_orth(...)``
    once those take target_modules. Returns the module names."""
    from fastvlm.tuners.common import attach, wrap_site

    names = linear_names(model, suffixes)

    def patch():
        for name in names:
            owner, _, attr = name.rpartition(".")
            wrap_site(model.get_submodule(owner), attr, make)

    attach(model, patch, kind, None)
    return names


def features(model, images, tokens):
    """(image features, text features) through fastvlm's one interface over model families."""
    from fastvlm.models import encode_image, encode_text

    with torch.no_grad():
        return encode_image(model, images), encode_text(model, tokens)


def clip_tokenizer(context_length: int = 16):
    """transformers' CLIPTokenizer with the OpenAI CLIP vocabulary, built offline from open_clip's bundled BPE
    file (the same byte-level BPE: vocabulary and merges in rank order; only the special tokens are spelt
    ``<|startoftext|>`` / ``<|endoftext|>`` there)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    vocab = dict(bpe.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in merges], model_max_length=context_length)


def save_tiny_clip(folder, tokenizer: bool = True, seed: int = 0) -> str:
    """A random-init tiny CLIPModel saved with save_pretrained (and its tokenizer beside it)."""
    tiny_clip(seed).save_pretrained(folder)
    if tokenizer:
        clip_tokenizer().save_pretrained(folder)
    return str(folder)
