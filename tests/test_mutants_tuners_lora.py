"""Exact tests of the LoRA tuner (fastvlm/tuners/lora.py, docs/methods.md section 4) written from its
definition, ``y = inner(x) + (alpha / r) * (x A^T) B^T`` with A Kaiming-uniform(a = sqrt(5)) as peft and
nn.Linear draw it (bound 1 / sqrt(fan_in)) and B = 0: the factors' init, the layer's output and its exact
gradients at a non-trivial state (B moved off 0), merge / unmerge, bypass, the config checks, and the
patched model on every architecture with a preset (open_clip ViT, transformers CLIP/SigLIP, timm ViT)
against the same model with ``W + (alpha / r) B A`` put into its weights by hand."""

import copy
import math

import pytest
import torch
from torch import nn

from fastvlm.models import encode_image
from fastvlm.tuners.common import tuner_layers, tuners_of
from fastvlm.tuners.lora import (TARGETS, LoRAConfig, LoRALinear, LoRAPair, apply_lora, merge_lora,
                                 unmerge_lora)

from . import any_models
from .test_tuner_pairs import tiny_model


def kaiming(rows, cols, g):
    a = torch.empty(rows, cols)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
    return a


def test_config_defaults_and_targets():
    c = LoRAConfig()
    assert (c.rank, c.alpha, c.targets, c.towers, c.seed, c.target_modules) == \
        (8, 16.0, ("attn_in", "attn_out"), ("visual",), 0, None)
    assert TARGETS == ("attn_in", "attn_out", "mlp_fc", "mlp_proj")


def test_pair_init_is_peft_kaiming_and_zero():
    pair = LoRAPair(5, 7, LoRAConfig(rank=3, alpha=6.0), torch.Generator().manual_seed(4))
    assert pair.scale == 2.0 and pair.A.shape == (3, 7) and pair.B.shape == (5, 3)
    assert torch.equal(pair.A.detach(), kaiming(3, 7, torch.Generator().manual_seed(4)))
    assert float(pair.A.abs().max()) <= 1 / math.sqrt(7) and float(pair.A.abs().max()) > 0.5 / math.sqrt(7)
    assert torch.equal(pair.B.detach(), torch.zeros(5, 3)) and not pair.merged
    assert LoRAPair(2, 2, LoRAConfig(rank=1, alpha=0.5), torch.Generator()).scale == 0.5
    with pytest.raises(ValueError, match="^rank must be >= 1, got 0$"):
        LoRAPair(2, 2, LoRAConfig(rank=0), torch.Generator())


def perturbed_layer(seed=0, rank=2, alpha=3.0):
    torch.manual_seed(seed)
    base = nn.Linear(4, 3)
    layer = LoRALinear.from_linear(base, rank=rank, alpha=alpha, seed=seed)
    with torch.no_grad():
        layer.lora.B.copy_(torch.randn(3, rank, generator=torch.Generator().manual_seed(seed + 10)))
    return base, layer


def test_layer_output_is_base_plus_scaled_low_rank_path():
    base, layer = perturbed_layer()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    A, B, s = layer.lora.A.detach(), layer.lora.B.detach(), 1.5  # alpha / r = 3 / 2
    want = x @ base.weight.detach().T + base.bias.detach() + s * (x @ A.T) @ B.T
    torch.testing.assert_close(layer(x), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.lora(x), s * (x @ A.T) @ B.T, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.lora.delta(), s * B @ A, rtol=1e-6, atol=1e-7)
    x64 = x.double()
    assert layer.lora(x64).dtype == torch.float64  # the factors follow the input's dtype
    torch.testing.assert_close(layer.lora(x64), s * (x64 @ A.double().T) @ B.double().T, rtol=1e-6, atol=1e-7)
    layer.bypass = True
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


def test_layer_gradients_are_exact():
    """dL/dB = s (G^T)(x A^T), dL/dA = s (G B)^T x, dL/dx = G W + s (G B) A for G = dL/dy."""
    base, layer = perturbed_layer(rank=3, alpha=1.5)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(2), requires_grad=True)
    G = torch.randn(6, 3, generator=torch.Generator().manual_seed(3))
    (layer(x) * G).sum().backward()
    A, B, W, s = layer.lora.A.detach(), layer.lora.B.detach(), base.weight.detach(), 0.5
    torch.testing.assert_close(layer.lora.B.grad, s * G.T @ (x.detach() @ A.T), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora.A.grad, s * (G @ B).T @ x.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, G @ W + s * (G @ B) @ A, rtol=1e-5, atol=1e-6)
    assert base.weight.grad is None and base.bias.grad is None  # frozen by from_linear


def test_from_linear_holds_the_linear_and_freezes_it_or_not():
    base = nn.Linear(4, 3)
    layer = LoRALinear.from_linear(base, rank=2, alpha=4.0, seed=5)
    assert layer.base is base and layer.weight is base.weight
    assert (layer.config.rank, layer.config.alpha, layer.config.seed) == (2, 4.0, 5)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert torch.equal(layer.lora.A.detach(), kaiming(2, 4, torch.Generator().manual_seed(5)))
    assert [id(p) for p in layer.tuner_parameters()] == [id(layer.lora.A), id(layer.lora.B)]
    assert not layer.merged and not layer.bypass
    other = nn.Linear(4, 3)
    LoRALinear.from_linear(other, freeze=False)
    assert other.weight.requires_grad and other.bias.requires_grad
    assert LoRALinear.from_linear(nn.Linear(4, 3)).config == LoRAConfig(rank=8, alpha=16.0, seed=0)
    with pytest.raises(TypeError, match="^linear must be a Linear or ProjectionView, got Conv2d$"):
        LoRALinear.from_linear(nn.Conv2d(1, 1, 1))


def test_merge_folds_the_delta_and_unmerge_takes_it_out():
    base, layer = perturbed_layer()
    w0 = base.weight.detach().clone()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    want = layer(x).detach()
    delta = 1.5 * layer.lora.B.detach() @ layer.lora.A.detach()
    layer.merge()
    assert layer.merged and layer.lora.merged
    torch.testing.assert_close(base.weight, w0 + delta, rtol=0, atol=1e-7)
    torch.testing.assert_close(layer(x), want, rtol=1e-6, atol=1e-6)  # computed with the merged weight alone
    torch.testing.assert_close(base(x), want, rtol=1e-6, atol=1e-6)
    layer.merge()  # a second merge is a no-op
    torch.testing.assert_close(base.weight, w0 + delta, rtol=0, atol=1e-7)
    with pytest.raises(RuntimeError, match="cannot bypass a merged lora layer"):
        layer.bypass = True
        layer(x)
    layer.bypass = False
    layer.unmerge()
    assert not layer.merged and not layer.lora.merged
    torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), want, rtol=1e-6, atol=1e-6)
    layer.unmerge()  # unmerging an unmerged layer is a no-op
    torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)


def test_merge_and_unmerge_of_one_layer_record_no_graph():
    """A layer merged directly (not through merge_lora) writes B A into the weight outside autograd: a frozen
    weight stays a frozen leaf, and a trainable one (freeze=False) can be merged at all."""
    base, layer = perturbed_layer()
    layer.merge()
    assert base.weight.grad_fn is None and not base.weight.requires_grad and base.weight.is_leaf
    layer.unmerge()
    assert base.weight.grad_fn is None and not base.weight.requires_grad
    torch.manual_seed(0)
    free = nn.Linear(4, 3)
    lay = LoRALinear.from_linear(free, rank=2, freeze=False)
    with torch.no_grad():
        lay.lora.B.fill_(0.1)
    lay.merge()
    lay.unmerge()
    assert free.weight.requires_grad and free.weight.is_leaf and free.weight.grad_fn is None


def test_merge_keeps_the_weights_dtype():
    torch.manual_seed(0)
    base = nn.Linear(4, 3).double()
    layer = LoRALinear.from_linear(base, rank=2, alpha=2.0)
    with torch.no_grad():
        layer.lora.B.fill_(0.5)
    w0 = base.weight.detach().clone()
    layer.merge()
    assert base.weight.dtype == torch.float64
    torch.testing.assert_close(base.weight, w0 + (layer.lora.B @ layer.lora.A).double().detach(), rtol=1e-6,
                               atol=1e-7)


def test_apply_checks_targets_and_draws_each_sites_a_in_order():
    with pytest.raises(ValueError, match=r"^targets must be a non-empty subset of \('attn_in', 'attn_out', 'mlp_fc', "
                                         r"'mlp_proj'\), got \('qkv',\)$"):
        apply_lora(tiny_model(), LoRAConfig(targets=("qkv",)))
    with pytest.raises(ValueError, match=r"got \(\)$"):
        apply_lora(tiny_model(), LoRAConfig(targets=()))
    model = apply_lora(tiny_model(), LoRAConfig(rank=2, targets=("mlp_fc", "attn_in"), seed=9))
    layers = [m for _, m in tuner_layers(model, "lora")]
    names = [n for n, _ in tuner_layers(model, "lora")]
    assert names == ["visual.transformer.resblocks.0.attn.in_proj", "visual.transformer.resblocks.0.mlp.c_fc",
                     "visual.transformer.resblocks.1.attn.in_proj", "visual.transformer.resblocks.1.mlp.c_fc"]
    g = torch.Generator().manual_seed(9)  # one generator, the sites in model order
    for m in layers:
        assert torch.equal(m.lora.A.detach(), kaiming(2, m.in_features, g))
    assert tuners_of(model).config("lora").seed == 9
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for m in layers for p in (m.lora.A, m.lora.B)}
    # target_modules replaces the preset (and is recorded in the config)
    m2 = apply_lora(tiny_model(), LoRAConfig(rank=2), target_modules=["visual.transformer.resblocks.1.mlp.c_proj"])
    assert [n for n, _ in tuner_layers(m2, "lora")] == ["visual.transformer.resblocks.1.mlp.c_proj"]
    assert tuners_of(m2).config("lora").target_modules == ["visual.transformer.resblocks.1.mlp.c_proj"]
    assert apply_lora(tiny_model()) is not None and tuners_of(apply_lora(tiny_model())).config("lora") == LoRAConfig()


def by_hand(model):
    """A copy of ``model`` with ``W + s B A`` written into each LoRA site's weight and the layers bypassed."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for _, m in tuner_layers(ref, "lora"):
            m.weight.add_(m.lora.scale * m.lora.B @ m.lora.A)
            m.bypass = True
    return ref


@pytest.mark.parametrize("arch", ["open_clip_vit", *any_models.ARCHS])
def test_patched_model_is_the_hand_merged_model(arch):
    if arch == "open_clip_vit":
        model, x = tiny_model(), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    else:
        model, x = any_models.build(arch), any_models.images(2)
    twin = copy.deepcopy(model)
    apply_lora(model, LoRAConfig(rank=2, alpha=5.0, targets=TARGETS, seed=1))
    with torch.no_grad():
        zero = encode_image(model, x)
        torch.testing.assert_close(zero, encode_image(twin, x), rtol=1e-5, atol=1e-6)  # B = 0: the original
        g = torch.Generator().manual_seed(3)
        for _, m in tuner_layers(model, "lora"):
            m.lora.B.copy_(0.3 * torch.randn(m.lora.B.shape, generator=g))
        got = encode_image(model, x)
        want = encode_image(by_hand(model), x)
    assert not torch.allclose(got, zero, atol=1e-3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    w = [m.weight.detach().clone() for _, m in tuner_layers(model, "lora")]
    assert merge_lora(model) is model and all(m.merged for _, m in tuner_layers(model, "lora"))
    with torch.no_grad():
        torch.testing.assert_close(encode_image(model, x), want, rtol=1e-4, atol=1e-5)
    assert unmerge_lora(model) is model and not any(m.merged for _, m in tuner_layers(model, "lora"))
    for a, (_, m) in zip(w, tuner_layers(model, "lora")):
        torch.testing.assert_close(m.weight, a, rtol=0, atol=1e-6)
