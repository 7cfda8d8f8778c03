"""Property-based tests (hypothesis): every op against its reference over random shapes, strides and values,
on the torch path and, at small sizes, in the Triton interpreter.

Tolerances are relative to the magnitude of the terms each output or gradient sums, derived from the inputs
(``_close``'s ``terms``), not to the result alone: where a gradient cancels to rounding noise (small
logit scales, nearly parallel rows), its largest entry can fall far below the rounding error of the sums that
built it, and a tolerance relative to it fails on correct code. Rounding error in fp32 is at most about
n * 2^-23 times the terms' magnitude for an n-term sum; the tolerances below are that for the examples'
sizes, with a margin of a few rounding steps.

Hypothesis' shrinking is off (``phases``): the examples are derandomized (the same every run), so a failure
is reported at once with its example instead of after minutes of shrinking, and each example has a deadline
that stops a hung or pathological one.
"""

from datetime import timedelta

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import fastvlm
from fastvlm.functional import (block_rotate, cayley, grad_dropout, masked_linear, orthogonal_linear,
                                residual_cross_entropy, residual_logits)
from fastvlm.ops.masked import grad_dropout_reference, masked_linear_reference
from fastvlm.ops.orth import cayley_reference, n_params, orthogonal_linear_reference
from fastvlm.ops.residual import residual_cross_entropy_reference, residual_logits_reference

BACKENDS = ["torch", "triton"]
SETTINGS = dict(max_examples=12, deadline=timedelta(seconds=60), suppress_health_check=[HealthCheck.too_slow],
                derandomize=True,  # derandomized: CI runs the same examples every time
                phases=[Phase.explicit, Phase.reuse, Phase.generate])  # no shrinking: see the module docstring


def _tensor(seed, *shape, scale=1.0, transposed=False):
    g = torch.Generator().manual_seed(seed)
    if transposed and len(shape) == 2:
        return (scale * torch.randn(shape[1], shape[0], generator=g)).T  # non-contiguous view
    return scale * torch.randn(*shape, generator=g)


def _grads(out, inputs, seed):
    go = _tensor(seed + 99, *out.shape) if out.dim() else torch.tensor(1.0)
    return torch.autograd.grad(out, inputs, go)


def _close(a, b, tol, terms):
    """max |a - b| <= tol * max(max |b|, terms): ``terms`` bounds the magnitude of what was summed to make b,
    from the inputs' scale, so that rounding noise of a cancelled result is not judged against itself."""
    scale = max(b.abs().max().item(), float(terms))
    err = (a - b).abs().max().item()
    assert err <= tol * scale, f"max error {err:.3e} > {tol:.0e} x scale {scale:.3e}"


def _amax(t):
    return t.detach().abs().max().item() if t.numel() else 0.0


def _row_norms(t):
    return torch.linalg.vector_norm(t.detach().float(), dim=-1)


@pytest.mark.parametrize("backend_name", BACKENDS)
@settings(**SETTINGS)
@given(B=st.integers(1, 9), K=st.integers(1, 70), D=st.integers(1, 80), seed=st.integers(0, 10**6),
       alpha=st.floats(-2, 2), scale=st.floats(0.1, 100), tr=st.booleans(), loss=st.booleans())
def test_residual_ops(backend_name, B, K, D, seed, alpha, scale, tr, loss):
    f = _tensor(seed, B, D, transposed=tr).requires_grad_()
    t = _tensor(seed + 1, K, D, transposed=tr).requires_grad_()
    x = _tensor(seed + 2, K, D, scale=0.5).requires_grad_()
    y = torch.randint(0, K, (B,), generator=torch.Generator().manual_seed(seed))
    with fastvlm.backend(backend_name):
        out = residual_cross_entropy(f, t, x, y, alpha, scale) if loss else residual_logits(f, t, x, alpha, scale)
        got = _grads(out, (f, t, x), seed)
    ref = (residual_cross_entropy_reference(f, t, x, y, alpha, scale) if loss
           else residual_logits_reference(f, t, x, alpha, scale))
    want = _grads(ref, (f, t, x), seed)
    # |logits| <= s. d logits = g is bounded by 1 per row (softmax - onehot) for the loss, else by the
    # upstream gradient; d fhat_b = s sum_k g_bk uhat_k sums K unit-bounded terms and dividing by ||f_b||
    # (or ||u_k||: d base, and alpha times it for d residual) scales it: the terms of every gradient.
    gmax = 1.0 if loss else _amax(_tensor(seed + 99, B, K))
    u = (t + alpha * x).detach()
    inv = 1.0 / min(_row_norms(f).min().item(), _row_norms(u).min().item(), 1e30)
    terms = scale * gmax * max(B, K) * inv * max(1.0, abs(alpha))
    _close(out.detach(), ref.detach(), 1e-4, scale)
    for a, b in zip(got, want):
        _close(a, b, 2e-4, terms)


@pytest.mark.parametrize("backend_name", BACKENDS)
@settings(**SETTINGS)
@given(M=st.integers(1, 40), N=st.integers(1, 40), K=st.integers(1, 40), seed=st.integers(0, 10**6),
       thr=st.floats(-0.01, 0.02), bias=st.booleans(), tr=st.booleans(), ratio=st.floats(0, 1))
def test_masked_ops(backend_name, M, N, K, seed, thr, bias, tr, ratio):
    x = _tensor(seed, M, K, transposed=tr).requires_grad_()
    w = _tensor(seed + 1, N, K, transposed=tr)
    s = (0.01 * torch.rand(N, K, generator=torch.Generator().manual_seed(seed))).requires_grad_()
    b = _tensor(seed + 2, N).requires_grad_() if bias else None
    ins = (x, s) + ((b,) if bias else ())
    with fastvlm.backend(backend_name):
        out = masked_linear(x, w, s, b, thr)
        got = _grads(out, ins, seed)
        ga, gb = _tensor(seed + 3, N, K), _tensor(seed + 4, N, K)
        dropped = grad_dropout(ga, gb, ratio, seed)
    ref = masked_linear_reference(x, w, s, b, thr)
    want = _grads(ref, ins, seed)
    # the terms of y = x @ (W m)^T + b: |x| @ |W|^T (+ |b|); of dx = dy @ (W m): |dy| @ |W|; of
    # dS = (dy^T @ x) * W: (|dy|^T @ |x|) * |W|; of db = sum dy: M |dy|
    ax, aw, ago = x.detach().abs(), w.abs(), _tensor(seed + 99, M, N).abs()
    y_terms = (ax @ aw.T).max().item() + (_amax(b) if bias else 0.0)
    g_terms = max((ago @ aw).max().item(), ((ago.T @ ax) * aw).max().item(), M * ago.max().item())
    _close(out.detach(), ref.detach(), 1e-5, y_terms)
    for a, c in zip(got, want):
        _close(a, c, 1e-5, g_terms)
    assert torch.equal(dropped, grad_dropout_reference(ga, gb, ratio, seed))


@pytest.mark.parametrize("backend_name", BACKENDS)
@settings(**SETTINGS)
@given(r=st.integers(1, 4), b=st.sampled_from([1, 2, 3, 5, 8, 16, 17]), M=st.integers(1, 30), N=st.integers(1, 30),
       seed=st.integers(0, 10**6), norm=st.floats(0.0, 3.0), tr=st.booleans())
def test_orth_ops(backend_name, r, b, M, N, seed, norm, tr):
    K = r * b
    p = (norm * _tensor(seed, r, n_params(b))).requires_grad_() if b > 1 else torch.zeros(r, 0, requires_grad=True)
    x = _tensor(seed + 1, M, K, transposed=tr).requires_grad_()
    w = _tensor(seed + 2, N, K).requires_grad_()
    with fastvlm.backend(backend_name):
        if b == 1:  # no free parameters: R = I
            out = orthogonal_linear(x, w, torch.zeros(r, 0), None, 1)
            torch.testing.assert_close(out, x @ w.T)
            return
        rot = cayley(p, b)
        out = orthogonal_linear(x, w, p, None, b)
        rotated = block_rotate(x, rot.detach())
        got = _grads(out, (x, w, p), seed)
    # R is orthogonal, so |R| <= 1 entrywise and x @ R has the magnitude of x's rows: the terms of
    # x R W^T are ||x_row|| |W| K; the gradients' terms add the upstream gradient's M rows and, for the
    # params, the inverse's factor (R + I) / 2 <= 1 on both sides of dR
    xr, wm, gm = _row_norms(x).max().item(), _amax(w), _amax(_tensor(seed + 99, M, N))
    y_terms = xr * wm * K
    g_terms = gm * max(M, N, K) * max(xr, 1.0) * max(wm, 1.0) * K
    _close(rot.detach(), cayley_reference(p, b).detach(), 1e-5, 1.0)
    _close(rotated.detach(), x.detach() @ torch.block_diag(*rot.detach()), 1e-5, xr)
    ref = orthogonal_linear_reference(x, w, p, None, b)
    want = _grads(ref, (x, w, p), seed)
    _close(out.detach(), ref.detach(), 1e-4, y_terms)
    for a, c in zip(got, want):
        _close(a, c, 5e-4, g_terms)
