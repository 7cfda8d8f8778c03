"""Cases of the tuners family: each tuner's training step (forward + CE on the zero-shot classifier +
backward + Adam) against the frozen model's forward + backward to the input, same model and batch; plus
trainable parameter counts. A whole step is not one op, so it has no compiled-naive provider.

``tuner_step_hf``: one tuner's step on the open_clip model and on a transformers ``CLIPModel`` of the same
widths, depths, patch and image size (random init, the same tuner preset on each), each beside its own frozen
model: the same matmuls per block, so the two steps should cost the same within noise (the HF model's
separate q/k/v projections are three matmuls where open_clip packs one)."""

from __future__ import annotations

import torch

from .harness import Case, Provider, warn_random_weights_once

FAMILY = "tuners"
OPS = ("tuner_step", "tuner_step_recompute", "tuner_step_hf")
TUNERS = ("vpt", "lora", "adapter", "mask", "orth")
#: the tuners with activation recomputation, each beside its plain step (the tuner_step_recompute case)
RECOMPUTE = ("adapter", "adapter+recompute", "orth", "orth+recompute")


#: the tuner of the tuner_step_hf case
HF_TUNER = "lora"


def clip_batch(model_name: str, batch: int, device, seed=0, hf: bool = False):
    """A random-init open_clip model (``hf``: the transformers CLIPModel of the same config), a batch of images
    and labels, and a 10-class unit-norm classifier."""
    from ..models import encode_image, image_norm, load_clip

    warn_random_weights_once()
    torch.manual_seed(seed)
    model = hf_clip_like(model_name, device) if hf else load_clip(model_name, None, device)[0]
    size, _, _ = image_norm(model)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, 10, (batch,), generator=g).to(device)
    with torch.no_grad():
        dim = encode_image(model, images[:1]).shape[-1]
    cls = torch.nn.functional.normalize(torch.randn(10, dim, generator=g), dim=-1).to(device)
    return model, images, labels, cls


def hf_clip_like(model_name: str, device):
    """A random-init transformers ``CLIPModel`` with the widths, depths, heads, MLP ratio, patch and image size
    and embedding width of open_clip's ``model_name`` config, in eval mode."""
    import open_clip
    import transformers

    from .. import models  # noqa: F401  (registers fastvlm's tiny configs with open_clip)

    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"model_name must be an open_clip architecture, got {model_name!r}")
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    mlp = v.get("mlp_ratio", 4.0)
    vision = dict(hidden_size=v["width"], intermediate_size=int(v["width"] * mlp), num_hidden_layers=v["layers"],
                  num_attention_heads=v["width"] // v.get("head_width", 64), image_size=v["image_size"],
                  patch_size=v["patch_size"])
    text = dict(hidden_size=t["width"], intermediate_size=int(t["width"] * t.get("mlp_ratio", 4.0)),
                num_hidden_layers=t["layers"], num_attention_heads=t["heads"], vocab_size=t["vocab_size"],
                max_position_embeddings=t["context_length"], bos_token_id=0, eos_token_id=1, pad_token_id=1)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg["embed_dim"])
    return transformers.CLIPModel(config).to(device).eval()


def _attach(name, model):
    """``<tuner>`` or ``<tuner>+recompute`` (activation recomputation of the tuned blocks)."""
    from ..tuners.adapter import AdapterConfig
    from ..tuners.mask import apply_masks
    from ..tuners.orth import OrthConfig, apply_orth
    from ..tuners.pack import apply_method

    tuner, _, option = name.partition("+")
    recompute = option == "recompute"
    if tuner == "adapter":
        return apply_method(model, tuner, AdapterConfig(recompute=recompute))
    if tuner in ("vpt", "lora"):
        return apply_method(model, tuner)
    if tuner == "mask":
        return apply_masks(model)
    return apply_orth(model, OrthConfig(towers=("visual",), recompute=recompute))


def _step_provider(model_name, batch, device, name, counts, hf=False):
    """The setup of one provider: ``frozen`` (forward + backward to the input) or a tuner's training step."""
    import torch.nn.functional as F

    from ..models import encode_image

    def setup():
        model, images, labels, cls = clip_batch(model_name, batch, device, hf=hf)
        if name == "frozen":
            for p in model.parameters():
                p.requires_grad_(False)
            x = images.clone().requires_grad_()

            def step():
                F.cross_entropy(100 * F.normalize(encode_image(model, x), dim=-1) @ cls.T, labels).backward()
                x.grad = None
            return step
        _attach(name, model)
        params = [p for p in model.parameters() if p.requires_grad]
        counts[("hf_" if hf else "") + name] = sum(p.numel() for p in params)
        opt = torch.optim.Adam(params, lr=1e-5)

        def step():
            F.cross_entropy(100 * F.normalize(encode_image(model, images), dim=-1) @ cls.T, labels).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    return setup


def step_case(model_name: str, batch: int, device, tuners=TUNERS, op: str = "tuner_step") -> Case:
    counts = {}
    unknown = [t for t in tuners if t not in TUNERS + RECOMPUTE]
    if unknown:
        raise ValueError(f"tuners must be among {TUNERS + RECOMPUTE}, got {unknown}")
    return Case(op, dict(model=model_name, batch=batch),
                [Provider(n, _step_provider(model_name, batch, device, n, counts)) for n in ("frozen", *tuners)],
                baseline="frozen", kind="step", size=batch, extra={"trainable": counts})


def hf_step_case(model_name: str, batch: int, device, tuner: str = HF_TUNER) -> Case:
    """``tuner``'s step on open_clip's ``model_name`` and on the transformers CLIPModel of the same config, each
    frozen model beside it (providers ``frozen``, ``<tuner>``, ``hf_frozen``, ``hf_<tuner>``; ratios to
    open_clip's frozen step)."""
    if tuner not in TUNERS:
        raise ValueError(f"tuner must be one of {TUNERS}, got {tuner!r}")
    counts = {}
    providers = [Provider(("hf_" if hf else "") + n, _step_provider(model_name, batch, device, n, counts, hf))
                 for hf in (False, True) for n in ("frozen", tuner)]
    return Case("tuner_step_hf", dict(model=model_name, batch=batch), providers, baseline="frozen", kind="step",
                size=batch, extra={"trainable": counts})


def cases(device, quick: bool, full: bool) -> list[Case]:
    model_name, batch = ("ViT-B-32", 4) if quick else ("ViT-B-16", 8)
    out = [step_case(model_name, batch, device),
           step_case(model_name, batch, device, tuners=RECOMPUTE, op="tuner_step_recompute")]
    try:
        import transformers  # noqa: F401  (a test / bench dependency, not a core one)
    except ImportError:
        return out
    return out + [hf_step_case(model_name, batch, device)]
