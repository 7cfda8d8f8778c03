"""Gradient dropout's random stream (fastvlm/ops/philox.py): both implementations against Triton's ``tl.rand``
and the Triton kernels (interpreted) element for element past every chunk boundary, and precision."""

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import fastvlm
from fastvlm.functional import grad_dropout, masked_linear
from fastvlm.ops import philox
from fastvlm.ops.masked import grad_dropout_reference

# past every chunk boundary: the torch implementation's 32K chunks, the former 64K chunks, the C kernel's
# 512-element blocks; counters that cross 2**32 (the high word changes inside the range)
N_PAST = (1 << 17) + 777
CROSSING = 2**32 - 70_000


@pytest.fixture(params=["c", "torch"])
def impl(request, monkeypatch):
    """Run a test with the compiled C kernel and with the torch implementation."""
    monkeypatch.setenv("FASTVLM_PHILOX", request.param)
    if request.param == "c" and philox.stream_implementation() != "c":
        pytest.skip("no C compiler: the torch implementation runs everywhere")
    assert philox.stream_implementation() == request.param
    return request.param


def _impls(monkeypatch):
    """Switch to each implementation in turn (the C kernel only where it builds)."""
    for impl in ("c", "torch"):
        monkeypatch.setenv("FASTVLM_PHILOX", impl)
        if philox.stream_implementation() == impl:
            yield impl


@triton.jit
def _rand_kernel(o, seed, base, n, B: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * B + tl.arange(0, B)
    tl.store(o + offs, tl.rand(seed, offs + base), mask=offs < n)


def tl_rand(seed: int, base: int, n: int) -> torch.Tensor:
    """``tl.rand(seed, base + i)`` for i < n, from Triton itself (the interpreter on CPU): one launch."""
    o = torch.empty(n)
    B = triton.next_power_of_2(n)
    _rand_kernel[(1,)](o, seed, base, n, B=B)
    return o


@pytest.mark.parametrize("seed,base", [(0, 0), (2**33 + 5, CROSSING), (2**61 + 12345, 2**40 + 3)])
def test_stream_matches_tl_rand_past_chunks_and_high_words(impl, seed, base):
    want = tl_rand(seed, base, N_PAST)
    assert torch.equal(philox.philox_uniform(seed, torch.arange(N_PAST) + base), want)
    # negative offsets are read as uint64, as tl.rand reads them
    neg = torch.tensor([-1, -2**31, -2**40], dtype=torch.int64)
    o = torch.empty(3)
    for i, v in enumerate(neg.tolist()):
        o[i] = tl_rand(seed, v, 1)[0]
    assert torch.equal(philox.philox_uniform(seed, neg), o)


def _grads(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ga = torch.randn(shape, generator=g, dtype=torch.float64)
    # about half the signs conflict, with keep probabilities spread over (0, 1)
    gb = torch.randn(shape, generator=g, dtype=torch.float64) * 3 * torch.rand(shape, generator=g, dtype=torch.float64)
    return ga.to(dtype), gb.to(dtype)


@pytest.mark.parametrize("dtype,ratio", [(torch.float32, 0.5), (torch.float32, 0.8), (torch.float16, 0.8),
                                         (torch.bfloat16, 0.8)])  # 0.8: fp32(1 - 0.8) != 1 - fp32(0.8)
def test_grad_dropout_torch_path_equals_triton_kernel_past_chunks(monkeypatch, dtype, ratio):
    ga, gb = _grads((257, 261), seed=1, dtype=dtype)  # 67077 elements
    seed, offset = 2**33 + 5, CROSSING
    with fastvlm.backend("triton"):
        b = grad_dropout(ga, gb, ratio, seed, offset)
    for impl in _impls(monkeypatch):
        with fastvlm.backend("torch"):
            a = grad_dropout(ga, gb, ratio, seed, offset)
        assert a.dtype == dtype
        assert torch.equal(a, grad_dropout_reference(ga, gb, ratio, seed, offset)), impl
        kept = a == ga
        assert torch.equal(kept, b == ga), impl  # the same elements dropped
        assert 0.5 < kept.float().mean().item() < 0.95  # the drop decisions are exercised
        if dtype == torch.bfloat16:
            # the interpreter rounds fp32 -> bf16 towards zero (compiled Triton and torch: to nearest even),
            # so a dropped value may differ by one bf16 step: check both against the fp32 product
            want = ga[~kept].float() * torch.tensor(np.float32(1.0) - np.float32(ratio))
            assert torch.equal(a[~kept], want.bfloat16()), impl
            assert torch.equal(b[~kept], _bf16_towards_zero(want))
        else:
            assert torch.equal(a, b), impl


def _bf16_towards_zero(x: torch.Tensor) -> torch.Tensor:
    return (x.view(torch.int32) & ~0xFFFF).view(torch.float32).bfloat16()


def test_fused_dropout_torch_path_equals_triton_kernel_past_chunks(monkeypatch):
    """masked_linear's score gradient with ref_grad: the Triton epilogue's U(seed, n*K + k) against the torch
    path at 260 x 260 scores (67600 elements). Small-integer x, dy and W make dy.T @ x * W exact in fp32 in
    any summation order, so the two paths see the same g_a and must drop the same elements."""
    g = torch.Generator().manual_seed(3)
    N = K = 260
    x = torch.randint(-2, 3, (4, K), generator=g).float()
    w = torch.randint(-3, 4, (N, K), generator=g).float()
    s = (torch.rand(N, K, generator=g) * 0.01).requires_grad_()
    dy = torch.randint(-2, 3, (4, N), generator=g).float()
    ref = torch.randn(N, K, generator=g) * 4
    out = {}
    for path in ["triton"] + [f"torch-{impl}" for impl in _impls(monkeypatch)]:
        with fastvlm.backend(path.split("-")[0]):
            (out[path],) = torch.autograd.grad(
                masked_linear(x, w, s, ref_grad=ref, drop_ratio=0.8, seed=2**35 + 9), [s], dy)
    plain = (dy.T @ x) * w
    assert len(out) >= 2
    for path, got in out.items():
        assert torch.equal(got, out["triton"]), path
    assert torch.equal(out["triton"], grad_dropout_reference(plain, ref, 0.8, 2**35 + 9))
    dropped = (out["triton"] != plain).sum().item()
    assert 1000 < dropped < N * K - 1000, dropped


# ---------------------------------------------------------------------------------------------------------
# precision: the input's, fp64 included
# ---------------------------------------------------------------------------------------------------------


def _formula_fp64(ga, gb, ratio, u):
    """The documented formula written out in float64 with numpy, U widened exactly from fp32."""
    a, b, u = ga.numpy(), gb.numpy(), u.numpy().astype(np.float64)
    p = 0.5 * (1.0 + np.sign(a) * ((a + b) / (np.abs(a) + np.abs(b) + 1e-8)))
    return torch.from_numpy(((1.0 - ratio) + ratio * (p > u).astype(np.float64)) * a)


@pytest.mark.parametrize("fn", ["grad_dropout", "reference"])
def test_fp64_is_computed_in_fp64(impl, fn):
    ga, gb = _grads((257, 300), seed=4, dtype=torch.float64)
    seed, offset = 77, CROSSING
    f = grad_dropout if fn == "grad_dropout" else grad_dropout_reference
    with fastvlm.backend("torch"):
        got = f(ga, gb, 0.3, seed, offset)
    assert got.dtype == torch.float64
    u = tl_rand(seed, offset, ga.numel()).view(ga.shape)
    assert torch.equal(got, _formula_fp64(ga, gb, 0.3, u))
    # ratio 0: g_task exactly, every bit of fp64
    with fastvlm.backend("torch"):
        assert torch.equal(f(ga, gb, 0.0, seed, offset), ga)
    # beyond fp32's range: finite, and the formula's value
    big_a, big_b = ga * 1e300, gb * 1e300
    with fastvlm.backend("torch"):
        got = f(big_a, big_b, 0.3, seed, offset)
    assert torch.isfinite(got).all()
    assert torch.equal(got, _formula_fp64(big_a, big_b, 0.3, u))


def test_fp32_keep_scale_is_taken_in_fp32(impl):
    """Dropped elements are scaled by 1 - fp32(ratio) computed in fp32, as the Triton kernels do."""
    ga, gb = _grads((5000,), seed=5)
    with fastvlm.backend("torch"):
        out = grad_dropout(ga, gb, 0.8, 3)
    dropped = out != ga
    assert dropped.sum() > 100
    scale = np.float32(1.0) - np.float32(0.8)
    assert scale != np.float32(1.0 - 0.8)
    assert torch.equal(out[dropped], ga[dropped] * torch.tensor(scale))


def test_in_place_output_and_mixed_dtypes(impl):
    """out may be g_ref's own storage (the two-pass step); g_ref may have another dtype than g_task."""
    ga, gb = _grads((70_000,), seed=6)
    want = grad_dropout_reference(ga, gb, 0.6, 9, 5)
    buf = gb.clone()
    assert philox.grad_dropout_torch(ga, buf, 0.6, 9, 5, out=buf) is buf
    assert torch.equal(buf, want)
    got = philox.grad_dropout_torch(ga.double(), gb, 0.6, 9, 5)
    assert got.dtype == torch.float64
    assert torch.equal(got, grad_dropout_reference(ga.double(), gb.double(), 0.6, 9, 5))


def test_missing_compiler_falls_back_to_torch(monkeypatch, tmp_path):
    monkeypatch.setattr(philox._LIB, "_lib", None)
    monkeypatch.setenv("FASTVLM_PHILOX", "c")
    monkeypatch.setenv("FASTVLM_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert philox.stream_implementation() == "torch"
    ga, gb = _grads((40_000,), seed=7)
    u = tl_rand(11, 0, ga.numel())
    p = 0.5 * (1.0 + torch.sign(ga) * ((ga + gb) / (ga.abs() + gb.abs() + 1e-8)))
    want = torch.where(p > u, 1.0, 0.5) * ga  # ratio 0.5: keep scales 1 and 0.5, exact in fp32
    assert torch.equal(grad_dropout(ga, gb, 0.5, 11), want)
    assert list(tmp_path.iterdir()) == []  # nothing half-built left behind


def test_differentiable_inputs_keep_their_graph():
    """Through autograd (the torch ops), the gradient of the output w.r.t. g_task is the keep scale."""
    ga, gb = _grads((5000,), seed=8)
    ga.requires_grad_()
    with fastvlm.backend("torch"):
        out = grad_dropout(ga, gb, 0.8, 3)
    (d,) = torch.autograd.grad(out.sum(), [ga])
    assert torch.equal(out.detach(), grad_dropout_reference(ga.detach(), gb, 0.8, 3))
    assert set(d.unique().tolist()) == {1.0, float(np.float32(1.0) - np.float32(0.8))}
