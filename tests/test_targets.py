"""target_modules (fastvlm/tuners/targets.py): exact names, suffixes at a dot boundary and regular expressions
select the sites a tuner patches; an unmatched pattern or an unsupported module is an error naming it, and
after an error the model is unchanged. The open_clip presets give the sites they always did."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastvlm.tuners.common import tuner_layers, tuners_of
from fastvlm.tuners.lora import LoRAConfig, apply_lora
from fastvlm.tuners.mask import MaskedConv2d, apply_masks
from fastvlm.tuners.orth import apply_orth

from .any_models import build
from .test_tuner_pairs import tiny_model

V0 = "vision_model.encoder.layers.0"


def lora_sites(model):
    return [n for n, _ in tuner_layers(model, "lora")]


def snapshot(model):
    """Module types by name and which parameters train: what a half-done patch would change."""
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def test_exact_names_suffixes_and_a_regex():
    model = apply_lora(build("hf_clip"), target_modules=[f"{V0}.self_attn.q_proj"])
    assert lora_sites(model) == [f"{V0}.self_attn.q_proj"]

    model = apply_lora(build("hf_clip"), target_modules=["v_proj", "layers.1.mlp.fc2"])  # suffixes
    want = [f"{t}_model.encoder.layers.{i}.self_attn.v_proj" for t in ("vision", "text") for i in (0, 1)]
    want += [f"{t}_model.encoder.layers.1.mlp.fc2" for t in ("vision", "text")]
    assert sorted(lora_sites(model)) == sorted(want)

    model = apply_lora(build("hf_clip"), target_modules=r"vision_model\.encoder\.layers\.\d\.mlp\.fc\d")
    assert sorted(lora_sites(model)) == [f"vision_model.encoder.layers.{i}.mlp.fc{j}" for i in (0, 1) for j in (1, 2)]


def test_a_suffix_matches_only_at_a_dot_and_a_regex_the_whole_name():
    with pytest.raises(ValueError, match=r"target_modules \['proj'\] match no module of this CLIPModel"):
        apply_lora(build("hf_clip"), target_modules=["proj"])  # q_proj ends in "proj", not in ".proj"
    with pytest.raises(ValueError, match=r"match no module"):
        apply_lora(build("hf_clip"), target_modules=r"q_proj")  # fullmatch: not a search


@pytest.mark.parametrize("targets,named", [
    (["q_proj", "nothing_here"], r"\['nothing_here'\] match no module"),
    (["q_proj", "layer_norm1"], r"cannot patch: .*layers\.0\.layer_norm1 \(LayerNorm\).*\(it patches nn\.Linear, "
                                r"nn\.MultiheadAttention\)"),
    (["patch_embedding"], r"vision_model\.embeddings\.patch_embedding \(Conv2d\)"),
    (r"vision_model\.encoder\.layers\.0\.mlp(\..*)?", r"layers\.0\.mlp \(CLIPMLP\).*activation_fn"),
    ([], r"non-empty list"),
])
def test_errors_name_the_offender_and_patch_nothing(targets, named):
    model = build("hf_clip")
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError), match=named):
        apply_lora(model, target_modules=targets)
    assert snapshot(model) == before and tuners_of(model) is None


def test_every_tuner_checks_before_patching():
    """Rotations: a block size that does not divide one target's width stops all of them."""
    model = build("hf_clip")
    before = snapshot(model)
    from fastvlm.tuners.orth import OrthConfig

    with pytest.raises(ValueError, match=r"block_size=64 must divide the input width 32 of .*mlp\.fc1"):
        apply_orth(model, OrthConfig(block_size=64), target_modules=["fc2", "fc1"])  # fc2 (64 wide) fits
    assert snapshot(model) == before
    with pytest.raises(ValueError, match=r"apply_masks: target_modules select modules apply_masks cannot patch: "
                                         r"vision_model\.post_layernorm \(LayerNorm\)"):
        apply_masks(model, target_modules=["q_proj", "post_layernorm"])
    assert snapshot(model) == before


def test_open_clip_attention_is_two_sites_and_its_name_selects_both():
    """An nn.MultiheadAttention is targeted as <attn>.in_proj / <attn>.out_proj; its own name gives both, the
    same sites (and so the same parameter names and values) as the default preset."""
    preset = apply_lora(tiny_model(), LoRAConfig(rank=2))
    by_name = apply_lora(tiny_model(), LoRAConfig(rank=2), target_modules=r"visual\..*\.attn")
    both_towers = apply_lora(tiny_model(), LoRAConfig(rank=2), target_modules=["attn"])  # a suffix: text too
    assert len(lora_sites(both_towers)) == 2 * 2 + 1 * 2
    want = [f"visual.transformer.resblocks.{i}.attn.{p}" for i in (0, 1) for p in ("in_proj", "out_proj")]
    assert lora_sites(preset) == lora_sites(by_name) == want
    a, b = dict(preset.named_parameters()), dict(by_name.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)
    only_out = apply_lora(tiny_model(), target_modules=r".*resblocks\.1\.attn\.out_proj")
    assert lora_sites(only_out) == ["visual.transformer.resblocks.1.attn.out_proj"]


def test_names_do_not_depend_on_other_tuners_on_the_site():
    """A site that already carries masks is targeted by the plain module's name."""
    model = apply_masks(build("timm_vit"))
    apply_lora(model, target_modules=["blocks.0.attn.qkv"])
    assert lora_sites(model) == ["blocks.0.attn.qkv"]
    assert [n for n, _ in tuner_layers(model, "masks")][:2] == ["patch_embed.proj", "blocks.0.attn.qkv"]


def test_open_clip_resnet_attention_pool_takes_masks_only():
    """open_clip's attention pool reads its projection weights without calling them: masks parametrize them
    (as the preset does), LoRA there would be skipped, so it is refused."""
    from fastvlm.models import TINY_RN, load_clip

    rn, *_ = load_clip(TINY_RN, None)
    with pytest.raises(ValueError, match=r"visual\.attnpool\.q_proj \(Linear whose weight AttentionPool2d reads"):
        apply_lora(rn, target_modules=["attnpool.q_proj"])
    apply_masks(rn, target_modules=["attnpool.q_proj"])
    assert [n for n, _ in tuner_layers(rn, "masks")] == ["visual.attnpool.q_proj.parametrizations.weight.0"]


def test_any_module_with_target_modules_and_no_preset():
    """A model fastvlm has no preset for: the default is an error that says to give target_modules; with them,
    a plain nn.Sequential takes masks on a linear and on a 3x3 conv (the reference path)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 5 * 5, 2))
    with pytest.raises(ValueError, match="no preset for a Sequential .*give target_modules"):
        apply_masks(model)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        want = model(x)
    apply_masks(model, target_modules=["0", "2"])
    assert isinstance(model[0], MaskedConv2d) and not model[0].fused and model[2].fused
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.scores", "2.scores"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)


def test_a_suffix_reaches_the_siglip_pooling_head():
    """["out_proj"] also selects SigLIP's pooling head, an nn.MultiheadAttention used as cross-attention (a
    probe over the tokens): it is patched like any attention and the model still starts as the original."""
    from fastvlm.models import encode_image

    from .any_models import images

    frozen, model = build("hf_siglip"), build("hf_siglip")
    apply_lora(model, target_modules=["out_proj"])
    assert "vision_model.head.attention.out_proj" in lora_sites(model) and len(lora_sites(model)) == 2 + 2 + 1
    apply_masks(model, target_modules=["head.attention"])  # the attention's name: both of its projections
    assert [n for n, _ in tuner_layers(model, "masks")] == [f"vision_model.head.attention.{p}" for p in ("in_proj", "out_proj")]
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(encode_image(model, x), encode_image(frozen, x), rtol=1e-4, atol=1e-5)


def test_an_attention_the_projections_cannot_take_is_refused_before_patching():
    """An nn.MultiheadAttention with separate key/value widths has no packed in_proj_weight to wrap."""
    model = nn.Sequential(nn.MultiheadAttention(8, 2, kdim=4, vdim=4), nn.Linear(8, 8))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"cannot patch: 0 \(MultiheadAttention\)"):
        apply_lora(model, target_modules=["0", "1"])
    assert snapshot(model) == before


def test_a_preset_names_exact_modules():
    """open_clip's text block names are suffixes of the image tower's (transformer.resblocks.N...): a text
    tower preset patches the text tower alone, and two towers come in the order given (LoRA's seeded A)."""
    text_only = apply_lora(tiny_model(), LoRAConfig(rank=2, towers=("text",)))
    assert lora_sites(text_only) == [f"transformer.resblocks.0.attn.{p}" for p in ("in_proj", "out_proj")]
    both = apply_lora(tiny_model(), LoRAConfig(rank=2, towers=("text", "visual")))
    first = dict(both.named_parameters())["transformer.resblocks.0.attn.in_proj.lora.A"]
    assert torch.equal(first, dict(text_only.named_parameters())["transformer.resblocks.0.attn.in_proj.lora.A"])
