"""Every tuner on transformers CLIP and SigLIP and on a timm ViT, each attached with its architecture preset
(fastvlm/tuners/targets.py), end to end on tiny random-init models (tests/any_models.py): the patched model
starts as the unpatched one, only tuner parameters train, one training step lowers the loss, bypass gives
the frozen model, merge gives the patched model from plain layers, and the zero-shot teachers of RMT and
OrthCR are the frozen model. open_clip ViT and ResNet are covered by the other tuner tests."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from fastvlm.models import encode_image
from fastvlm.tuners.adapter import AdapterConfig, apply_adapters
from fastvlm.tuners.common import bypass, merge, names_of, tuner_layers, tuners_of, unmerge
from fastvlm.tuners.lora import LoRAConfig, apply_lora
from fastvlm.tuners.mask import MaskConfig, apply_masks, merge_masks
from fastvlm.tuners.orth import OrthConfig, apply_orth
from fastvlm.tuners.vpt import VPTConfig, apply_vpt

from .any_models import ARCHS, IMAGE, build, has_text, images, tokens
from .test_tuner_pairs import perturb  # off the identity start (masks: about a third switched off)

KINDS = ("masks", "orth", "lora", "vpt", "adapter")
#: per kind, the parameter-name pattern of every trainable tensor on these models (written out from the
#: presets' sites, not read from the code)
BLOCK = r"(vision_model\.encoder\.layers|text_model\.encoder\.layers|blocks)\.\d+"
TRAINABLE = {
    "masks": rf"({BLOCK}\.(self_attn\.[qkvo]|attn\.qkv|attn\.proj|self_attn\.out_proj).*\.scores"
             r"|vision_model\.embeddings\.patch_embedding\.scores|patch_embed\.proj\.scores)",
    "orth": rf"{BLOCK}\.mlp\.fc[12]\.params",
    "lora": rf"{BLOCK}\.(self_attn\.[qkv]_proj|self_attn\.out_proj|attn\.qkv|attn\.proj)\.lora\.[AB]",
    "vpt": rf"{BLOCK}\.prompts",
    "adapter": rf"{BLOCK}\.(self_attn|mlp|ls1|ls2)\.(down|up)\.(weight|bias)",
}
#: trainable tensors per kind on a 2-layer image tower (+ a 2-layer text tower for orth on CLIP/SigLIP)
COUNTS = {"masks": 2 * 4 + 1, "lora": 2 * 4 * 2, "vpt": 2, "adapter": 2 * 2 * 4}
COUNTS_TIMM = {"masks": 2 * 2 + 1, "lora": 2 * 2 * 2, "vpt": 2, "adapter": 2 * 2 * 4, "orth": 2 * 2}


def apply_kind(model, kind):
    if kind == "masks":
        return apply_masks(model, MaskConfig(mlp=False))
    if kind == "orth":
        return apply_orth(model, OrthConfig(block_size=8))
    if kind == "lora":
        return apply_lora(model, LoRAConfig(rank=2))
    if kind == "vpt":
        return apply_vpt(model, VPTConfig(tokens=2))
    return apply_adapters(model, AdapterConfig(bottleneck=4))


def classifier(dim, k=3, seed=3):
    return F.normalize(torch.randn(k, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def loss_of(model, x, labels, cls):
    return F.cross_entropy(100 * F.normalize(encode_image(model, x), dim=-1) @ cls.T, labels)


def one_step(model, kind, x, labels, cls):
    """One optimiser step on the tuner's parameters. Masks: SGD with a step that just moves the scores of the
    largest gradients across the threshold (a handful of masks switch off, where switching off lowers the
    loss to first order); the others: Adam at 1e-3."""
    params = tuners_of(model).parameters(kind)
    loss = loss_of(model, x, labels, cls)
    loss.backward()
    if kind == "masks":
        cfg = tuners_of(model).config("masks")
        top = max(p.grad.max() for p in params)
        opt = torch.optim.SGD(params, lr=1.5 * (cfg.init - cfg.threshold) / float(top))
    else:
        opt = torch.optim.Adam(params, lr=1e-3)
    opt.step()
    return loss.item()


def plain_twin(model, arch):
    """A fresh unpatched model carrying ``model``'s current frozen weights (a merged tuner's weights)."""
    twin = build(arch, seed=9)
    sd = {re.sub(r"(\.(base|inner))+\.", ".", k): v for k, v in model.state_dict().items()}
    twin.load_state_dict({k: sd[k] for k in twin.state_dict()})
    return twin


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_tuner_on_every_architecture(arch, kind):
    x, labels = images(), torch.tensor([0, 1, 2, 0])
    frozen = build(arch)
    with torch.no_grad():
        want = encode_image(frozen, x)
    model = apply_kind(build(arch), kind)
    cls = classifier(want.shape[-1])

    # only the tuner's parameters train: the sites the preset names, no backbone tensor
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    counts = COUNTS_TIMM if arch == "timm_vit" else dict(COUNTS, orth=2 * 2 * 2)
    assert len(trainable) == counts[kind], trainable
    bad = [n for n in trainable if not re.fullmatch(TRAINABLE[kind], n)]
    assert not bad, bad
    assert {id(p) for p in model.parameters() if p.requires_grad} == tuners_of(model).trainable_ids()

    # at init: the unpatched model (prompts are extra tokens: they change the output from the start)
    with torch.no_grad():
        start = encode_image(model, x)
    if kind == "vpt":
        assert not torch.allclose(start, want, atol=1e-3)
    else:
        torch.testing.assert_close(start, want, rtol=1e-4, atol=1e-5)

    before = one_step(model, kind, x, labels, cls)
    with torch.no_grad():
        after = loss_of(model, x, labels, cls).item()
    assert after < before, (before, after)

    perturb(model, kind)
    with torch.no_grad():
        tuned = encode_image(model, x)
        assert not torch.allclose(tuned, want, atol=1e-3)
        with bypass(model, kind):
            torch.testing.assert_close(encode_image(model, x), want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(encode_image(model, x), tuned, rtol=0, atol=0)  # bypass restored

    if kind in ("vpt", "adapter"):
        with pytest.raises(NotImplementedError, match=f"{kind} layers cannot be merged"):
            merge(model, kind)
        return
    if kind == "masks":
        merge_masks(model)
        assert not tuner_layers(model, "masks")
    else:
        merge(model, kind)
    with torch.no_grad():
        torch.testing.assert_close(encode_image(model, x), tuned, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(encode_image(plain_twin(model, arch), x), tuned, rtol=1e-4, atol=1e-5)
    if kind != "masks":
        unmerge(model, kind)
        with torch.no_grad(), bypass(model, kind):
            torch.testing.assert_close(encode_image(model, x), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_prompts_go_in_after_the_prefix_and_come_out_after_the_last_block(arch):
    """The prompts sit after the class token (SigLIP has none) between the blocks, and the encoder's output has
    exactly the original tokens again."""
    model = apply_vpt(build(arch), VPTConfig(tokens=3, deep=False))
    seen = []
    blocks = [m for _, m in tuner_layers(model, "vpt")]
    assert [b.prompts is not None for b in blocks] == [True, False]  # shallow: the first block only
    h = blocks[1].inner.register_forward_pre_hook(lambda m, a, k=None: seen.append(a[0].shape[1]))
    x = images(2)
    with torch.no_grad():
        if arch == "timm_vit":
            out = model.forward_features(x)
        else:
            out = model.vision_model(pixel_values=x).last_hidden_state
    h.remove()
    patches, prefix = (IMAGE // 8) ** 2, (0 if arch == "hf_siglip" else 1)  # 16 patches of 8 px
    assert out.shape[1] == patches + prefix and seen == [patches + prefix + 3]
    prompts = blocks[0].prompts
    first = []
    h = blocks[0].inner.register_forward_pre_hook(lambda m, a, k=None: first.append(a[0]))
    with torch.no_grad():
        encode_image(model, x)
    h.remove()
    torch.testing.assert_close(first[0][:, prefix:prefix + 3], prompts.expand(2, -1, -1), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_rmt_teacher_is_the_frozen_model(arch):
    """rmt_losses' L_kl is the soft cross-entropy from the frozen model's predictions (computed here on an
    unpatched twin) to the masked model's; one rmt_step with gradient dropout runs and changes the scores."""
    from fastvlm.train.rmt import RMTRecipe, rmt_losses, rmt_step

    x, labels = images(), torch.tensor([0, 1, 2, 0])
    frozen = build(arch)
    model = apply_masks(build(arch))
    perturb(model, "masks")
    cls = classifier(encode_image(frozen, x[:1]).shape[-1])
    recipe = RMTRecipe(drop_ratio=0.5)
    with torch.no_grad():
        p_zs = (100 * F.normalize(encode_image(frozen, x), dim=-1) @ cls.T).softmax(-1)
        logp = (100 * F.normalize(encode_image(model, x), dim=-1) @ cls.T).log_softmax(-1)
        _, l_kl, _, _ = rmt_losses(model, x, labels, cls, recipe)
    torch.testing.assert_close(l_kl, -(p_zs * logp).sum(-1).mean(), rtol=1e-4, atol=1e-5)
    scores = tuners_of(model).parameters("masks")
    old = [s.detach().clone() for s in scores]
    opt = torch.optim.Adam(scores, lr=1e-3)
    out = rmt_step(model, x, labels, cls, opt, recipe, step=0)
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values())
    assert any(not torch.equal(a, s) for a, s in zip(old, scores))


@pytest.mark.parametrize("arch", [a for a in ARCHS if has_text(a)])
def test_orthcr_teacher_is_the_frozen_model(arch):
    """orthcr_loss's KL terms are against the frozen model's predictions (image and text towers unrotated,
    computed here on an unpatched twin, on the same cutout)."""
    from fastvlm.models import encode_text
    from fastvlm.train.orth import OrthRecipe, cutout, orthcr_loss

    x, labels, t = images(), torch.tensor([0, 1, 2, 0]), tokens()
    frozen = build(arch)
    model = apply_orth(build(arch), OrthConfig(block_size=8))
    perturb(model, "orth")
    recipe = OrthRecipe()

    def logp(m, imgs):
        cls = F.normalize(encode_text(m, t), dim=-1)
        return (100 * F.normalize(encode_image(m, imgs), dim=-1) @ cls.T).log_softmax(-1)

    with torch.no_grad():
        cut = cutout(x, recipe.cutout_ratio, torch.Generator().manual_seed(4))
        kl = F.kl_div(logp(model, x), logp(frozen, x).exp(), reduction="batchmean")
        kl_cut = F.kl_div(logp(model, cut), logp(frozen, cut).exp(), reduction="batchmean")
    loss, parts = orthcr_loss(model, x, labels, t, recipe, torch.Generator().manual_seed(4))
    assert kl.item() > 1e-4
    assert parts["kl"] == pytest.approx(kl.item(), rel=1e-4, abs=1e-6)
    assert parts["kl_cutout"] == pytest.approx(kl_cut.item(), rel=1e-4, abs=1e-6)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tuners_of(model).parameters("orth"))


def test_a_pack_keeps_its_target_modules(tmp_path):
    """target_modules is part of the config saved with a PVP pack: the downstream model re-attaches to the
    same modules from the pack alone and computes what the upstream one did."""
    from fastvlm.tuners.pack import apply_method, config_of_pack, load_pack, save_pack

    up = build("hf_clip")
    apply_method(up, "lora", LoRAConfig(rank=2, target_modules=("q_proj", "fc2")))
    perturb(up, "lora")
    folder = save_pack(str(tmp_path / "pack"), up, "lora", backbone="tiny-hf-clip")
    method, cfg = config_of_pack(folder)
    assert method == "lora" and cfg.target_modules == ("q_proj", "fc2")
    down = build("hf_clip")
    apply_method(down, method, cfg)
    load_pack(down, folder, backbone="tiny-hf-clip")
    assert len(tuner_layers(down, "lora")) == 2 * 2 * 2  # q_proj and fc2 of 2 layers in each tower
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(encode_image(down, x), encode_image(up, x), rtol=0, atol=0)


@pytest.mark.parametrize("apply", ["orth", "adapter"])
def test_recompute_is_open_clip_only(apply):
    """Activation recomputation is open_clip's block checkpointing: elsewhere it is refused before patching."""
    model = build("timm_vit")
    with pytest.raises(ValueError, match="recompute=True uses open_clip.s block checkpointing: open_clip models only"):
        if apply == "orth":
            apply_orth(model, OrthConfig(block_size=8, recompute=True))
        else:
            apply_adapters(model, AdapterConfig(recompute=True))
    assert tuners_of(model) is None and not tuner_layers(model)


def test_masks_and_lora_stack_on_the_same_transformers_projections():
    """Masks always sit on the plain q/k/v/out projection, so masks-then-LoRA and LoRA-then-masks are the same
    model with the same parameter names; bypassing the masks leaves the LoRA-only model."""
    x = images(2)
    a = apply_lora(apply_masks(build("hf_clip")), LoRAConfig(rank=2))
    b = apply_masks(apply_lora(build("hf_clip"), LoRAConfig(rank=2)))
    lora_only = apply_lora(build("hf_clip"), LoRAConfig(rank=2))
    for m in (a, b, lora_only):
        perturb(m, "lora", seed=6)
    for m in (a, b):
        perturb(m, "masks", seed=7)
    names = sorted(names_of(a, [p for p in a.parameters() if p.requires_grad]))
    assert names == sorted(names_of(b, [p for p in b.parameters() if p.requires_grad]))
    assert {"vision_model.encoder.layers.0.self_attn.q_proj.scores",
            "vision_model.encoder.layers.0.self_attn.q_proj.lora.A"} <= set(names)
    with torch.no_grad():
        torch.testing.assert_close(encode_image(a, x), encode_image(b, x), rtol=0, atol=0)
        with bypass(a, "masks"):
            torch.testing.assert_close(encode_image(a, x), encode_image(lora_only, x), rtol=1e-5, atol=1e-6)
