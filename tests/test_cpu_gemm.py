"""The CPU matmul dispatch (``_backend.linear``: torch's BLAS or oneDNN) and which matmuls each op sends there."""

import pytest
import torch
import torch.nn.functional as F

import fastvlm
from fastvlm import _backend
from fastvlm.functional import masked_linear, orthogonal_linear, residual_cross_entropy
from fastvlm.ops.orth import n_params

from .helpers import assert_close

needs_onednn = pytest.mark.skipif(_backend._onednn_op() is None, reason="this torch build has no oneDNN linear")


@pytest.fixture
def count_onednn(monkeypatch):
    """Counts the oneDNN calls the ops make."""
    op = _backend._onednn_op()
    calls = []

    def counting():
        def call(*a):
            calls.append(a[0].shape)
            return op(*a)
        return call if op is not None else None

    monkeypatch.setattr(_backend, "_onednn_op", counting)
    return calls


def _ref(x, w, b=None):
    y = x.double() @ w.double().T
    return y + b.double() if b is not None else y


@needs_onednn
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (3, 1, 5), (5, 7, 1), (67, 33, 129), (130, 768, 65)])
@pytest.mark.parametrize("w_layout", ["rows", "transposed"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_onednn_linear_matches_fp64(M, K, N, w_layout, with_bias, count_onednn):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    if w_layout == "transposed":  # the transpose of a row-major [K, N]: how the backward passes W
        w = w.T.contiguous().T
    with fastvlm.cpu_gemm("onednn"):
        y = _backend.linear(x, w, b if with_bias else None)
    assert count_onednn == [(M, K)]
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert_close("onednn linear", y, _ref(x, w, b if with_bias else None).float(), torch.float32)


@pytest.mark.parametrize("case", ["fp16", "fp64", "bf16", "x non-contiguous", "w non-contiguous", "3-D x",
                                  "torch mode", "records autograd", "strided bias"])
def test_falls_back_to_f_linear(case, count_onednn):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(9, 6, generator=g), torch.randn(4, 6, generator=g)
    mode = "onednn" if _backend._onednn_op() is not None else "torch"
    if case in ("fp16", "fp64", "bf16"):
        dt = {"fp16": torch.float16, "fp64": torch.float64, "bf16": torch.bfloat16}[case]
        x, w = x.to(dt), w.to(dt)
    elif case == "x non-contiguous":
        x = torch.randn(6, 9, generator=g).T
    elif case == "w non-contiguous":
        w = torch.randn(4, 12, generator=g)[:, ::2]
    elif case == "3-D x":
        x = x.view(3, 3, 6)
    elif case == "torch mode":
        mode = "torch"
    elif case == "records autograd":
        x.requires_grad_()
    bias = torch.randn(8, generator=g)[::2] if case == "strided bias" else None
    with fastvlm.cpu_gemm(mode):
        y = _backend.linear(x, w, bias)
    assert count_onednn == []
    assert torch.equal(y, F.linear(x, w, bias))


def test_a_wrong_bias_gets_torch_s_error_not_onednn_s():
    with fastvlm.cpu_gemm("onednn" if _backend._onednn_op() is not None else "torch"):
        with pytest.raises(RuntimeError, match="size"):
            _backend.linear(torch.randn(5, 3), torch.randn(4, 3), torch.randn(7))


def test_modes_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="cpu_gemm must be one of"):
        with fastvlm.cpu_gemm("mkl"):
            pass
    monkeypatch.setenv("FASTVLM_CPU_GEMM", "fast")
    with pytest.raises(ValueError, match="FASTVLM_CPU_GEMM must be one of"):
        _backend.linear(torch.randn(2, 3), torch.randn(4, 3))
    monkeypatch.setenv("FASTVLM_CPU_GEMM", "onednn")
    monkeypatch.setattr(_backend, "_onednn_op", lambda: None)
    with pytest.raises(RuntimeError, match="FASTVLM_CPU_GEMM=onednn but this torch build has no oneDNN"):
        _backend.linear(torch.randn(2, 3), torch.randn(4, 3))
    monkeypatch.setenv("FASTVLM_CPU_GEMM", "auto")  # auto without oneDNN: torch's matmul, no error
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    assert torch.equal(_backend.linear(x, w), F.linear(x, w))


def test_auto_mode_times_once_per_thread_count(monkeypatch):
    timed = []
    real = _backend._onednn_faster.__wrapped__

    @__import__("functools").lru_cache(maxsize=None)
    def fake(threads):
        timed.append(threads)
        return real(threads)

    monkeypatch.setattr(_backend, "_onednn_faster", fake)
    small = torch.randn(5, 3), torch.randn(2, 3)
    big = torch.randn(128, 128), torch.randn(128, 128)  # 2^21 multiply-adds: the smallest auto considers
    with fastvlm.cpu_gemm("auto"):
        assert_close("auto", _backend.linear(*small), _ref(*small).float(), torch.float32)
        assert timed == []  # a small matmul goes to torch's without timing anything
        for _ in range(3):
            assert_close("auto", _backend.linear(*big), _ref(*big).float(), torch.float32)
    assert timed == [torch.get_num_threads()]  # the timing ran once, on the first large call


@needs_onednn
def test_ops_route_their_matmuls(count_onednn):
    """Which matmuls each op's torch path sends to oneDNN, and that the results stay the reference's."""
    g = torch.Generator().manual_seed(3)
    with fastvlm.backend("torch"), fastvlm.cpu_gemm("onednn"):
        x = torch.randn(40, 64, generator=g, requires_grad=True)
        w = torch.randn(16, 64, generator=g)
        p = (0.1 * torch.randn(2, n_params(32), generator=g)).requires_grad_()
        # (a random grad_output: .sum()'s is an expanded, non-contiguous tensor, which takes torch's matmul)
        orthogonal_linear(x, w, p, block_size=32).backward(torch.randn(40, 16))  # 40 rows > 16: weight side
        assert len(count_onednn) == 2  # y and dx
        count_onednn.clear()
        orthogonal_linear(x, torch.randn(96, 64, generator=g), p, block_size=32).backward(torch.randn(40, 96))
        assert len(count_onednn) == 2  # the input side: y and dx
        count_onednn.clear()
        x_frozen = x.detach()
        orthogonal_linear(x_frozen, torch.randn(96, 64, generator=g), p, block_size=32).backward(torch.randn(40, 96))
        assert len(count_onednn) == 2  # the input side: y, and dx's matmul, whose product dR needs
        count_onednn.clear()
        s = (0.01 * torch.rand(16, 64, generator=g)).requires_grad_()
        masked_linear(x, w, s).backward(torch.randn(40, 16))
        assert len(count_onednn) == 2  # y and dx; dL/dS on torch's matmul
        count_onednn.clear()
        f = torch.randn(8, 64, generator=g, requires_grad=True)
        t, r = torch.randn(10, 64, generator=g), torch.zeros(10, 64, requires_grad=True)
        residual_cross_entropy(f, t, r, torch.randint(0, 10, (8,), generator=g)).backward()
        assert len(count_onednn) == 0  # the residual family stays on torch's BLAS (accuracy: test_agreement)
