"""Every pair of tuners on one model, in both orders: the patched model starts as the original, only tuner
parameters train, bypassing one leaves the other working, and saving/loading each kind restores it.

The model is a tiny random-init open_clip ViT (width 32, two blocks, 16 px) so the 30 ordered pairs stay fast."""

import itertools

import pytest
import torch

from fastvlm.tuners.adapter import AdapterConfig, apply_adapters
from fastvlm.tuners.common import bypass, load_tuners, save_tuners, tuner_names, tuners_of
from fastvlm.tuners.lora import LoRAConfig, apply_lora
from fastvlm.tuners.mask import MaskConfig, apply_masks
from fastvlm.tuners.orth import OrthConfig, apply_orth
from fastvlm.tuners.taskres import TaskResHead, apply_taskres
from fastvlm.tuners.vpt import VPTConfig, apply_vpt

PAIRS_MODEL = "fastvlm-test-pairs"
PAIRS_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}
KINDS = ["taskres", "masks", "orth", "vpt", "lora", "adapter"]


def tiny_model(seed=0):
    """A random-init open_clip CLIP of PAIRS_CONFIG, the same weights for the same seed."""
    import open_clip
    from open_clip import factory

    factory._MODEL_CONFIGS.setdefault(PAIRS_MODEL, PAIRS_CONFIG)
    torch.manual_seed(seed)
    return open_clip.create_model(PAIRS_MODEL, pretrained=None)  # no tokenizer or transforms: fast


def base_classifier(k=3, seed=11):
    return torch.randn(k, PAIRS_CONFIG["embed_dim"], generator=torch.Generator().manual_seed(seed))


def apply_kind(model, kind):
    """Attach one tuner of ``kind`` with a small config that touches every site it can."""
    if kind == "taskres":
        apply_taskres(model, base_classifier())
    elif kind == "masks":
        apply_masks(model, MaskConfig(mlp=True))
    elif kind == "orth":
        apply_orth(model, OrthConfig(block_size=8, attention=True, towers=("visual",)))
    elif kind == "vpt":
        apply_vpt(model, VPTConfig(tokens=2, seed=1))
    elif kind == "lora":
        apply_lora(model, LoRAConfig(rank=2, targets=("attn_in", "attn_out", "mlp_fc", "mlp_proj"), seed=2))
    elif kind == "adapter":
        apply_adapters(model, AdapterConfig(bottleneck=4, seed=3))
    else:
        raise ValueError(kind)
    return model


@torch.no_grad()
def perturb(model, kind, seed=5):
    """Move ``kind``'s parameters off their identity start (masks: switch about a third of them off)."""
    g = torch.Generator().manual_seed(seed)
    for p in tuners_of(model).parameters(kind):
        if kind == "masks":
            p.copy_(torch.empty(p.shape).uniform_(-0.01, 0.02, generator=g))
        else:
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def images(n=2, seed=1):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def out(model, x, with_head):
    """The image features, or the TaskRes head's logits on them when the pair has a head (a model without an
    attached head gets the zero-residual head: the zero-shot classifier)."""
    f = model.encode_image(x)
    if not with_head:
        return f
    head = model.taskres if hasattr(model, "taskres") else TaskResHead(base_classifier())
    return head(f)


def rounding(with_head):
    """Tolerance of two computations of ``out`` that differ only in fp32 rounding (a patched site may run
    another matmul, oneDNN's or the fused op's): features are O(1); the head multiplies their cosines by its
    logit scale, 100, and so their rounding."""
    return {"rtol": 1e-4, "atol": 1e-5 * (100 if with_head else 1)}


ORDERED = list(itertools.permutations(KINDS, 2))


@pytest.mark.parametrize("first,second", ORDERED, ids=[f"{a}+{b}" for a, b in ORDERED])
def test_pair(first, second, tmp_path):
    with_head = "taskres" in (first, second)
    x = images()
    ref = tiny_model()
    want0 = out(ref, x, with_head)
    model = apply_kind(apply_kind(tiny_model(), first), second)

    # at init the patched model is the unpatched one (with prompts: the model with the same prompts alone,
    # since prompts change the output from the start)
    start = out(apply_kind(tiny_model(), "vpt"), x, with_head) if "vpt" in (first, second) else want0
    torch.testing.assert_close(out(model, x, with_head), start, **rounding(with_head))

    # exactly the two tuners' parameters train, and each of them gets a gradient
    reg = tuners_of(model)
    assert reg.kinds() == [first, second]
    tuner_ids = {id(p) for k in (first, second) for p in reg.parameters(k)}
    assert all(reg.parameters(k) for k in (first, second))
    everything = list(model.parameters())
    assert {id(p) for p in everything if p.requires_grad} == tuner_ids
    out(model, x, with_head).square().sum().backward()
    assert all(p.grad is not None for p in everything if p.requires_grad)

    for k in (first, second):
        perturb(model, k)
    with torch.no_grad():
        tuned = out(model, x, with_head)
    assert not torch.allclose(tuned, want0, atol=1e-3)
    files = {k: save_tuners(model, str(tmp_path / f"{k}.safetensors"), kinds=[k]) for k in (first, second)}

    # bypassing one leaves the other working: the result is the model with the other tuner alone, loaded from
    # its own file (which also shows each kind's save/load restores it, whatever was stacked with it)
    for off, on in ((first, second), (second, first)):
        alone = apply_kind(tiny_model(), on)
        load_tuners(alone, files[on])
        with torch.no_grad(), bypass(model, off):
            got = out(model, x, with_head)
        with torch.no_grad():
            torch.testing.assert_close(got, out(alone, x, with_head), **rounding(with_head))
            assert not torch.allclose(got, want0, atol=1e-3), f"{on} does nothing with {off} bypassed"

    # both kinds saved in one file restore the pair exactly
    both = save_tuners(model, str(tmp_path / "both.safetensors"))
    again = apply_kind(apply_kind(tiny_model(), first), second)
    load_tuners(again, both)
    with torch.no_grad():
        torch.testing.assert_close(out(again, x, with_head), tuned, rtol=0, atol=0)


def test_masks_commute_with_every_tuner():
    """A mask always sits on the plain weight, so masks-then-X and X-then-masks are the same model."""
    x = images()
    for other in ("orth", "lora"):
        a = apply_kind(apply_kind(tiny_model(), "masks"), other)
        b = apply_kind(apply_kind(tiny_model(), other), "masks")
        for m in (a, b):
            perturb(m, "masks")
            perturb(m, other)
        names_a, names_b = tuner_names(a), tuner_names(b)
        assert sorted(names_a[id(p)] for p in a.parameters() if p.requires_grad) == \
            sorted(names_b[id(p)] for p in b.parameters() if p.requires_grad)
        with torch.no_grad():
            torch.testing.assert_close(a.encode_image(x), b.encode_image(x), rtol=0, atol=0)
