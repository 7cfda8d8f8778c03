"""cayley, block_rotate and orthogonal_linear: kernels (interpreted) and torch path against the references."""

import pytest
import torch

import fastvlm
from fastvlm.functional import block_rotate, cayley, orthogonal_linear
from fastvlm.ops.orth import cayley_reference, n_params, orthogonal_linear_reference, rotation_side

from .helpers import DTYPES, check_op_against_reference, cuda_only, noncontig, on_device

BLOCKS = [2, 3, 16, 32, 64]


def _params(r, b, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return on_device((scale * torch.randn(r, n_params(b), generator=g)).requires_grad_())


@pytest.mark.parametrize("b", BLOCKS)
@pytest.mark.parametrize("r", [1, 3])
def test_cayley_matches_reference(backend, b, r):
    p = _params(r, b)
    check_op_against_reference(lambda p: cayley(p, b), lambda p: cayley_reference(p, b), [p], torch.float32)


@pytest.mark.parametrize("b", BLOCKS)
def test_cayley_fp16_params(backend, b):
    p = _params(3, b)
    check_op_against_reference(lambda p: cayley(p, b), lambda p: cayley_reference(p, b), [p], torch.float16)


@pytest.mark.parametrize("b", [3, 16, 64])
@pytest.mark.parametrize("norm", [0.1, 1.0, 10.0, 200.0, 4700.0, 3e4])
def test_exact_transform_is_orthogonal_at_any_norm(backend, b, norm):
    """max |R^T R - I| < 2e-5 whatever ||Q||_2: up to CAYLEY_MAX_NORM (256, in ||Q||_F) the fp32 inverse
    (the kernel's pivoted Gauss-Jordan, the torch path's LU), above it the fp64 inverse of those blocks."""
    p = _params(5, b, seed=1).detach()
    q_norm = torch.linalg.matrix_norm(cayley_reference(p, b) * 0 + _skew_norm(p, b), ord=2).max()
    p = p * (norm / q_norm)
    r = cayley(p, b)
    err = (r.transpose(1, 2) @ r - on_device(torch.eye(b))).abs().max().item()
    assert err < 2e-5, err


@pytest.mark.parametrize("b", [3, 16, 64])
def test_cayley_max_norm_bound_on_both_sides(monkeypatch, b):
    """The bound's two sides on the Triton path. Below CAYLEY_MAX_NORM every block is the kernel's and within
    2e-5 of orthogonal; above it the kernel's own fp32 result is what the bound keeps out (b = 3, ||Q||_2 =
    4700: 7.3e-5, the u ||Q|| rounding of the inverse), and the fp64 inverse replaces exactly those blocks."""
    from fastvlm.kernels import orth as ko
    from fastvlm.ops import orth as oo

    eye = on_device(torch.eye(b))
    p = _params(4, b, seed=1).detach()
    frob = torch.linalg.matrix_norm(_skew_norm(p, b))
    scale = torch.tensor([200.0, 4700.0, 0.5, 3e4])[:, None] / frob[:, None]  # blocks 1 and 3 above
    p = p * on_device(scale)
    q = _skew_norm(p, b)
    assert (torch.linalg.matrix_norm(q) > oo.CAYLEY_MAX_NORM).tolist() == [False, True, False, True]
    calls = []
    real = oo._cayley_torch
    monkeypatch.setattr(oo, "_cayley_torch", lambda qq: calls.append((qq.shape[0], qq.dtype)) or real(qq))
    with fastvlm.backend("triton"):
        r = cayley(p, b)
        raw = ko.cayley(q)
    assert calls == [(2, torch.float64)]  # the Triton path inverts in fp64 just the two blocks above
    err = (r.transpose(1, 2) @ r - eye).abs().amax(dim=(1, 2))
    assert (err < 2e-5).all(), err
    assert torch.equal(r[[0, 2]], raw[[0, 2]])  # below the bound: the kernel's bits
    if b == 3:
        raw_err = (raw.transpose(1, 2) @ raw - eye).abs().amax(dim=(1, 2))
        assert raw_err[0] < 2e-5 < raw_err[1], raw_err


@pytest.mark.parametrize("b,r", [(16, 3), (32, 5), (64, 1), (5, 7)])
@pytest.mark.parametrize("norm", [200.0, 1000.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cayley_matches_reference_at_large_norms(backend, b, r, norm, dtype):
    """Forward and gradient against the dense solve in fp64 at max_j ||Q_j||_F = 200 (on Triton every block
    the fp32 kernel's: below CAYLEY_MAX_NORM) and 1000 (the largest blocks above it: the fp64 inverse), where
    an unpivoted elimination's Schur complements grow like ||Q||^2 (it reached 2.3e-5 in R^T R - I at
    b = 16, ||Q||_2 = 100)."""
    p = _params(r, b, seed=3).detach()
    p = (p * (norm / torch.linalg.matrix_norm(_skew_norm(p, b)).max())).requires_grad_()
    check_op_against_reference(lambda p: cayley(p, b), lambda p: cayley_reference(p.double(), b).float(), [p], dtype)


def test_cayley_of_stacked_layers_is_one_launch_and_each_layers_own(launches):
    """Every layer's blocks of one size stacked into one parameter give, in one launch, each layer's R bit for
    bit (one program per block: no block sees another); run to run the same bits."""
    b = 16
    layers = [_params(r, b, seed=s).detach() for s, r in ((0, 3), (1, 48), (2, 5))]  # 768 / 16, odd counts
    with fastvlm.backend("triton"):
        alone = [cayley(p, b) for p in layers]
        launches.clear()
        stacked = cayley(torch.cat(layers), b)
        again = cayley(torch.cat(layers), b)
    assert launches == ["cayley_fwd_kernel"] * 2
    assert torch.equal(stacked, torch.cat(alone)) and torch.equal(stacked, again)


def _skew_norm(p, b):
    from fastvlm.ops.orth import skew

    return skew(p, b)


def test_neumann_series_breaks_down_where_exact_does_not():
    b = 16
    p = _params(2, b, seed=2).detach()
    q = _skew_norm(p, b)
    p = p / torch.linalg.matrix_norm(q, ord=2).max()  # ||Q|| = 1
    exact = cayley(p, b)
    series = cayley(p, b, neumann_terms=5)
    eye = on_device(torch.eye(b))
    assert (exact.transpose(1, 2) @ exact - eye).abs().max() < 1e-5
    assert (series.transpose(1, 2) @ series - eye).abs().max() > 0.1
    # At ||Q|| = 0.01 the series' truncation error, ||(I + Q) sum_{j>8} Q^j|| <= 1.01 * 0.01^9 / 0.99, is far
    # below fp32 rounding, so the two differ by rounding alone. Each entry of R is a b-term dot product of
    # entries of magnitude <= 1, rounded with eps = 2^-23 per step: |error| <= b * eps per matmul or solve
    # (1.9e-6 at b = 16, about 4 ulps of 1), and each side takes about two such steps (exact: the inverse then
    # 2 A^-1 - I; series: the sum then the product). atol = 4 b eps (7.6e-6) covers both with a factor of two
    # to spare; a tolerance of about one ulp of 1 would fail on any other summation order.
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(cayley(0.01 * p, b, neumann_terms=8), cayley(0.01 * p, b), rtol=0, atol=4 * b * eps)


def test_zero_params_give_identity(backend):
    r = cayley(on_device(torch.zeros(4, n_params(8))), 8)
    torch.testing.assert_close(r, on_device(torch.eye(8)).expand(4, 8, 8))


@pytest.mark.parametrize("b", [3, 16, 32])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("rows", [70, 300])  # 300: several of the torch path's 128-row (b <= 16) chunks
def test_block_rotate_matches_dense(backend, b, transpose, rows):
    nb = 3
    g = torch.Generator().manual_seed(3)
    x = on_device(torch.randn(rows, nb * b, generator=g).requires_grad_())
    rot = on_device(torch.randn(nb, b, b, generator=g).requires_grad_())

    def ref(x, rot):
        d = torch.block_diag(*rot)
        return x @ (d.T if transpose else d)

    check_op_against_reference(lambda x, rot: block_rotate(x, rot, transpose), ref, [x, rot], torch.float32)
    check_op_against_reference(lambda x, rot: block_rotate(x, rot, transpose), ref, [x, rot], torch.float16)


@pytest.mark.parametrize("b", [16, 32])
def test_weight_rotation_with_4kib_rows_torch_path(b):
    # weight rows of 1024 fp32 are 4 KiB: the torch path then rotates the weight 128 rows at a time
    # (cache-set aliasing); 300 rows make three chunks, the last one partial
    from fastvlm.ops.orth import _rotate_torch

    g = torch.Generator().manual_seed(15)
    w = on_device(torch.randn(300, 1024, generator=g))
    rot = on_device(torch.linalg.qr(torch.randn(1024 // b, b, b, generator=g))[0])
    for transpose in (False, True):
        dense = torch.block_diag(*rot)
        torch.testing.assert_close(_rotate_torch(w, rot, transpose, dealias=True), w @ (dense.T if transpose else dense),
                                   rtol=1e-5, atol=1e-5)
    x = on_device(torch.randn(400, 1024, generator=g).requires_grad_())  # more rows than outputs: the weight side
    p = _params(1024 // b, b, scale=0.05, seed=16)
    with fastvlm.backend("torch"):
        assert _dR_from_dx(orthogonal_linear(x, w, p, None, b))
        check_op_against_reference(lambda x, p: orthogonal_linear(x, w, p, None, b),
                                   lambda x, p: orthogonal_linear_reference(x, w, p, None, b), [x, p], torch.float32)


@pytest.mark.parametrize("lead,N,b,r", [((5,), 40, 16, 2), ((2, 70), 40, 32, 3), ((3,), 1, 3, 5), ((130,), 17, 64, 1),
                                        pytest.param((8, 197), 3072, 32, 24, marks=cuda_only),  # ViT-B/16 MLP
                                        pytest.param((1576,), 768, 64, 48, marks=cuda_only)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_orthogonal_linear_matches_reference(backend, lead, N, b, r, dtype):
    K = r * b
    g = torch.Generator().manual_seed(4)
    x = on_device(torch.randn(*lead, K, generator=g).requires_grad_())
    w = on_device((torch.randn(N, K, generator=g) / K**0.5).requires_grad_())
    bias = on_device(torch.randn(N, generator=g).requires_grad_())
    p = _params(r, b, seed=5)
    check_op_against_reference(lambda x, w, p, bias: orthogonal_linear(x, w, p, bias, b),
                               lambda x, w, p, bias: orthogonal_linear_reference(x, w, p, bias, b),
                               [x, w, p, bias], dtype, names=["x", "weight", "params", "bias"])


def test_both_sides_agree_and_side_follows_cost(backend):
    assert rotation_side(10, 3072) == "input" and rotation_side(1576, 768) == "weight"
    # training an exact R: both sides cost the same matmuls; the weight side moves less memory when N < M
    assert rotation_side(1576, 768, 32, training=True) == "weight"
    assert rotation_side(1576, 3072, 32, training=True) == "input"
    # Triton rotates x inside the matmul: the input side costs nothing extra
    assert rotation_side(1576, 768, 32, training=True, fused=True) == "input"
    # a series R is not orthogonal: the weight side's backward needs dW' = dy^T x (an extra M*N*K)
    assert rotation_side(1576, 768, 32, training=True, orthogonal=False) == "input"
    assert rotation_side(100_000, 16, 64, training=True, orthogonal=False) == "weight"
    g = torch.Generator().manual_seed(6)
    w = on_device(torch.randn(8, 64, generator=g))
    p = _params(2, 32, seed=7)
    few = on_device(torch.randn(3, 64, generator=g))  # 3 rows < 8 outputs: input side
    many = on_device(torch.randn(50, 64, generator=g))  # 50 rows > 8 outputs: weight side
    for x in (few, many):
        with torch.no_grad():  # inference: the side follows the forward cost
            torch.testing.assert_close(orthogonal_linear(x, w, p, None, 32),
                                       orthogonal_linear_reference(x, w, p, None, 32), rtol=1e-4, atol=1e-5)


def _dR_from_dx(y) -> bool:
    """Whether y's orthogonal_linear takes the weight side with dR from dx (an orthogonal R, W frozen)."""
    seen, stack = set(), [y.grad_fn]
    while stack:
        f = stack.pop()
        if f is None or id(f) in seen:
            continue
        seen.add(id(f))
        if type(f).__name__ == "OrthogonalLinearFunctionBackward":
            return f.side == "weight" and f.orthogonal and not f.needs_input_grad[2]
        stack.extend(g for g, _ in f.next_functions)
    raise AssertionError("no orthogonal_linear in the graph")


@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("b,r,N", [(3, 5, 7), (16, 3, 1), (32, 2, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_weight_side_training_takes_dR_from_dx(b, r, N, x_grad, dtype):
    # more rows than outputs, weight frozen, exact R: the weight side, with dR = (x_j^T dx_j) R_j
    K = r * b
    g = torch.Generator().manual_seed(11)
    x = on_device(torch.randn(5, 9, K, generator=g).requires_grad_(x_grad))
    w = on_device(torch.randn(N, K, generator=g) / K**0.5)
    bias = on_device(torch.randn(N, generator=g).requires_grad_())
    p = _params(r, b, seed=12)
    with fastvlm.backend("torch"):
        y = orthogonal_linear(x, w, p, bias, b)
        assert _dR_from_dx(y)
        check_op_against_reference(lambda x, w, p, bias: orthogonal_linear(x, w, p, bias, b),
                                   lambda x, w, p, bias: orthogonal_linear_reference(x, w, p, bias, b),
                                   [x, w, p, bias], dtype, names=["x", "weight", "params", "bias"])


def test_weight_side_with_a_series_or_a_trained_weight_uses_plain_autograd():
    # dR from dx needs an orthogonal R and a frozen W; otherwise autograd through W @ blockdiag(R)^T
    g = torch.Generator().manual_seed(13)
    x = on_device(torch.randn(40, 32, generator=g).requires_grad_())
    p = _params(2, 16, scale=0.05, seed=14)
    for w, terms in ((on_device(torch.randn(4, 32, generator=g)), 6),
                     (on_device(torch.randn(4, 32, generator=g).requires_grad_()), None)):
        with fastvlm.backend("torch"):
            y = orthogonal_linear(x, w, p, None, 16, neumann_terms=terms)
        assert not _dR_from_dx(y)
        check_op_against_reference(lambda x, w, p: orthogonal_linear(x, w, p, None, 16, terms),
                                   lambda x, w, p: orthogonal_linear_reference(x, w, p, None, 16, terms),
                                   [x, w, p], torch.float32)


def test_non_contiguous(backend):
    g = torch.Generator().manual_seed(8)
    x = noncontig(on_device(torch.randn(9, 48, generator=g).requires_grad_()))
    w = noncontig(on_device(torch.randn(20, 48, generator=g).requires_grad_()))
    p = _params(3, 16, seed=9)
    assert not x.is_contiguous()
    check_op_against_reference(lambda x, w, p: orthogonal_linear(x, w, p, None, 16),
                               lambda x, w, p: orthogonal_linear_reference(x, w, p, None, 16), [x, w, p], torch.float32)


def test_gradcheck_fp64_torch_path():
    with fastvlm.backend("torch"):
        p = _params(2, 5, seed=10).detach().double().requires_grad_()
        assert torch.autograd.gradcheck(lambda p: cayley(p, 5), (p,))
        x = on_device(torch.randn(4, 10, dtype=torch.float64, requires_grad=True))
        w = on_device(torch.randn(3, 10, dtype=torch.float64, requires_grad=True))
        assert torch.autograd.gradcheck(lambda x, w, p: orthogonal_linear(x, w, p, None, 5), (x, w, p))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(block_size=5), "block_size=5 must divide the input width K=64"),
        (dict(params=torch.zeros(2, 10)), r"params must have shape \[r, 496\]"),
        (dict(params=torch.zeros(3, 496)), "params must have r = K / block_size = 2 rows"),
        (dict(x=torch.zeros(2, 63)), "x must be non-empty and end in K=64"),
        (dict(params=torch.full((2, 496), float("inf"), requires_grad=True)), "params contains NaN or inf"),
        (dict(block_size=0), "block_size must be a positive int"),
        (dict(neumann_terms=0), "neumann_terms must be None"),
        (dict(x=torch.zeros(2, 64, dtype=torch.int64)), "x must be a floating tensor"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    args = dict(x=torch.randn(2, 64), weight=torch.randn(8, 64), params=torch.zeros(2, 496), block_size=32)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        orthogonal_linear(**args)


peft = pytest.importorskip("peft", reason="peft is not installed (CI installs it)")


@pytest.mark.parametrize("neumann", [False, True])
def test_matches_peft_oft(neumann):
    """peft's exact branch computes (I - Q)(I + Q)^-1, i.e. our R for -Q; its Neumann branch expands
    (I + Q)(I - Q)^-1 with num_cayley_neumann_terms = our neumann_terms + 2. Outputs and gradients agree."""
    from peft import OFTConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 24))
    cfg = OFTConfig(target_modules=["0"], oft_block_size=16, r=0, use_cayley_neumann=neumann,
                    num_cayley_neumann_terms=5, init_weights=False)
    model = get_peft_model(base, cfg)
    layer = model.base_model.model[0]
    rot = layer.oft_R["default"]
    with torch.no_grad():
        rot.weight.normal_(0, 0.05 if neumann else 0.5)
    x = torch.randn(7, 64, requires_grad=True)
    y_peft = model(x)
    ours_p = (rot.weight.detach() * (1.0 if neumann else -1.0)).requires_grad_()
    w = layer.base_layer.weight.detach()
    y = orthogonal_linear(x, w, ours_p, layer.base_layer.bias.detach(), 16, neumann_terms=3 if neumann else None)
    torch.testing.assert_close(y, y_peft, rtol=1e-4, atol=1e-5)
    go = torch.randn_like(y)
    gx_p, gw_p = torch.autograd.grad(y_peft, [x, rot.weight], go)
    gx, gp = torch.autograd.grad(y, [x, ours_p], go)
    torch.testing.assert_close(gx, gx_p, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gp * (1.0 if neumann else -1.0), gw_p, rtol=1e-4, atol=1e-5)
