"""fp32 dots follow torch.get_float32_matmul_precision(): the launchers pass the choice as the PRECISION
constexpr (the interpreter ignores it, so what is checked is the launch, not the arithmetic)."""

import pytest
import torch

import fastvlm
from fastvlm.functional import block_rotate, cayley, masked_linear, residual_cross_entropy
from fastvlm.ops.orth import n_params


@pytest.fixture
def launches(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    seen = []
    real_run = InterpretedFunction.run

    def run(self, *args, **kwargs):
        seen.append((self.fn.__name__, kwargs))
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return seen


@pytest.fixture
def matmul_precision():
    old = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(old)


def _run_ops(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 16, generator=g).to(dtype).requires_grad_()
    w = torch.randn(5, 16, generator=g).to(dtype)
    s = (0.01 * torch.rand(5, 16, generator=g)).requires_grad_()
    masked_linear(x, w, s).sum().backward()
    f, t, r = (torch.randn(n, 16, generator=g).to(dtype).requires_grad_() for n in (4, 7, 7))
    residual_cross_entropy(f, t, r, torch.randint(0, 7, (4,), generator=g)).backward()
    p = (0.1 * torch.randn(2, n_params(8), generator=g)).requires_grad_()
    block_rotate(x, cayley(p, 8)).sum().backward()


@pytest.mark.parametrize("setting,expected", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_fp32_launches_take_torchs_precision(launches, matmul_precision, setting, expected):
    matmul_precision(setting)
    with fastvlm.backend("triton"):
        _run_ops(torch.float32)
    dots = [(n, kw["PRECISION"]) for n, kw in launches if "PRECISION" in kw]
    names = {n for n, _ in dots}
    assert {"score_grad_kernel", "ce_class_tile_kernel", "matmul_kernel", "rotate_kernel",
            "rotate_grad_r_kernel", "cayley_bwd_kernel"} <= names
    assert all(p == expected for _, p in dots), dots


def test_fp16_launches_and_the_residual_gradient_matmuls(launches, matmul_precision):
    """fp16 dots take no precision ("ieee" by convention); the residual backward's matmuls on the fp32
    softmax gradient run fp32 dots on TF32 inputs whatever the setting (fp16's mantissa, fp32's range)."""
    matmul_precision("highest")
    with fastvlm.backend("triton"):
        _run_ops(torch.float16)
    import triton.language as tl

    def on_g(n, kw):  # the matmuls whose A operand is the fp32 softmax gradient G
        return (n == "matmul_kernel" and kw.get("HAS_KSCALE")) or n == "norm_grad_kernel"

    grad_mm = [kw for n, kw in launches if on_g(n, kw)]
    assert {n for n, kw in launches if on_g(n, kw)} == {"matmul_kernel", "norm_grad_kernel"}
    assert grad_mm and all(kw["DOT_DTYPE"] == tl.float32 and kw["PRECISION"] == "tf32" for kw in grad_mm)
    others = [kw for n, kw in launches if "PRECISION" in kw and not on_g(n, kw) and n != "cayley_bwd_kernel"]
    assert others and all(kw["DOT_DTYPE"] == tl.float16 and kw["PRECISION"] == "ieee" for kw in others)
