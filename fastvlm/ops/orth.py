r"""OrthCR: exact Cayley orthogonal transforms and block rotations (docs/methods.md §3).

Formula::

    params [r, b(b-1)/2]  ->  U strictly upper triangular (torch.triu_indices(b, b, 1) order),  Q = U - U^T
    cayley:  R = (I + Q)(I - Q)^-1 = 2 (I - Q)^-1 - I          (exact; one inverse per block)
             R = (I + Q)(I + Q + ... + Q^k)                     (neumann_terms = k: the truncated series)
    backward (exact), A = I - Q, G = dL/dR:  dL/dQ = 2 A^-T G A^-T,  dL/dU = (dL/dQ - dL/dQ^T) on the strict
             upper triangle
    orthogonal_linear:  y = (x @ blockdiag(R)) @ W^T + bias  =  x @ (W @ blockdiag(R)^T)^T + bias
             input side costs M*K*b flops for M rows of x, weight side N*K*b: the cheaper side is used.
             Training an exact R with W frozen, the weight side takes dR from dx (R orthogonal):
             dL/dR_j = (x_j^T dx_j) R_j, and the side is picked by memory traffic (see rotation_side).

Implementations: ``*_reference`` (naive: dense solve / dense block-diagonal matrix, the oracle); the torch
path (batched LU inverse, strided-bmm rotations, explicit backward, matmuls through ``_backend.linear``: oneDNN
on CPUs where it is faster); the Triton kernels in ``kernels/orth.py`` (Gauss-Jordan inverse per block with partial pivoting, every
block of a stack in one launch; blocks with ||Q||_F > CAYLEY_MAX_NORM inverted in fp64, see there).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from .._checks import check_finite, check_float, check_same_device, check_same_dtype, check_tensor, compiling
from ._template import empty_for_none, fake_grads, none_for_unneeded


def n_params(block_size: int) -> int:
    return block_size * (block_size - 1) // 2


def skew(params: torch.Tensor, block_size: int) -> torch.Tensor:
    """Q = U - U^T from the strict upper triangles [r, b(b-1)/2] -> [r, b, b]."""
    iu = torch.triu_indices(block_size, block_size, 1, device=params.device)
    q = params.new_zeros(params.shape[0], block_size, block_size)
    q[:, iu[0], iu[1]] = params
    return q - q.transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------------------


def cayley_reference(params, block_size, neumann_terms=None):
    q = skew(params, block_size)
    eye = torch.eye(block_size, dtype=q.dtype, device=q.device).expand_as(q)
    if neumann_terms is None:
        return torch.linalg.solve(eye - q, eye + q, left=False)  # (I + Q)(I - Q)^-1
    series, power = eye.clone(), eye
    for _ in range(neumann_terms):
        power = power @ q
        series = series + power
    return (eye + q) @ series


def block_rotate_reference(x, rotation, transpose=False):
    dense = torch.block_diag(*rotation).to(x.dtype)
    return x @ (dense.T if transpose else dense)


def orthogonal_linear_reference(x, weight, params, bias=None, block_size=32, neumann_terms=None):
    r = cayley_reference(params, block_size, neumann_terms)
    return F.linear(x @ torch.block_diag(*r).to(x.dtype), weight, bias)


def _orth_example(dtype, generator, op):
    b, r = 4, 3
    params = (0.2 * torch.randn(r, n_params(b), generator=generator, dtype=dtype)).requires_grad_()
    x = torch.randn(2, 5, r * b, generator=generator, dtype=dtype).requires_grad_()
    if op == "cayley":
        return [params], {"block_size": b}
    if op == "block_rotate":
        rot = torch.linalg.qr(torch.randn(r, b, b, generator=generator, dtype=torch.float64))[0].to(dtype)
        return [x, rot.requires_grad_()], {"transpose": True}
    w = torch.randn(7, r * b, generator=generator, dtype=dtype)
    bias = torch.randn(7, generator=generator, dtype=dtype).requires_grad_()
    return [x, w, params, bias], {"block_size": b}


#: small inputs for each public op of this family (see fastvlm/ops/residual.py's EXAMPLES)
EXAMPLES = {op: (lambda dtype, g, op=op: _orth_example(dtype, g, op))
            for op in ("cayley", "block_rotate", "orthogonal_linear")}


# ---------------------------------------------------------------------------------------------------------
# the ops: forward and backward (torch path or Triton launchers), Functions and custom ops calling them
# ---------------------------------------------------------------------------------------------------------


def _kernels(t, block_size):
    """The Triton launchers when this call runs on Triton and the block fits them (b <= 64), else None."""
    kernels = _backend.triton_kernels("orth", t)
    return kernels if kernels is not None and block_size <= kernels.MAX_BLOCK else None


def _blocks(t2, nb, b):
    """[M, nb*b] viewed as the batch [nb, M, b] (strided: no copy)."""
    return t2.view(t2.shape[0], nb, b).transpose(0, 1)


def _rotate_torch(x2, r, transpose, dealias=False):
    """One strided bmm straight into the output: no permuted copies of x (einsum makes two).

    On CPU, when a row of the output is a multiple of 4 KiB, the strided bmm writes b-wide pieces of rows
    that all fall in the same cache sets (4 KiB aliasing), several times slower than a row that does not
    alias. ``dealias`` then computes a contiguous [r, 128, b] product per 128 rows and copies it, for
    b <= 32 (b=64 shows no such loss). The weight rotation asks for it; rotations of x do not, since the
    128-row temporary would raise the op's peak. Figures: docs/performance.md."""
    nb, b, _ = r.shape
    rr = (r.transpose(1, 2) if transpose else r).to(x2.dtype)
    out = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
    if dealias and x2.device.type == "cpu" and b <= 32 and (out.stride(0) * out.element_size()) % 4096 == 0:
        for i in range(0, x2.shape[0], 128):
            _blocks(out[i:i + 128], nb, b).copy_(torch.bmm(_blocks(x2[i:i + 128], nb, b), rr))
    else:
        torch.bmm(_blocks(x2, nb, b), rr, out=_blocks(out, nb, b))
    return out


def _rotate(t2, r, transpose, kernels):
    return kernels.rotate(t2, r, transpose) if kernels is not None else _rotate_torch(t2, r, transpose)


def _block_gram(x2, g2, r, kernels):
    """[x_j^T g_j for each block j] in R's dtype: the rotation's gradient when g is the rotated side's."""
    nb, b, _ = r.shape
    if kernels is not None:
        return kernels.rotate_grad_r(x2, g2, nb, b).to(r.dtype)
    out = torch.zeros(nb, b, b, dtype=r.dtype, device=r.device)
    step = 512  # row chunks: each chunk's x and g stay in cache across the batch of blocks
    for i in range(0, x2.shape[0], step):
        xs, gs = x2[i:i + step], g2[i:i + step]
        out.baddbmm_(_blocks(xs, nb, b).transpose(1, 2).to(r.dtype), _blocks(gs, nb, b).to(r.dtype))
    return out


#: the largest ||Q_j||_F of a block the Triton kernel inverts in fp32; blocks above it are inverted in fp64
#: (``cayley_forward``). Why: an fp32 inverse of A = I - Q that is backward stable (the kernel's pivoted
#: Gauss-Jordan, like LAPACK's pivoted LU) still rounds A^-1 by about u kappa(A), u = 2^-24, with
#: kappa_2(A) = sqrt(1 + ||Q||_2^2) (A^T A = I + Q^T Q), and that error is not skew: R = 2 A^-1 - I loses
#: orthogonality by max |R^T R - I| ~ c u ||Q||_2. Measured in the interpreter (pivoted kernel, b = 3 to 64,
#: ||Q||_2 = 10 to 3e4): c <= 0.62 (b = 3: 2.5e-5 at ||Q|| = 1000, 7.3e-5 at 4700, 1.1e-3 at 3e4; odd b
#: always have an eigenvalue 0 of Q next to the large ones, the worst case). For the tolerance 2e-5 that the
#: tests hold R^T R - I to: ||Q||_2 <= 2e-5 / u = 335 with c = 1; 256 keeps c = 1.3 of margin. ||Q||_F >=
#: ||Q||_2 is what is checked (one reduction; the check costs one device-to-host read per call).
CAYLEY_MAX_NORM = 256.0


def _cayley_torch(q):
    """R = 2 (I - Q)^-1 - I by torch's batched (pivoted LU) inverse, in q's dtype. (I - Q)^-1 = ((I + Q)^-1)^T:
    linalg.inv returns column-major blocks, so their transpose is row-major, the strides the custom op's fake
    (empty_like) and the Triton kernel give, without a copy; I + Q is built on the diagonal, without an
    identity tensor (b x b more at the peak)."""
    a = q.clone()
    a.diagonal(dim1=-2, dim2=-1).add_(1.0)
    r = torch.linalg.inv(a).mT.mul_(2.0)
    r.diagonal(dim1=-2, dim2=-1).sub_(1.0)
    return r


def cayley_forward(q):
    """Exact R = 2 (I - Q)^-1 - I for the skew blocks q [r, b, b]: on Triton every block in one launch of
    the pivoted Gauss-Jordan kernel, on the torch path a batched (pivoted LU) inverse; then blocks with
    ||Q_j||_F > CAYLEY_MAX_NORM are inverted again in fp64 and rounded to q's dtype, since above that norm
    an fp32 inverse's rounding passes 2e-5 in R^T R - I (fp64 q: no check)."""
    kernels = _kernels(q, q.shape[-1])
    r = kernels.cayley(q) if kernels is not None else _cayley_torch(q)
    if q.dtype != torch.float64:
        big = torch.linalg.matrix_norm(q) > CAYLEY_MAX_NORM
        if bool(big.any()):
            r[big] = _cayley_torch(q[big].double()).to(r.dtype)
    return r


def cayley_backward(r, g):
    """dL/dQ = 2 A^-T G A^-T with A^-1 = (R + I) / 2, from R alone; autograd through Q = U - U^T then gives
    dU = dQ - dQ^T."""
    kernels = _kernels(r, r.shape[-1])
    if kernels is not None:
        return kernels.cayley_backward(r, g)
    ainv = r.clone()  # A^-1 = (R + I) / 2 in one temporary, no identity tensor
    ainv.diagonal(dim1=-2, dim2=-1).add_(1.0)
    ainv_t = ainv.mul_(0.5).transpose(1, 2)
    return (ainv_t @ g @ ainv_t).mul_(2.0)


def block_rotate_forward(x2, r, transpose):
    """x2 [M, K] @ blockdiag(R) (transpose: blockdiag(R)^T), without the dense matrix."""
    return _rotate(x2, r, transpose, _kernels(x2, r.shape[-1]))


def block_rotate_backward(x2, r, dy, transpose, needs):
    """(dx2, dR) for ``needs`` = (x, R)."""
    kernels = _kernels(x2, r.shape[-1])
    dx = dr = None
    if needs[0]:
        dx = _rotate(dy, r, not transpose, kernels)
    if needs[1]:  # transpose: dR_j = (x_j^T dy_j)^T = dy_j^T x_j, contiguous like the custom op's fake
        dr = _block_gram(dy, x2, r, kernels) if transpose else _block_gram(x2, dy, r, kernels)
    return dx, dr


def rotated_weight(weight, r, dtype):
    """W' = W @ blockdiag(R)^T in ``dtype``; the weight side builds it in forward and again in backward
    (the layer keeps no copy of its weight between the passes)."""
    return _rotate_torch(weight, r, True, dealias=True).to(dtype)


SIDES = ("input", "weight", "fused")


def orthogonal_linear_forward(x2, r, weight, bias, side):
    """y = (x2 @ blockdiag(R)) @ W^T + bias, by ``side`` (see :func:`rotation_side`): ``"input"`` rotates
    x2, ``"weight"`` rotates W, ``"fused"`` runs the Triton kernel with the rotation inside the matmul."""
    if side == "fused":
        return _backend.triton_kernels("orth", x2).rotated_linear(x2, r, weight, bias)
    if side == "input":
        return _backend.linear(block_rotate_forward(x2, r, False), weight, bias)
    return _backend.linear(x2, rotated_weight(weight, r, x2.dtype), bias)


def orthogonal_linear_backward(dy2, x2, r, weight, side, orthogonal, needs):
    """(dx2, dR, dW, dbias) for ``needs`` = (x, R, W, bias), None where not needed.

    Weight side with an orthogonal R and W frozen: dR comes from dx alone. The rotated input's gradient is
    dxr = dx @ blockdiag(R), so dL/dR_j = x_j^T dxr_j = (x_j^T dx_j) R_j, b x b per block, where autograd
    through W' would need dL/dW' = dy^T x, a whole M*N*K matmul. Otherwise (a truncated series R, or W
    trains) the weight side takes dW' = dy^T x: dR_j = dW'_j^T W_j and dW = dW' @ blockdiag(R)."""
    need_x, need_r, need_w, need_b = needs
    dx = dr = dw = db = None
    if side == "fused":
        kernels = _backend.triton_kernels("orth", x2)
        dx, dr = kernels.rotated_linear_backward(dy2, x2, r, weight)
        dr = dr.to(r.dtype)
        if need_w:
            dw = (dy2.T @ kernels.rotate(x2, r).to(dy2.dtype)).to(weight.dtype)
    elif side == "input":
        if need_x or need_r:
            dxr = _backend.linear(dy2, weight.to(dy2.dtype).t())
            dx, dr = block_rotate_backward(x2, r, dxr, False, (need_x, need_r))
        if need_w:
            dw = (dy2.T @ block_rotate_forward(x2, r, False)).to(weight.dtype)
    elif orthogonal and not need_w:
        if need_x:
            dx = _backend.linear(dy2, rotated_weight(weight, r, dy2.dtype).t())
        if need_r:
            if dx is not None:
                dr = _block_gram(x2, dx, r, None) @ r
            else:  # no dx to reuse: the rotated input's gradient straight from the frozen weight
                dr = _block_gram(x2, _backend.linear(dy2, weight.to(dy2.dtype).t()), r, None)
    else:
        if need_x:
            dx = _backend.linear(dy2, rotated_weight(weight, r, dy2.dtype).t())
        if need_r or need_w:
            dw_rot = dy2.T @ x2  # dL/dW'
            dw_blocks, dr = block_rotate_backward(weight, r, dw_rot.to(weight.dtype), True, (need_w, need_r))
            dw = dw_blocks
    if need_b:
        db = dy2.sum(dim=0)
    return dx, dr, dw, db


class CayleyFunction(torch.autograd.Function):
    """Eager autograd of the exact Cayley transform; saves only R."""

    @staticmethod
    def forward(ctx, q):
        r = cayley_forward(q)
        ctx.save_for_backward(r)
        return r

    @staticmethod
    def backward(ctx, g):
        return cayley_backward(ctx.saved_tensors[0], g)


class BlockRotateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, r, transpose):
        ctx.save_for_backward(x2, r)
        ctx.transpose = transpose
        return block_rotate_forward(x2, r, transpose)

    @staticmethod
    def backward(ctx, dy):
        x2, r = ctx.saved_tensors
        return (*block_rotate_backward(x2, r, dy, ctx.transpose, ctx.needs_input_grad[:2]), None)


class OrthogonalLinearFunction(torch.autograd.Function):
    """Eager autograd of :func:`orthogonal_linear` on 2-D x, R already built."""

    @staticmethod
    def forward(ctx, x2, r, weight, bias, side, orthogonal):
        ctx.save_for_backward(x2, r, weight)
        ctx.side, ctx.orthogonal = side, orthogonal
        return orthogonal_linear_forward(x2, r, weight, bias, side)

    @staticmethod
    def backward(ctx, dy2):
        x2, r, weight = ctx.saved_tensors
        grads = orthogonal_linear_backward(dy2, x2, r, weight, ctx.side, ctx.orthogonal, ctx.needs_input_grad[:4])
        return (*grads, None, None)


@torch.library.custom_op("fastvlm::cayley", mutates_args=())
def _cayley_op(q: Tensor) -> Tensor:
    return cayley_forward(q)


@_cayley_op.register_fake
def _(q):
    return torch.empty_like(q)


@torch.library.custom_op("fastvlm::cayley_backward", mutates_args=())
def _cayley_backward_op(r: Tensor, g: Tensor) -> Tensor:
    return cayley_backward(r, g)


@_cayley_backward_op.register_fake
def _(r, g):
    return torch.empty_like(r)


_cayley_op.register_autograd(lambda ctx, g: _cayley_backward_op(ctx.saved_tensors[0], g),
                             setup_context=lambda ctx, inputs, output: ctx.save_for_backward(output))


@torch.library.custom_op("fastvlm::block_rotate", mutates_args=())
def _block_rotate_op(x2: Tensor, r: Tensor, transpose: bool) -> Tensor:
    return block_rotate_forward(x2, r, transpose)


@_block_rotate_op.register_fake
def _(x2, r, transpose):
    return torch.empty_like(x2)


@torch.library.custom_op("fastvlm::block_rotate_backward", mutates_args=())
def _block_rotate_backward_op(x2: Tensor, r: Tensor, dy: Tensor, transpose: bool, need_x: bool, need_r: bool
                              ) -> tuple[Tensor, Tensor]:
    return empty_for_none(block_rotate_backward(x2, r, dy, transpose, (need_x, need_r)), (x2, r))


@_block_rotate_backward_op.register_fake
def _(x2, r, dy, transpose, need_x, need_r):
    return fake_grads([(x2, need_x), (r, need_r)])


def _block_rotate_setup(ctx, inputs, output):
    x2, r, transpose = inputs
    ctx.save_for_backward(x2, r)
    ctx.transpose = transpose


def _block_rotate_op_backward(ctx, dy):
    x2, r = ctx.saved_tensors
    needs = ctx.needs_input_grad[:2]
    dx, dr = none_for_unneeded(_block_rotate_backward_op(x2, r, dy, ctx.transpose, *needs), needs)
    return dx, dr, None


_block_rotate_op.register_autograd(_block_rotate_op_backward, setup_context=_block_rotate_setup)


@torch.library.custom_op("fastvlm::orthogonal_linear", mutates_args=())
def _orthogonal_linear_op(x2: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor], side: str,
                          orthogonal: bool) -> Tensor:
    return orthogonal_linear_forward(x2, r, weight, bias, side)


@_orthogonal_linear_op.register_fake
def _(x2, r, weight, bias, side, orthogonal):
    return x2.new_empty(x2.shape[0], weight.shape[0])


@torch.library.custom_op("fastvlm::orthogonal_linear_backward", mutates_args=())
def _orthogonal_linear_backward_op(dy2: Tensor, x2: Tensor, r: Tensor, weight: Tensor, side: str, orthogonal: bool,
                                   need_x: bool, need_r: bool, need_weight: bool, need_bias: bool
                                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = orthogonal_linear_backward(dy2, x2, r, weight, side, orthogonal, (need_x, need_r, need_weight, need_bias))
    return empty_for_none(grads, (x2, r, weight, dy2))


@_orthogonal_linear_backward_op.register_fake
def _(dy2, x2, r, weight, side, orthogonal, need_x, need_r, need_weight, need_bias):
    return fake_grads([(x2, need_x), (r, need_r), (weight, need_weight), (dy2[0], need_bias)])


def _orthogonal_linear_setup(ctx, inputs, output):
    x2, r, weight, bias, side, orthogonal = inputs
    ctx.save_for_backward(x2, r, weight)
    ctx.side, ctx.orthogonal = side, orthogonal


def _orthogonal_linear_op_backward(ctx, dy2):
    x2, r, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad[:4]
    grads = _orthogonal_linear_backward_op(dy2, x2, r, weight, ctx.side, ctx.orthogonal, *needs)
    return (*none_for_unneeded(grads, needs), None, None)


_orthogonal_linear_op.register_autograd(_orthogonal_linear_op_backward, setup_context=_orthogonal_linear_setup)


# ---------------------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------------------


def _check_params(params, block_size):
    check_tensor("params", params)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if params.dim() != 2 or params.shape[1] != n_params(block_size) or params.shape[0] == 0:
        raise ValueError(f"params must have shape [r, {n_params(block_size)}] (b(b-1)/2 for block_size={block_size}), "
                         f"got {tuple(params.shape)}")
    check_float("params", params, not compiling() and _backend.use_triton(params))
    if torch.is_grad_enabled() and params.requires_grad:
        check_finite("params", params)


def cayley(params, block_size, neumann_terms=None):
    """The r orthogonal blocks [r, b, b] of ``R = (I + Q)(I - Q)^-1`` (exact), or of the truncated series
    ``(I + Q)(I + Q + ... + Q^k)`` with ``neumann_terms=k``. Differentiable. Computed in fp32 (fp64 kept on
    the torch path); the Triton kernel runs the exact transform, the series runs in torch everywhere."""
    _check_params(params, block_size)
    if neumann_terms is not None:
        if isinstance(neumann_terms, bool) or not isinstance(neumann_terms, int) or neumann_terms < 1:
            raise ValueError(f"neumann_terms must be None (exact) or an int >= 1, got {neumann_terms!r}")
        return cayley_reference(params if params.dtype == torch.float64 else params.float(), block_size, neumann_terms)
    q = skew(params if params.dtype == torch.float64 else params.float(), block_size)
    return _cayley_op(q) if compiling() else CayleyFunction.apply(q)


def block_rotate(x, rotation, transpose=False):
    """``x @ blockdiag(rotation)`` (or its transpose) for x [..., K], rotation [r, b, b], K = r*b."""
    nb, b, _ = rotation.shape
    if x.shape[-1] != nb * b:
        raise ValueError(f"x must end in K = r*b = {nb * b} features, got shape {tuple(x.shape)}")
    x2 = x.reshape(-1, x.shape[-1])
    if compiling():
        return _block_rotate_op(x2, rotation, bool(transpose)).view(x.shape)
    return BlockRotateFunction.apply(x2, rotation, bool(transpose)).view(x.shape)


def rotation_side(m_rows: int, n_out: int, block_size: int = 32, training: bool = False, orthogonal: bool = True,
                  fused: bool = False) -> str:
    """Which side to rotate, by cost. Forward alone: x (M*K*b flops) or the weight (N*K*b), the cheaper.

    While the rotation trains on Triton (``fused``): the input side, x rotated once by the rotate kernel and
    then one GEMM (or inside the matmul when the fused kernels are asked for, ``FASTVLM_FUSED``; see
    docs/kernels.md for the modelled costs). Otherwise, with an orthogonal R (the exact transform), the
    weight side gets the rotation's gradient from dx (see orthogonal_linear_backward) and both sides cost
    the same matmuls; what differs
    is memory traffic: the input side rotates x, rotates dx back and reads x and dx for dR (about 6*M*K
    elements), the weight side rotates W twice and reads x and dx (4*N*K + 2*M*K). So: the weight side when
    N < M. A series R is not orthogonal: the weight side's backward then needs dW' = dy^T x, a whole extra
    M*N*K matmul, against the input side's M*K*b (flops 2MNK + 3MKb vs 3MNK + 2NKb)."""
    m, n, b = m_rows, n_out, block_size
    if not training:
        return "input" if m <= n else "weight"
    if fused:
        return "input"
    if orthogonal:
        return "weight" if n < m else "input"
    return "input" if 2 * m * n + 3 * m * b <= 3 * m * n + 2 * n * b else "weight"


def orthogonal_linear(x, weight, params, bias=None, block_size=32, neumann_terms=None):
    """``F.linear(x @ blockdiag(cayley(params)), weight, bias)``, rotating x or the weight, whichever is
    cheaper for the shape; the dense block-diagonal matrix is never built. weight [N, K], K = r*b."""
    for n, t in (("x", x), ("weight", weight)):
        check_tensor(n, t)
    on_triton = not compiling() and _backend.use_triton(x)
    check_float("x", x, on_triton)
    check_float("weight", weight, on_triton)
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"weight must be a non-empty 2-D [N, K] tensor, got shape {tuple(weight.shape)}")
    K = weight.shape[1]
    if isinstance(block_size, int) and block_size >= 1 and K % block_size:
        raise ValueError(f"block_size={block_size} must divide the input width K={K}")
    _check_params(params, block_size)
    if params.shape[0] * block_size != K:
        raise ValueError(f"params must have r = K / block_size = {K // block_size} rows, got {params.shape[0]}")
    if x.dim() < 1 or x.shape[-1] != K or x.numel() == 0:
        raise ValueError(f"x must be non-empty and end in K={K} features, got shape {tuple(x.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    check_same_device(x=x, weight=weight, params=params, bias=bias)
    (x, weight, bias), amp = _backend.amp_cast(x, weight, bias)  # params and R stay fp32
    check_same_dtype("orthogonal_linear", x=x, weight=weight, bias=bias)
    with amp:
        return _orthogonal_linear(x, weight, params, bias, block_size, neumann_terms)


def _orthogonal_linear(x, weight, params, bias, block_size, neumann_terms):
    K, N = weight.shape[1], weight.shape[0]
    r = cayley(params, block_size, neumann_terms)
    training = torch.is_grad_enabled() and params.requires_grad
    kernels = _kernels(x, block_size)
    fused = kernels is not None  # Triton: rotate x (rotate kernel, or inside the matmul when fused)
    exact = neumann_terms is None
    side = rotation_side(x.numel() // K, N, block_size, training, orthogonal=exact, fused=fused)
    if side == "input" and fused and kernels.fused("orth"):
        side = "fused"
    x2 = x.reshape(-1, K)
    if compiling():
        y = _orthogonal_linear_op(x2, r, weight, bias, side, exact)
    else:
        y = OrthogonalLinearFunction.apply(x2, r, weight, bias, side, exact)
    return y.view(*x.shape[:-1], N)
