"""Exact tests of the residual family's torch path where a plausible one-token bug would otherwise pass: the
class-chunk size, the per-chunk target and ignore-index bookkeeping past chunk boundaries, the learnable
logit scale's gradient, label smoothing's mean-over-classes term (its own chunked K x D pass), and the
``torch.compile`` custom ops called eagerly (their autograd and fake implementations). Written for the
mutation run of ``fastvlm/ops/residual.py`` (docs/testing.md); each compares with the naive composition in
fp64, where the only difference left is summation order (~1e-15 relative)."""

import pytest
import torch
import torch.nn.functional as F

import fastvlm
import fastvlm.functional as FV
from fastvlm.ops import residual as R

B, D, K = 5, 7, 13
SMALL_CHUNK = 40  # elements: class_chunk(5, 7, 13) = 40 // 7 = 5 classes, so chunks [0, 5), [5, 10), [10, 13)
ALPHA = 0.7
TOL = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(R, "CHUNK_ELEMENTS", SMALL_CHUNK)
    assert R.class_chunk(B, D, K) == 5


@pytest.fixture(autouse=True)
def torch_path():
    with fastvlm.backend("torch"):
        yield


def inputs(seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, D, generator=g, dtype=torch.float64)
    t = torch.randn(K, D, generator=g, dtype=torch.float64)
    x = 0.5 * torch.randn(K, D, generator=g, dtype=torch.float64)  # a trained residual, not zero
    s = torch.tensor(scale, dtype=torch.float64)  # small enough that no softmax saturates
    return [a.requires_grad_() for a in (f, t, x, s)]


# targets on both sides of every chunk boundary, and ignored rows in the first and the last chunk's rows
TARGET = torch.tensor([4, 5, -100, 10, 12])


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def test_class_chunk_by_hand():
    assert R.class_chunk(4, 8, 100) == 100  # everything fits: one chunk of all classes
    assert R.class_chunk(3, 1 << 20, 10) == 2  # 2^21 // 2^20
    assert R.class_chunk(1 << 19, 3, 10) == 4  # the larger of B and D bounds it
    assert R.class_chunk(1 << 22, 1, 5) == 1  # never 0, even when one class is already over the budget
    assert R.class_chunk(2, 2, 0) == 1


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3, 1.0])
def test_cross_entropy_over_chunks_equals_the_reference(small_chunks, reduction, label_smoothing):
    f, t, x, s = inputs()
    loss = FV.residual_cross_entropy(f, t, x, TARGET, ALPHA, s, reduction, label_smoothing=label_smoothing)
    ref = F.cross_entropy(R.residual_logits_reference(f, t, x, ALPHA, s), TARGET, reduction=reduction,
                          label_smoothing=label_smoothing)
    torch.testing.assert_close(loss, ref, **TOL)
    w = torch.linspace(0.5, 1.5, B, dtype=torch.float64) if reduction == "none" else 1.0
    got, want = grads((loss * w).sum(), (f, t, x, s)), grads((ref * w).sum(), (f, t, x, s))
    for name, a, b in zip(("features", "base", "residual", "logit_scale"), got, want):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=name: f"d {n}: {m}")
    assert got[3].abs() > 1e-3  # the scale's gradient is not trivially zero here


def test_logits_over_chunks_equal_the_reference_with_a_learnable_scale(small_chunks):
    f, t, x, s = inputs(1)
    out = FV.residual_logits(f, t, x, ALPHA, s)
    ref = R.residual_logits_reference(f, t, x, ALPHA, s)
    torch.testing.assert_close(out, ref, **TOL)
    g = torch.randn(B, K, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for a, b in zip(grads((out * g).sum(), (f, t, x, s)), grads((ref * g).sum(), (f, t, x, s))):
        torch.testing.assert_close(a, b, **TOL)


def test_the_scale_gradient_by_hand():
    """logits = s <fhat, uhat>: d/ds sum(logits) = sum <fhat, uhat> = sum(logits) / s."""
    f, t, x, s = inputs(3, scale=2.5)
    (ds,) = grads(FV.residual_logits(f, t, x, ALPHA, s).sum(), (s,))
    cos = F.normalize(f, dim=-1) @ F.normalize(t + ALPHA * x, dim=-1).T
    torch.testing.assert_close(ds, cos.sum(), **TOL)


def test_label_smoothing_bounds_are_those_of_f_cross_entropy():
    f, t, x, _ = inputs()
    FV.residual_cross_entropy(f, t, x, TARGET, label_smoothing=1.0)  # allowed, as in F.cross_entropy
    with pytest.raises(ValueError, match="label_smoothing"):
        FV.residual_cross_entropy(f, t, x, TARGET, label_smoothing=1.0 + 1e-9)
    with pytest.raises(ValueError, match="label_smoothing"):
        FV.residual_cross_entropy(f, t, x, TARGET, label_smoothing=-1e-9)


def test_smoothing_term_by_hand(small_chunks):
    """logit_t - mean_k logit_k, 0 on ignored rows; its class mean runs in 5-class chunks here."""
    f, t, x, s = inputs(4)
    tgt = torch.where(TARGET >= 0, TARGET, -1)
    got = R.smoothing_term(f, t, x, tgt, ALPHA, 3.0)
    logits = R.residual_logits_reference(f, t, x, ALPHA, 3.0)
    want = logits.gather(1, tgt.clamp_min(0)[:, None])[:, 0] - logits.mean(dim=1)
    want = torch.where(tgt >= 0, want, 0.0)
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(grads(got.sum(), (f, t, x)), grads(want.sum(), (f, t, x))):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("keep_softmax", [True, False])
def test_the_custom_ops_run_eagerly_with_the_reference_gradients(keep_softmax):
    """The custom ops torch.compile records are plain callables too: their registered autograd gives the
    reference gradients (the softmax kept or recomputed), with a row weight on every row."""
    f, t, x, _ = inputs(5)
    tgt = torch.where(TARGET >= 0, TARGET, -1)
    rows = R._residual_ce_op(f, t, x, tgt, ALPHA, 3.0, keep_softmax)[0]
    ref = F.cross_entropy(R.residual_logits_reference(f, t, x, ALPHA, 3.0), TARGET, reduction="none")
    torch.testing.assert_close(rows, ref, **TOL)
    w = torch.tensor([0.5, 2.0, 7.0, 1.0, 3.0], dtype=torch.float64)  # 7.0 on the ignored row: no effect
    for a, b in zip(grads((rows * w).sum(), (f, t, x)), grads((ref * w).sum(), (f, t, x))):
        torch.testing.assert_close(a, b, **TOL)
    logits = R._residual_logits_op(f, t, x, ALPHA, 3.0)[0]
    g = torch.randn(B, K, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    want_logits = R.residual_logits_reference(f, t, x, ALPHA, 3.0)
    for a, b in zip(grads((logits * g).sum(), (f, t, x)), grads((want_logits * g).sum(), (f, t, x))):
        torch.testing.assert_close(a, b, **TOL)


def test_the_custom_ops_fake_implementations_match_the_real_ones():
    """opcheck runs each op for real and under FakeTensorMode and compares shapes, dtypes and strides (the
    fake implementation is what torch.compile plans with)."""
    f, t, x, _ = (a.detach() for a in inputs(7))
    tgt = torch.where(TARGET >= 0, TARGET, -1)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(R._residual_logits_op, (f, t, x, ALPHA, 3.0), test_utils=checks)
    for keep in (True, False):
        torch.library.opcheck(R._residual_ce_op, (f, t, x, tgt, ALPHA, 3.0, keep), test_utils=checks)
    _, rf, ru = R._residual_logits_op(f, t, x, ALPHA, 3.0)
    grad = torch.randn(B, K, dtype=torch.float64)
    for needs in ((True, True, True, True), (True, False, True, False), (False, True, False, True)):
        torch.library.opcheck(R._residual_backward_op,
                              (f, t, x, rf, ru, grad, None, None, None, ALPHA, 3.0, *needs), test_utils=checks)


@pytest.mark.parametrize("trains", ["features", "base", "residual"])
def test_each_input_alone_gets_its_own_gradient(trains):
    """Gradients follow which inputs require them, one at a time (TaskRes trains the residual alone; a frozen
    input must not borrow another's flag)."""
    f, t, x, _ = (a.detach() for a in inputs(8))
    named = {"features": f, "base": t, "residual": x}
    named[trains].requires_grad_()
    loss = FV.residual_cross_entropy(f, t, x, TARGET, ALPHA, 3.0)
    logits = FV.residual_logits(f, t, x, ALPHA, 3.0)
    ref_loss = F.cross_entropy(R.residual_logits_reference(f, t, x, ALPHA, 3.0), TARGET)
    ref_logits = R.residual_logits_reference(f, t, x, ALPHA, 3.0)
    g = torch.randn(B, K, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    (a,), (b,) = grads(loss, (named[trains],)), grads(ref_loss, (named[trains],))
    torch.testing.assert_close(a, b, **TOL)
    (a,), (b,) = grads((logits * g).sum(), (named[trains],)), grads((ref_logits * g).sum(), (named[trains],))
    torch.testing.assert_close(a, b, **TOL)


def test_the_backward_op_gives_unneeded_gradients_in_their_inputs_dtype():
    """fp16 inputs accumulate in fp32 (rf, ru, the gradient): an unneeded gradient still comes back empty in
    its own input's dtype, as the fake says (it once came back in rf's fp32)."""
    f, t, x, _ = (a.detach().half() for a in inputs(10))
    _, rf, ru = R._residual_logits_op(f, t, x, ALPHA, 3.0)
    assert rf.dtype == torch.float32
    grad = torch.randn(B, K)
    torch.library.opcheck(R._residual_backward_op, (f, t, x, rf, ru, grad, None, None, None, ALPHA, 3.0,
                                                    False, False, True, False),
                          test_utils=("test_schema", "test_faketensor"))
    df, dt, dx, ds = R._residual_backward_op(f, t, x, rf, ru, grad, None, None, None, ALPHA, 3.0,
                                             False, False, True, False)
    assert (df.dtype, dt.dtype, df.numel(), dt.numel()) == (torch.float16, torch.float16, 0, 0)
