"""Agreement with torch's own semantics where the ops stand in for a torch composition: ignored targets,
dtypes, autocast, label smoothing, a learnable logit scale, and the integer kinds torch users pass."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastvlm
import fastvlm.functional as FV
from fastvlm.ops.orth import n_params
from fastvlm.ops.residual import residual_logits_reference

from .helpers import assert_close


def _residual_inputs(B=6, K=9, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, D, generator=g, dtype=dtype).requires_grad_()
    t = torch.randn(K, D, generator=g, dtype=dtype).requires_grad_()
    x = (0.3 * torch.randn(K, D, generator=g, dtype=dtype)).requires_grad_()
    y = torch.randint(0, K, (B,), generator=g)
    return f, t, x, y


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_target_ignored_gives_torchs_loss_and_zero_gradients(backend, reduction):
    f, t, x, _ = _residual_inputs()
    y = torch.full((6,), -100)
    loss = FV.residual_cross_entropy(f, t, x, y, reduction=reduction)
    want = F.cross_entropy(residual_logits_reference(f, t, x), y, reduction=reduction)
    torch.testing.assert_close(loss, want, equal_nan=True)  # mean: NaN (0/0); sum: 0; none: zeros
    grads = torch.autograd.grad(loss.sum(), [f, t, x])
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))  # not NaN: 0 x 1/0 must not leak into the gradients


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.1, 1.0])
def test_label_smoothing_matches_cross_entropy(backend, reduction, eps):
    f, t, x, y = _residual_inputs()
    y[2] = -100  # an ignored row: smoothing must not touch it, and the mean divides by the 5 valid rows
    got = FV.residual_cross_entropy(f, t, x, y, 0.5, 20.0, reduction, label_smoothing=eps)
    want = F.cross_entropy(residual_logits_reference(f, t, x, 0.5, 20.0), y, reduction=reduction,
                           label_smoothing=eps)
    assert_close("loss", got, want, torch.float32)
    go = torch.rand_like(want)
    for a, b in zip(torch.autograd.grad(got, [f, t, x], go), torch.autograd.grad(want, [f, t, x], go)):
        assert_close("grad", a, b, torch.float32)


def test_label_smoothing_across_class_chunks(monkeypatch):
    import fastvlm.ops.residual as R

    monkeypatch.setattr(R, "CHUNK_ELEMENTS", 64)  # 4 classes a chunk at D=16: 3 chunks, the last partial
    f, t, x, y = _residual_inputs(K=11)
    with fastvlm.backend("torch"):
        got = FV.residual_cross_entropy(f, t, x, y, label_smoothing=0.2)
    want = F.cross_entropy(residual_logits_reference(f, t, x), y, label_smoothing=0.2)
    assert_close("loss", got, want, torch.float32)
    for a, b in zip(torch.autograd.grad(got, [f, t, x]), torch.autograd.grad(want, [f, t, x])):
        assert_close("grad", a, b, torch.float32)


def test_label_smoothing_is_checked():
    f, t, x, y = _residual_inputs()
    with pytest.raises(ValueError, match="label_smoothing must be <= 1"):
        FV.residual_cross_entropy(f, t, x, y, label_smoothing=1.5)


@pytest.mark.parametrize("op", ["logits", "ce"])
def test_learnable_logit_scale_gets_its_gradient(backend, op):
    f, t, x, y = _residual_inputs()
    s = torch.tensor(20.0, requires_grad=True)
    s_ref = torch.tensor(20.0, requires_grad=True)
    if op == "logits":
        got, want = FV.residual_logits(f, t, x, 0.5, s), residual_logits_reference(f, t, x, 0.5, s_ref)
    else:
        got = FV.residual_cross_entropy(f, t, x, y, 0.5, s, label_smoothing=0.1)
        want = F.cross_entropy(residual_logits_reference(f, t, x, 0.5, s_ref), y, label_smoothing=0.1)
    go = torch.randn_like(want)
    g_got = torch.autograd.grad(got, [s, f, x], go)
    g_want = torch.autograd.grad(want, [s_ref, f, x], go)
    assert g_got[0].shape == s.shape
    for a, b in zip(g_got, g_want):
        assert_close("grad", a, b, torch.float32)


def test_logit_scale_gradient_in_fp64_by_gradcheck():
    f, t, x, y = _residual_inputs(B=3, K=4, D=5, dtype=torch.float64)
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    with fastvlm.backend("torch"):
        assert torch.autograd.gradcheck(lambda s, f: FV.residual_cross_entropy(f, t, x, y, 0.5, s, "sum"), [s, f])


def test_alpha_that_requires_grad_is_refused():
    f, t, x, y = _residual_inputs()
    with pytest.raises(ValueError, match="alpha must be a number or a tensor that does not require grad"):
        FV.residual_logits(f, t, x, torch.tensor(0.5, requires_grad=True))


def test_autocast_loss_is_fp32_like_cross_entropy():
    f, t, x, y = _residual_inputs()
    with fastvlm.backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = FV.residual_cross_entropy(f, t, x, y)
        want = F.cross_entropy(residual_logits_reference(f, t, x), y)
    assert want.dtype == torch.float32 and loss.dtype == torch.float32


def _mixed_cases():
    g = torch.Generator().manual_seed(1)
    x16, x32 = torch.randn(4, 32, generator=g).half(), torch.randn(4, 32, generator=g)
    w32, b32 = torch.randn(8, 32, generator=g), torch.randn(8, generator=g)
    s = torch.full((8, 32), 0.01)
    p = torch.zeros(2, n_params(16))
    t32 = torch.randn(5, 32, generator=g)
    return [
        ("masked_linear x fp16, weight/bias fp32", lambda: FV.masked_linear(x16, w32, s, b32), "x is torch.float16"),
        ("masked_linear x fp16, weight fp32, no bias", lambda: FV.masked_linear(x16, w32, s), "weight is torch.float32"),
        ("masked_linear bias fp16", lambda: FV.masked_linear(x32, w32, s, b32.half()), "bias is torch.float16"),
        ("orthogonal_linear x fp16, weight fp32", lambda: FV.orthogonal_linear(x16, w32, p, None, 16), "x is torch.float16"),
        ("orthogonal_linear bias fp16", lambda: FV.orthogonal_linear(x32, w32, p, b32.half(), 16), "bias is torch.float16"),
        ("residual_logits features fp16", lambda: FV.residual_logits(x16, t32, torch.zeros_like(t32)), "features is torch.float16"),
        ("residual_cross_entropy residual fp16",
         lambda: FV.residual_cross_entropy(x32, t32, torch.zeros_like(t32).half(), torch.zeros(4, dtype=torch.long)),
         "residual is torch.float16"),
    ]


@pytest.mark.parametrize("case", _mixed_cases(), ids=lambda c: c[0])
def test_mixed_dtypes_are_refused_naming_the_arguments(case):
    _, call, fragment = case
    with fastvlm.backend("torch"), pytest.raises(TypeError, match=fragment) as err:
        call()
    assert "share one dtype" in str(err.value)


def test_mixed_dtypes_run_under_autocast():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 32, generator=g).half()
    w = torch.randn(8, 32, generator=g)
    with fastvlm.backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        y = FV.masked_linear(x, w, torch.full((8, 32), 0.01))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("seed", [np.int64(7), np.uint32(7), torch.tensor(7), torch.tensor(7, dtype=torch.int32)],
                         ids=["numpy.int64", "numpy.uint32", "tensor int64", "tensor int32"])
def test_seed_of_any_integer_kind(seed):
    g = torch.Generator().manual_seed(3)
    ga, gb = torch.randn(40, 30, generator=g), torch.randn(40, 30, generator=g)
    with fastvlm.backend("torch"):
        assert torch.equal(FV.grad_dropout(ga, gb, 0.5, seed), FV.grad_dropout(ga, gb, 0.5, 7))
        x, w = torch.randn(3, 30, generator=g), torch.randn(40, 30, generator=g)
        s = torch.full((40, 30), 0.01, requires_grad=True)
        FV.masked_linear(x, w, s, ref_grad=gb, drop_ratio=0.5, seed=seed).sum().backward()
        got = s.grad.clone()
        s.grad = None
        FV.masked_linear(x, w, s, ref_grad=gb, drop_ratio=0.5, seed=7).sum().backward()
        assert torch.equal(got, s.grad)


@pytest.mark.parametrize("seed", [1.0, True, -1, 2**62, torch.tensor(1.0), torch.tensor(True), torch.tensor([1, 2]), "3"])
def test_seed_that_is_not_an_integer_is_refused(seed):
    g = torch.randn(4, 4)
    with pytest.raises(ValueError, match="seed must be an int in"):
        FV.grad_dropout(g, g, 0.5, seed)


@pytest.mark.parametrize("gemm", ["torch", "onednn"])
@pytest.mark.parametrize("op", ["logits", "ce"])
def test_fp32_gradients_as_accurate_as_the_plain_composition(gemm, op):
    """Against fp64, the torch path's fp32 gradients stay within 1.5x the error of the plain fp32 composition
    (F.normalize + matmul + F.cross_entropy) at a shape with 4 class chunks' worth of work per row."""
    from fastvlm import _backend

    if gemm == "onednn" and _backend._onednn_op() is None:
        pytest.skip("this torch build has no oneDNN linear")
    g = torch.Generator().manual_seed(5)
    B, K, D = 128, 400, 256
    f64, t64 = torch.randn(B, D, generator=g, dtype=torch.float64), torch.randn(K, D, generator=g, dtype=torch.float64)
    x64 = 0.3 * torch.randn(K, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (B,), generator=g)
    go = torch.randn(B, K, generator=g, dtype=torch.float64)

    def grads(fn, dtype):
        leaves = [a.to(dtype).requires_grad_() for a in (f64, t64, x64)]
        out = fn(*leaves)
        return torch.autograd.grad(out, leaves, None if op == "ce" else go.to(dtype))

    def plain(f, t, x):
        lg = residual_logits_reference(f, t, x)
        return F.cross_entropy(lg, y) if op == "ce" else lg

    def ours(f, t, x):
        return FV.residual_cross_entropy(f, t, x, y) if op == "ce" else FV.residual_logits(f, t, x)

    exact = grads(plain, torch.float64)
    with fastvlm.backend("torch"), fastvlm.cpu_gemm(gemm):
        got = grads(ours, torch.float32)
    want = grads(plain, torch.float32)
    for name, a, b, e in zip(("features", "base", "residual"), got, want, exact):
        err_ours, err_plain = (a.double() - e).abs().max().item(), (b.double() - e).abs().max().item()
        assert err_ours <= 1.5 * err_plain, f"d {name}: {err_ours:.2e} vs the plain composition's {err_plain:.2e}"
