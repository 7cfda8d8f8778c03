"""Which kernels the ops launch on the Triton path: the composition (cuBLAS GEMMs + Triton epilogues) by
default, the fused matmul kernels behind ``FASTVLM_FUSED`` / ``fused_kernels``; both against the references."""

import pytest
import torch

import fastvlm
from fastvlm.functional import masked_linear, orthogonal_linear
from fastvlm.kernels._common import fused, fused_kernels
from fastvlm.ops.masked import masked_linear_reference
from fastvlm.ops.orth import n_params, orthogonal_linear_reference


def _masked_case(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 24, generator=g).to(dtype).requires_grad_()
    w = torch.randn(9, 24, generator=g).to(dtype)
    s = (0.01 * torch.rand(9, 24, generator=g)).requires_grad_()
    b = torch.randn(9, generator=g).to(dtype).requires_grad_()
    return x, w, s, b


def _grads(fn, inputs, go):
    inputs = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
    y = fn(*inputs)
    y.backward(go)
    return y, [t.grad for t in inputs if t.requires_grad]


@pytest.mark.parametrize("flag", [(), ("masked",)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_masked_paths_match_reference(launches, flag, dtype):
    x, w, s, b = _masked_case(dtype)
    go = torch.randn(2, 5, 9, generator=torch.Generator().manual_seed(2)).to(dtype)
    want, gwant = _grads(lambda x, s, b: masked_linear_reference(x, w, s, b), [x, s, b], go)
    with fastvlm.backend("triton"), fused_kernels(*flag):
        got, ggot = _grads(lambda x, s, b: masked_linear(x, w, s, b), [x, s, b], go)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    for a, e in zip(ggot, gwant):
        torch.testing.assert_close(a.float(), e.float(), **tol)
    assert "score_grad_kernel" in launches  # the fused score gradient runs on both paths
    assert ("matmul_kernel" in launches) == bool(flag)  # y and dx: fused kernel only behind the flag


@pytest.mark.parametrize("flag", [(), ("orth",)])
def test_orth_paths_match_reference(launches, flag):
    g = torch.Generator().manual_seed(3)
    bsz, r = 8, 3
    x = torch.randn(7, r * bsz, generator=g).requires_grad_()
    w = torch.randn(5, r * bsz, generator=g)
    p = (0.2 * torch.randn(r, n_params(bsz), generator=g)).requires_grad_()
    go = torch.randn(7, 5, generator=g)
    want, gwant = _grads(lambda x, p: orthogonal_linear_reference(x, w, p, None, bsz), [x, p], go)
    with fastvlm.backend("triton"), fused_kernels(*flag):
        got, ggot = _grads(lambda x, p: orthogonal_linear(x, w, p, None, bsz), [x, p], go)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for a, e in zip(ggot, gwant):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)
    fused_ran = {"rotated_linear_fwd_kernel", "rotated_linear_bwd_kernel"} <= set(launches)
    assert fused_ran == bool(flag)
    if not flag:  # rotate x once, one GEMM; backward: GEMM, then the rotate and gram kernels
        assert {"rotate_kernel", "rotate_grad_r_kernel"} <= set(launches)
        assert not {"rotated_linear_fwd_kernel", "rotated_linear_bwd_kernel"} & set(launches)


def test_fused_flag_reads_the_environment(monkeypatch):
    monkeypatch.setenv("FASTVLM_FUSED", "")
    assert not fused("masked") and not fused("orth")
    monkeypatch.setenv("FASTVLM_FUSED", "orth")
    assert fused("orth") and not fused("masked")
    monkeypatch.setenv("FASTVLM_FUSED", "all")
    assert fused("masked") and fused("orth")
    with fused_kernels():
        assert not fused("masked")
    monkeypatch.setenv("FASTVLM_FUSED", "residual")
    with pytest.raises(ValueError, match="FASTVLM_FUSED"):
        fused("masked")
    with pytest.raises(ValueError, match="families"):
        with fused_kernels("cayley"):
            pass
