"""Cases of the tuners family: each tuner's training step (forward + CE on the zero-shot classifier +
backward + Adam) against the frozen model's forward + backward to the input, same model and batch; plus
trainable parameter counts. A whole step is not one op, so it has no compiled-naive provider."""

from __future__ import annotations

import torch

from .harness import Case, Provider, warn_random_weights_once

FAMILY = "tuners"
OPS = ("tuner_step", "tuner_step_recompute")
TUNERS = ("vpt", "lora", "adapter", "mask", "orth")
#: the tuners with activation recomputation, each beside its plain step (the tuner_step_recompute case)
RECOMPUTE = ("adapter", "adapter+recompute", "orth", "orth+recompute")


def clip_batch(model_name: str, batch: int, device, seed=0):
    """A random-init open_clip model, a batch of images and labels, and a 10-class unit-norm classifier."""
    from ..models import load_clip
    from ..train.common import image_norm

    warn_random_weights_once()
    torch.manual_seed(seed)
    model, *_ = load_clip(model_name, None, device)
    size, _, _ = image_norm(model)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, 10, (batch,), generator=g).to(device)
    dim = model.text_projection.shape[1] if model.text_projection is not None else model.visual.output_dim
    cls = torch.nn.functional.normalize(torch.randn(10, dim, generator=g), dim=-1).to(device)
    return model, images, labels, cls


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


def step_case(model_name: str, batch: int, device, tuners=TUNERS, op: str = "tuner_step") -> Case:
    import torch.nn.functional as F

    counts = {}

    def provider(name):
        def setup():
            model, images, labels, cls = clip_batch(model_name, batch, device)
            if name == "frozen":
                for p in model.parameters():
                    p.requires_grad_(False)
                x = images.clone().requires_grad_()

                def step():
                    F.cross_entropy(100 * F.normalize(model.encode_image(x), dim=-1) @ cls.T, labels).backward()
                    x.grad = None
                return step
            _attach(name, model)
            params = [p for p in model.parameters() if p.requires_grad]
            counts[name] = sum(p.numel() for p in params)
            opt = torch.optim.Adam(params, lr=1e-5)

            def step():
                F.cross_entropy(100 * F.normalize(model.encode_image(images), dim=-1) @ cls.T, labels).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return step
        return setup

    unknown = [t for t in tuners if t not in TUNERS + RECOMPUTE]
    if unknown:
        raise ValueError(f"tuners must be among {TUNERS + RECOMPUTE}, got {unknown}")
    return Case(op, dict(model=model_name, batch=batch),
                [Provider("frozen", provider("frozen"))] + [Provider(n, provider(n)) for n in tuners],
                baseline="frozen", kind="step", size=batch, extra={"trainable": counts})


def cases(device, quick: bool, full: bool) -> list[Case]:
    model_name, batch = ("ViT-B-32", 4) if quick else ("ViT-B-16", 8)
    return [step_case(model_name, batch, device),
            step_case(model_name, batch, device, tuners=RECOMPUTE, op="tuner_step_recompute")]
