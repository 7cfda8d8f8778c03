"""RMT tuner and recipe on random-init open_clip models."""

import os

import pytest
import torch
import torch.nn.functional as F

from fastvlm.models import TINY, TINY_RN, load_clip
from fastvlm.ops.masked import binary_mask
from fastvlm.train.rmt import RMTRecipe, clip_logits, rmt_step
from fastvlm.tuners.mask import (MaskConfig, apply_masks, bypass_masks, export_masks, load_masks, mask_entries,
                                 merge_masks, score_parameters, sparsity)


def _model(name=TINY, seed=0):
    torch.manual_seed(seed)
    m, *_ = load_clip(name, None)
    return m


def _batch(size, n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 5, (n,), generator=g)


def _classifier(dim=32, k=5, seed=2):
    return F.normalize(torch.randn(k, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("name,size", [(TINY, 32), (TINY_RN, 64)])
def test_patched_model_equals_original_at_start(backend, name, size):
    ref, model = _model(name), _model(name)
    images, _ = _batch(size)
    apply_masks(model, MaskConfig(mlp=True))
    want = ref.encode_image(images)
    got = model.encode_image(images)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("scores" in n for n in trainable)
    if name == TINY:
        names = [n for n, _, _ in mask_entries(model)]
        assert "visual.conv1" in names and "visual.transformer.resblocks.1.attn.in_proj" in names
        assert "visual.transformer.resblocks.0.mlp.c_fc" in names


@pytest.mark.parametrize("name,size", [(TINY, 32), (TINY_RN, 64)])
def test_training_lowers_loss_changes_masks_keeps_weights(name, size):
    model = _model(name)
    apply_masks(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    images, labels = _batch(size, n=8)
    cls = _classifier()
    recipe = RMTRecipe(lr=5e-3, drop_ratio=0.5, seed=3)
    opt = torch.optim.Adam(score_parameters(model), lr=recipe.lr)
    first = rmt_step(model, images, labels, cls, opt, recipe, 0)
    for step in range(1, 25):
        last = rmt_step(model, images, labels, cls, opt, recipe, step)
    assert last["ce"] < first["ce"] - 0.05, (first, last)
    assert sparsity(model) > 0.0
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), f"frozen tensor {n} changed"


def test_bypass_is_the_zero_shot_model():
    ref, model = _model(), _model()
    apply_masks(model)
    with torch.no_grad():
        for s in score_parameters(model):
            s.uniform_(-0.01, 0.02)  # switch many masks off
    images, _ = _batch(32)
    assert not torch.allclose(model.encode_image(images), ref.encode_image(images))
    with bypass_masks(model):
        torch.testing.assert_close(model.encode_image(images), ref.encode_image(images), rtol=1e-4, atol=1e-5)


def test_two_pass_step_matches_explicit_gradient_dropout(backend):
    """The fused two-pass step gives exactly grad_dropout(grad(CE + reg), grad(KL)) per layer."""
    from fastvlm.ops.masked import grad_dropout
    from fastvlm.train.rmt import layer_seed

    model = _model()
    apply_masks(model)
    with torch.no_grad():
        for s in score_parameters(model):
            s.uniform_(0.0, 0.02)
    images, labels = _batch(32)
    cls = _classifier()
    recipe = RMTRecipe(drop_ratio=0.8, seed=5)
    scores = score_parameters(model)  # every ViT mask is fused: layer i of the step is scores[i]
    # explicit: the two gradients, then grad_dropout layer by layer
    with torch.no_grad(), bypass_masks(model):
        p_zs = clip_logits(model, images, cls).softmax(-1)
    logp = clip_logits(model, images, cls).log_softmax(-1)
    g_b = torch.autograd.grad(-(p_zs * logp).sum(-1).mean(), scores, retain_graph=True)
    l_a = F.nll_loss(logp, labels) + recipe.reg * sum(torch.linalg.vector_norm(s) for s in scores)
    g_a = torch.autograd.grad(l_a, scores)
    want = [grad_dropout(a, b, 0.8, layer_seed(5, 7, i)) for i, (a, b) in enumerate(zip(g_a, g_b))]

    class Capture(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

        def step(self):
            self.grads = [p.grad.clone() for p in scores]

    opt = Capture(scores)
    rmt_step(model, images, labels, cls, opt, recipe, step=7)
    for i, (got, exp) in enumerate(zip(opt.grads, want)):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-8, msg=f"layer {i}")


def test_packed_file_is_30x_smaller_than_fp32_scores(tmp_path):
    from open_clip import factory

    from fastvlm.models import TINY_CONFIG

    # wide enough that the fixed header is small next to the payload, as at ViT-B/16 (28M mask bits)
    cfg = {**TINY_CONFIG, "vision_cfg": {**TINY_CONFIG["vision_cfg"], "width": 256, "head_width": 64}}
    factory._MODEL_CONFIGS["fastvlm-test-w256"] = cfg
    model = _model("fastvlm-test-w256")
    apply_masks(model)
    path = export_masks(model, str(tmp_path / "masks.safetensors"))
    n = sum(s.numel() for s in score_parameters(model))
    assert n > 500_000
    assert os.path.getsize(path) * 30 <= n * 4, "packed masks must be at least 30x smaller than fp32 scores"


def test_export_reloads_exactly(tmp_path):
    model = _model()
    apply_masks(model)
    with torch.no_grad():
        for s in score_parameters(model):
            s.uniform_(-0.01, 0.03)
    path = export_masks(model, str(tmp_path / "masks.safetensors"))
    images, _ = _batch(32)
    want = model.encode_image(images)
    fresh = _model()
    apply_masks(fresh)
    load_masks(fresh, path)
    torch.testing.assert_close(fresh.encode_image(images), want, rtol=0, atol=0)
    # merging makes an ordinary open_clip model with the same outputs
    merged = merge_masks(fresh)
    assert not any("scores" in n for n, _ in merged.named_parameters())
    assert type(merged.visual.transformer.resblocks[0].attn) is torch.nn.MultiheadAttention
    torch.testing.assert_close(merged.encode_image(images), want, rtol=1e-4, atol=1e-5)


def test_mismatched_mask_file_is_refused(tmp_path):
    model = _model()
    apply_masks(model, MaskConfig(mlp=True))
    path = export_masks(model, str(tmp_path / "m.safetensors"))
    other = _model()
    apply_masks(other)
    with pytest.raises(ValueError, match="does not fit the model: not in model: .*mlp.c_fc.scores"):
        load_masks(other, path)


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="cannot patch an image encoder of type Linear"):
        apply_masks(_Holder())
    with pytest.raises(ValueError, match=r"init \(0.001\) must exceed threshold"):
        apply_masks(_model(), MaskConfig(init=1e-3))


class _Holder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = torch.nn.Linear(2, 2)


def test_pass_two_writes_into_pass_one_buffers(backend, monkeypatch):
    """No second N x K buffer per layer: pass 2's dropped gradient lands in pass 1's gradient storage."""
    from fastvlm.ops.masked import GradSlot

    model = _model()
    apply_masks(model)
    scores = score_parameters(model)
    taken = []
    real_take = GradSlot.take

    def take(self):
        ref = real_take(self)
        if ref is not None:
            taken.append(ref.data_ptr())
        return ref

    monkeypatch.setattr(GradSlot, "take", take)

    class Capture(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

        def step(self):
            self.ptrs = sorted(s.grad.data_ptr() for s in scores)

    opt = Capture(scores)
    images, labels = _batch(32)
    rmt_step(model, images, labels, _classifier(), opt, RMTRecipe(drop_ratio=0.5), 0)
    assert len(taken) == len(scores) and sorted(taken) == opt.ptrs


def test_cli_tune_mask(tmp_path, capsys):
    import json

    from fastvlm import cli

    from .synthetic import make_image_folder

    make_image_folder(tmp_path / "data", classes=3, per_class=4, split_dirs=True)
    out = tmp_path / "run"
    rc = cli.main(["tune", "mask", "--model", TINY, "--pretrained", "none", "--data", str(tmp_path / "data"),
                   "--shots", "2", "--epochs", "2", "--lr", "1e-2", "--batch-size", "3", "--out", str(out), "--no-progress"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["history"]) == 2 and 0.0 <= m["sparsity"] < 1.0
    assert (out / "masks.safetensors").exists() and "RMT top-1" in capsys.readouterr().out
