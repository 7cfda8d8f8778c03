"""residual_logits and residual_cross_entropy: kernel (interpreted) and torch path against the reference."""

import pytest
import torch
import torch.nn.functional as F

from fastvlm.functional import residual_cross_entropy, residual_logits
from fastvlm.ops.residual import residual_cross_entropy_reference, residual_logits_reference

from .helpers import DTYPES, assert_close, check_op_against_reference, cuda_only, noncontig, on_device

SHAPES = [  # (B, K, D): B=1, K=1, K=1001, D in {100, 512, 768, 1024}, sizes off the 64/32 blocks
    (1, 1, 100),
    (3, 1001, 100),
    (2, 5, 512),
    (5, 3, 768),
    (2, 7, 1024),
    (67, 65, 33),
    pytest.param(256, 1000, 512, marks=cuda_only),  # TaskRes at CLIP widths: too slow for the interpreter
    pytest.param(256, 21843, 1024, marks=cuda_only),
]


def _inputs(B, K, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, D, generator=g).requires_grad_()
    t = torch.randn(K, D, generator=g).requires_grad_()
    x = (0.3 * torch.randn(K, D, generator=g)).requires_grad_()
    y = torch.randint(0, K, (B,), generator=g)
    return on_device(f, t, x, y)


@pytest.mark.parametrize("B,K,D", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_logits_matches_reference(backend, B, K, D, dtype):
    f, t, x, _ = _inputs(B, K, D)
    check_op_against_reference(
        lambda f, t, x: residual_logits(f, t, x, 0.7, 100.0),
        lambda f, t, x: residual_logits_reference(f, t, x, 0.7, 100.0),
        [f, t, x], dtype, names=["features", "base", "residual"])


@pytest.mark.parametrize("B,K,D", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_residual_cross_entropy_matches_reference(backend, B, K, D, dtype, reduction):
    f, t, x, y = _inputs(B, K, D)
    check_op_against_reference(
        lambda f, t, x: residual_cross_entropy(f, t, x, y, 0.5, 100.0, reduction),
        lambda f, t, x: residual_cross_entropy_reference(f, t, x, y, 0.5, 100.0, reduction),
        [f, t, x], dtype, names=["features", "base", "residual"])


def test_bf16_torch_path():
    # bf16 runs on the torch path (the interpreter's bf16 arithmetic is unreliable, see README)
    import fastvlm

    f, t, x, y = _inputs(4, 9, 64)
    with fastvlm.backend("torch"):
        check_op_against_reference(
            lambda f, t, x: residual_cross_entropy(f, t, x, y), lambda f, t, x: residual_cross_entropy_reference(f, t, x, y),
            [f, t, x], torch.bfloat16)


@pytest.mark.parametrize("op", ["logits", "ce"])
def test_non_contiguous_inputs(backend, op):
    f, t, x, y = _inputs(6, 11, 40, seed=3)
    fn = (lambda f, t, x: residual_logits(f, t, x)) if op == "logits" else (lambda f, t, x: residual_cross_entropy(f, t, x, y))
    rf = (lambda f, t, x: residual_logits_reference(f, t, x)) if op == "logits" else (
        lambda f, t, x: residual_cross_entropy_reference(f, t, x, y))
    nf, nt, nx = noncontig(f), noncontig(t), noncontig(x)
    assert not nf.is_contiguous() and not nt.is_contiguous()
    check_op_against_reference(fn, rf, [nf, nt, nx], torch.float32)


def test_only_residual_requires_grad(backend):
    f, t, x, y = _inputs(4, 6, 20)
    f, t = f.detach(), t.detach()
    loss = residual_cross_entropy(f, t, x, y)
    (gx,) = torch.autograd.grad(loss, [x])
    ref = residual_cross_entropy_reference(f, t, x, y)
    (gr,) = torch.autograd.grad(ref, [x])
    torch.testing.assert_close(gx, gr, rtol=1e-4, atol=1e-6)


def test_ignore_index_matches_cross_entropy(backend):
    f, t, x, y = _inputs(7, 5, 16)
    y = y.clone()
    y[[1, 4]] = -100
    for red in ("mean", "sum", "none"):
        got = residual_cross_entropy(f, t, x, y, reduction=red)
        want = F.cross_entropy(residual_logits_reference(f, t, x), y, reduction=red)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cross_entropy_equals_f_cross_entropy_on_logits(backend):
    # the public contract: equals F.cross_entropy(residual_logits(...)) with our own logits op too
    f, t, x, y = _inputs(9, 13, 24, seed=5)
    got = residual_cross_entropy(f, t, x, y, alpha=1.0, logit_scale=30.0)
    want = F.cross_entropy(residual_logits(f, t, x, alpha=1.0, logit_scale=30.0), y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gradcheck_fp64_torch_path():
    import fastvlm

    f, t, x, y = (v.double() if v.is_floating_point() else v for v in _inputs(3, 4, 5, seed=7))
    f, t, x = (v.detach().requires_grad_() for v in (f, t, x))
    with fastvlm.backend("torch"):
        assert torch.autograd.gradcheck(lambda f, t, x: residual_logits(f, t, x, 0.5, 10.0), (f, t, x))
        for red in ("mean", "sum", "none"):
            assert torch.autograd.gradcheck(
                lambda f, t, x: residual_cross_entropy(f, t, x, y, 0.5, 10.0, red), (f, t, x))


def test_torch_path_never_holds_b_by_k(monkeypatch):
    """With a tiny chunk budget the torch path must still be exact: every class chunk is handled."""
    import fastvlm
    import fastvlm.ops.residual as R

    monkeypatch.setattr(R, "CHUNK_ELEMENTS", 64)  # chunks of 2 classes for D=32
    monkeypatch.setattr(R, "keeps_softmax", lambda B, D, K: False)  # the recomputing backward, chunk by chunk
    f, t, x, y = _inputs(8, 37, 32, seed=11)
    with fastvlm.backend("torch"):
        check_op_against_reference(
            lambda f, t, x: residual_cross_entropy(f, t, x, y), lambda f, t, x: residual_cross_entropy_reference(f, t, x, y),
            [f, t, x], torch.float32)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(residual=torch.zeros(3, 8)), "residual must have the shape of base"),
        (dict(features=torch.zeros(2, 7)), "features must have D=8"),
        (dict(base=torch.zeros(0, 8), residual=torch.zeros(0, 8)), "base must not be empty"),
        (dict(features=torch.zeros(2, 8, dtype=torch.int64)), "features must be a floating tensor"),
        (dict(features=torch.zeros(8)), "features must be 2-D"),
        (dict(alpha=float("nan")), "alpha must be a finite real number"),
        (dict(target=torch.tensor([0, 4])), r"target holds class index 4, outside \[0, 4\)"),
        (dict(target=torch.tensor([0.0, 1.0])), "target must hold integer class indices"),
        (dict(target=torch.tensor([0, 1, 2])), r"target must have shape \(2,\)"),
        (dict(reduction="avg"), "reduction must be 'mean', 'sum' or 'none'"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    args = dict(features=torch.randn(2, 8), base=torch.randn(4, 8), residual=torch.zeros(4, 8),
                target=torch.tensor([0, 3]), alpha=0.5, reduction="mean")
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        residual_cross_entropy(**args)


def test_fp64_on_triton_path_is_refused():
    import fastvlm

    with fastvlm.backend("triton"), pytest.raises(TypeError, match="Triton path takes fp32/fp16/bf16"):
        residual_logits(*on_device(torch.randn(2, 4).double(), torch.randn(3, 4).double(), torch.zeros(3, 4).double()))


def test_torch_path_one_chunk_keeps_softmax_and_backward_can_repeat():
    """All classes in one chunk: the forward keeps softmax - onehot for backward (no recompute). It must not
    be consumed: a second backward (retain_graph) gives the same gradients, and both equal the chunked path."""
    import fastvlm
    import fastvlm.ops.residual as R

    f, t, x, y = _inputs(8, 37, 32, seed=12)
    x.requires_grad_()
    with fastvlm.backend("torch"):
        loss = residual_cross_entropy(f, t, x, y, reduction="sum")
        node = loss.grad_fn.next_functions[0][0]  # the reduction's input: the per-row losses
        assert type(node).__name__ == "ResidualCrossEntropyFunctionBackward"
        assert node.saved_tensors[7].shape == (8, 37)  # softmax - onehot, kept
        g1 = torch.autograd.grad(loss, [x], retain_graph=True)[0]
        g2 = torch.autograd.grad(loss, [x])[0]
        R_chunk, R_keeps = R.CHUNK_ELEMENTS, R.keeps_softmax
        try:
            R.CHUNK_ELEMENTS = 64  # two classes a chunk: the recompute path
            R.keeps_softmax = lambda B, D, K: False
            g3 = torch.autograd.grad(residual_cross_entropy(f, t, x, y, reduction="sum"), [x])[0]
        finally:
            R.CHUNK_ELEMENTS, R.keeps_softmax = R_chunk, R_keeps
    assert torch.equal(g1, g2)
    assert_close("chunked vs one chunk", g1, g3, torch.float32)  # fp32 summation order only


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_loss_past_one_batch_tile_and_class_tile(dtype):
    """The loss kernel takes the whole batch per block up to 256 rows: 300 rows need two batch tiles (the
    second one partial), 70 classes cross the 32- and 64-class tiles, D = 20 crosses the 8/16-deep steps."""
    import fastvlm

    f, t, x, y = _inputs(300, 70, 20, seed=21)
    with fastvlm.backend("triton"):
        check_op_against_reference(
            lambda f, t, x: residual_cross_entropy(f, t, x, y, 0.5, 30.0, "sum"),
            lambda f, t, x: residual_cross_entropy_reference(f, t, x, y, 0.5, 30.0, "sum"),
            [f, t, x], dtype, names=["features", "base", "residual"])


def test_triton_backward_chunks_off_the_class_tiles(monkeypatch):
    """Backward class chunks of 13 classes (not a multiple of the class tile) recompute the softmax
    gradient chunk by chunk: the gradients still match the reference."""
    import fastvlm
    from fastvlm.kernels import residual as kernels

    monkeypatch.setattr(kernels, "BACKWARD_CHUNK_ELEMENTS", 13 * 32)  # max(B, D) = 32: chunks of 13 classes
    f, t, x, y = _inputs(8, 37, 32, seed=22)
    with fastvlm.backend("triton"):
        check_op_against_reference(
            lambda f, t, x: residual_cross_entropy(f, t, x, y),
            lambda f, t, x: residual_cross_entropy_reference(f, t, x, y), [f, t, x], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_one_class_gives_exactly_zero_gradients(dtype):
    """With one class the loss is 0 and every gradient is exactly 0: the backward's softmax exp(logit - lse)
    is exactly 1 only when its recomputed logits are bit for bit the forward's (the same class-tile kernel);
    a recompute in another tiling left ~4e-6 here."""
    import fastvlm

    f, t, x, y = _inputs(3, 1, 100, seed=23)
    f, t, x = (v.detach().to(dtype).requires_grad_() for v in (f, t, x))
    with fastvlm.backend("triton"):
        loss = residual_cross_entropy(f, t, x, y, 0.5, 100.0, "sum")
        grads = torch.autograd.grad(loss, [f, t, x])
    assert loss.item() == 0.0
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


def test_triton_loss_combines_more_partials_than_one_step(monkeypatch):
    """600 classes are 19 class tiles of 32 (IEEE fp32); with 16 partial columns a step the log-sum-exp
    combine runs a second, partial step with the running max."""
    import fastvlm
    from fastvlm.kernels import residual as kernels

    monkeypatch.setitem(kernels.COMBINE_BLOCK, "BLOCK_C", 16)
    f, t, x, y = _inputs(3, 600, 8, seed=24)
    with fastvlm.backend("triton"):
        check_op_against_reference(
            lambda f, t, x: residual_cross_entropy(f, t, x, y, 0.5, 100.0, "none"),
            lambda f, t, x: residual_cross_entropy_reference(f, t, x, y, 0.5, 100.0, "none"),
            [f, t, x], torch.float32)


@pytest.mark.parametrize("trained", ["base", "residual"])
def test_triton_base_or_residual_alone(trained):
    """The folded norm backward writes d base only, or d residual only, as asked."""
    import fastvlm

    f, t, x, y = _inputs(5, 40, 24, seed=25)
    f = f.detach()
    (t if trained == "residual" else x).requires_grad_(False)
    with fastvlm.backend("triton"):
        check_op_against_reference(
            lambda f, t, x: residual_cross_entropy(f, t, x, y),
            lambda f, t, x: residual_cross_entropy_reference(f, t, x, y), [f, t, x], torch.float32)


@pytest.mark.parametrize("op", ["residual_logits", "residual_cross_entropy"])
def test_torch_path_projection_in_row_blocks_is_exact(monkeypatch, op):
    """Features frozen: d uhat is written into the returned gradient and projected there block by block,
    uhat rebuilt per block; with blocks of 2 rows (D=32) every block boundary must still be right."""
    import fastvlm
    import fastvlm.ops.residual as R

    monkeypatch.setattr(R, "PROJECT_ELEMENTS", 64)
    f, t, x, y = _inputs(6, 13, 32, seed=13)
    f = f.detach()
    fn = {"residual_logits": lambda t, x: residual_logits(f, t, x, 0.7, 50.0),
          "residual_cross_entropy": lambda t, x: residual_cross_entropy(f, t, x, y, 0.7, 50.0, "none")}[op]
    ref = {"residual_logits": lambda t, x: residual_logits_reference(f, t, x, 0.7, 50.0),
           "residual_cross_entropy": lambda t, x: residual_cross_entropy_reference(f, t, x, y, 0.7, 50.0, "none")}[op]
    with fastvlm.backend("torch"):
        check_op_against_reference(fn, ref, [t, x], torch.float32, names=["base", "residual"])


@pytest.mark.parametrize("op", ["residual_logits", "residual_cross_entropy"])
def test_torch_path_peak_is_the_gradient_plus_one_logits_matrix(op):
    """The CPU torch path's peak over forward + backward, all classes in one chunk, features and base frozen
    (TaskRes trains the residual only), against a bound counted by hand in fp32 elements:

    forward: uhat (K x D), the logits (B x K), s * fhat (B x D), and for the loss the log-sum-exp's
    temporary (B x K) beside the logits that become softmax - onehot in place;
    backward: the kept softmax - onehot or the logits the caller holds (B x K), s * fhat (B x D), the
    returned d residual (K x D) into which d uhat is written and projected, and that projection's two row
    blocks (2 x PROJECT_ELEMENTS); vectors of B or K (norms, log-sum-exp, weights) stay under 64 KiB.
    So the peak is at most K D + 2 B K + B D + 2 PROJECT_ELEMENTS elements + 64 KiB: at B=64, K=2048, D=256
    that is 2 + 1 + 1/16 + 1 MiB + 64 KiB, where holding d uhat and its products apart (as the torch path
    once did: four K x D tensors) takes more than 8 MiB."""
    import fastvlm
    from fastvlm.bench.harness import peak_memory
    from fastvlm.ops.residual import PROJECT_ELEMENTS, class_chunk

    B, K, D = 64, 2048, 256
    assert class_chunk(B, D, K) >= K  # one chunk: no recompute
    f, t, x, y = (v.detach() for v in _inputs(B, K, D, seed=14))
    x.requires_grad_()
    go = torch.randn(B, K)

    def step():
        if op == "residual_logits":
            residual_logits(f, t, x).backward(go)
        else:
            residual_cross_entropy(f, t, x, y).backward()

    with fastvlm.backend("torch"):
        step()  # first-call allocations (thread pools, the matmul's dispatch) stay out of the measurement
        peak = peak_memory(step, torch.device("cpu"), reset=lambda: setattr(x, "grad", None))
    e = 4
    bound = e * (K * D + 2 * B * K + B * D + 2 * PROJECT_ELEMENTS) + (64 << 10)
    assert e * K * D <= peak <= bound, (peak / 2**20, bound / 2**20)


def test_torch_path_exp_floor_keeps_wide_logits_exact():
    """Logits spanning 200 (cosines near +-1 at logit_scale 100): the softmax terms under exp(-87) are
    floored there (fastvlm.ops.residual._exp_, against torch's slow path for subnormal results), which must
    leave the loss and its gradients those of the reference."""
    import fastvlm
    from fastvlm.ops.residual import EXP_FLOOR, _exp_

    floored = _exp_(torch.tensor([-200.0, EXP_FLOOR, 0.0]))
    assert floored[0] == floored[1] == torch.tensor(EXP_FLOOR).exp() and floored[2] == 1.0
    g = torch.Generator().manual_seed(15)
    t = torch.randn(8, 64, generator=g)
    t[4:] = -t[:4]  # two opposite groups of classes
    f = t[torch.tensor([0, 1, 5, 6, 2, 7])] + 0.05 * torch.randn(6, 64, generator=g)
    x = (0.01 * torch.randn(8, 64, generator=g)).requires_grad_()
    y = torch.tensor([0, 1, 5, 6, 3, 4])  # two rows whose target is on the far side: loss near 200
    with fastvlm.backend("torch"):
        check_op_against_reference(lambda x: residual_cross_entropy(f, t, x, y, 0.5, 100.0, "none"),
                                   lambda x: residual_cross_entropy_reference(f, t, x, y, 0.5, 100.0, "none"),
                                   [x], torch.float32, names=["residual"])
    logits = residual_logits_reference(f, t, x, 0.5, 100.0)
    assert (logits.amax(1) - logits.amin(1)).min() > 150  # the case is the wide one it claims


def test_torch_path_keeps_the_softmax_across_chunks_when_the_batch_is_at_most_d(monkeypatch):
    """B <= D with several class chunks: softmax - onehot is kept (B x K, no larger than the K x D gradient)
    and sliced per chunk in backward; the same values as the reference, and as the recomputing backward."""
    import fastvlm
    import fastvlm.ops.residual as R

    monkeypatch.setattr(R, "CHUNK_ELEMENTS", 64)  # chunks of 2 classes for D=32
    assert R.keeps_softmax(8, 32, 37) and not R.keeps_softmax(40, 32, 37) and R.keeps_softmax(40, 32, 1)
    f, t, x, y = _inputs(8, 37, 32, seed=16)
    with fastvlm.backend("torch"):
        loss = residual_cross_entropy(f, t, x, y, reduction="sum")
        assert loss.grad_fn.next_functions[0][0].saved_tensors[7].shape == (8, 37)  # kept
        check_op_against_reference(
            lambda f, t, x: residual_cross_entropy(f, t, x, y), lambda f, t, x: residual_cross_entropy_reference(f, t, x, y),
            [f, t, x], torch.float32)


# ---------------------------------------------------------------------------------------------------------
# the torch path's C row kernels (fastvlm/ops/residual.py _ROWS_SOURCE) against the torch ops and fp64
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(params=["c", "torch"])
def rows_impl(request, monkeypatch):
    """Run a test with the C row kernels and with their torch-op fallback (``FASTVLM_NATIVE=torch``)."""
    import fastvlm.ops.residual as R

    monkeypatch.setenv("FASTVLM_NATIVE", request.param)
    built = R._ROWS.get() is not None
    if request.param == "c" and not built:
        pytest.skip("no C compiler: the torch ops run everywhere")
    assert built == (request.param == "c")
    return request.param


def _row_operands(rows, D, dtype, seed, strided):
    """base, residual, d as [rows, D] with unit column stride; ``strided``: views into wider rows."""
    g = torch.Generator().manual_seed(seed)
    width = D + 5 if strided else D
    t, x, d = (torch.randn(rows, width, generator=g, dtype=torch.float64)[:, :D] for _ in range(3))
    t[1] = 0.0  # a zero u row when alpha x is zero there too: 1/||u|| is 1/eps
    x[1] = 0.0
    return [v.to(dtype) for v in (t, x, d)]


@pytest.mark.parametrize("D", [1, 7, 8, 33, 520])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("strided", [False, True], ids=["rows", "strided_rows"])
def test_row_kernels_match_the_formula(rows_impl, monkeypatch, D, dtype, strided):
    """uhat = u r, r = 1/max(||u||, eps) with u = t + alpha x, and d <- s r (d - uhat <uhat, d>), in place,
    against the formula in fp64; with pieces of one row (every piece boundary) and rows wider than D."""
    import fastvlm.ops.residual as R

    monkeypatch.setattr(R, "_ROW_PIECE", 1)
    monkeypatch.setattr(R, "_ROW_THREADED_MIN", 0)  # pieces on threads even at these sizes
    rows, alpha, s = 11, 0.7, 0.3
    t, x, d = _row_operands(rows, D, dtype, seed=D, strided=strided)
    u = t.double() + alpha * x.double()
    r = 1.0 / u.norm(dim=1).clamp_min(R.EPS)
    uh_want = u * r[:, None]
    d_want = s * r[:, None] * (d.double() - uh_want * (uh_want * d.double()).sum(1, keepdim=True))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-6)

    uh, ru = R.TorchPath._uhat(t, x, alpha)
    assert uh.dtype == ru.dtype == dtype
    torch.testing.assert_close(ru.double(), r, **tol)
    torch.testing.assert_close(uh.double(), uh_want, **tol)
    chunk = R.ClassChunk(t, x, ru, None, None)
    torch.testing.assert_close(R.TorchPath._chunk_uhat(chunk, alpha).double(), uh_want, **tol)
    dd = d.clone()
    R.TorchPath._project(dd, None, chunk, alpha, s)
    torch.testing.assert_close(dd.double(), d_want, **tol)
    assert (R._row_kernel("fv_project", t, x, dd, ru[:, None]) is not None) == (rows_impl == "c")


def test_row_kernels_leave_autograd_inputs_to_the_torch_ops(rows_impl):
    """Tensors autograd must differentiate through (label smoothing's class mean runs _uhat under grad)
    never reach ctypes, which would drop the graph; fp16 and non-unit column strides neither."""
    import fastvlm.ops.residual as R

    t = torch.randn(4, 8, requires_grad=True)
    x = torch.randn(4, 8)
    assert R._row_kernel("fv_uhat", t, x) is None
    with torch.no_grad():
        assert (R._row_kernel("fv_uhat", t, x) is not None) == (rows_impl == "c")
    assert R._row_kernel("fv_uhat", t.detach().half(), x.half()) is None
    assert R._row_kernel("fv_uhat", t.detach().T.contiguous().T, x) is None
    assert R._row_kernel("fv_uhat", t.detach(), x.double()) is None


@pytest.mark.parametrize("op", ["residual_logits", "residual_cross_entropy"])
def test_ops_agree_with_and_without_the_row_kernels(monkeypatch, op):
    """The whole op, every gradient, with the C row kernels and with the torch ops: equal to fp32 rounding
    (the two round differently: the C dots sum in double), and both at the reference."""
    import fastvlm

    f, t, x, y = _inputs(9, 37, 40, seed=16)
    fn = {"residual_logits": lambda f, t, x: residual_logits(f, t, x, 0.7, 30.0),
          "residual_cross_entropy": lambda f, t, x: residual_cross_entropy(f, t, x, y, 0.7, 30.0)}[op]
    outs = {}
    for impl in ("c", "torch"):
        monkeypatch.setenv("FASTVLM_NATIVE", impl)
        with fastvlm.backend("torch"):
            leaves = [v.detach().requires_grad_() for v in (f, t, x)]
            out = fn(*leaves)
            out.backward(torch.ones_like(out))
        outs[impl] = [out.detach(), *(v.grad for v in leaves)]
    for a, b in zip(outs["c"], outs["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradcheck_fp64_with_the_row_kernels(rows_impl):
    import fastvlm

    f, t, x, y = (v.detach() for v in _inputs(3, 6, 10, seed=17))
    args = [v.double().requires_grad_() for v in (f, t, x)]
    with fastvlm.backend("torch"):
        assert torch.autograd.gradcheck(lambda f, t, x: residual_cross_entropy(f, t, x, y, 0.6, 4.0), args)
        assert torch.autograd.gradcheck(lambda f, t, x: residual_logits(f, t, x, 0.6, 4.0), args)
