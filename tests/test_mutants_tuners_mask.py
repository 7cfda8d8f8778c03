"""Exact tests of fastvlm/tuners/mask.py (the survivors of its mutation sample, docs/testing.md): the drop-in
constructors' defaults, the ResNet parametrization's entries, the unfused layers' regulariser inside
gradient_dropout against the written-out formula, the packed masks' decode value, merge_masks outside
autograd."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvlm.models import TINY_RN, load_clip
from fastvlm.ops.masked import binary_mask, grad_dropout_reference
from fastvlm.tuners.mask import (MaskConfig, MaskedConv2d, MaskedLinear, apply_masks, export_masks,
                                 gradient_dropout, load_masks, mask_entries, merge_masks)


def _resnet(seed=0):
    torch.manual_seed(seed)
    model, *_ = load_clip(TINY_RN, None)
    return model


def test_drop_in_constructors_default_to_the_papers_threshold_and_init():
    """MaskedLinear.from_linear / MaskedConv2d.from_conv: threshold 5e-3, scores starting at 1e-2 (every mask on)."""
    lin = MaskedLinear.from_linear(nn.Linear(4, 3))
    conv = MaskedConv2d.from_conv(nn.Conv2d(3, 2, 2, stride=2))
    for layer in (lin, conv):
        assert layer.threshold == 5e-3 and layer.config.threshold == 5e-3 and layer.config.init == 1e-2
        assert torch.all(layer.scores == 1e-2)


def test_resnet_mask_entries_name_the_parametrized_weight_and_its_owner():
    """On a ResNet the masks are parametrizations: each entry is (the parametrization's name, the owner's
    original frozen weight, the scores), and the weight is the owner module's own tensor."""
    model = _resnet()
    apply_masks(model)
    entries = mask_entries(model)
    assert entries and all(".parametrizations.weight." in n for n, _, _ in entries)
    for name, weight, scores in entries:
        owner = model.get_submodule(name.split(".parametrizations")[0])
        assert weight is owner.parametrizations.weight.original
        assert scores.shape == weight.shape


def test_unfused_regulariser_and_dropout_inside_gradient_dropout():
    """Unfused layers (ResNet): on exit scores.grad = dropout(g_a + reg S / ||S||, g_b) with seed_of(i),
    written out here from the formula (pass 1 gives g_b, pass 2 g_a), at reg 0.3 and ratio 0.7."""
    model = _resnet(1)
    apply_masks(model)
    entries = mask_entries(model)
    g = torch.Generator().manual_seed(3)
    for _, _, s in entries:  # scores off their init, some below the threshold
        with torch.no_grad():
            s.copy_(torch.rand(s.shape, generator=g) * 2e-2)
    g_b = [torch.randn(s.shape, generator=g) for _, _, s in entries]
    g_a = [torch.randn(s.shape, generator=g) for _, _, s in entries]
    for (_, _, s), gb in zip(entries, g_b):
        s.grad = gb.clone()
    reg, ratio = 0.3, 0.7
    seed_of = lambda i: 100 + 7 * i  # noqa: E731
    with gradient_dropout(model, ratio, seed_of, reg):
        for (_, _, s), ga in zip(entries, g_a):
            assert s.grad is None  # pass 1's gradient taken out
            s.grad = ga.clone()  # what pass 2's backward leaves
    for j, ((_, _, s), ga, gb) in enumerate(zip(entries, g_a, g_b)):
        sd = s.detach()
        want = grad_dropout_reference(ga + reg * sd / sd.norm(), gb, ratio, seed_of(j))
        torch.testing.assert_close(s.grad, want, rtol=1e-6, atol=1e-7)


def test_loaded_masks_set_scores_to_the_larger_of_init_and_twice_the_threshold(tmp_path):
    """A loaded mask's on-scores are max(init, 2 threshold) (clear of the threshold, as trained scores may
    sit just above it), its off-scores 0; checked where each term is the larger."""
    for init, threshold, on_value in ((1e-2, 2e-3, 1e-2), (6e-3, 5e-3, 1e-2)):
        model = _resnet(2)
        cfg = MaskConfig(threshold=threshold, init=init)
        apply_masks(model, cfg)
        entries = mask_entries(model)
        g = torch.Generator().manual_seed(4)
        for _, _, s in entries:
            with torch.no_grad():
                s.copy_(torch.rand(s.shape, generator=g) * 4 * threshold)
        masks = [binary_mask(s.detach(), threshold) for _, _, s in entries]
        path = export_masks(model, str(tmp_path / f"m{init}.pt"))
        fresh = _resnet(2)
        apply_masks(fresh, cfg)
        load_masks(fresh, path)
        for (_, _, s), m in zip(mask_entries(fresh), masks):
            want = torch.where(m, torch.full_like(s, on_value), torch.zeros_like(s))
            assert torch.equal(s.detach(), want)


def test_merge_masks_records_no_autograd_graph():
    """Merging multiplies the masks into the weights without recording autograd, also into a weight the
    user made trainable again (an in-place product on a leaf that requires grad is an error under autograd):
    the merged weights are leaves without a graph, equal to W * [S > tau]."""
    model = _resnet(3)
    apply_masks(model)
    entries = mask_entries(model)
    entries[0][1].requires_grad_(True)  # one frozen weight trained beside its mask
    want = {name.split(".parametrizations")[0]: (w.detach() * binary_mask(s.detach(), 5e-3)).clone()
            for name, w, s in entries}
    merge_masks(model)
    for owner, w in want.items():
        weight = model.get_submodule(owner).weight
        assert weight.grad_fn is None
        assert torch.equal(weight.detach(), w)
    images = torch.randn(2, 3, 64, 64)
    assert torch.isfinite(F.normalize(model.encode_image(images), dim=-1)).all()
