"""Comparison helpers shared by the op tests: an op against its reference, forward and every gradient."""

import torch

# max error allowed, relative to the largest magnitude of the fp32 reference computed from the same
# (rounded) inputs: fp32 accumulation everywhere, so only the output rounding and summation order differ
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def leaf(t, dtype=None, requires_grad=True):
    t = t.detach().to(dtype or t.dtype)
    return t.requires_grad_(requires_grad)


def noncontig(t):
    """The same values in a non-contiguous layout (a transposed copy viewed back)."""
    return t.detach().T.contiguous().T.requires_grad_(t.requires_grad)


def assert_close(name, got, want, dtype, scale=None):
    tol = TOL[dtype]
    got, want = got.float(), want.float()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    s = scale if scale is not None else max(want.abs().max().item(), 1e-6)
    err = (got - want).abs().max().item()
    assert err <= tol * s, f"{name}: max error {err:.3e} > {tol:.0e} x scale {s:.3e}"


def check_op_against_reference(op, reference, inputs, dtype, grad_out_fn=torch.randn_like, names=None):
    """op(*inputs) against reference(*fp32 copies of the same inputs): forward and every input gradient."""
    low = [leaf(t, dtype, t.requires_grad) if t.is_floating_point() else t for t in inputs]
    ref_in = [leaf(t, torch.float32, t.requires_grad) if t.is_floating_point() else t for t in low]
    out = op(*low)
    want = reference(*ref_in)
    assert out.shape == want.shape, f"shape {tuple(out.shape)} != {tuple(want.shape)}"
    assert_close("forward", out, want, dtype)
    go = grad_out_fn(want).to(out.dtype).float()  # the reference gets the same rounded grad_output
    diff = [i for i, t in enumerate(low) if t.is_floating_point() and t.requires_grad]
    g_got = torch.autograd.grad(out, [low[i] for i in diff], go.to(out.dtype))
    g_want = torch.autograd.grad(want, [ref_in[i] for i in diff], go)
    for i, a, b in zip(diff, g_got, g_want):
        assert a.shape == b.shape
        assert_close(f"grad of {names[i] if names else i}", a, b, dtype)
    return out
