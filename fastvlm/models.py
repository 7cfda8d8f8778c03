"""Loading models: an open_clip architecture with pretrained weights (an open_clip tag such as 'openai', or a
local checkpoint file) or random initialisation (``pretrained=None``), or ``hf:<folder>``, a Hugging Face
``transformers`` CLIPModel or SiglipModel folder written by ``save_pretrained`` (read offline).

Also registers ``fastvlm-tiny-vit``, a 2-block ViT at 32 px, and ``fastvlm-tiny-rn``, a one-block-per-stage
ModifiedResNet at 64 px, used by the tests, the quick benchmarks and the
CLI demos, so everything runs on a CPU with no downloads.
"""

from __future__ import annotations

import contextlib
import json
import logging
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


class _OnceFilter(logging.Filter):
    """Let open_clip's "No pretrained weights loaded ... initialized randomly" warning through once per
    process: every random-init model build logs it, and a benchmark builds many."""

    seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if RANDOM_WEIGHTS not in str(record.msg):
            return True
        if _OnceFilter.seen:
            return False
        _OnceFilter.seen = True
        return True


RANDOM_WEIGHTS = "No pretrained weights loaded"  # open_clip's warning for pretrained=None, on the root logger


def filter_random_weights_warning() -> None:
    """Install the once-per-process filter of open_clip's random-weights warning on the root logger (done
    at import; installing it again changes nothing)."""
    root = logging.getLogger()
    if not any(isinstance(f, _OnceFilter) for f in root.filters):
        root.addFilter(_OnceFilter())


filter_random_weights_warning()


class WeightsUnavailable(RuntimeError):
    """A pretrained tag whose weights are neither cached nor downloadable (no network)."""


def check_model_name(model: str) -> None:
    """Refuse a name that is not an open_clip architecture, suggesting the nearest (case, '-', '_')."""
    from .templates import nearest

    names = open_clip.list_models()
    if model in names:
        return
    guess = nearest(model, names)
    hint = f"did you mean {guess!r}? " if guess else ""
    raise ValueError(f"unknown model {model!r}: {hint}it must be an open_clip architecture "
                     f"(open_clip.list_models(), e.g. ViT-B-16, ViT-B-32, RN50, {TINY}) or hf:<folder>, a "
                     "transformers CLIPModel/SiglipModel saved with save_pretrained")


def _tag(pretrained: str | None) -> str | None:
    return None if pretrained in (None, "", "none", "None") else pretrained


def check_pretrained(model: str, pretrained: str | None) -> str | None:
    """Validate ``pretrained`` for ``model`` without loading anything: None/'none', an existing file, or a
    known open_clip tag. Returns the local file holding a tag's weights when they are already cached (None
    when a download is needed or nothing is to be loaded)."""
    tag = _tag(pretrained)
    if tag is None:
        return None
    if os.path.exists(tag):
        if not os.path.isfile(tag):
            raise ValueError(f"pretrained {tag!r} is a folder: give the checkpoint file inside it")
        return tag
    known = {t for m, t in open_clip.list_pretrained() if m == model}
    if tag not in known and (os.sep in tag or tag.endswith((".pt", ".pth", ".bin", ".safetensors"))):
        raise FileNotFoundError(f"pretrained checkpoint {tag!r} does not exist")
    if not known:
        raise ValueError(f"pretrained {tag!r}: open_clip has no pretrained weights for {model}; give a checkpoint "
                         "file, or 'none' for random weights")
    if tag not in known:
        raise ValueError(f"pretrained must be a file or one of {sorted(known)} for {model} ('none': random weights), "
                         f"got {tag!r}")
    return cached_weights(open_clip.get_pretrained_cfg(model, tag))


def cached_weights(cfg: dict) -> str | None:
    """The local file of an open_clip pretrained config when it is already downloaded, else None. open_clip
    prefers the Hugging Face hub (and a .safetensors twin of a .bin) and falls back to the URL in
    ~/.cache/clip."""
    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    hub = cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            hub = ""
    if hub:
        repo, name = os.path.split(hub)
        name = name or "open_clip_pytorch_model.bin"
        names = [name[:-4] + ".safetensors"] if name.endswith((".bin", ".pth")) else []
        if name == "open_clip_pytorch_model.bin":
            names = ["open_clip_model.safetensors"]
        for n in names + [name]:
            hit = try_to_load_from_cache(repo, n)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
        return None
    url = cfg.get("url", "")
    if url:
        path = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        return path if os.path.isfile(path) else None
    return None


def _download_host(cfg: dict) -> str:
    if cfg.get("hf_hub"):
        from urllib.parse import urlparse

        try:
            from huggingface_hub import constants

            return urlparse(constants.ENDPOINT).hostname or "huggingface.co"
        except ImportError:
            pass
    from urllib.parse import urlparse

    return urlparse(cfg.get("url", "")).hostname or "huggingface.co"


def _reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to host:443 opens within ``timeout`` s (name lookup included: it runs in a
    thread so that a hanging resolver cannot stall the caller)."""
    import socket
    import threading

    ok = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def ensure_weights_available(model: str, pretrained: str | None) -> None:
    """Fail in seconds, not after open_clip's retries, when a tag's weights are not cached and cannot be
    downloaded: the hub is offline (HF_HUB_OFFLINE) or its host does not answer."""
    tag = _tag(pretrained)
    if tag is None or check_pretrained(model, tag) is not None:
        return
    cfg = open_clip.get_pretrained_cfg(model, tag)
    host = _download_host(cfg)
    why = None
    if cfg.get("hf_hub") and _hub_offline_env():
        why = "the Hugging Face hub is set offline (HF_HUB_OFFLINE)"
    elif not _reachable(host):
        why = f"{host} cannot be reached"
    if why:
        raise WeightsUnavailable(
            f"pretrained {tag!r}: the {model} weights are not in the local cache and {why}; give a local "
            f"checkpoint file (--pretrained /path/to/weights.bin) or --pretrained none for random weights")


def _hub_offline_env() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


@contextlib.contextmanager
def _hub_offline(on: bool):
    """Hub downloads answered from the cache alone (no request to check for a newer file) while ``on``."""
    if not on:
        yield
        return
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def load_clip(model: str, pretrained: str | None = None, device: str | torch.device = "cpu"):
    """Return (model, preprocess_train, preprocess_eval, tokenizer), the model in eval mode.

    model: an open_clip architecture, or ``hf:<folder>`` (:func:`load_hf_clip`; ``pretrained`` must then be
    None: the folder holds the weights).
    pretrained: None or 'none' for random init; a path to a local checkpoint file; otherwise an open_clip
    pretrained tag (e.g. 'openai'), which open_clip downloads on first use (weights already in the cache
    are read without any network request). A tag trained with QuickGELU (the OpenAI weights) builds the
    architecture with QuickGELU, as the weights need.
    """
    folder = hf_folder(model)
    if folder is not None:
        if _tag(pretrained) is not None:
            raise ValueError(f"pretrained must be None for an hf: model (the folder holds its weights), got "
                             f"{pretrained!r}")
        return load_hf_clip(folder, device)
    if model not in open_clip.list_models():
        raise ValueError(f"model must be an open_clip architecture (open_clip.list_models()), got {model!r}")
    tag = _tag(pretrained)
    cached = check_pretrained(model, tag) if tag is not None else None
    kw = {}
    if tag is not None and not os.path.exists(tag):
        if open_clip.get_pretrained_cfg(model, tag).get("quick_gelu", False):
            kw["force_quick_gelu"] = True
    with _hub_offline(cached is not None and not os.path.exists(tag or "")):
        m, pre_train, pre_eval = open_clip.create_model_and_transforms(model, pretrained=tag, device=device, **kw)
    m.eval()
    return m, pre_train, pre_eval, open_clip.get_tokenizer(model)


# ---------------------------------------------------------------------------------------------------------
# Hugging Face checkpoint folders: hf:<folder>
# ---------------------------------------------------------------------------------------------------------

HF_PREFIX = "hf:"
HF_MODEL_TYPES = {"clip": "CLIPModel", "siglip": "SiglipModel"}  # config.json's model_type -> class
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json")


def hf_folder(model: str) -> str | None:
    """The folder of an ``hf:<folder>`` model name (``~`` expanded), None for any other name."""
    if not isinstance(model, str) or not model.startswith(HF_PREFIX):
        return None
    return os.path.expanduser(model[len(HF_PREFIX):])


def check_hf_folder(folder: str) -> str:
    """Refuse, without loading anything, a folder that is not a saved CLIPModel / SiglipModel (missing, no
    config.json, another model type, no weights). Returns its model_type."""
    if not folder:
        raise ValueError("hf: needs a folder: hf:<folder saved by save_pretrained>")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"hf: folder {folder!r} does not exist" if not os.path.exists(folder) else
                                f"hf:{folder} is a file: give the folder written by save_pretrained")
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"hf:{folder} is not a Hugging Face model folder (no config.json): give a folder written "
                         "by CLIPModel/SiglipModel.save_pretrained")
    with open(path) as fh:
        model_type = json.load(fh).get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"hf:{folder} holds a {model_type!r} model, not a CLIP-style one: hf: loads "
                         f"model_type {sorted(HF_MODEL_TYPES)} ({', '.join(HF_MODEL_TYPES.values())})")
    if not weight_files(folder):
        raise ValueError(f"hf:{folder} has a config.json but no weights ({', '.join(_WEIGHTS[::2])})")
    return model_type


def weight_files(folder: str) -> list[str]:
    """The weight files of an hf: folder that exist: single files, or shard indexes and their shards."""
    names = list(_WEIGHTS)
    for index in _WEIGHTS[1::2]:
        path = os.path.join(folder, index)
        if os.path.isfile(path):
            with open(path) as fh:
                names += sorted(set(json.load(fh).get("weight_map", {}).values()))
    return [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]


def load_hf_clip(folder: str, device: str | torch.device = "cpu"):
    """(model, preprocess_train, preprocess_eval, tokenizer) of a transformers CLIPModel or SiglipModel folder,
    read offline (``local_files_only``) in fp32, the model in eval mode.

    The preprocessing is open_clip's ``image_transform`` at :func:`image_norm`'s size, mean and std (the
    folder's image processor is not read). The tokenizer is :class:`HFTokenizer` over the folder's own
    tokenizer; a CLIP folder without one gets open_clip's CLIP BPE tokenizer (the OpenAI vocabulary, the
    ids of transformers' CLIPTokenizer: it needs the text model's vocab_size to be 49408); a SigLIP folder
    without one is refused."""
    import transformers
    from open_clip.transform import image_transform

    model_type = check_hf_folder(folder)
    cls = getattr(transformers, HF_MODEL_TYPES[model_type])
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a bar over the tensors of a local file is noise
    try:
        model = cls.from_pretrained(folder, local_files_only=True, dtype=torch.float32).to(device).eval()
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    size, mean, std = image_norm(model)
    return (model, image_transform(size, True, mean, std), image_transform(size, False, mean, std),
            hf_tokenizer(folder, model))


class HFTokenizer:
    """open_clip's tokenizer contract over a transformers tokenizer: ``tok(texts)`` -> LongTensor [B, L], each
    text padded with the tokenizer's pad token or truncated (its special tokens kept) to
    ``L = context_length``, the text model's max_position_embeddings. CLIP pools at the first end-of-text
    token and SigLIP at the last position, trained on texts padded to that length; neither needs an
    attention mask."""

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer, self.context_length = tokenizer, context_length

    def __call__(self, texts, context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = self.tokenizer(texts, padding="max_length", truncation=True,
                             max_length=context_length or self.context_length, return_tensors="pt")
        return out["input_ids"].long()


def hf_tokenizer(folder: str, model):
    """The tokenizer for a loaded hf: model (see :func:`load_hf_clip`)."""
    text = model.config.text_config
    length = text.max_position_embeddings
    if any(os.path.isfile(os.path.join(folder, f)) for f in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(folder, local_files_only=True), length)
    if model.config.model_type == "clip" and text.vocab_size == 49408:
        from open_clip.tokenizer import SimpleTokenizer

        return SimpleTokenizer(context_length=length)
    raise ValueError(f"hf:{folder} has no tokenizer ({', '.join(_TOKENIZER_FILES[:2])}): save it beside the model "
                     "(tokenizer.save_pretrained(folder))" + ("" if model.config.model_type != "clip" else
                                                              f"; open_clip's CLIP tokenizer needs vocab_size "
                                                              f"49408, the model has {text.vocab_size}"))


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------------------
# one interface over the model families fastvlm patches
# ---------------------------------------------------------------------------------------------------------
#
# The recipes, the TaskRes classifier and the command line use a model only through these three functions,
# so they run on every family the tuners patch: an open_clip CLIP (``encode_image`` / ``encode_text``), a
# Hugging Face ``transformers`` CLIPModel or SiglipModel (``get_image_features`` / ``get_text_features``),
# and a timm image model (``forward``: its pooled features with ``num_classes=0``, else its head's output;
# an image encoder alone, no text tower).


def _is_hf(model) -> bool:
    return hasattr(model, "get_image_features") and hasattr(model, "config")


def _is_timm(model) -> bool:
    return hasattr(model, "forward_features") and hasattr(model, "pretrained_cfg")


def _features(out):
    """transformers 5 returns a ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds the projected
    features; earlier releases return the tensor itself."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def encode_image(model, images: torch.Tensor) -> torch.Tensor:
    """The image embeddings [B, D] of ``images`` [B, 3, H, W] (not normalised)."""
    if hasattr(model, "encode_image"):
        return model.encode_image(images)
    if _is_hf(model):
        return _features(model.get_image_features(pixel_values=images))
    if _is_timm(model):
        return model(images)
    raise TypeError(f"cannot encode images with a {type(model).__name__}: expected an open_clip CLIP, a "
                    "transformers CLIPModel/SiglipModel or a timm model")


def encode_text(model, tokens: torch.Tensor) -> torch.Tensor:
    """The text embeddings [B, D] of ``tokens`` [B, L] (not normalised)."""
    if hasattr(model, "encode_text"):
        return model.encode_text(tokens)
    if _is_hf(model) and hasattr(model, "get_text_features"):
        return _features(model.get_text_features(input_ids=tokens))
    raise TypeError(f"a {type(model).__name__} has no text encoder: text classifiers (TaskRes, the zero-shot "
                    "head) need an open_clip CLIP or a transformers CLIPModel/SiglipModel")


def image_norm(model):
    """(image size, mean, std) of the model's preprocessing."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    if _is_hf(model):
        size = model.config.vision_config.image_size
        mean, std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        if type(model).__name__.startswith("Siglip"):
            mean = std = (0.5, 0.5, 0.5)  # SigLIP's processors normalise to [-1, 1]
        return size, mean, std
    if _is_timm(model):
        cfg = model.pretrained_cfg
        size = getattr(getattr(model, "patch_embed", None), "img_size", None) or cfg.get("input_size", (3, 224))[-1]
        size = size[0] if isinstance(size, (tuple, list)) else size
        return size, tuple(cfg.get("mean", OPENAI_DATASET_MEAN)), tuple(cfg.get("std", OPENAI_DATASET_STD))
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return size, getattr(model.visual, "image_mean", None) or OPENAI_DATASET_MEAN, \
        getattr(model.visual, "image_std", None) or OPENAI_DATASET_STD
