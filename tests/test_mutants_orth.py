"""Exact tests of the orth family's torch path where a plausible one-token bug would otherwise pass (the
mutation run of ``fastvlm/ops/orth.py``, docs/testing.md): the Cayley transform, its series and its backward
against the formulas of docs/methods.md §3 written out here (fp64, only summation order differs), the block
rotation past the torch path's row chunks, every side of orthogonal_linear with each input alone taking its
gradient, the side chosen at the edges of its cost rule, each argument check on both sides of its edge, and
the ``torch.compile`` custom ops run eagerly and checked against their fake implementations."""

import pytest
import torch

import fastvlm
import fastvlm.functional as FV
from fastvlm.ops import orth as O

F64 = torch.float64
TOL = dict(rtol=1e-11, atol=1e-11)


@pytest.fixture(autouse=True)
def torch_path():
    with fastvlm.backend("torch"):
        yield


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed, scale=1.0, dtype=F64):
    return scale * torch.randn(*shape, generator=gen(seed), dtype=dtype)


# ---- the formulas of docs/methods.md §3, written out -----------------------------------------------------


def skew_by_hand(p, b):
    """Q_j = U_j - U_j^T, U_j's strict upper triangle filled row by row: (0,1), (0,2), ..., (1,2), ..."""
    q = torch.zeros(p.shape[0], b, b, dtype=p.dtype)
    for j in range(p.shape[0]):
        k = 0
        for row in range(b):
            for col in range(row + 1, b):
                q[j, row, col] = p[j, k]
                q[j, col, row] = -p[j, k]
                k += 1
    return q


def cayley_by_hand(p, b):
    """(I + Q)(I - Q)^-1, by a dense solve of R (I - Q) = I + Q."""
    q = skew_by_hand(p, b)
    eye = torch.eye(b, dtype=p.dtype)
    return torch.stack([torch.linalg.solve((eye - qj).T, (eye + qj).T).T for qj in q])


def series_by_hand(p, b, k):
    """(I + Q)(I + Q + Q^2 + ... + Q^k), the powers by matrix_power."""
    q = skew_by_hand(p, b)
    eye = torch.eye(b, dtype=p.dtype)
    return torch.stack([(eye + qj) @ sum(torch.linalg.matrix_power(qj, i) for i in range(k + 1)) for qj in q])


def cayley_grad_by_hand(p, b, g):
    """dparams from dR = g: dQ = 2 A^-T G A^-T with A = I - Q, dU = dQ - dQ^T on the strict upper triangle."""
    q = skew_by_hand(p, b)
    eye = torch.eye(b, dtype=p.dtype)
    out = torch.zeros_like(p)
    for j in range(p.shape[0]):
        ainv_t = torch.linalg.inv(eye - q[j]).T
        dq = 2 * ainv_t @ g[j] @ ainv_t
        du = dq - dq.T
        out[j] = torch.stack([du[row, col] for row in range(b) for col in range(row + 1, b)])
    return out


def dense(r):
    return torch.block_diag(*r)


# ---- n_params, skew, cayley ------------------------------------------------------------------------------


def test_n_params_is_the_strict_upper_triangle():
    assert [O.n_params(b) for b in (1, 2, 3, 4, 5, 32)] == [0, 1, 3, 6, 10, 496]


def test_skew_fills_the_upper_triangle_row_by_row():
    p = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)
    want = torch.tensor([[[0, 1, 2], [-1, 0, 3], [-2, -3, 0]], [[0, 4, 5], [-4, 0, 6], [-5, -6, 0]]], dtype=F64)
    assert torch.equal(O.skew(p, 3), want)
    p4 = randn(3, 6, seed=1)
    assert torch.equal(O.skew(p4, 4), skew_by_hand(p4, 4))


def test_a_2x2_block_is_the_rotation_by_twice_atan_a():
    """b = 2: Q = [[0, a], [-a, 0]], R = [[1 - a^2, 2a], [-2a, 1 - a^2]] / (1 + a^2), by hand."""
    a = torch.tensor([[0.3], [-1.7], [0.0]], dtype=F64)
    want = torch.stack([torch.tensor([[1 - v * v, 2 * v], [-2 * v, 1 - v * v]], dtype=F64) / (1 + v * v)
                        for v in a[:, 0].tolist()])
    torch.testing.assert_close(FV.cayley(a, 2), want, **TOL)
    torch.testing.assert_close(O.cayley_reference(a, 2), want, **TOL)
    # the series at k = 1: (I + Q)^2 = [[1 - a^2, 2a], [-2a, 1 - a^2]], not divided
    torch.testing.assert_close(FV.cayley(a, 2, neumann_terms=1), want * (1 + a[:, :, None] ** 2), **TOL)


@pytest.mark.parametrize("b,r", [(3, 4), (5, 2), (7, 1)])  # r != b: a size taken from the wrong dim fails
def test_exact_transform_and_its_gradient_against_the_formulas(b, r):
    p = randn(r, O.n_params(b), seed=b, scale=0.7).requires_grad_()
    g = randn(r, b, b, seed=b + 100)
    out = FV.cayley(p, b)
    assert out.dtype == F64 and out.shape == (r, b, b)
    assert type(out.grad_fn).__name__ == "CayleyFunctionBackward"  # eager: the autograd.Function
    torch.testing.assert_close(out, cayley_by_hand(p.detach(), b), **TOL)
    (dp,) = torch.autograd.grad(out, p, g)
    torch.testing.assert_close(dp, cayley_grad_by_hand(p.detach(), b, g), **TOL)
    # and the building blocks alone, on the skew blocks
    q = skew_by_hand(p.detach(), b)
    torch.testing.assert_close(O.cayley_forward(q), cayley_by_hand(p.detach(), b), **TOL)
    eye = torch.eye(b, dtype=F64)
    want_dq = torch.stack([2 * torch.linalg.inv(eye - qj).T @ gj @ torch.linalg.inv(eye - qj).T
                           for qj, gj in zip(q, g)])
    torch.testing.assert_close(O.cayley_backward(cayley_by_hand(p.detach(), b), g), want_dq, **TOL)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_series_and_its_gradient_against_the_formula(k):
    b, r = 4, 3
    p = randn(r, O.n_params(b), seed=20 + k, scale=0.4).requires_grad_()
    ph = p.detach().clone().requires_grad_()
    out = FV.cayley(p, b, neumann_terms=k)
    want = series_by_hand(ph, b, k)
    torch.testing.assert_close(out, want, **TOL)
    torch.testing.assert_close(O.cayley_reference(p.detach(), b, k), want.detach(), **TOL)
    g = randn(r, b, b, seed=30 + k)
    (dp,) = torch.autograd.grad(out, p, g)
    (dh,) = torch.autograd.grad(want, ph, g)
    torch.testing.assert_close(dp, dh, **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_params_below_fp64_are_computed_in_fp32(dtype):
    p = randn(2, 3, seed=3, scale=0.5).to(dtype)
    want = cayley_by_hand(p.double(), 3)
    for terms in (None, 2):
        out = FV.cayley(p, 3, neumann_terms=terms)
        assert out.dtype == torch.float32
        ref = want if terms is None else series_by_hand(p.double(), 3, 2)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    assert FV.cayley(p.double(), 3, neumann_terms=2).dtype == F64


def test_zero_params_give_the_identity_and_b1_has_no_params():
    torch.testing.assert_close(FV.cayley(torch.zeros(2, 6, dtype=F64), 4), torch.eye(4, dtype=F64).expand(2, 4, 4),
                               rtol=0, atol=0)
    torch.testing.assert_close(FV.cayley(torch.zeros(3, 0, dtype=F64), 1), torch.ones(3, 1, 1, dtype=F64),
                               rtol=0, atol=0)


# ---- the argument checks of cayley, on both sides of each edge -------------------------------------------


@pytest.mark.parametrize("block_size", [0, -1, True, 2.0, "2"])
def test_block_size_must_be_a_positive_int(block_size):
    with pytest.raises(ValueError, match="block_size must be a positive int, got"):
        FV.cayley(torch.zeros(2, 1), block_size)


@pytest.mark.parametrize("shape", [(1,), (2, 2), (2, 4), (0, 3), (2, 3, 1), ()])
def test_params_shape_is_checked_on_both_sides(shape):
    with pytest.raises(ValueError, match=r"params must have shape \[r, 3\] \(b\(b-1\)/2 for block_size=3\), got"):
        FV.cayley(torch.zeros(shape), 3)
    assert FV.cayley(torch.zeros(1, 3), 3).shape == (1, 3, 3)  # r = 1 is fine


@pytest.mark.parametrize("terms", [0, -2, True, 1.0, "3"])
def test_neumann_terms_must_be_none_or_a_positive_int(terms):
    with pytest.raises(ValueError, match="neumann_terms must be None .exact. or an int >= 1, got"):
        FV.cayley(torch.zeros(2, 3), 3, neumann_terms=terms)


def test_params_checks_name_the_argument():
    with pytest.raises(TypeError, match="params"):
        FV.cayley([[0.0, 0.0, 0.0]], 3)
    with pytest.raises(TypeError, match="params must be a floating"):
        FV.cayley(torch.zeros(2, 3, dtype=torch.int64), 3)


def test_non_finite_params_are_refused_only_where_they_train():
    bad = torch.tensor([[0.0, float("nan"), 0.0]])
    with pytest.raises(ValueError, match="params contains NaN or inf"):
        FV.cayley(bad.clone().requires_grad_(), 3)
    assert torch.isnan(FV.cayley(bad, 3)).any()  # frozen: computed, not scanned
    with torch.no_grad():
        assert torch.isnan(FV.cayley(bad.clone().requires_grad_(), 3)).any()


# ---- block_rotate -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("transpose", [False, True, 0, 1])
@pytest.mark.parametrize("rows", [7, 1100])  # 1100: three of the row chunks the rotation's gradient sums
def test_block_rotate_and_each_input_alone_against_the_dense_matrix(transpose, rows):
    b, r = 3, 4
    rot = O.cayley_reference(randn(r, 3, seed=40), b)
    x = randn(rows, r * b, seed=41)
    d = dense(rot).T if transpose else dense(rot)
    dy = randn(rows, r * b, seed=42)
    y = FV.block_rotate(x, rot, transpose)
    torch.testing.assert_close(y, x @ d, **TOL)
    xg, rg = x.clone().requires_grad_(), rot.clone().requires_grad_()
    (dx,) = torch.autograd.grad(FV.block_rotate(xg, rot, transpose), xg, dy)
    torch.testing.assert_close(dx, dy @ d.T, **TOL)
    (dr,) = torch.autograd.grad(FV.block_rotate(x, rg, transpose), rg, dy)
    gram = torch.stack([x[:, j * b:(j + 1) * b].T @ dy[:, j * b:(j + 1) * b] for j in range(r)])
    torch.testing.assert_close(dr, gram.transpose(1, 2) if transpose else gram, **TOL)


def test_block_rotate_keeps_the_leading_shape_and_checks_the_width():
    rot = O.cayley_reference(randn(2, 1, seed=43), 2)
    x = randn(2, 3, 4, seed=44)
    y = FV.block_rotate(x, rot)
    assert y.shape == (2, 3, 4)
    torch.testing.assert_close(y, x @ dense(rot), **TOL)
    for bad in (x[..., :3], torch.cat([x, x[..., :1]], -1)):
        with pytest.raises(ValueError, match=r"x must end in K = r\*b = 4 features, got shape"):
            FV.block_rotate(bad, rot)


def _bmm_calls(monkeypatch):
    calls = []
    real = torch.bmm

    def spy(a, b, *args, **kwargs):
        calls.append(a.shape[1])
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "bmm", spy)
    return calls


@pytest.mark.parametrize("b,k,dtype,pieces", [
    (16, 1024, torch.float32, [128, 128, 44]),  # rows of 4 KiB, b <= 32: 128-row pieces
    (32, 1024, torch.float32, [128, 128, 44]),
    (32, 512, F64, [128, 128, 44]),             # 4 KiB of fp64
    (64, 1024, torch.float32, [300]),           # b = 64: one bmm
    (16, 1008, torch.float32, [300]),           # rows not a multiple of 4 KiB
    (16, 2048, torch.float32, [128, 128, 44]),  # 8 KiB
])
def test_the_weight_rotation_dealiases_4kib_rows_in_128_row_pieces(monkeypatch, b, k, dtype, pieces):
    """docs/performance.md: the weight rotation computes 128 rows at a time when a row is a multiple of
    4 KiB and b <= 32, every row still rotated exactly."""
    w = randn(300, k, seed=45).to(dtype)
    rot = O.cayley_reference(randn(k // b, O.n_params(b), seed=46, scale=0.1), b).to(dtype)
    calls = _bmm_calls(monkeypatch)
    got = O.rotated_weight(w, rot, dtype)
    assert calls == pieces
    want = torch.cat([w[:, j * b:(j + 1) * b] @ rot[j].T for j in range(k // b)], 1)
    torch.testing.assert_close(got, want, rtol=1e-12 if dtype == F64 else 1e-5, atol=1e-12 if dtype == F64 else 1e-5)
    calls.clear()
    O.block_rotate_forward(w, rot, True)  # rotations of x never dealias
    assert calls == [300]


# ---- orthogonal_linear: every side, each input alone ------------------------------------------------------


B, R_, N = 3, 4, 5
K = B * R_


def layer(seed, rows=6):
    x = randn(rows, K, seed=seed)
    w = randn(N, K, seed=seed + 1)
    p = randn(R_, O.n_params(B), seed=seed + 2, scale=0.6)
    bias = randn(N, seed=seed + 3)
    return x, w, p, bias


def by_hand(x, w, p, bias, dy, terms=None):
    """y = x D W^T + bias with D = blockdiag(R), and every gradient: dx = dy W D^T, dW = dy^T x D,
    dbias = sum(dy), dR_j = (x^T dy W)_jj, dparams through the Cayley formula (or autograd of the series)."""
    rot = cayley_by_hand(p, B) if terms is None else series_by_hand(p, B, terms)
    d = dense(rot)
    y = x @ d @ w.T + bias
    full = x.T @ dy @ w
    dr = torch.stack([full[j * B:(j + 1) * B, j * B:(j + 1) * B] for j in range(R_)])
    if terms is None:
        dp = cayley_grad_by_hand(p, B, dr)
    else:
        pp = p.clone().requires_grad_()
        (dp,) = torch.autograd.grad(series_by_hand(pp, B, terms), pp, dr)
    return y, {"x": dy @ w @ d.T, "weight": dy.T @ x @ d, "params": dp, "bias": dy.sum(0)}


NAMES = ("x", "weight", "params", "bias")


@pytest.mark.parametrize("rows", [2, 9])  # fewer rows than outputs (input side) and more (weight side)
@pytest.mark.parametrize("terms", [None, 2])
@pytest.mark.parametrize("trains", [NAMES, *[(n,) for n in NAMES], ("x", "params"), ("weight", "params"),
                                    ("params", "bias")])
def test_each_input_alone_gets_its_own_gradient(rows, terms, trains):
    x, w, p, bias = layer(50 + rows, rows)
    dy = randn(rows, N, seed=60 + rows)
    want_y, want = by_hand(x, w, p, bias, dy, terms)
    named = dict(zip(NAMES, (x, w, p, bias)))
    for n in trains:
        named[n] = named[n].clone().requires_grad_()
    y = FV.orthogonal_linear(named["x"], named["weight"], named["params"], named["bias"], B, terms)
    torch.testing.assert_close(y, want_y, **TOL)
    got = torch.autograd.grad(y, [named[n] for n in trains], dy)
    for n, gn in zip(trains, got):
        torch.testing.assert_close(gn, want[n], **TOL, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("side", ["input", "weight"])
@pytest.mark.parametrize("orthogonal", [True, False])
@pytest.mark.parametrize("needs", [(True, True, True, True), (True, False, False, False), (False, True, False, False),
                                   (False, False, True, False), (False, False, False, True), (True, True, False, False),
                                   (False, True, True, False)])
def test_every_backward_branch_against_the_formulas(side, orthogonal, needs):
    x, w, p, bias = layer(70, 7)
    dy = randn(7, N, seed=71)
    rot = cayley_by_hand(p, B)
    _, want = by_hand(x, w, p, bias, dy)
    full = x.T @ dy @ w
    want["r"] = torch.stack([full[j * B:(j + 1) * B, j * B:(j + 1) * B] for j in range(R_)])
    y = O.orthogonal_linear_forward(x, rot, w, bias, side)
    torch.testing.assert_close(y, x @ dense(rot) @ w.T + bias, **TOL)
    got = O.orthogonal_linear_backward(dy, x, rot, w, side, orthogonal, needs)
    for n, need, g in zip(("x", "r", "weight", "bias"), needs, got):
        if need:
            torch.testing.assert_close(g, want[n], **TOL, msg=lambda m, n=n: f"{n}: {m}")
        else:
            assert g is None, n


def test_no_bias_and_leading_dims():
    x, w, p, _ = layer(80, 6)
    x3 = x.view(2, 3, K)
    rot = cayley_by_hand(p, B)
    y = FV.orthogonal_linear(x3, w, p, None, B)
    assert y.shape == (2, 3, N)
    torch.testing.assert_close(y, (x @ dense(rot) @ w.T).view(2, 3, N), **TOL)
    torch.testing.assert_close(FV.orthogonal_linear(x[0], w, p, None, B), x[0] @ dense(rot) @ w.T, **TOL)


# ---- which side: the cost rule at its edges ---------------------------------------------------------------


def side_by_hand(m, n, b, training, orthogonal, fused):
    """docs/methods.md §3: inference the cheaper rotation (x when M <= N); training on Triton x; an exact R the
    weight when N < M; a series the fewer multiply-adds, 2MNK + 3MKb (input, ties) against 3MNK + 2NKb."""
    if not training:
        return "input" if m * b <= n * b else "weight"
    if fused:
        return "input"
    if orthogonal:
        return "weight" if n < m else "input"
    return "input" if 2 * m * n + 3 * m * b <= 3 * m * n + 2 * n * b else "weight"


def test_rotation_side_follows_the_cost_rule_everywhere_on_a_grid():
    for m in range(1, 41):
        for n in range(1, 41):
            for b in (1, 2, 3, 5, 16, 31, 32, 33):
                for training in (False, True):
                    for orthogonal in (False, True):
                        for fused in (False, True):
                            want = side_by_hand(m, n, b, training, orthogonal, fused)
                            assert O.rotation_side(m, n, b, training, orthogonal, fused) == want, (
                                m, n, b, training, orthogonal, fused)


def test_rotation_side_defaults():
    """block_size 32, inference, an exact R, not fused: each default moves the answer of one call."""
    assert O.rotation_side(32, 32, training=True, orthogonal=False) == "input"  # a tie at b = 32
    assert O.rotation_side(31, 31, training=True, orthogonal=False) == "weight"  # 31 < b
    assert O.rotation_side(4, 4, 5, orthogonal=False) == "input"  # inference: a series does not matter
    assert O.rotation_side(4, 4, 5, training=True) == "input"  # exact: the weight only when N < M
    assert O.rotation_side(5, 3, 5, training=True) == "weight"  # not fused
    assert O.rotation_side(5, 5) == "input" and O.rotation_side(6, 5) == "weight"


@pytest.fixture
def sides(monkeypatch):
    seen = []
    real = O.orthogonal_linear_forward

    def spy(x2, r, weight, bias, side):
        seen.append((tuple(x2.shape), side))
        return real(x2, r, weight, bias, side)

    monkeypatch.setattr(O, "orthogonal_linear_forward", spy)
    return seen


@pytest.mark.parametrize("lead,trains,terms,side", [
    ((5,), False, None, "input"), ((6,), False, None, "weight"),    # inference: M <= N = 5
    ((1, 5), False, None, "input"), ((2, 3), False, None, "weight"),  # M counts every leading row
    ((6,), True, None, "weight"), ((5,), True, None, "input"),      # exact R: the weight when N < M
    ((2, 3), True, None, "weight"),
    # a series, b = 3, N = 5: M = 8 gives 80 + 72 > 120 + 30 (weight); M = 7 gives 70 + 63 <= 105 + 30 (input)
    ((8,), True, 2, "weight"), ((7,), True, 2, "input"), ((8,), False, 2, "weight"), ((2, 4), True, 2, "weight"),
])
def test_the_op_rotates_the_side_its_shape_asks_for(sides, lead, trains, terms, side):
    x = randn(*lead, K, seed=90)
    _, w, p, bias = layer(91)
    if trains:
        p.requires_grad_()
    y = FV.orthogonal_linear(x, w, p, bias, B, terms)
    rot = cayley_by_hand(p.detach(), B) if terms is None else series_by_hand(p.detach(), B, terms)
    torch.testing.assert_close(y, x @ dense(rot) @ w.T + bias, **TOL)
    m = x.numel() // K
    assert sides == [((m, K), side)]


def test_params_that_train_under_no_grad_are_inference(sides):
    """A series at M = N = 2, b = 3: inference takes the input side (M <= N), training it the weight side
    (8 + 18 > 12 + 12 multiply-adds per K)."""
    x = randn(2, K, seed=92)
    w = randn(2, K, seed=93)
    p = randn(R_, 3, seed=94).requires_grad_()
    with torch.no_grad():
        FV.orthogonal_linear(x, w, p, None, B, 2)
    FV.orthogonal_linear(x, w, p.detach(), None, B, 2)
    FV.orthogonal_linear(x, w, p, None, B, 2)
    assert [s for _, s in sides] == ["input", "input", "weight"]


# ---- orthogonal_linear's checks, both sides of each edge ---------------------------------------------------


def test_every_check_of_orthogonal_linear():
    x, w, p, bias = layer(100)

    def refused(exc, match, **kw):
        args = dict(x=x, weight=w, params=p, bias=bias, block_size=B)
        args.update(kw)
        with pytest.raises(exc, match=match):
            FV.orthogonal_linear(**args)

    refused(TypeError, "x must be a torch.Tensor, got list", x=x.tolist())
    refused(TypeError, "weight must be a torch.Tensor, got list", weight=w.tolist())
    refused(TypeError, "x must be a floating", x=x.long())
    refused(TypeError, "weight must be a floating", weight=w.long())
    for bad in (w[0], w[None], w[:0]):
        refused(ValueError, r"weight must be a non-empty 2-D \[N, K\] tensor, got shape", weight=bad)
    refused(ValueError, "block_size=5 must divide the input width K=12", block_size=5)
    refused(ValueError, "block_size must be a positive int", block_size=0)
    refused(ValueError, "block_size must be a positive int", block_size=-3)
    refused(ValueError, "block_size must be a positive int", block_size=True)
    for rows in (3, 5):
        refused(ValueError, "params must have r = K / block_size = 4 rows, got", params=randn(rows, 3, seed=1))
    for bad in (x[0, 0], x[:, :-1], torch.cat([x, x[:, :1]], 1), x[:0]):
        refused(ValueError, "x must be non-empty and end in K=12 features, got shape", x=bad)
    for bad in (bias[:-1], torch.cat([bias, bias[:1]]), bias[None]):
        refused(ValueError, r"bias must have shape \(5,\), got", bias=bad)
    refused((TypeError, ValueError), "dtype", x=x.float())
    refused((TypeError, ValueError), "dtype", bias=bias.float())
    refused((TypeError, ValueError), "dtype", weight=w.float())
    refused(ValueError, "params contains NaN or inf", params=torch.full((R_, 3), float("inf"), requires_grad=True))
    # block_size 1: every K divides, params [K, 0], R = I
    torch.testing.assert_close(FV.orthogonal_linear(x, w, torch.zeros(K, 0, dtype=F64), None, 1), x @ w.T, **TOL)


def test_autocast_runs_the_matmuls_in_bf16_and_keeps_params_fp32():
    x, w, p, bias = (t.float() for t in layer(110))
    p.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = FV.orthogonal_linear(x, w, p, bias, B)
    assert y.dtype == torch.bfloat16
    want = x @ dense(cayley_by_hand(p.detach().double(), B)).float() @ w.T + bias
    torch.testing.assert_close(y.float(), want, rtol=3e-2, atol=6e-2)
    y.float().sum().backward()
    assert p.grad.dtype == torch.float32


# ---- the custom ops (what torch.compile runs), eagerly --------------------------------------------------


CHECKS = ("test_schema", "test_faketensor")


def test_the_custom_ops_compute_the_same_values_and_gradients():
    p = randn(R_, 3, seed=120, scale=0.6)
    q = skew_by_hand(p, B).requires_grad_()
    g = randn(R_, B, B, seed=121)
    rot = O._cayley_op(q)
    torch.testing.assert_close(rot, cayley_by_hand(p, B), **TOL)
    (dq,) = torch.autograd.grad(rot, q, g)
    eye = torch.eye(B, dtype=F64)
    ainv_t = torch.linalg.inv(eye - q.detach()).transpose(1, 2)
    torch.testing.assert_close(dq, 2 * ainv_t @ g @ ainv_t, **TOL)

    x, w, _, bias = layer(122)
    rot = cayley_by_hand(p, B)
    dy = randn(6, K, seed=123)
    for transpose in (False, True):
        d = dense(rot).T if transpose else dense(rot)
        for alone in ("x", "r"):
            xg = x.clone().requires_grad_(alone == "x")
            rg = rot.clone().requires_grad_(alone == "r")
            y = O._block_rotate_op(xg, rg, transpose)
            torch.testing.assert_close(y, x @ d, **TOL)
            (got,) = torch.autograd.grad(y, xg if alone == "x" else rg, dy)
            if alone == "x":
                torch.testing.assert_close(got, dy @ d.T, **TOL)
            else:
                gram = torch.stack([x[:, j * B:(j + 1) * B].T @ dy[:, j * B:(j + 1) * B] for j in range(R_)])
                torch.testing.assert_close(got, gram.transpose(1, 2) if transpose else gram, **TOL)

    dy = randn(6, N, seed=124)
    _, want = by_hand(x, w, p, bias, dy)
    full = x.T @ dy @ w
    want["r"] = torch.stack([full[j * B:(j + 1) * B, j * B:(j + 1) * B] for j in range(R_)])
    for side in ("input", "weight"):
        for alone in ("x", "r", "weight", "bias"):
            ins = {"x": x.clone(), "r": rot.clone(), "weight": w.clone(), "bias": bias.clone()}
            ins[alone].requires_grad_()
            y = O._orthogonal_linear_op(ins["x"], ins["r"], ins["weight"], ins["bias"], side, True)
            torch.testing.assert_close(y, x @ dense(rot) @ w.T + bias, **TOL)
            (got,) = torch.autograd.grad(y, ins[alone], dy)
            torch.testing.assert_close(got, want[alone], **TOL, msg=lambda m, a=alone, s=side: f"{s} {a}: {m}")


@pytest.mark.parametrize("xdtype", [F64, torch.float32])
def test_the_custom_ops_fake_implementations_match_the_real_ones(xdtype):
    p = randn(R_, 3, seed=130, scale=0.6)
    q = skew_by_hand(p, B)
    rot = cayley_by_hand(p, B)
    torch.library.opcheck(O._cayley_op, (q,), test_utils=CHECKS)
    torch.library.opcheck(O._cayley_backward_op, (rot, randn(R_, B, B, seed=131)), test_utils=CHECKS)
    x, w, _, bias = (t.to(xdtype) for t in layer(132))
    dy = randn(6, K, seed=133).to(xdtype)
    for transpose in (False, True):
        torch.library.opcheck(O._block_rotate_op, (x, rot, transpose), test_utils=CHECKS)
        for needs in ((True, True), (True, False), (False, True)):
            torch.library.opcheck(O._block_rotate_backward_op, (x, rot, dy, transpose, *needs), test_utils=CHECKS)
    dy = randn(6, N, seed=134).to(xdtype)
    for side in ("input", "weight"):
        torch.library.opcheck(O._orthogonal_linear_op, (x, rot, w, bias, side, True), test_utils=CHECKS)
        torch.library.opcheck(O._orthogonal_linear_op, (x[:2], rot, w, None, side, False), test_utils=CHECKS)
        for orthogonal in (True, False):
            for needs in ((True, True, True, True), (True, False, False, True), (False, True, False, False),
                          (False, False, True, False)):
                torch.library.opcheck(O._orthogonal_linear_backward_op, (dy, x, rot, w, side, orthogonal, *needs),
                                      test_utils=CHECKS)


@pytest.mark.parametrize("op", ["cayley", "block_rotate", "orthogonal_linear"])
@pytest.mark.parametrize("seed", range(3))
def test_the_template_examples_keep_their_contract(op, seed):
    """The op template's example inputs: b = 4, r = 3 (K = 12), x [2, 5, 12] with two leading dims, params
    0.2 * N(0, 1), an orthogonal rotation, a [7, 12] frozen weight and a trained bias."""
    args, kw = O.EXAMPLES[op](F64, gen(seed))
    if op == "cayley":
        (p,) = args
        assert kw == {"block_size": 4} and p.shape == (3, 6) and p.requires_grad and p.dtype == F64
        assert 0.05 < p.std() < 0.5
    elif op == "block_rotate":
        x, rot = args
        assert kw == {"transpose": True} and x.shape == (2, 5, 12) and rot.shape == (3, 4, 4)
        assert x.requires_grad and rot.requires_grad and rot.dtype == F64
        torch.testing.assert_close(rot.transpose(1, 2) @ rot, torch.eye(4, dtype=F64).expand(3, 4, 4), **TOL)
    else:
        x, w, p, bias = args
        assert kw == {"block_size": 4} and x.shape == (2, 5, 12) and w.shape == (7, 12) and bias.shape == (7,)
        assert p.shape == (3, 6) and x.requires_grad and p.requires_grad and bias.requires_grad
        assert not w.requires_grad and 0.05 < p.std() < 0.5


@pytest.mark.parametrize("name", ["x", "weight"])
def test_a_non_tensor_is_refused_by_name_before_the_backend_looks_at_it(name):
    """Under the default backend ("auto") the backend asks x for its device: a list must be refused first."""
    x, w, p, bias = layer(140)
    args = {"x": x, "weight": w}
    args[name] = args[name].tolist()
    with fastvlm.backend("auto"):
        with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor, got list"):
            FV.orthogonal_linear(args["x"], args["weight"], p, bias, B)


def test_blocks_up_to_64_run_on_the_kernels():
    """The Triton launchers take b <= 64 (kernels/orth.py's MAX_BLOCK, _kernels' docstring); larger blocks stay
    on the torch path. Only the dispatch is asked here: no kernel runs."""
    t = torch.zeros(2, 3)
    with fastvlm.backend("triton"):
        assert O._kernels(t, 64) is not None and O._kernels(t, 1) is not None
        assert O._kernels(t, 65) is None
    assert O._kernels(t, 64) is None  # the torch backend
