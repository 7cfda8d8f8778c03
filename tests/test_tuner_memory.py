"""The frozen attention of the rotation, prompt and adapter tuners runs through the projected attention (one
matmul per projection), and activation recomputation for rotations and adapters gives the same step with less
kept for backward."""

import pytest
import torch

from fastvlm.models import TINY, load_clip
from fastvlm.tuners._attention import ProjectedMultiheadAttention
from fastvlm.tuners.adapter import AdapterConfig, apply_adapters
from fastvlm.tuners.orth import OrthConfig, apply_orth, rotation_parameters
from fastvlm.tuners.vpt import apply_vpt


def _model(seed=0):
    torch.manual_seed(seed)
    model, *_ = load_clip(TINY, None)
    return model


APPLY = {
    "orth": lambda m, **kw: apply_orth(m, OrthConfig(block_size=16, towers=("visual",), **kw)),
    "adapter": lambda m, **kw: apply_adapters(m, AdapterConfig(bottleneck=8, **kw)),
    "vpt": lambda m, **kw: apply_vpt(m),
}


@pytest.mark.parametrize("kind", sorted(APPLY))
def test_frozen_attention_is_routed_through_the_projected_attention(kind):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain = _model()
    with torch.no_grad():
        want = plain.encode_image(images)
    model = APPLY[kind](_model())
    attns = [blk.attn for blk in model.visual.transformer.resblocks]
    assert attns and all(isinstance(a, ProjectedMultiheadAttention) for a in attns)
    if kind == "vpt":
        return  # prompts change the output from the start; the routing itself is checked above
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), want, rtol=1e-5, atol=1e-5)


def _saved_bytes_and_grads(model, images):
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    params = [p for p in model.parameters() if p.requires_grad]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.encode_image(images).square().sum()
    grads = torch.autograd.grad(loss, params)
    return sum(saved), loss.detach(), grads


@pytest.mark.parametrize("kind", ["orth", "adapter"])
def test_recompute_gives_the_same_step_with_less_kept_for_backward(kind):
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))

    def build(recompute):
        model = APPLY[kind](_model(), recompute=recompute)
        if kind == "orth":
            with torch.no_grad():
                for p in rotation_parameters(model):
                    p.normal_(std=0.05, generator=torch.Generator().manual_seed(3))
        model.train()
        return model

    kept_plain, loss_plain, g_plain = _saved_bytes_and_grads(build(False), images)
    model = build(True)
    assert all(tr.grad_checkpointing for tr in (model.visual.transformer,))
    kept, loss, grads = _saved_bytes_and_grads(model, images)
    torch.testing.assert_close(loss, loss_plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert kept < 0.8 * kept_plain, (kept, kept_plain)
