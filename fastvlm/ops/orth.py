r"""OrthCR: exact Cayley orthogonal transforms and block rotations (METHODS.md section 3).

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
on CPUs where it is faster); the Triton kernels in ``kernels/orth.py`` (Gauss-Jordan inverse per block:
I - Q has every singular value >= 1, so no pivoting is needed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend
from .._checks import check_finite, check_float, check_same_device, check_tensor, compiling
from .linear import frozen_linear


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


def orthogonal_linear_reference(x, weight, params, bias=None, block_size=32, neumann_terms=None):
    r = cayley_reference(params, block_size, neumann_terms)
    return F.linear(x @ torch.block_diag(*r).to(x.dtype), weight, bias)


# ---------------------------------------------------------------------------------------------------------
# autograd Functions
# ---------------------------------------------------------------------------------------------------------


def _kernels(t, block_size):
    """The Triton launchers when this call runs on Triton and the block fits them (b <= 64), else None."""
    if _backend.use_triton(t):
        from ..kernels import orth as ko

        return ko if block_size <= ko.MAX_BLOCK else None
    return None


class Cayley(torch.autograd.Function):
    """Exact R = 2 (I - Q)^-1 - I from Q; saves only R (A^-1 = (R + I) / 2)."""

    @staticmethod
    def forward(ctx, q):
        ko = _kernels(q, q.shape[-1])
        if ko is not None:
            r = ko.cayley(q)
        else:
            eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
            r = torch.linalg.inv(eye - q).mul_(2.0).sub_(eye)
        ctx.save_for_backward(r)
        ctx.ko = ko
        return r

    @staticmethod
    def backward(ctx, g):
        (r,) = ctx.saved_tensors
        if ctx.ko is not None:
            return ctx.ko.cayley_backward(r, g)
        eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
        ainv_t = ((r + eye) * 0.5).transpose(1, 2)
        return 2.0 * ainv_t @ g @ ainv_t  # dL/dQ; autograd through Q = U - U^T gives dU = dQ - dQ^T


def _blocks(t2, nb, b):
    """[M, nb*b] viewed as the batch [nb, M, b] (strided: no copy)."""
    return t2.view(t2.shape[0], nb, b).transpose(0, 1)


def _rotate_torch(x2, r, transpose, dealias=False):
    """One strided bmm straight into the output: no permuted copies of x (einsum makes two).

    On CPU, when a row of the output is a multiple of 4 KiB, the strided bmm writes b-wide pieces of rows
    that all fall in the same cache sets: b=16 took 7.2 ms at 1576 x 3072 (1.8 ms at 1024 wide, 1.06 at 1280,
    a wider row that does not alias). ``dealias`` then computes a contiguous [r, 128, b] product per 128 rows
    and copies it (4.8 ms, 0.9 ms at 1024) for b <= 32 (b=64 shows no such loss). The weight rotation asks
    for it; rotations of x do not, since the 128-row temporary would raise the op's peak (by 1% at K=1024)."""
    nb, b, _ = r.shape
    rr = (r.transpose(1, 2) if transpose else r).to(x2.dtype)
    out = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
    if dealias and x2.device.type == "cpu" and b <= 32 and (out.stride(0) * out.element_size()) % 4096 == 0:
        for i in range(0, x2.shape[0], 128):
            _blocks(out[i:i + 128], nb, b).copy_(torch.bmm(_blocks(x2[i:i + 128], nb, b), rr))
    else:
        torch.bmm(_blocks(x2, nb, b), rr, out=_blocks(out, nb, b))
    return out


def _rotate(t2, r, transpose, ko):
    return ko.rotate(t2, r, transpose) if ko is not None else _rotate_torch(t2, r, transpose)


def _block_gram(x2, g2, r, ko):
    """[x_j^T g_j for each block j] in R's dtype: the rotation's gradient when g is the rotated side's."""
    nb, b, _ = r.shape
    if ko is not None:
        return ko.rotate_grad_r(x2, g2, nb, b).to(r.dtype)
    out = torch.zeros(nb, b, b, dtype=r.dtype, device=r.device)
    step = 512  # row chunks: each chunk's x and g stay in cache across the batch (b=16: 4.3 -> 3.2 ms at K=3072)
    for i in range(0, x2.shape[0], step):
        xs, gs = x2[i:i + step], g2[i:i + step]
        out.baddbmm_(_blocks(xs, nb, b).transpose(1, 2).to(r.dtype), _blocks(gs, nb, b).to(r.dtype))
    return out


class BlockRotate(torch.autograd.Function):
    """x [M, K] @ blockdiag(R) (transpose=True: blockdiag(R)^T) without the dense matrix."""

    @staticmethod
    def forward(ctx, x2, r, transpose):
        ko = _kernels(x2, r.shape[-1])
        out = _rotate(x2, r, transpose, ko)
        ctx.save_for_backward(x2, r)
        ctx.ko, ctx.transpose = ko, transpose
        return out

    @staticmethod
    def backward(ctx, dy):
        x2, r = ctx.saved_tensors
        ko, tr = ctx.ko, ctx.transpose
        dx = dr = None
        if ctx.needs_input_grad[0]:
            dx = _rotate(dy, r, not tr, ko)
        if ctx.needs_input_grad[1]:
            dr = _block_gram(x2, dy, r, ko)
            if tr:
                dr = dr.transpose(1, 2)
        return dx, dr, None


class WeightRotatedLinear(torch.autograd.Function):
    """The weight side while an exact (orthogonal) rotation trains, W frozen: y = x @ W'^T + bias with
    W' = W @ blockdiag(R)^T. Autograd through that would need dL/dW' = dy^T x, a whole M*N*K matmul. Since
    blockdiag(R) is orthogonal, the rotated input's gradient is dxr = dx @ blockdiag(R), so the rotation's
    gradient comes from dx alone: dL/dR_j = x_j^T dxr_j = (x_j^T dx_j) R_j, b x b per block. W' is rebuilt
    in backward rather than saved (N*K; the layer keeps no copy of its weight between the passes).
    Torch ops only: where the Triton kernels apply, training takes their fused input side instead."""

    @staticmethod
    def rotated_weight(weight, r, dtype):
        """W' = W @ blockdiag(R)^T in ``dtype``; built in forward, built again in backward."""
        return _rotate_torch(weight, r, True, dealias=True).to(dtype)

    @staticmethod
    def forward(ctx, x2, r, weight, bias):
        y = _backend.linear(x2, WeightRotatedLinear.rotated_weight(weight, r, x2.dtype), bias)
        ctx.save_for_backward(x2, r, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, r, weight = ctx.saved_tensors
        dx = dr = db = None
        if ctx.needs_input_grad[0]:
            dx = _backend.linear(dy, WeightRotatedLinear.rotated_weight(weight, r, dy.dtype).t())
        if ctx.needs_input_grad[1]:
            if dx is not None:
                dr = _block_gram(x2, dx, r, None) @ r
            else:  # no dx to reuse: the rotated input's gradient straight from the frozen weight
                dr = _block_gram(x2, _backend.linear(dy, weight.to(dy.dtype).t()), r, None)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = dy.sum(dim=0)
        return dx, dr, None, db


class RotatedLinear(torch.autograd.Function):
    """Triton path of the input side: (x @ blockdiag(R)) @ W^T + bias with the rotation fused into the
    matmul both ways (the rotated x is never stored). The weight's own gradient, when asked for, needs the
    rotated x: it is rebuilt then."""

    @staticmethod
    def forward(ctx, x2, r, weight, bias):
        from ..kernels import orth as ko

        ctx.save_for_backward(x2, r, weight)
        ctx.has_bias = bias is not None
        return ko.rotated_linear(x2, r, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        from ..kernels import orth as ko

        x2, r, weight = ctx.saved_tensors
        dx, dr = ko.rotated_linear_backward(dy, x2, r, weight)
        dw = db = None
        if ctx.needs_input_grad[2]:
            dw = (dy.T @ ko.rotate(x2, r).to(dy.dtype)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = dy.sum(dim=0)
        return dx, dr.to(r.dtype), dw, db


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
    if compiling():
        from . import library

        return library.cayley_fwd(q)
    return Cayley.apply(q)


def block_rotate(x, rotation, transpose=False):
    """``x @ blockdiag(rotation)`` (or its transpose) for x [..., K], rotation [r, b, b], K = r*b."""
    nb, b, _ = rotation.shape
    if x.shape[-1] != nb * b:
        raise ValueError(f"x must end in K = r*b = {nb * b} features, got shape {tuple(x.shape)}")
    x2 = x.reshape(-1, x.shape[-1])
    if compiling():
        from . import library

        return library.block_rotate_fwd(x2, rotation, transpose).view(x.shape)
    return BlockRotate.apply(x2, rotation, transpose).view(x.shape)


def rotation_side(m_rows: int, n_out: int, block_size: int = 32, training: bool = False, orthogonal: bool = True,
                  fused: bool = False) -> str:
    """Which side to rotate, by cost. Forward alone: x (M*K*b flops) or the weight (N*K*b), the cheaper.

    While the rotation trains: ``fused`` (Triton) rotates x inside the matmul both ways, so the input side
    costs next to nothing. Otherwise, with an orthogonal R (the exact transform), the weight side gets the
    rotation's gradient from dx (see WeightRotatedLinear) and both sides cost the same matmuls; what differs
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
    with amp:
        return _orthogonal_linear(x, weight, params, bias, block_size, neumann_terms)


def _orthogonal_linear(x, weight, params, bias, block_size, neumann_terms):
    K, N = weight.shape[1], weight.shape[0]
    r = cayley(params, block_size, neumann_terms)
    m_rows = x.numel() // K
    training = torch.is_grad_enabled() and params.requires_grad
    fused = not compiling() and _kernels(x, block_size) is not None  # Triton: rotation fused into the matmul
    exact = neumann_terms is None
    if rotation_side(m_rows, N, block_size, training, orthogonal=exact, fused=fused) == "input":
        if fused:
            return RotatedLinear.apply(x.reshape(-1, K), r, weight, bias).view(*x.shape[:-1], N)
        return frozen_linear(block_rotate(x, r), weight, bias)
    if training and exact and not weight.requires_grad and not compiling():
        return WeightRotatedLinear.apply(x.reshape(-1, K), r, weight, bias).view(*x.shape[:-1], N)
    w_rot = block_rotate(weight, r, transpose=True)  # W @ blockdiag(R)^T
    return frozen_linear(x, w_rot.to(x.dtype), bias)
