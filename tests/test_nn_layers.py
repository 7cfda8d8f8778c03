"""The drop-in layers of fastvlm.nn, built by hand on plain modules: they hold the frozen weight by reference
(same storage), start as the module they wrap, compute their method's formula (written out here with torch),
bypass to the wrapped module, merge / unmerge where the method allows, and only their own parameters train."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastvlm.nn import LoRALinear, MaskedConv2d, MaskedLinear, OrthogonalLinear, ProjectedMultiheadAttention
from fastvlm.tuners.common import bypass, tuner_layers

G = torch.Generator().manual_seed(0)


def linear(k=16, n=12):
    torch.manual_seed(0)
    return nn.Linear(k, n)


def frozen(layer, module):
    """Only the layer's own parameters train, and the wrapped module's weight is the same storage."""
    assert all(not p.requires_grad for p in module.parameters())
    assert [p.requires_grad for p in layer.tuner_parameters()] == [True] * len(layer.tuner_parameters())
    assert layer.weight.data_ptr() == module.weight.data_ptr()


def test_masked_linear():
    lin = linear()
    w0 = lin.weight.detach().clone()
    layer = MaskedLinear.from_linear(lin, threshold=5e-3, init=1e-2)
    frozen(layer, lin)
    x = torch.randn(5, 16, generator=G)
    torch.testing.assert_close(layer(x), lin(x), rtol=0, atol=1e-6)  # every mask on
    with torch.no_grad():
        layer.scores.copy_(torch.rand(12, 16, generator=G) * 1e-2)  # about half below 5e-3
    mask = (layer.scores > 5e-3).float()
    want = x @ (w0 * mask).T + lin.bias
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
    layer(x).square().sum().backward()
    dy = 2 * want
    torch.testing.assert_close(layer.scores.grad, (dy.T @ x) * w0, rtol=1e-4, atol=1e-5)  # straight-through
    layer.bypass = True
    torch.testing.assert_close(layer(x), x @ w0.T + lin.bias, rtol=1e-5, atol=1e-6)
    layer.bypass = False
    layer.merge()
    torch.testing.assert_close(lin.weight, w0 * mask, rtol=0, atol=0)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError, match="merging zeroes the masked-off weights"):
        layer.unmerge()


@pytest.mark.parametrize("conv,fused", [(dict(kernel_size=4, stride=4), True),
                                        (dict(kernel_size=3, stride=1, padding=1), False)])
def test_masked_conv(conv, fused):
    """A patch conv runs the fused masked matmul, any other conv the reference path: both are
    conv2d(x, W * M, b)."""
    torch.manual_seed(0)
    c = nn.Conv2d(3, 6, **conv)
    w0 = c.weight.detach().clone()
    layer = MaskedConv2d.from_conv(c)
    frozen(layer, c)
    assert layer.fused is fused
    x = torch.randn(2, 3, 8, 8, generator=G)
    torch.testing.assert_close(layer(x), c(x), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        layer.scores.copy_(torch.rand(c.weight.shape, generator=G) * 1e-2)
    want = F.conv2d(x, w0 * (layer.scores > 5e-3).float(), c.bias, **{k: v for k, v in conv.items() if k != "kernel_size"})
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="conv must be a Conv2d, got Linear"):
        MaskedConv2d.from_conv(linear())


def cayley_by_hand(params, b):
    """R_j = (I + Q_j)(I - Q_j)^-1, Q_j = U_j - U_j^T, U_j's strict upper triangle in triu_indices order."""
    out = []
    for row in params.double():
        u = torch.zeros(b, b, dtype=torch.float64)
        i, j = torch.triu_indices(b, b, 1)
        u[i, j] = row
        q = u - u.T
        eye = torch.eye(b, dtype=torch.float64)
        out.append((eye + q) @ torch.linalg.inv(eye - q))
    return torch.block_diag(*out).float()


def test_orthogonal_linear():
    lin = linear()
    w0 = lin.weight.detach().clone()
    layer = OrthogonalLinear.from_linear(lin, block_size=8)
    frozen(layer, lin)
    assert layer.params.shape == (2, 8 * 7 // 2)
    x = torch.randn(5, 16, generator=G)
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-6)  # R = I
    with torch.no_grad():
        layer.params.normal_(std=0.1, generator=G)
    R = cayley_by_hand(layer.params.detach(), 8)
    want = x @ R @ w0.T + lin.bias
    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-5)
    with bypass(layer):
        torch.testing.assert_close(layer(x), x @ w0.T + lin.bias, rtol=1e-5, atol=1e-6)
    layer.merge()
    torch.testing.assert_close(lin.weight, w0 @ R.T, rtol=1e-4, atol=1e-6)  # W <- W blockdiag(R)^T
    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(lin.weight, w0, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="block_size=5 must divide the input width 16"):
        OrthogonalLinear.from_linear(linear(), block_size=5)


def test_lora_linear():
    lin = linear()
    w0 = lin.weight.detach().clone()
    layer = LoRALinear.from_linear(lin, rank=2, alpha=4.0, seed=3)
    frozen(layer, lin)
    x = torch.randn(5, 16, generator=G)
    torch.testing.assert_close(layer(x), lin(x), rtol=0, atol=0)  # B = 0
    with torch.no_grad():
        layer.lora.B.normal_(generator=G)
    A, B = layer.lora.A.detach(), layer.lora.B.detach()
    want = x @ w0.T + lin.bias + 2.0 * (x @ A.T) @ B.T  # alpha / r = 2
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    layer.merge()
    torch.testing.assert_close(lin.weight, w0 + 2.0 * B @ A, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(lin.weight, w0, rtol=1e-5, atol=1e-6)
    again = LoRALinear.from_linear(linear(), rank=2, alpha=4.0, seed=3)
    assert torch.equal(again.lora.A, layer.lora.A)  # A is seeded
    with pytest.raises(TypeError, match="linear must be a Linear or ProjectionView, got Conv2d"):
        LoRALinear.from_linear(nn.Conv2d(1, 1, 1))


def test_attention_projections_take_the_linear_layers():
    """ProjectedMultiheadAttention.from_mha computes the module's self-attention through in_proj / out_proj,
    which the drop-in layers replace; the weights stay the MultiheadAttention's own."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 5, 16, generator=G)
    with torch.no_grad():
        want = mha(x, x, x, need_weights=False)[0]
    attn = ProjectedMultiheadAttention.from_mha(mha)
    attn.in_proj = LoRALinear.from_linear(attn.in_proj, rank=2)
    attn.out_proj = MaskedLinear.from_linear(attn.out_proj)
    assert attn.in_proj.weight.data_ptr() == mha.in_proj_weight.data_ptr()
    assert attn.out_proj.weight.data_ptr() == mha.out_proj.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(attn(x)[0], want, rtol=1e-5, atol=1e-6)
        attn.in_proj.lora.B.normal_(generator=G)
        moved = attn(x)[0]
        assert not torch.allclose(moved, want, atol=1e-3)
        with bypass(attn):  # every tuner layer under a module, placed by hand
            torch.testing.assert_close(attn(x)[0], want, rtol=1e-5, atol=1e-6)
    assert [n for n, _ in tuner_layers(attn)] == ["in_proj", "out_proj"]


def test_cross_attention_through_the_projections():
    """A pooling head's probe attending over tokens (query is not key): each of q, k, v is its slice of the
    one (masked) in_proj, so the result is nn.MultiheadAttention's with the masked weight written in."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    probe, tokens = torch.randn(2, 1, 16, generator=G), torch.randn(2, 5, 16, generator=G)
    attn = ProjectedMultiheadAttention.from_mha(mha)
    with torch.no_grad():
        torch.testing.assert_close(attn(probe, tokens, tokens)[0], mha(probe, tokens, tokens)[0], rtol=1e-5, atol=1e-6)
    attn.in_proj = MaskedLinear.from_linear(attn.in_proj)
    with torch.no_grad():
        attn.in_proj.scores.copy_(torch.rand(48, 16, generator=G) * 1e-2)
        masked = nn.MultiheadAttention(16, 2, batch_first=True)
        masked.load_state_dict(mha.state_dict())
        masked.in_proj_weight.mul_((attn.in_proj.scores > 5e-3).float())
        values = torch.randn(2, 5, 16, generator=G)  # key is not value either
        torch.testing.assert_close(attn(probe, tokens, values)[0], masked(probe, tokens, values)[0],
                                   rtol=1e-5, atol=1e-6)


def test_gradient_dropout_reaches_a_reference_path_conv():
    """RMT's two-pass dropout on a conv that is not a patch conv: its score gradient is dropped after the
    backward, as grad_dropout(g_a, g_b) with the seed of its index (the fused layers count first)."""
    from fastvlm.functional import grad_dropout
    from fastvlm.tuners.mask import apply_masks, gradient_dropout

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 5 * 5, 2))
    apply_masks(model, target_modules=["0", "2"])
    x = torch.randn(2, 3, 5, 5, generator=G)
    conv = model[0]
    assert not conv.fused
    g_a = torch.autograd.grad(model(x).square().sum(), [conv.scores])[0]
    g_b = torch.autograd.grad(model(x).sum(), [conv.scores])[0]
    want = grad_dropout(g_a, g_b, 1.0, seed=7 + 1)  # index 1: the fused linear is layer 0
    model(x).sum().backward()  # pass 1
    with gradient_dropout(model, 1.0, lambda i: 7 + i):
        model(x).square().sum().backward()  # pass 2
    torch.testing.assert_close(conv.scores.grad, want, rtol=0, atol=0)
    assert (want == 0).any() and not torch.equal(want, g_a)  # some of g_a was dropped
