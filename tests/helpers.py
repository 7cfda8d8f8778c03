"""Comparison helpers shared by the op tests: an op against its reference, forward and every gradient; and the
device the op tests build their inputs on (set by tests/conftest.py from ``--device``)."""

import pytest
import torch

# max error allowed, relative to the largest magnitude of the fp32 reference computed from the same
# (rounded) inputs: fp32 accumulation everywhere, so only the output rounding and summation order differ
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

_DEVICE = [torch.device("cpu")]

CUDA_ONLY_REASON = "CUDA only (pytest --device cuda): too slow or not testable in Triton's interpreter"
#: a parameter or test that runs only with --device cuda; skipped on CPU with this reason
cuda_only = pytest.mark.cuda_only(reason=CUDA_ONLY_REASON)
#: the activation dtypes of the op tests; bf16 only compiled (the interpreter's bf16 arithmetic is unreliable)
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.cuda_only(
              reason="bf16 kernels run compiled only (the interpreter's bf16 arithmetic is unreliable): "
                     "pytest --device cuda"))]


def set_device(name: str) -> None:
    _DEVICE[0] = torch.device(name)


def device() -> torch.device:
    return _DEVICE[0]


def on_device(*tensors):
    """The tensors on the suite's device (one tensor: that tensor). Inputs are drawn on CPU from a seeded
    generator and then moved, so every device tests the same values; a tensor that requires grad stays a leaf
    that requires grad. None passes through."""
    out = []
    for t in tensors:
        if t is not None and t.device != device():
            t = t.detach().to(device()).requires_grad_(t.requires_grad)
        out.append(t)
    return out[0] if len(tensors) == 1 else tuple(out)


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
    """op(*inputs) against reference(*fp32 copies of the same inputs): forward and every input gradient. The
    inputs must be on the suite's device (built with on_device), so that --device cuda tests the kernels there."""
    for t in inputs:
        assert t.device == device(), f"an input is on {t.device}, the suite runs on {device()}: build it with on_device"
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
