"""Exact tests of the masked family's torch path where a plausible one-token bug would otherwise pass (the
mutation run of ``fastvlm/ops/masked.py``, docs/testing.md): the two-pass slot with its regulariser, each
argument check on both sides of its edge, gradients following exactly the inputs that need them, and the
``torch.compile`` custom ops' fake implementations. fp64 against the written-out formula, where only
summation order differs."""

import pytest
import torch

import fastvlm
import fastvlm.functional as FV
from fastvlm.ops import masked as M
from fastvlm.ops.philox import philox_uniform

N, K, T, TAU = 5, 7, 6, 5e-3
TOL = dict(rtol=1e-12, atol=1e-12)


@pytest.fixture(autouse=True)
def torch_path():
    with fastvlm.backend("torch"):
        yield


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g, dtype=torch.float64)
    w = torch.randn(N, K, generator=g, dtype=torch.float64)
    s = TAU + torch.randn(N, K, generator=g, dtype=torch.float64) * 1e-2  # about half the masks on
    b = torch.randn(N, generator=g, dtype=torch.float64)
    return x, w, s, b


def straight_through(x, w, s, dy):
    """(y's masked weight, d scores) by hand: y = x (W*[S>tau])^T, dS = (dy^T x) * W."""
    return w * (s > TAU), (dy.T @ x) * w


def test_the_slot_drops_the_regularised_gradient_against_pass_one_in_place():
    """Pass 2 with a slot: g_a = (dy^T x) W + reg S/||S||, dropped against pass 1's gradient with the slot's
    ratio and seed, written into pass 1's buffer."""
    x, w, s, b = inputs(1)
    scores = s.clone().requires_grad_()
    dy = torch.randn(T, N, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    g_ref = torch.randn(N, K, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    slot = M.GradSlot()
    slot.ref, slot.ratio, slot.seed, slot.reg = g_ref.clone(), 0.6, 11, 0.25
    buffer = slot.ref
    y = M.masked_linear_slotted(x, w, scores, b, TAU, slot)
    (y * dy).sum().backward()
    _, ds = straight_through(x, w, s, dy)
    g_a = ds + 0.25 * s / torch.linalg.vector_norm(s)
    u = philox_uniform(11, torch.arange(N * K)).view(N, K).double()
    want = M.keep_scale(g_a, g_ref, u, 0.6) * g_a
    torch.testing.assert_close(scores.grad, want, **TOL)
    assert scores.grad.data_ptr() == buffer.data_ptr() and slot.ref is None  # consumed in place
    assert not torch.equal(want, ds)  # the regulariser and the dropout both moved it


def test_an_empty_slot_gives_the_plain_straight_through_gradient():
    x, w, s, b = inputs(4)
    scores = s.clone().requires_grad_()
    dy = torch.randn(T, N, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = M.masked_linear_slotted(x, w, scores, b, TAU, M.GradSlot())
    mw, ds = straight_through(x, w, s, dy)
    torch.testing.assert_close(y, x @ mw.T + b, **TOL)
    (y * dy).sum().backward()
    torch.testing.assert_close(scores.grad, ds, **TOL)
    with pytest.raises(TypeError, match="slot must be a GradSlot, got dict"):
        M.masked_linear_slotted(x, w, scores, b, TAU, {})


@pytest.mark.parametrize("trains", ["x", "scores", "bias"])
def test_each_input_alone_gets_its_own_gradient(trains):
    x, w, s, b = inputs(6)
    named = {"x": x, "scores": s, "bias": b}
    named[trains].requires_grad_()
    dy = torch.randn(T, N, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y = FV.masked_linear(x, w, s, b, TAU)
    (got,) = torch.autograd.grad((y * dy).sum(), (named[trains],))
    mw, ds = straight_through(x, w, s, dy)
    want = {"x": dy @ mw, "scores": ds, "bias": dy.sum(0)}[trains]
    torch.testing.assert_close(got, want, **TOL)


def test_a_vector_input_is_one_row():
    x, w, s, b = inputs(8)
    torch.testing.assert_close(FV.masked_linear(x[0], w, s, b, TAU), x[0] @ (w * (s > TAU)).T + b, **TOL)


@pytest.mark.parametrize("case,needle", [
    ("weight 3-D", "weight must be a non-empty 2-D"), ("weight 1-D", "weight must be a non-empty 2-D"),
    ("weight empty", "weight must be a non-empty 2-D"), ("x 0-D", "x must end in K=7"),
    ("x too few columns", "x must end in K=7"), ("x too many columns", "x must end in K=7"),
    ("bias short", r"bias must have shape \(5,\)"), ("bias long", r"bias must have shape \(5,\)"),
])
def test_every_shape_check_on_both_sides(case, needle):
    x, w, s, b = inputs(9)
    args = {"x": x, "weight": w, "scores": s, "bias": b}
    if case.startswith("weight"):
        w = {"weight 3-D": w[None], "weight 1-D": w[0], "weight empty": w[:0]}[case]
        args.update(weight=w, scores=torch.full(w.shape, 1.0, dtype=w.dtype))
    elif case.startswith("x"):
        args["x"] = {"x 0-D": x[0, 0], "x too few columns": x[:, :-1], "x too many columns": torch.cat([x, x], 1)}[case]
    else:
        args["bias"] = b[:-1] if case == "bias short" else torch.cat([b, b[:1]])
    with pytest.raises(ValueError, match=needle):
        FV.masked_linear(args["x"], args["weight"], args["scores"], args["bias"], TAU)


def test_grad_dropout_bounds_and_empty_tensors():
    g = torch.randn(3, 4, dtype=torch.float64)
    FV.grad_dropout(g, g, 1.0, 0)  # ratio 1 is allowed
    for bad in (1.0 + 1e-9, -1e-9):
        with pytest.raises(ValueError, match="ratio"):
            FV.grad_dropout(g, g, bad, 0)
    empty = torch.empty(0, 4, dtype=torch.float64)
    out = FV.grad_dropout(empty, empty, 0.5, 0)
    assert out.shape == (0, 4) and out.dtype == torch.float64


def test_the_custom_ops_fake_implementations_match_the_real_ones():
    x, w, s, b = inputs(10)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(M._masked_linear_op, (x, w, s, b, TAU, None, 0.0, 0), test_utils=checks)
    torch.library.opcheck(M._masked_linear_op, (x[:4], w, s, None, TAU, None, 0.0, 0), test_utils=checks)
    dy = torch.randn(T, N, dtype=torch.float64)
    for needs in ((True, True, True), (False, True, False), (True, False, True)):
        torch.library.opcheck(M._masked_linear_backward_op, (dy, x, w, s, None, TAU, 0.0, 0, *needs),
                              test_utils=checks)


@pytest.mark.parametrize("seed", range(4))
def test_the_template_examples_keep_their_contract(seed):
    """The op template's example inputs (tests/test_op_template.py feeds them to every check): x with two
    leading dims ("any leading shape"), 9 x 13 off every tile size, and scores 1e-3 to 1.1e-2 from tau on
    both sides, so fp64 gradcheck's perturbations never flip a mask bit and both mask values occur."""
    (x, w, s, b), kw = M.EXAMPLES["masked_linear"](torch.float64, torch.Generator().manual_seed(seed))
    assert kw == {} and x.shape == (2, 3, 13) and w.shape == s.shape == (9, 13) and b.shape == (9,)
    assert x.requires_grad and s.requires_grad and b.requires_grad and not w.requires_grad
    gap = (s - TAU).abs()
    assert (gap >= 1e-3 - 1e-12).all() and (gap <= 1.1e-2 + 1e-12).all(), gap
    assert (s > TAU).sum() >= 20 and (s <= TAU).sum() >= 20  # of 117: both values, about half each
    (ga, gb), kw = M.EXAMPLES["grad_dropout"](torch.float64, torch.Generator().manual_seed(seed))
    assert ga.shape == gb.shape == (11, 6) and kw == {"ratio": 0.6, "seed": 5, "offset": 3}


# ---- the survivors of the after run (docs/testing.md): defaults, the empty early return, the first checks ---


def straight_through_ds(x, w, dy):
    return (dy.T @ x) * w


def test_the_backward_defaults_drop_nothing_and_add_no_regulariser():
    """masked_linear_backward's defaults: ratio 0 (grad_dropout at ratio 0 is the identity), seed 0, reg 0."""
    x, w, s, _ = inputs(20)
    dy = torch.randn(T, N, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    g_ref = torch.randn(N, K, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    ds = straight_through_ds(x, w, dy)
    _, got, _ = M.masked_linear_backward(dy, x, w, s, TAU, (False, True, False))
    torch.testing.assert_close(got, ds, **TOL)  # reg 0: no S / ||S|| term
    _, got, _ = M.masked_linear_backward(dy, x, w, s, TAU, (False, True, False), g_ref.clone())
    torch.testing.assert_close(got, ds, **TOL)  # ratio 0: kept whole
    _, got, _ = M.masked_linear_backward(dy, x, w, s, TAU, (False, True, False), g_ref.clone(), 0.6)
    u = philox_uniform(0, torch.arange(N * K)).view(N, K).double()  # seed 0, offset 0
    want = M.keep_scale(ds, g_ref, u, 0.6) * ds
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.equal(want, ds)


def test_the_public_defaults_seed_and_offset_are_zero():
    x, w, s, b = inputs(23)
    g_ref = torch.randn(N, K, generator=torch.Generator().manual_seed(24), dtype=torch.float64)
    dy = torch.randn(T, N, generator=torch.Generator().manual_seed(25), dtype=torch.float64)
    scores = s.clone().requires_grad_()
    (FV.masked_linear(x, w, scores, b, TAU, ref_grad=g_ref, drop_ratio=0.6) * dy).sum().backward()
    ds = straight_through_ds(x, w, dy)
    u = philox_uniform(0, torch.arange(N * K)).view(N, K).double()
    torch.testing.assert_close(scores.grad, M.keep_scale(ds, g_ref, u, 0.6) * ds, **TOL)
    want = M.keep_scale(ds, g_ref, u, 0.6) * ds
    torch.testing.assert_close(M.grad_dropout_reference(ds, g_ref, 0.6, 0), want, **TOL)  # offset 0
    torch.testing.assert_close(FV.grad_dropout(ds, g_ref, 0.6, 0), want, **TOL)


class _Kernels:
    """A stand-in for the Triton launchers: records what is launched."""

    def __init__(self):
        self.launched = []

    def grad_dropout(self, g_task, g_ref, ratio, seed, offset):
        self.launched.append(tuple(g_task.shape))
        return g_task * 0.5


def test_an_empty_gradient_returns_before_any_kernel(monkeypatch):
    """The early return keeps an empty tensor from the Triton launch (a grid of zero programs)."""
    kernels = _Kernels()
    monkeypatch.setattr(M._backend, "use_triton", lambda t: True)
    monkeypatch.setattr(M._backend, "triton_kernels", lambda family, t: kernels)
    empty = torch.empty(0, 4)
    out = FV.grad_dropout(empty, empty, 0.5, 0)
    assert out.shape == (0, 4) and out is not empty and kernels.launched == []
    g = torch.ones(2, 4)
    torch.testing.assert_close(FV.grad_dropout(g, g, 0.5, 0), g * 0.5)
    assert kernels.launched == [(2, 4)]


@pytest.mark.parametrize("name", ["x", "weight", "scores"])
def test_a_non_tensor_is_refused_by_name_before_the_backend_looks_at_it(name):
    """Under the default backend ("auto") the backend asks x for its device: a list must be refused first."""
    x, w, s, b = inputs(26)
    args = {"x": x, "weight": w, "scores": s}
    args[name] = args[name].tolist()
    with fastvlm.backend("auto"):
        with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor, got list"):
            FV.masked_linear(args["x"], args["weight"], args["scores"], b, TAU)


@pytest.mark.parametrize("trains", ["x", "scores", "bias"])
def test_the_custom_op_gives_each_input_alone_its_gradient(trains):
    """The torch.compile custom op, run eagerly: its autograd passes the needs of x, scores and bias."""
    x, w, s, b = inputs(27)
    named = {"x": x.clone(), "scores": s.clone(), "bias": b.clone()}
    named[trains].requires_grad_()
    dy = torch.randn(T, N, generator=torch.Generator().manual_seed(28), dtype=torch.float64)
    y = M._masked_linear_op(named["x"], w, named["scores"], named["bias"], TAU, None, 0.0, 0)
    (got,) = torch.autograd.grad(y, (named[trains],), dy)
    want = {"x": dy @ (w * (s > TAU)), "scores": straight_through_ds(x, w, dy), "bias": dy.sum(0)}[trains]
    torch.testing.assert_close(got, want, **TOL)


def test_unneeded_gradients_of_the_custom_op_have_their_inputs_dtype():
    """scores may be another float than x: an unneeded score gradient comes back empty in the scores' dtype,
    as the fake says (it was x's)."""
    x, w, s, _ = inputs(29)
    x, w = x.float(), w.float()
    dy = torch.randn(T, N, dtype=torch.float32)
    checks = ("test_schema", "test_faketensor")
    for needs in ((True, False, True), (False, True, False), (True, False, False)):
        torch.library.opcheck(M._masked_linear_backward_op, (dy, x, w, s, None, TAU, 0.0, 0, *needs),
                              test_utils=checks)


class _ForwardKernels:
    """A stand-in for the Triton launchers of the forward: ``fused`` as asked, records a fused launch."""

    def __init__(self, fused):
        self.is_fused, self.launched = fused, []

    def fused(self, family):
        return family == "masked" and self.is_fused

    def forward(self, x2, weight, scores, bias, threshold):
        self.launched.append("forward")
        return torch.zeros(x2.shape[0], weight.shape[0], dtype=x2.dtype)


@pytest.mark.parametrize("fused", [False, True])
def test_the_fused_forward_runs_only_behind_its_flag(monkeypatch, fused):
    """On Triton without FASTVLM_FUSED=masked: W * [S > tau] then one GEMM; with it, the fused kernel."""
    kernels = _ForwardKernels(fused)
    monkeypatch.setattr(M._backend, "triton_kernels", lambda family, t: kernels)
    x, w, s, b = inputs(30)
    y = M.masked_linear_forward(x, w, s, b, TAU)
    if fused:
        assert kernels.launched == ["forward"] and torch.equal(y, torch.zeros(T, N, dtype=torch.float64))
    else:
        assert kernels.launched == []
        torch.testing.assert_close(y, x @ (w * (s > TAU)).T + b, **TOL)
