"""Triton kernels for OrthCR (formula and reference: fastvlm/ops/orth.py).

    cayley:   R = 2 (I - Q)^-1 - I per block (Gauss-Jordan with partial pivoting), one program per block of
              any stack of blocks (all layers' blocks of one size in one launch), the block padded to a power
              of two >= 16 with identity.
    backward: dQ = 2 A^-T G A^-T with A^-1 = (R + I) / 2 (autograd through Q = U - U^T does the rest).
    rotate:   out[m, r*b + c] = sum_j X[m, r*b + j] R[r, j, c]   (x @ blockdiag(R), never built dense)
    rotate_grad_r: dR[r] = X[:, r]^T @ dY[:, r]
    rotated_linear (fused): y = (x @ blockdiag(R)) @ W^T + b with each block of x rotated in registers on its
              way into the matmul; backward dx = (dy @ W) @ blockdiag(R)^T and dR from the same registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import HALF_AND_FULL, Variant, declare, dot_dtype, dot_precision, fused, gpu_dot_dtype, precisions


#: largest block size the kernels take (one block's tiles live in registers); larger blocks run in torch
MAX_BLOCK = 64


def block_pad(b: int) -> int:
    return max(16, triton.next_power_of_2(b))


def _warps(BLOCK: int) -> int:
    return 4 if BLOCK < 64 else 8  # 64-wide rotation tiles spill at 4 warps (fastvlm kernels)


# launch policy per kernel, chosen with `fastvlm kernels` (no spills on sm_80 or sm_90a)
def cayley_fwd_warps(BLOCK: int) -> int:
    """Pivoted Gauss-Jordan: 4 warps, 8 at BLOCK=64 (4 spill 48-56 bytes there with the pivot's row swaps;
    8: 148 / 170 registers on sm_80 / sm_90a, one block per SM)."""
    return 4 if BLOCK < 64 else 8


def cayley_bwd_warps(BLOCK: int) -> int:
    return 4 if BLOCK < 64 else 16  # two IEEE fp32 64x64 dots


def rotate_block_m(BLOCK: int, dot) -> int:
    return 32 if (BLOCK >= 64 and dot == tl.float32) else 64


@triton.jit
def cayley_fwd_kernel(q_ptr, r_ptr, b, BLOCK: tl.constexpr):
    """R = 2 (I - Q)^-1 - I for block program_id(0) of q [r, b, b] (contiguous; fp32 out): Gauss-Jordan on
    [A | I], A = I - Q, with partial pivoting (at step i the row of largest |a[j, i]|, j >= i, is swapped
    into row i; the same row operations turn I into A^-1, so no column permutation is undone). The block is
    padded to BLOCK with identity rows and columns, so the padded inverse is blockdiag(A^-1, I) and a padding
    row is never chosen as pivot for a real column (its entry there is 0).

    Why pivoting although A's symmetric part is I (every pivot of the unpivoted elimination is >= 1 in exact
    arithmetic): its Schur complements grow like ||Q||^2, and in fp32 the unpivoted elimination lost
    orthogonality (max |R^T R - I| 5.5e-4 at b = 16, ||Q||_2 = 4700; a zero pivot, NaN, at 3e4), where the
    pivoted one stays at fp32 rounding (docs/kernels.md; tests/test_orth.py)."""
    blk = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK)
    inside = (rows[:, None] < b) & (cols[None, :] < b)
    offs = blk * b * b + rows[:, None] * b + cols[None, :]
    q = tl.load(q_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    eye = tl.where(rows[:, None] == cols[None, :], 1.0, 0.0)
    a = eye - q  # padded with identity: the inverse is blockdiag(A^-1, I)
    inv = eye
    for i in range(0, b):
        is_col = cols[None, :] == i
        col = tl.sum(tl.where(is_col, a, 0.0), axis=1)  # a[:, i]
        p = tl.argmax(tl.where(rows >= i, tl.abs(col), -1.0), axis=0)  # first row of the largest |a[j, i]|
        is_i = rows[:, None] == i
        is_p = rows[:, None] == p
        a_i = tl.sum(tl.where(is_i, a, 0.0), axis=0)
        inv_i = tl.sum(tl.where(is_i, inv, 0.0), axis=0)
        a_p = tl.sum(tl.where(is_p, a, 0.0), axis=0)
        inv_p = tl.sum(tl.where(is_p, inv, 0.0), axis=0)
        # swap rows i and p (p == i: no-op), then eliminate column i from every other row with row i
        a = tl.where(is_i, a_p[None, :], tl.where(is_p, a_i[None, :], a))
        inv = tl.where(is_i, inv_p[None, :], tl.where(is_p, inv_i[None, :], inv))
        col_i = tl.sum(tl.where(rows == i, col, 0.0), axis=0)
        piv = tl.sum(tl.where(rows == p, col, 0.0), axis=0)
        factor = tl.where(rows == p, col_i, col)  # column i after the swap
        factor = tl.where(rows == i, 0.0, factor)
        a_row = a_p / piv
        inv_row = inv_p / piv
        a = tl.where(is_i, a_row[None, :], a - factor[:, None] * a_row[None, :])
        inv = tl.where(is_i, inv_row[None, :], inv - factor[:, None] * inv_row[None, :])
    tl.store(r_ptr + offs, 2.0 * inv - eye, mask=inside)


declare(cayley_fwd_kernel)


@triton.jit
def cayley_bwd_kernel(r_ptr, g_ptr, dq_ptr, b, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK)
    inside = (rows[:, None] < b) & (cols[None, :] < b)
    offs = blk * b * b + rows[:, None] * b + cols[None, :]
    offs_t = blk * b * b + cols[None, :] * b + rows[:, None]  # transposed load
    eye = tl.where(rows[:, None] == cols[None, :], 1.0, 0.0)
    ainv_t = (tl.load(r_ptr + offs_t, mask=inside, other=0.0).to(tl.float32) + eye) * 0.5  # A^-T
    g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    dq = 2.0 * tl.dot(tl.dot(ainv_t, g, input_precision=PRECISION), ainv_t, input_precision=PRECISION)
    tl.store(dq_ptr + offs, dq, mask=inside)


declare(cayley_bwd_kernel)


@triton.jit
def rotate_kernel(x_ptr, sx_m, sx_k, r_ptr, sr_r, sr_j, sr_c, out_ptr, so_m, so_k, M, b,
                  BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """One (row tile, block) of out = x @ blockdiag(R); pass R's strides swapped for blockdiag(R)^T."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    blk = tl.program_id(1)
    j = tl.arange(0, BLOCK)
    m_ok = offs_m < M
    j_ok = j < b
    col = (blk * b + j).to(tl.int64)  # column offsets x strides reach 2^31 on transposed views
    m64 = offs_m.to(tl.int64)
    x = tl.load(x_ptr + m64[:, None] * sx_m + col[None, :] * sx_k, mask=m_ok[:, None] & j_ok[None, :], other=0.0)
    rr = tl.load(r_ptr + (blk.to(tl.int64) * sr_r + j[:, None] * sr_j + j[None, :] * sr_c),
                 mask=j_ok[:, None] & j_ok[None, :], other=0.0)
    if DOT_DTYPE == tl.float32:
        y = tl.dot(x.to(tl.float32), rr.to(tl.float32), input_precision=PRECISION)
    else:
        y = tl.dot(x.to(DOT_DTYPE), rr.to(DOT_DTYPE))
    tl.store(out_ptr + m64[:, None] * so_m + col[None, :] * so_k, y.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & j_ok[None, :])


declare(rotate_kernel, tensor_cores=True)


@triton.jit
def rotate_grad_r_kernel(x_ptr, sx_m, sx_k, dy_ptr, sd_m, sd_k, dr_ptr, M, b,
                         BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """dR[r, j, c] = sum_m x[m, r*b + j] dy[m, r*b + c] (fp32)."""
    blk = tl.program_id(0)
    j = tl.arange(0, BLOCK)
    j_ok = j < b
    col = (blk * b + j).to(tl.int64)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mk = (offs_m < M)[:, None] & j_ok[None, :]
        m64 = offs_m.to(tl.int64)
        x = tl.load(x_ptr + m64[:, None] * sx_m + col[None, :] * sx_k, mask=mk, other=0.0)
        dy = tl.load(dy_ptr + m64[:, None] * sd_m + col[None, :] * sd_k, mask=mk, other=0.0)
        if DOT_DTYPE == tl.float32:
            acc = tl.dot(tl.trans(x.to(tl.float32)), dy.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(tl.trans(x.to(DOT_DTYPE)), dy.to(DOT_DTYPE), acc)
    offs = blk.to(tl.int64) * b * b + j[:, None] * b + j[None, :]
    tl.store(dr_ptr + offs, acc, mask=j_ok[:, None] & j_ok[None, :])


declare(rotate_grad_r_kernel, tensor_cores=True)


@triton.jit
def rotated_linear_fwd_kernel(x_ptr, sx_m, sx_k, r_ptr, w_ptr, sw_n, sw_k, bias_ptr, out_ptr, so_m, so_n,
                              M, N, nb, b, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """out = (x @ blockdiag(R)) @ W^T + bias, rotating each block of x in registers on its way into the
    linear's accumulator: the rotated x (M x K) is never written or read back. R: [nb, b, b] contiguous."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    m64, n64 = offs_m.to(tl.int64), offs_n.to(tl.int64)
    j = tl.arange(0, BLOCK)
    j_ok = j < b
    j64 = j.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for blk in range(0, nb):
        col = (blk * b + j).to(tl.int64)
        x = tl.load(x_ptr + m64[:, None] * sx_m + col[None, :] * sx_k, mask=m_ok[:, None] & j_ok[None, :], other=0.0)
        r = tl.load(r_ptr + (blk * b * b + j64[:, None] * b + j64[None, :]),
                    mask=j_ok[:, None] & j_ok[None, :], other=0.0)
        w = tl.load(w_ptr + col[:, None] * sw_k + n64[None, :] * sw_n, mask=j_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_DTYPE == tl.float32:
            xr = tl.dot(x.to(tl.float32), r.to(tl.float32), input_precision=PRECISION)
            acc = tl.dot(xr, w.to(tl.float32), acc, input_precision=PRECISION)
        else:
            xr = tl.dot(x.to(DOT_DTYPE), r.to(DOT_DTYPE))
            acc = tl.dot(xr.to(DOT_DTYPE), w.to(DOT_DTYPE), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + m64[:, None] * so_m + n64[None, :] * so_n, acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


declare(rotated_linear_fwd_kernel)


@triton.jit
def rotated_linear_bwd_kernel(dy_ptr, sd_m, sd_n, x_ptr, sx_m, sx_k, r_ptr, w_ptr, sw_n, sw_k, dx_ptr, sdx_m,
                              sdx_k, drp_ptr, M, N, nb, b, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """For one (row tile, block): dxr = dy @ W[:, blk] in registers, then dx = dxr @ R_blk^T and this row
    tile's share of dR_blk = x_blk^T @ dxr (summed over row tiles afterwards: deterministic, no atomics)."""
    pid_m = tl.program_id(0)
    blk = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    m64 = offs_m.to(tl.int64)
    j = tl.arange(0, BLOCK)
    j_ok = j < b
    col = (blk * b + j).to(tl.int64)
    dxr = tl.zeros((BLOCK_M, BLOCK), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        n64 = offs_n.to(tl.int64)
        dy = tl.load(dy_ptr + m64[:, None] * sd_m + n64[None, :] * sd_n, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        w = tl.load(w_ptr + n64[:, None] * sw_n + col[None, :] * sw_k, mask=n_ok[:, None] & j_ok[None, :], other=0.0)
        if DOT_DTYPE == tl.float32:
            dxr = tl.dot(dy.to(tl.float32), w.to(tl.float32), dxr, input_precision=PRECISION)
        else:
            dxr = tl.dot(dy.to(DOT_DTYPE), w.to(DOT_DTYPE), dxr)
    jj = j_ok[:, None] & j_ok[None, :]
    r_t = tl.load(r_ptr + (blk.to(tl.int64) * b * b + j[None, :] * b + j[:, None]), mask=jj, other=0.0)  # R^T
    x = tl.load(x_ptr + m64[:, None] * sx_m + col[None, :] * sx_k, mask=m_ok[:, None] & j_ok[None, :], other=0.0)
    if DOT_DTYPE == tl.float32:
        dx = tl.dot(dxr, r_t.to(tl.float32), input_precision=PRECISION)
        dr = tl.dot(tl.trans(x.to(tl.float32)), dxr, input_precision=PRECISION)
    else:
        dx = tl.dot(dxr.to(DOT_DTYPE), r_t.to(DOT_DTYPE))
        dr = tl.dot(tl.trans(x.to(DOT_DTYPE)), dxr.to(DOT_DTYPE))
    tl.store(dx_ptr + m64[:, None] * sdx_m + col[None, :] * sdx_k, dx.to(dx_ptr.dtype.element_ty),
             mask=m_ok[:, None] & j_ok[None, :])
    base = (pid_m.to(tl.int64) * nb + blk) * b * b
    tl.store(drp_ptr + (base + j[:, None] * b + j[None, :]), dr, mask=jj)


declare(rotated_linear_bwd_kernel)


# ---------------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------------

def fused_tile(BLOCK: int, dot) -> dict:
    """Tile of the fused rotate+linear kernels (chosen with `fastvlm kernels`): IEEE fp32 dots spill at
    64-row tiles, so fp32 takes 32 rows (16 for 64-wide blocks)."""
    if dot != tl.float32:
        return dict(BLOCK_M=64, BLOCK_N=32)
    return dict(BLOCK_M=32 if BLOCK <= 32 else 16, BLOCK_N=32)


def fused_warps(BLOCK: int, dot) -> int:
    return 8 if (BLOCK >= 64 or dot == tl.float32) else 4


def _fused_setup(x2, rmat, a, weight):
    """Shapes, padded block, dot dtype, tile and R in the activations' dtype, shared by both directions."""
    nb, b, _ = rmat.shape
    BLOCK = block_pad(b)
    dot = dot_dtype(a, weight)
    return x2.shape[0], weight.shape[0], nb, b, BLOCK, dot, fused_tile(BLOCK, dot), rmat.to(x2.dtype).contiguous()


def rotated_linear(x2, rmat, weight, bias):
    """(x2 @ blockdiag(R)) @ W^T + bias with the rotation fused into the matmul (R cast to x2's dtype)."""
    M, N, nb, b, BLOCK, dot, tile, rr = _fused_setup(x2, rmat, x2, weight)
    out = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    grid = (triton.cdiv(M, tile["BLOCK_M"]), triton.cdiv(N, tile["BLOCK_N"]))
    rotated_linear_fwd_kernel[grid](x2, x2.stride(0), x2.stride(1), rr, weight, weight.stride(0), weight.stride(1),
                                    bias if bias is not None else weight, out, out.stride(0), out.stride(1),
                                    M, N, nb, b, HAS_BIAS=bias is not None, BLOCK=BLOCK, DOT_DTYPE=dot,
                                    PRECISION=dot_precision(dot),
                                    num_warps=fused_warps(BLOCK, dot), **tile)
    return out


def rotated_linear_backward(dy2, x2, rmat, weight):
    """(dx, dR): dx = (dy @ W) @ blockdiag(R)^T and dR = x^T (dy @ W) per block, fp32 dR."""
    M, N, nb, b, BLOCK, dot, tile, rr = _fused_setup(x2, rmat, dy2, weight)
    dx = torch.empty_like(x2, memory_format=torch.contiguous_format)
    n_mt = triton.cdiv(M, tile["BLOCK_M"])
    partial = torch.empty(n_mt, nb, b, b, device=x2.device, dtype=torch.float32)
    rotated_linear_bwd_kernel[(n_mt, nb)](dy2, dy2.stride(0), dy2.stride(1), x2, x2.stride(0), x2.stride(1),
                                          rr, weight, weight.stride(0), weight.stride(1),
                                          dx, dx.stride(0), dx.stride(1), partial, M, N, nb, b, BLOCK=BLOCK,
                                          DOT_DTYPE=dot, PRECISION=dot_precision(dot),
                                          num_warps=fused_warps(BLOCK, dot), **tile)
    return dx, partial.sum(dim=0)


def cayley(q):
    """q: [r, b, b] skew-symmetric (contiguous) -> R [r, b, b] fp32."""
    r, b, _ = q.shape
    out = torch.empty(r, b, b, device=q.device, dtype=torch.float32)
    BLOCK = block_pad(b)
    cayley_fwd_kernel[(r,)](q.contiguous(), out, b, BLOCK=BLOCK, num_warps=cayley_fwd_warps(BLOCK))
    return out


def cayley_backward(rmat, g):
    """dQ = 2 A^-T g A^-T, A^-1 = (R + I) / 2 -> [r, b, b] fp32."""
    r, b, _ = rmat.shape
    out = torch.empty(r, b, b, device=rmat.device, dtype=torch.float32)
    BLOCK = block_pad(b)
    cayley_bwd_kernel[(r,)](rmat.contiguous(), g.contiguous(), out, b, BLOCK=BLOCK,
                            PRECISION=dot_precision(tl.float32), num_warps=cayley_bwd_warps(BLOCK))
    return out


def rotate(x2, rmat, transpose=False):
    """x2 [M, K] @ blockdiag(R) (or blockdiag(R)^T) -> [M, K] in x2's dtype (R cast to it: fp16/bf16
    activations rotate on tensor cores)."""
    M, K = x2.shape
    nb, b, _ = rmat.shape
    rmat = rmat.to(x2.dtype)
    out = torch.empty(M, K, device=x2.device, dtype=x2.dtype)
    BLOCK = block_pad(b)
    s_r, s_j, s_c = rmat.stride()
    if transpose:
        s_j, s_c = s_c, s_j
    dot = dot_dtype(x2)
    bm = rotate_block_m(BLOCK, dot)
    grid = (triton.cdiv(M, bm), nb)
    rotate_kernel[grid](x2, x2.stride(0), x2.stride(1), rmat, s_r, s_j, s_c, out, out.stride(0), out.stride(1), M, b,
                        BLOCK_M=bm, BLOCK=BLOCK, DOT_DTYPE=dot, PRECISION=dot_precision(dot), num_warps=_warps(BLOCK))
    return out


def rotate_grad_r(x2, dy2, nb, b):
    M = x2.shape[0]
    out = torch.empty(nb, b, b, device=x2.device, dtype=torch.float32)
    BLOCK = block_pad(b)
    dot = dot_dtype(x2, dy2)
    rotate_grad_r_kernel[(nb,)](x2, x2.stride(0), x2.stride(1), dy2, dy2.stride(0), dy2.stride(1), out, M, b,
                                BLOCK_M=rotate_block_m(BLOCK, dot), BLOCK=BLOCK, DOT_DTYPE=dot,
                                PRECISION=dot_precision(dot),
                                num_warps=_warps(BLOCK))
    return out


def variants():
    """Every configuration the launchers above can choose: blocks padded to 16, 32 or 64 (b <= MAX_BLOCK)."""
    f32 = torch.float32
    out = []
    for BLOCK in (16, 32, 64):
        w = _warps(BLOCK)
        out.append(Variant(cayley_fwd_kernel, {"BLOCK": BLOCK}, {"num_warps": cayley_fwd_warps(BLOCK)},
                           {"q_ptr": f32, "r_ptr": f32}))
        for prec in precisions(tl.float32):
            out.append(Variant(cayley_bwd_kernel, {"BLOCK": BLOCK, "PRECISION": prec},
                               {"num_warps": cayley_bwd_warps(BLOCK)}, {"r_ptr": f32, "g_ptr": f32, "dq_ptr": f32}))
        for d, prec in ((d, p) for d in HALF_AND_FULL for p in precisions(gpu_dot_dtype(d))):
            dot = gpu_dot_dtype(d)
            c = {"BLOCK_M": rotate_block_m(BLOCK, dot), "BLOCK": BLOCK, "DOT_DTYPE": dot, "PRECISION": prec}
            out.append(Variant(rotate_kernel, c, {"num_warps": w}, {"x_ptr": d, "r_ptr": d, "out_ptr": d}))
            out.append(Variant(rotate_grad_r_kernel, c, {"num_warps": w}, {"x_ptr": d, "dy_ptr": d, "dr_ptr": f32}))
            fw, ft = {"num_warps": fused_warps(BLOCK, dot)}, fused_tile(BLOCK, dot)
            for has_bias in (False, True):
                out.append(Variant(rotated_linear_fwd_kernel, {"HAS_BIAS": has_bias, "BLOCK": BLOCK, "DOT_DTYPE": dot,
                                                               "PRECISION": prec, **ft}, fw,
                                   {"x_ptr": d, "r_ptr": d, "w_ptr": d, "bias_ptr": d, "out_ptr": d}))
            out.append(Variant(rotated_linear_bwd_kernel, {"BLOCK": BLOCK, "DOT_DTYPE": dot, "PRECISION": prec, **ft},
                               fw,
                               {"dy_ptr": d, "x_ptr": d, "r_ptr": d, "w_ptr": d, "dx_ptr": d, "drp_ptr": f32}))
    return out
