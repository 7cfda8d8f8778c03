"""masked_linear and grad_dropout: kernels (interpreted) and torch path against the references."""

import pytest
import torch

import fastvlm
from fastvlm.functional import grad_dropout, masked_linear
from fastvlm.ops.masked import (THRESHOLD, grad_dropout_reference, masked_linear_reference, masked_weight,
                                 philox_uniform)

from .helpers import DTYPES, check_op_against_reference, cuda_only, noncontig, on_device

SHAPES = [  # (leading dims of x, N, K)
    ((1,), 1, 1),
    ((7,), 3, 5),
    ((2, 9), 19, 33),
    ((130,), 65, 70),
    ((3, 5), 48, 768),
    pytest.param((8, 197), 2304, 768, marks=cuda_only),  # ViT-B/16 QKV and MLP-out at 8 images: too slow for
    pytest.param((1576,), 768, 3072, marks=cuda_only),  # the interpreter
]


def _inputs(lead, N, K, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g).requires_grad_()
    w = torch.randn(N, K, generator=g)
    s = (torch.rand(N, K, generator=g) * 0.01).requires_grad_()  # about half the mask on (tau = 5e-3)
    b = torch.randn(N, generator=g).requires_grad_() if bias else None
    return on_device(x, w, s, b)


@pytest.mark.parametrize("lead,N,K", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_masked_linear_matches_reference(backend, lead, N, K, dtype, bias):
    x, w, s, b = _inputs(lead, N, K, bias=bias)
    ins = [x, w, s] + ([b] if bias else [])
    names = ["x", "weight", "scores", "bias"]
    check_op_against_reference(
        lambda x, w, s, *b: masked_linear(x, w, s, *b),
        lambda x, w, s, *b: masked_linear_reference(x, w, s, *b),
        ins, dtype, names=names)


def test_masked_linear_non_contiguous(backend):
    x, w, s, b = _inputs((6,), 21, 17, seed=2)
    xn, sn = noncontig(x), noncontig(s)
    wn = w.T.contiguous().T
    assert not (xn.is_contiguous() or wn.is_contiguous() or sn.is_contiguous())
    check_op_against_reference(lambda x, w, s, b: masked_linear(x, w, s, b),
                               lambda x, w, s, b: masked_linear_reference(x, w, s, b),
                               [xn, wn, sn, b], torch.float32)


def test_mask_threshold_is_strict_and_applied(backend):
    w = on_device(torch.ones(2, 3))
    s = on_device(torch.tensor([[5e-3, 6e-3, 0.0], [1.0, -1.0, 5.0001e-3]]))
    y = masked_linear(on_device(torch.ones(1, 3)), w, s)
    torch.testing.assert_close(y, on_device(torch.tensor([[1.0, 2.0]])))


@pytest.mark.parametrize("lead,N,K", SHAPES)
def test_fused_dropout_equals_grad_dropout_of_plain_gradient(backend, lead, N, K):
    x, w, s, b = _inputs(lead, N, K, seed=4)
    ref = on_device(torch.randn(N, K))
    go = on_device(torch.randn(*lead, N))
    (plain,) = torch.autograd.grad(masked_linear(x, w, s, b), [s], go)
    (fused,) = torch.autograd.grad(masked_linear(x, w, s, b, ref_grad=ref, drop_ratio=0.7, seed=11), [s], go)
    assert torch.equal(fused, grad_dropout(plain, ref, 0.7, 11))


def test_grad_dropout_torch_and_triton_agree_element_for_element():
    g = torch.Generator().manual_seed(1)
    ga, gb = on_device(torch.randn(123, 77, generator=g), torch.randn(123, 77, generator=g))
    with fastvlm.backend("torch"):
        a = grad_dropout(ga, gb, 0.5, seed=2**33 + 5, offset=3)
    with fastvlm.backend("triton"):
        b = grad_dropout(ga, gb, 0.5, seed=2**33 + 5, offset=3)
    assert torch.equal(a, b)
    assert torch.equal(a, grad_dropout_reference(ga, gb, 0.5, 2**33 + 5, 3))


def test_philox_matches_tl_rand_with_high_offsets():
    import triton
    import triton.language as tl

    @triton.jit
    def k(o, seed, base, B: tl.constexpr):
        offs = tl.arange(0, B).to(tl.int64) + base
        tl.store(o + tl.arange(0, B), tl.rand(seed, offs))

    for seed, base in ((0, 0), (123456789, 2**33 + 17), (2**40 + 3, 5)):
        o = on_device(torch.empty(128))
        k[(1,)](o, seed, base, B=128)
        assert torch.equal(o, philox_uniform(seed, on_device(torch.arange(128)) + base)), (seed, base)
    u = philox_uniform(7, torch.arange(200_000))
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean().item() - 0.5) < 0.01


def test_grad_dropout_semantics(backend):
    g = torch.Generator().manual_seed(0)
    n = 200_000
    ga = on_device(torch.randn(n, generator=g))
    # lambda = 0: unchanged, exactly
    assert torch.equal(grad_dropout(ga, on_device(torch.randn(n, generator=g)), 0.0, 1), ga)
    # agreeing signs (P = 1) are always kept
    gb = ga * on_device(torch.rand(n, generator=g))
    assert torch.equal(grad_dropout(ga, gb, 1.0, 3), ga)
    # conflicting signs: kept with probability |g_a| / (|g_a| + |g_b|)
    gb = -ga * 3.0  # keep probability 1/4 everywhere
    out = grad_dropout(ga, gb, 1.0, 5)
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.25) < 0.01, kept
    assert torch.equal(out[out != 0], ga[out != 0])
    # lambda = 0.4: dropped elements keep (1 - 0.4) of their value
    out = grad_dropout(ga, gb, 0.4, 5)
    torch.testing.assert_close(out[out.abs() < ga.abs()], 0.6 * ga[out.abs() < ga.abs()])
    # same seed, same result; another seed differs
    assert torch.equal(grad_dropout(ga, gb, 1.0, 5), grad_dropout(ga, gb, 1.0, 5))
    assert not torch.equal(grad_dropout(ga, gb, 1.0, 5), grad_dropout(ga, gb, 1.0, 6))


def test_gradcheck_fp64_torch_path():
    x, w, s, b = (t.double() if t is not None else None for t in _inputs((2, 3), 4, 5, seed=8))
    x, s, b = (t.detach().requires_grad_() for t in (x, s, b))
    w = w.detach()
    with fastvlm.backend("torch"):
        # the STE makes the score gradient the gradient w.r.t. a continuous surrogate W * m: gradcheck the
        # x and bias gradients, and check dS against the closed form
        assert torch.autograd.gradcheck(lambda x, b: masked_linear(x, w, s, b), (x, b))
        go = on_device(torch.randn(2, 3, 4, dtype=torch.float64))
        (ds,) = torch.autograd.grad(masked_linear(x, w, s, b), [s], go)
        torch.testing.assert_close(ds, (go.reshape(-1, 4).T @ x.reshape(-1, 5)) * w)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(scores=torch.zeros(3, 5)), r"scores must have the shape of weight \(4, 5\)"),
        (dict(x=torch.zeros(2, 6)), "x must end in K=5 features"),
        (dict(weight=torch.zeros(4, 5, requires_grad=True)), "weight must be frozen"),
        (dict(bias=torch.zeros(5)), r"bias must have shape \(4,\)"),
        (dict(drop_ratio=1.5), "drop_ratio must be <= 1.0"),
        (dict(seed=-1), r"seed must be an int in \[0, 2\*\*62\)"),
        (dict(x=torch.zeros(2, 5, dtype=torch.int32)), "x must be a floating tensor"),
        (dict(ref_grad=torch.zeros(5, 4)), r"ref_grad must have the shape of scores \(4, 5\)"),
        (dict(scores=torch.full((4, 5), float("nan"), requires_grad=True)), "scores contains NaN or inf"),
        (dict(x=torch.zeros(0, 5)), "x must not be empty"),
        (dict(threshold=float("inf")), "threshold must be a finite real number"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    args = dict(x=torch.randn(2, 5), weight=torch.randn(4, 5), scores=torch.rand(4, 5).requires_grad_(),
                bias=None, drop_ratio=0.0, seed=0)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        masked_linear(**args)
    with pytest.raises(ValueError, match=r"g_ref must have the shape of g_task"):
        grad_dropout(torch.zeros(3), torch.zeros(4), 0.5, 0)
    with pytest.raises(ValueError, match="ratio must be >= 0.0"):
        grad_dropout(torch.zeros(3), torch.zeros(3), -0.1, 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_non_finite_score_among_finite_ones_is_refused(bad):
    s = torch.rand(64, 33)
    s[17, 5] = bad
    with pytest.raises(ValueError, match="scores contains NaN or inf"):
        masked_linear(torch.randn(2, 33), torch.randn(64, 33), s.requires_grad_())


def test_finite_scores_whose_sum_overflows_are_accepted():
    # the check reduces with a sum first; a sum that overflows must not be mistaken for an inf score
    s = torch.full((4, 5), 3e38)
    assert not torch.isfinite(s.sum())
    x, w = torch.randn(2, 5), torch.randn(4, 5)
    torch.testing.assert_close(masked_linear(x, w, s.requires_grad_()), x @ w.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_masked_weight_is_the_formula(dtype):
    # fp16 scores just above tau: compared in fp32, not after rounding tau to fp16 (0.0050011)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(37, 19, generator=g)
    s = torch.rand(37, 19, generator=g) * 1e-2
    s[0, :3] = torch.tensor([0.005, 0.0050003, 0.0049997])
    s = s.to(dtype)
    want = (w * (s.float() > THRESHOLD)).to(dtype)
    got = masked_weight(w, s, THRESHOLD, dtype)
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(masked_weight(w, s, THRESHOLD), w * (s.float() > THRESHOLD))


@pytest.mark.parametrize("M,N,K", [(700, 37, 45), (1100, 70, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_k_score_gradient_against_reference_and_run_to_run(M, N, K, dtype):
    """Split-K over tokens (score_grad_partial_kernel, then score_grad_reduce_kernel summing the splits in
    order with the epilogue): against (dy^T x) * W + c S for 1, 2, 3 and 8 splits (odd shapes, the last split
    short), the dropped gradient exactly grad_dropout of the split's own plain gradient (the epilogue is
    shared), out aliasing ref, and the same bits on a second run. Bit-identical across split counts is not
    promised (the token sums are grouped differently)."""
    from fastvlm.kernels import masked as km

    from .helpers import assert_close

    g = torch.Generator().manual_seed(5)
    dy, x = torch.randn(M, N, generator=g).to(dtype), torch.randn(M, K, generator=g).to(dtype)
    w, ref, s = torch.randn(N, K, generator=g).to(dtype), torch.randn(N, K, generator=g), torch.rand(N, K, generator=g)
    dy, x, w, ref, s = on_device(dy, x, w, ref, s)
    want = (dy.float().T @ x.float()) * w.float() + 0.3 * s
    for split in (1, 2, 3, 8):
        plain = km.grad_scores(dy, x, w, None, 0.0, 0, torch.float32, scores=s, add_scale=0.3, split=split)
        assert_close(f"split {split}", plain, want, torch.float32)
        dropped = km.grad_scores(dy, x, w, ref, 0.6, 9, torch.float32, scores=s, add_scale=0.3, split=split)
        assert torch.equal(dropped, grad_dropout(plain, ref, 0.6, 9))
        into = ref.clone()
        km.grad_scores(dy, x, w, into, 0.6, 9, torch.float32, scores=s, add_scale=0.3, out=into, split=split)
        assert torch.equal(into, dropped)
        assert torch.equal(km.grad_scores(dy, x, w, ref, 0.6, 9, torch.float32, scores=s, add_scale=0.3,
                                          split=split), dropped)


def test_split_k_is_chosen_where_the_tiles_leave_the_gpu_idle():
    from fastvlm.kernels import masked as km

    import triton.language as tl

    cfg = km.mm_config(tl.bfloat16, heavy_epilogue=True)
    assert km.score_grad_split(768, 768, 6304, cfg) == 2  # 144 tiles of 64 x 64: the model's best, 288 programs
    assert km.score_grad_split(768, 768, 1576, cfg) == 1  # modelled: the partials cost more than the fill gains
    assert km.score_grad_split(2304, 768, 6304, cfg) == 1  # 432 tiles
    assert km.score_grad_split(768, 768, 700, cfg) == 1  # fewer than 2 x 512 tokens: one pass
    assert km.score_grad_split(64, 64, 1 << 20, cfg) == km.MAX_SPLIT  # one tile, a million tokens
    assert km.split_chunk(6304, 2, 32) == 3168 and km.split_chunk(700, 3, 32) == 256
