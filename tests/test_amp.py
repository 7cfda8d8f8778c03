"""Mixed precision: under torch.autocast (bf16 on CPU) the ops run in bf16 like F.linear and stay within the
documented tolerance of fp32 (3e-2 of the largest magnitude: bf16 has 8 mantissa bits), forward and grads."""

import pytest
import torch

import fastvlm
import fastvlm.functional as FV
from fastvlm.ops.orth import n_params

TOL = 3e-2


def _rel(a, b):
    return (a.float() - b.float()).abs().max().item() / max(b.abs().max().item(), 1e-6)


def _compare(fn, inputs, expect_dtype=torch.bfloat16):
    ref = fn(*inputs)
    g_ref = torch.autograd.grad(ref.float().sum(), inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(*inputs)
    assert out.dtype == expect_dtype
    g = torch.autograd.grad(out.float().sum(), inputs)  # backward outside the autocast block, as usual
    assert _rel(out, ref) < TOL
    for a, b in zip(g, g_ref):
        assert a.dtype == torch.float32  # gradients reach the fp32 leaves in fp32
        assert _rel(a, b) < TOL


@pytest.fixture(autouse=True)
def torch_backend():
    with fastvlm.backend("torch"):
        yield


def test_residual_ops_under_autocast():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(8, 64, generator=g).requires_grad_()
    t = torch.randn(11, 64, generator=g)
    x = (0.3 * torch.randn(11, 64, generator=g)).requires_grad_()
    y = torch.randint(0, 11, (8,), generator=g)
    _compare(lambda f, x: FV.residual_logits(f, t, x, 0.5, 10.0), [f, x])
    # losses come out in fp32 under autocast, as F.cross_entropy's (torch's autocast policy for losses)
    _compare(lambda f, x: FV.residual_cross_entropy(f, t, x, y, 0.5, 10.0), [f, x], expect_dtype=torch.float32)


def test_masked_and_orth_under_autocast():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 64, generator=g).requires_grad_()
    w = torch.randn(24, 64, generator=g) / 8
    s = (0.01 * torch.rand(24, 64, generator=g)).requires_grad_()
    _compare(lambda x, s: FV.masked_linear(x, w, s), [x, s])
    p = (0.2 * torch.randn(4, n_params(16), generator=g)).requires_grad_()
    _compare(lambda x, p: FV.orthogonal_linear(x, w, p, None, 16), [x, p])


def test_autocast_mask_never_rounds_the_scores():
    # a score just above tau stays on under bf16 autocast (bf16 would round 5.01e-3 below 5e-3)
    s = torch.tensor([[5.01e-3, 4.99e-3]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = FV.masked_linear(torch.ones(1, 2), torch.ones(1, 2), s)
    assert y.item() == 1.0
