"""Triton kernels for the TaskRes residual classifier (formula and reference: fastvlm/ops/residual.py).

    u = t + alpha * x            (K x D, never materialised: combined as tiles load)
    logits = s * (f * rf) @ (u * ru).T,   rf / ru = 1 / max(||row||, eps)

Kernels: row inverse norms, the logits tile (forward), the cross-entropy partials (one class tile against the
whole batch per block, the norms accumulated in the same loop; online log-sum-exp per class tile, so no B x K
logits exist), the softmax-gradient chunk, and the normalisation backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (GROUP_M, HALF_AND_FULL, Variant, declare, dot_dtype, dot_precision, gpu_dot_dtype, matmul,
                      matmul_kernel, matmul_variants, mm_config, mm_tile, precisions, tile_constexprs, tile_grid,
                      tile_ids)

EPS = 1e-12
ROW_BLOCK = dict(BLOCK_R=16, BLOCK_C=128, num_warps=8)  # 4 warps spill on sm_80 with 64-bit offsets


@triton.jit
def _row_tile(a_ptr, sa_r, sa_c, b_ptr, sb_r, sb_c, beta, offs_r64, offs_c, m, HAS_B: tl.constexpr):
    """Rows of a + beta * b (fp32) for one (rows, columns) tile."""
    c64 = offs_c.to(tl.int64)  # column offsets x strides reach 2^31 on transposed views
    v = tl.load(a_ptr + offs_r64[:, None] * sa_r + c64[None, :] * sa_c, mask=m, other=0.0).to(tl.float32)
    if HAS_B:
        v += beta * tl.load(b_ptr + offs_r64[:, None] * sb_r + c64[None, :] * sb_c, mask=m, other=0.0).to(tl.float32)
    return v


@triton.jit
def inv_norm_kernel(a_ptr, sa_r, sa_c, b_ptr, sb_r, sb_c, beta, out_ptr, R, C, eps,
                    HAS_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[r] = 1 / max(||a[r] + beta * b[r]||, eps)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    offs_r64 = offs_r.to(tl.int64)
    sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        m = r_ok[:, None] & (offs_c < C)[None, :]
        v = _row_tile(a_ptr, sa_r, sa_c, b_ptr, sb_r, sb_c, beta, offs_r64, offs_c, m, HAS_B)
        sq += tl.sum(v * v, axis=1)
    tl.store(out_ptr + offs_r, 1.0 / tl.maximum(tl.sqrt(sq), eps), mask=r_ok)


declare(inv_norm_kernel, {"beta": "fp32", "eps": "fp32"})


@triton.jit
def _logits_tile(f_ptr, sf_b, sf_d, t_ptr, st_k, st_d, x_ptr, sx_k, sx_d, alpha, rf_ptr, ru_ptr, scale,
                 offs_b, offs_k, B, K, D,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 PRECISION: tl.constexpr):
    # B operand is u^T (D x K): t and x read through swapped strides, combined in registers
    acc = mm_tile(f_ptr, sf_b, sf_d, t_ptr, st_d, st_k, x_ptr, sx_d, sx_k, alpha, rf_ptr,
                  f_ptr, 0, 0, 0.0, offs_b, offs_k, B, K, D,
                  True, False, False, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION)
    rf = tl.load(rf_ptr + offs_b, mask=offs_b < B, other=0.0)
    ru = tl.load(ru_ptr + offs_k, mask=offs_k < K, other=0.0)
    return acc * (scale * rf)[:, None] * ru[None, :]


@triton.jit
def logits_kernel(f_ptr, sf_b, sf_d, t_ptr, st_k, st_d, x_ptr, sx_k, sx_d, alpha, rf_ptr, ru_ptr, scale,
                  out_ptr, so_b, so_k, B, K, D,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 PRECISION: tl.constexpr):
    pid_b, pid_k = tile_ids(tl.program_id(0), B, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_b = pid_b * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    lg = _logits_tile(f_ptr, sf_b, sf_d, t_ptr, st_k, st_d, x_ptr, sx_k, sx_d, alpha, rf_ptr, ru_ptr, scale,
                      offs_b, offs_k, B, K, D, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION)
    m = (offs_b < B)[:, None] & (offs_k < K)[None, :]
    tl.store(out_ptr + offs_b.to(tl.int64)[:, None] * so_b + offs_k.to(tl.int64)[None, :] * so_k,
             lg.to(out_ptr.dtype.element_ty), mask=m)


declare(logits_kernel, {"alpha": "fp32", "scale": "fp32"}, tensor_cores=True)


#: rows of the batch one class-tile block of ce_class_tile_kernel covers (its BLOCK_B): the batch rounded up
#: to a power of two, at least 64 (tl.dot's smallest efficient tile) and at most 256 (the accumulator's
#: registers); larger batches take several batch tiles, each reading t and x once more
BATCH_TILES = (64, 128, 256)
#: class tile x depth step and warps by the dot's (dtype, precision), 8 warps each, chosen with `fastvlm
#: kernels` at BLOCK_B = 256: 64 classes where the accumulator fits, so f is re-read once per 64 classes
#: (TF32 at 16-deep steps; fp16/bf16 at 16-deep steps, since 32-deep ones spill 8 bytes on sm_80); IEEE fp32
#: dots (FMA, the operands in registers) spill at 64 classes and take 32 at 8-deep steps.
CLASS_TILE_IEEE = dict(BLOCK_N=32, BLOCK_K=8, num_warps=8, num_stages=2)
CLASS_TILE_TF32 = dict(BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=2)
CLASS_TILE_HALF = dict(BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=3)


def batch_tile(B: int) -> int:
    """BLOCK_B of ce_class_tile_kernel for a batch of B rows (BATCH_TILES)."""
    return min(BATCH_TILES[-1], max(BATCH_TILES[0], triton.next_power_of_2(B)))


@triton.jit
def ce_class_tile_kernel(f_ptr, sf_b, sf_d, t_ptr, st_k, st_d, x_ptr, sx_k, sx_d, alpha, scale, eps,
                         y_ptr, rf_ptr, ru_ptr, pmax_ptr, psum_ptr, ptgt_ptr, lse_ptr, w_ptr, g_ptr, sg_b, sg_k,
                         gdot_ptr, NKB, NBB, B, K, D,
                         GRAD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """The cross-entropy partials of one class tile against a whole batch tile (all of B when B <= 256), in
    one pass over D that also gives both inverse norms:

        acc[b, k] = sum_d f[b, d] u[d, k],  u = t^T + alpha x^T   (the dot on un-normalised rows)
        ||f_b||^2 = sum_d f[b, d]^2,  ||u_k||^2 = sum_d u[d, k]^2   (from the tiles the dot already holds)
        logit[b, k] = s acc[b, k] / (max(||f_b||, eps) max(||u_k||, eps))

    then per (row, class tile) the max logit, sum exp(logit - max) and the target logit if it falls here
    (the launcher combines these B x NKB partials into the log-sum-exp: no B x K logits exist). Why: each
    class tile's rows of t and x are read once per batch tile (once in all when B <= 256) instead of once
    per 64-row tile, and no separate norm pass reads them again; f (B x D, small) is what is re-read, once
    per class tile. rf (from the first class tile's blocks) and ru (from the first
    batch tile's) are written for the backward. Program order: batch tiles fastest, so the programs that run
    together share one class tile of t and x. 1-D grid of NBB x NKB programs.

    GRAD (the backward's recompute, one class chunk): instead of the partials, the softmax gradient
    G[b, k] = w[b] (exp(logit[b, k] - lse[b]) - [k == y[b]]) into g. The logits come from the same code at the
    same tiles as the forward's, bit for bit, so each row of exp(logit - lse) sums to 1 as the forward's
    log-sum-exp says (a recompute in another tiling rounds differently: with one class, G would be
    exp(delta) - 1 != 0). It also writes gdot[pid_b, k] = sum_b G[b, k] logit[b, k] over its batch tile: the
    sum over all of them is <uhat_k, d uhat_k> (logit = s <fhat_b, uhat_k>, d uhat_k = s sum_b G[b, k]
    fhat_b), which lets norm_grad_kernel fold the normalisation backward into its matmul's epilogue."""
    pid = tl.program_id(0)
    pid_b = pid % NBB
    pid_k = pid // NBB
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    b_ok = offs_b < B
    k_ok = offs_k < K
    offs_b64 = offs_b.to(tl.int64)
    offs_k64 = offs_k.to(tl.int64)
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    fsq = tl.zeros((BLOCK_B,), dtype=tl.float32)
    usq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        offs_d = d0 + tl.arange(0, BLOCK_K)
        d_ok = offs_d < D
        offs_d64 = offs_d.to(tl.int64)
        f = tl.load(f_ptr + offs_b64[:, None] * sf_b + offs_d64[None, :] * sf_d,
                    mask=b_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        um = d_ok[:, None] & k_ok[None, :]
        u = tl.load(t_ptr + offs_d64[:, None] * st_d + offs_k64[None, :] * st_k, mask=um, other=0.0).to(tl.float32)
        u += alpha * tl.load(x_ptr + offs_d64[:, None] * sx_d + offs_k64[None, :] * sx_k, mask=um,
                             other=0.0).to(tl.float32)
        fsq += tl.sum(f * f, axis=1)
        usq += tl.sum(u * u, axis=0)
        if DOT_DTYPE == tl.float32:
            acc = tl.dot(f, u, acc, input_precision=PRECISION)
        else:
            acc = tl.dot(f.to(DOT_DTYPE), u.to(DOT_DTYPE), acc)
    rf = 1.0 / tl.maximum(tl.sqrt(fsq), eps)
    ru = 1.0 / tl.maximum(tl.sqrt(usq), eps)
    lg = acc * (scale * rf)[:, None] * ru[None, :]
    y = tl.load(y_ptr + offs_b, mask=b_ok, other=-1)
    if GRAD:
        lse = tl.load(lse_ptr + offs_b, mask=b_ok, other=0.0)
        w = tl.load(w_ptr + offs_b, mask=b_ok, other=0.0)
        g = (tl.exp(lg - lse[:, None]) - tl.where(offs_k[None, :] == y[:, None], 1.0, 0.0)) * w[:, None]
        tl.store(g_ptr + offs_b64[:, None] * sg_b + offs_k64[None, :] * sg_k, g, mask=b_ok[:, None] & k_ok[None, :])
        # padding rows: w = 0, so g = 0 (their logits are 0: a zero row of f times 1 / eps)
        tl.store(gdot_ptr + pid_b.to(tl.int64) * K + offs_k64, tl.sum(g * lg, axis=0), mask=k_ok)
    else:
        lg = tl.where(k_ok[None, :], lg, float("-inf"))
        mx = tl.max(lg, axis=1)
        sm = tl.sum(tl.exp(lg - mx[:, None]), axis=1)
        tg = tl.sum(tl.where(offs_k[None, :] == y[:, None], lg, 0.0), axis=1)
        o = offs_b64 * NKB + pid_k
        tl.store(pmax_ptr + o, mx, mask=b_ok)
        tl.store(psum_ptr + o, sm, mask=b_ok)
        tl.store(ptgt_ptr + o, tg, mask=b_ok)
        tl.store(rf_ptr + offs_b, rf, mask=b_ok & (pid_k == 0))
        tl.store(ru_ptr + offs_k, ru, mask=k_ok & (pid_b == 0))


declare(ce_class_tile_kernel, {"alpha": "fp32", "scale": "fp32", "eps": "fp32"}, tensor_cores=True)


@triton.jit
def lse_combine_kernel(pmax_ptr, psum_ptr, ptgt_ptr, lse_ptr, tgt_ptr, B, NKB,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per row b, from ce_class_tile_kernel's partials [B, NKB] (row-major):
    lse[b] = M + log(sum_j psum[b, j] exp(pmax[b, j] - M)), M = max_j pmax[b, j], and tgt[b] = sum_j ptgt[b, j],
    with a running max over column chunks (one launch instead of the eight torch kernels of the same sums)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < B
    row = offs_r.to(tl.int64) * NKB
    m = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    ssum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    tgt = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, NKB, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        ok = r_ok[:, None] & (offs_c < NKB)[None, :]
        o = row[:, None] + offs_c[None, :]
        # every class tile holds a class, so a row's partial maxima are finite; padding columns are -inf
        # (exp gives 0) and padding rows 0 (no inf - inf)
        pm = tl.where(r_ok[:, None], tl.load(pmax_ptr + o, mask=ok, other=float("-inf")), 0.0)
        m_new = tl.maximum(m, tl.max(pm, axis=1))
        scaled = tl.load(psum_ptr + o, mask=ok, other=0.0) * tl.exp(pm - m_new[:, None])
        ssum = ssum * tl.exp(m - m_new) + tl.sum(scaled, axis=1)
        m = m_new
        tgt += tl.sum(tl.load(ptgt_ptr + o, mask=ok, other=0.0), axis=1)
    # a row's sum is >= 1 (each partial counts its own max as exp(0)); padding rows take log(1)
    tl.store(lse_ptr + offs_r, m + tl.log(tl.where(r_ok, ssum, 1.0)), mask=r_ok)
    tl.store(tgt_ptr + offs_r, tgt, mask=r_ok)


declare(lse_combine_kernel)
#: rows x partial columns per step of lse_combine_kernel
COMBINE_BLOCK = dict(BLOCK_R=16, BLOCK_C=128, num_warps=4)


@triton.jit
def norm_grad_kernel(g_ptr, sg_b, sg_k, f_ptr, sf_b, sf_d, rf_ptr, t_ptr, st_k, st_d, x_ptr, sx_k, sx_d, alpha,
                     ru_ptr, gdot_ptr, scale, dt_ptr, sdt_k, dx_ptr, sdx_k, NBB, B, K, D,
                     HAS_DT: tl.constexpr, HAS_DX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """d t / d x of one (class tile, D tile), the normalisation backward in the matmul's epilogue:

        d uhat[k, d] = s sum_b G[b, k] f[b, d] rf[b]          (the tile's matmul, over the batch)
        d u[k, d]    = (d uhat[k, d] - uhat[k, d] dot[k]) ru[k],  uhat = (t + alpha x) ru,
        dot[k]       = <uhat_k, d uhat_k> = sum_i gdot[i, k]  (ce_class_tile_kernel's sums of G * logit)
        d t = d u,  d x = alpha d u

    Why: <uhat_k, d uhat_k> needs all of D, which one tile does not have; from gdot it is known before the
    matmul, so no fp32 K x D scratch is written and read twice (the two-pass norm_backward_kernel), and t
    and x are read once. 1-D grid (tile_grid) over cdiv(K, BLOCK_M) x cdiv(D, BLOCK_N) tiles."""
    pid_k, pid_d = tile_ids(tl.program_id(0), K, D, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = pid_k * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = offs_k < K
    # A = G^T [K, B] (strides swapped), B operand = f [B, D] scaled by rf per batch row (k-scale)
    acc = mm_tile(g_ptr, sg_k, sg_b, f_ptr, sf_b, sf_d, f_ptr, 0, 0, 0.0, rf_ptr, f_ptr, 0, 0, 0.0,
                  offs_k, offs_d, K, D, B, False, True, False, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION)
    dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for i in range(0, NBB):
        dot += tl.load(gdot_ptr + i * K + offs_k, mask=k_ok, other=0.0)
    ru = tl.load(ru_ptr + offs_k, mask=k_ok, other=0.0)
    k64 = offs_k.to(tl.int64)
    d64 = offs_d.to(tl.int64)
    m = k_ok[:, None] & (offs_d < D)[None, :]
    u = tl.load(t_ptr + k64[:, None] * st_k + d64[None, :] * st_d, mask=m, other=0.0).to(tl.float32)
    u += alpha * tl.load(x_ptr + k64[:, None] * sx_k + d64[None, :] * sx_d, mask=m, other=0.0).to(tl.float32)
    du = (scale * acc - u * (ru * dot)[:, None]) * ru[:, None]
    if HAS_DT:
        tl.store(dt_ptr + k64[:, None] * sdt_k + d64[None, :], du.to(dt_ptr.dtype.element_ty), mask=m)
    if HAS_DX:
        tl.store(dx_ptr + k64[:, None] * sdx_k + d64[None, :], (alpha * du).to(dx_ptr.dtype.element_ty), mask=m)


declare(norm_grad_kernel, {"alpha": "fp32", "scale": "fp32"}, tensor_cores=True)


def class_tile_config(dot, precision: str) -> dict:
    """BLOCK_N, BLOCK_K and launch options of ce_class_tile_kernel for this dot dtype and precision."""
    if dot != tl.float32:
        return dict(CLASS_TILE_HALF)
    return dict(CLASS_TILE_TF32 if precision == "tf32" else CLASS_TILE_IEEE)


def class_tile_variant(d: torch.dtype, block_b: int, precision: str, grad: bool, spec=None, label="") -> Variant:
    """The ce_class_tile_kernel launch for inputs of dtype ``d`` (its GPU dot dtype), BLOCK_B, precision and
    GRAD."""
    dot = gpu_dot_dtype(d)
    cfg = class_tile_config(dot, precision)
    opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
    return Variant(ce_class_tile_kernel, {"GRAD": grad, **cfg, "BLOCK_B": block_b, "DOT_DTYPE": dot,
                                          "PRECISION": precision},
                   opts, {"f_ptr": d, "t_ptr": d, "x_ptr": d, "y_ptr": torch.int64}, spec, label)


def norm_grad_variant(d: torch.dtype, dot, precision: str, has_dt: bool, has_dx: bool, spec=None, label=""):
    """The norm_grad_kernel launch for inputs of dtype ``d`` whose matmul runs in ``dot`` (grad_dot_dtype)."""
    tile, opts = tile_constexprs(dot, {"HAS_DT": has_dt, "HAS_DX": has_dx}, precision=precision)
    return Variant(norm_grad_kernel, tile, opts, {"f_ptr": d, "t_ptr": d, "x_ptr": d, "dt_ptr": d, "dx_ptr": d},
                   spec, label)


def dfhat_config(B: int, dot, precision: str) -> dict:
    """Tiles of the d fhat += s G uhat matmul ([B, D], over a chunk's classes): batch tiles of up to 256 rows
    (batch_tile) by the class-tile kernel's column tile and depth step, so G [B, chunk] is read once per
    column tile of D and t, x once per batch tile (at the default 64 x 32 tiles: 32 and 4 times at D = 1024,
    B = 256, the backward's largest L2 traffic in fastvlm.aot's model). With 64-wide columns (TF32,
    fp16/bf16) 256 rows spill on sm_80/sm_90a (unspecialised, 8 or 16 warps), so those take 128."""
    cfg = class_tile_config(dot, precision)
    return {"BLOCK_M": min(batch_tile(B), 128 if cfg["BLOCK_N"] > 32 else 256), **cfg}


def class_tile_counts(f, t, x) -> tuple:
    """(class tiles NKB, batch tiles NBB) of ce_class_tile_kernel's launch on these inputs: the sizes of its
    partials [B, NKB] and of its G * logit sums [NBB, K]."""
    cfg = class_tile_config(dot_dtype(f, t, x), dot_precision(dot_dtype(f, t, x)))
    return triton.cdiv(t.shape[0], cfg["BLOCK_N"]), triton.cdiv(f.shape[0], batch_tile(f.shape[0]))


def class_tiles(f, t, x, alpha, scale, target, *, rf=None, ru=None, partials=None, grad=None):
    """Launch ce_class_tile_kernel: the loss partials (``partials`` = (pmax, psum, ptgt) [B, NKB], writing rf
    [B] and ru [K]) or, with ``grad`` = (lse, w, g [B, K], gdot [NBB, K]), the softmax gradient G into g and
    its per-batch-tile sums of G * logit into gdot (NKB, NBB: class_tile_counts)."""
    B, D = f.shape
    K = t.shape[0]
    dot = dot_dtype(f, t, x)
    precision = dot_precision(dot)
    cfg = class_tile_config(dot, precision)
    nkb, nbb = class_tile_counts(f, t, x)
    # the other mode's pointers get an fp32 buffer of this launch (unused), so every launch of one mode and
    # dtype is one compiled specialisation, the one variants() lists (fp32 where it names no dtype)
    lse, w, g, gdot = grad if grad is not None else (partials[0],) * 4
    pmax, psum, ptgt = partials if partials is not None else (g, g, g)
    rf, ru = (g, g) if rf is None else (rf, ru)
    class_tile = ce_class_tile_kernel[tile_grid(nbb, nkb, 1, 1)]
    class_tile(f, f.stride(0), f.stride(1), t, t.stride(0), t.stride(1), x, x.stride(0), x.stride(1),
               float(alpha), float(scale), EPS, target, rf, ru, pmax, psum, ptgt, lse, w, g, g.stride(0), g.stride(1),
               gdot, nkb, nbb, B, K, D, GRAD=grad is not None, BLOCK_B=batch_tile(B), DOT_DTYPE=dot,
               PRECISION=precision, **cfg)


@triton.jit
def norm_backward_kernel(dv_ptr, sdv_r, a_ptr, sa_r, sa_c, b_ptr, sb_r, sb_c, beta, r_ptr,
                         o1_ptr, so1_r, o1_scale, o2_ptr, so2_r, o2_scale, R, C,
                         HAS_B: tl.constexpr, HAS_O1: tl.constexpr, HAS_O2: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """d v = (d vhat - vhat * <vhat, d vhat>) * r with vhat = (a + beta*b) * r; written scaled to o1 and o2."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    offs_r64 = offs_r.to(tl.int64)
    r = tl.load(r_ptr + offs_r, mask=r_ok, other=0.0)
    dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):  # pass 1: <vhat, d vhat>
        offs_c = c0 + tl.arange(0, BLOCK_C)
        m = r_ok[:, None] & (offs_c < C)[None, :]
        v = _row_tile(a_ptr, sa_r, sa_c, b_ptr, sb_r, sb_c, beta, offs_r64, offs_c, m, HAS_B)
        dv = tl.load(dv_ptr + (offs_r64[:, None] * sdv_r + offs_c[None, :]), mask=m, other=0.0)
        dot += tl.sum(v * dv, axis=1)
    dot = dot * r
    for c0 in range(0, C, BLOCK_C):  # pass 2: write
        offs_c = c0 + tl.arange(0, BLOCK_C)
        m = r_ok[:, None] & (offs_c < C)[None, :]
        v = _row_tile(a_ptr, sa_r, sa_c, b_ptr, sb_r, sb_c, beta, offs_r64, offs_c, m, HAS_B)
        dv = tl.load(dv_ptr + (offs_r64[:, None] * sdv_r + offs_c[None, :]), mask=m, other=0.0)
        g = (dv - v * (r * dot)[:, None]) * r[:, None]
        if HAS_O1:
            tl.store(o1_ptr + (offs_r64[:, None] * so1_r + offs_c[None, :]), (g * o1_scale).to(o1_ptr.dtype.element_ty), mask=m)
        if HAS_O2:
            tl.store(o2_ptr + (offs_r64[:, None] * so2_r + offs_c[None, :]), (g * o2_scale).to(o2_ptr.dtype.element_ty), mask=m)


declare(norm_backward_kernel, {"beta": "fp32", "o1_scale": "fp32", "o2_scale": "fp32"})


# ---------------------------------------------------------------------------------------------------------
# launchers: the primitives fastvlm/ops/residual.py drives (the torch twins live there, TorchPath)
# ---------------------------------------------------------------------------------------------------------


def inv_norm(a, b=None, beta=0.0):
    R, C = a.shape
    out = torch.empty(R, device=a.device, dtype=torch.float32)
    b_ = a if b is None else b
    cfg = ROW_BLOCK
    inv_norm_kernel[(triton.cdiv(R, cfg["BLOCK_R"]),)](
        a, a.stride(0), a.stride(1), b_, b_.stride(0), b_.stride(1), float(beta), out, R, C, EPS,
        HAS_B=b is not None, **cfg)
    return out


def _tile_args(f, t, x, alpha, rf, ru, scale):
    return (f, f.stride(0), f.stride(1), t, t.stride(0), t.stride(1), x, x.stride(0), x.stride(1),
            float(alpha), rf, ru, float(scale))


def logits_config(B: int, dot, precision: str) -> dict:
    """Tiles of logits_kernel ([B, K] over D): dfhat_config's batch tiles (up to 256 rows at IEEE fp32, 128
    at TF32 and fp16/bf16) by the class-tile kernel's column tile and depth step, so t and x (the B side,
    K x D each) are re-read from L2 once per batch tile: once at B <= 128 (256 at IEEE fp32), twice at
    B = 256 at TF32, where the 64-row default tiles re-read them 4 times (fastvlm.aot models 208 -> 137 us at
    TF32, B = 256, K = 21843, D = 1024; the composition 176 us)."""
    return dfhat_config(B, dot, precision)


def forward(features, base, residual, alpha, scale, target=None, out_dtype=None):
    """(rf, ru, logits) when target is None, else (rf, ru, (lse, target logit)): no B x K tensor for the loss.
    Inside: f = features, t = base, x = residual, as the kernels' pointer names."""
    f, t, x = features, base, residual
    B, D = f.shape
    K = t.shape[0]
    if target is None:
        rf, ru = inv_norm(f), inv_norm(t, x, alpha)
        dot = dot_dtype(f, t, x)
        cfg = {**logits_config(B, dot, dot_precision(dot)), "DOT_DTYPE": dot, "PRECISION": dot_precision(dot)}
        grid = tile_grid(B, K, cfg["BLOCK_M"], cfg["BLOCK_N"])
        out = torch.empty(B, K, device=f.device, dtype=out_dtype)
        logits_kernel[grid](*_tile_args(f, t, x, alpha, rf, ru, scale), out, out.stride(0), out.stride(1),
                            B, K, D, **cfg)
        return rf, ru, out
    # the loss: one launch of class tiles x whole batch tiles, the norms accumulated in its loop
    nkb = class_tile_counts(f, t, x)[0]
    rf = torch.empty(B, device=f.device, dtype=torch.float32)
    ru = torch.empty(K, device=f.device, dtype=torch.float32)
    pmax = torch.empty(B, nkb, device=f.device, dtype=torch.float32)
    psum, ptgt = torch.empty_like(pmax), torch.empty_like(pmax)
    class_tiles(f, t, x, alpha, scale, target, rf=rf, ru=ru, partials=(pmax, psum, ptgt))
    # combine the per-tile partials: B x cdiv(K, BLOCK_N) floats, never B x K
    lse, tgt = torch.empty_like(rf), torch.empty_like(rf)
    cfg = COMBINE_BLOCK
    lse_combine_kernel[(triton.cdiv(B, cfg["BLOCK_R"]),)](pmax, psum, ptgt, lse, tgt, B, nkb, **cfg)
    return rf, ru, (lse, tgt)


#: a backward class chunk on the Triton path holds chunk x max(B, D) <= 2^23 elements, four times the torch
#: path's budget: its one buffer is the softmax gradient G (B x chunk fp32, at most 32 MB; 8 MB at B = 256,
#: D = 1024, K = 21843, where t and x are 179 MB), and each chunk costs three launches whose matmuls re-read
#: G per tile: 3 chunks instead of 11 there (fastvlm.aot models 308 vs 384 us at TF32, all inputs trained).
BACKWARD_CHUNK_ELEMENTS = 1 << 23


def backward_chunk_classes(B: int, D: int, K: int) -> int:
    """Classes per backward chunk on the Triton path (BACKWARD_CHUNK_ELEMENTS over max(B, D), as the torch
    path's class_chunk)."""
    return max(1, min(K, BACKWARD_CHUNK_ELEMENTS // max(B, D, 1)))


def backward_prologue(features, rf, scale):
    return None  # the kernels scale the features by rf on the fly


def grad_dot_dtype(*tensors):
    """The dot dtype of the backward's two matmuls whose A operand is the fp32 softmax gradient G. bf16
    inputs: bf16 dots (bf16 has fp32's exponent range). fp16 inputs: fp32 dots, because G's entries are
    w_b (p - onehot) ~ p / B, 1e-7 at B = 256, which fp16 (smallest normal 6.1e-5, smallest subnormal
    6e-8) holds with a few bits or flushes to zero. Those fp32 dots take TF32 inputs (``grad_precision``):
    TF32 keeps fp16's 10-bit mantissa with fp32's range, so the fp16 operand loses nothing and G is rounded
    as much as an fp16 cast would round it, without the underflow. The accumulators and scratch stay fp32; only
    the gradients written out are fp16, where values below 6.1e-5 keep fewer than fp16's 11 significant
    bits and values below 6e-8 are zero."""
    dot = dot_dtype(*tensors)
    return tl.float32 if dot == tl.float16 else dot


def grad_precision(dot, *tensors) -> str:
    """PRECISION of those matmuls: TF32 for fp16 inputs (see grad_dot_dtype), else dot_precision."""
    return "tf32" if {t.dtype for t in tensors} == {torch.float16} else dot_precision(dot)


def backward_chunk(rows, chunk, g, ce):
    """One class chunk (``rows``, ``chunk``: fastvlm.ops.residual's Rows and ClassChunk) into chunk.dbase /
    chunk.dresidual and rows.dfhat += s G uhat_c. The cross-entropy (g is None): G recomputed with its sums
    of G * logit, then d t / d x by norm_grad_kernel (the norm backward in the matmul's epilogue). An
    upstream g (residual_logits): d uhat = s G^T fhat into a chunk scratch, then its normalisation
    backward."""
    f, rf, alpha, scale, dfhat = rows.features, rows.rf, rows.alpha, rows.scale, rows.dfhat
    tc, xc, ruc, dt_c, dx_c = chunk.base, chunk.residual, chunk.ru, chunk.dbase, chunk.dresidual
    B, D = f.shape
    Kc = tc.shape[0]
    dot = grad_dot_dtype(f, tc, xc)
    precision = grad_precision(dot, f, tc, xc)
    if g is None:  # recomputed by the forward's own class tiles (bit for bit its logits)
        tgt, lse, w = ce
        g = torch.empty(B, Kc, device=f.device, dtype=torch.float32)
        gdot = torch.empty(class_tile_counts(f, tc, xc)[1], Kc, device=f.device, dtype=torch.float32)
        class_tiles(f, tc, xc, alpha, scale, tgt, grad=(lse, w, g, gdot))
        if dt_c is not None or dx_c is not None:  # the norm backward folded into the d uhat matmul
            cfg = mm_config(dot)
            dt_, dx_ = (dt_c if dt_c is not None else dx_c), (dx_c if dx_c is not None else dt_c)
            norm_grad_kernel[tile_grid(Kc, D, cfg["BLOCK_M"], cfg["BLOCK_N"])](
                g, g.stride(0), g.stride(1), f, f.stride(0), f.stride(1), rf, tc, tc.stride(0), tc.stride(1),
                xc, xc.stride(0), xc.stride(1), float(alpha), ruc, gdot, float(scale), dt_, dt_.stride(0),
                dx_, dx_.stride(0), gdot.shape[0], B, Kc, D, HAS_DT=dt_c is not None, HAS_DX=dx_c is not None,
                DOT_DTYPE=dot, PRECISION=precision, **cfg)
    elif dt_c is not None or dx_c is not None:  # an upstream gradient (residual_logits): no logits to sum
        duh = torch.empty(Kc, D, device=f.device, dtype=torch.float32)
        matmul(g.t(), f, duh, alpha=scale, kscale=rf, dot=dot, precision=precision)
        _norm_backward(duh, tc, ruc, b=xc, beta=alpha, out1=dt_c, scale1=1.0, out2=dx_c, scale2=alpha)
    if dfhat is not None:
        matmul(g, tc, dfhat, alpha=scale, b2=xc, beta=alpha, kscale=ruc, accumulate=True, dot=dot,
               precision=precision, config=dfhat_config(B, dot, precision))


def norm_backward(dvhat, a, r, out):
    _norm_backward(dvhat, a, r, out1=out)


def _norm_backward(dvhat, a, r, b=None, beta=0.0, out1=None, scale1=1.0, out2=None, scale2=1.0):
    R, C = a.shape
    b_ = a if b is None else b
    o1 = dvhat if out1 is None else out1
    o2 = dvhat if out2 is None else out2
    cfg = ROW_BLOCK
    norm_backward_kernel[(triton.cdiv(R, cfg["BLOCK_R"]),)](
        dvhat, dvhat.stride(0), a, a.stride(0), a.stride(1), b_, b_.stride(0), b_.stride(1), float(beta), r,
        o1, o1.stride(0), float(scale1), o2, o2.stride(0), float(scale2), R, C,
        HAS_B=b is not None, HAS_O1=out1 is not None, HAS_O2=out2 is not None, **cfg)


def variants():
    """Every configuration the launchers above can choose (compiled ahead of time by `fastvlm kernels`)."""
    f32, i64 = torch.float32, torch.int64
    out = []
    mm_flags = dict(HAS_BMASK=False, HAS_BIAS=False)
    grad_mm = [  # grad_u_hat: G^T (fp32) @ f ; grad_f_hat_acc: G @ (t + alpha x)
        ({**mm_flags, "HAS_B2": False, "HAS_KSCALE": True, "ACCUMULATE": False},
         lambda d: {"b_ptr": d, "b2_ptr": d, "mk_ptr": d}, gpu_dot_dtype),
        ({**mm_flags, "HAS_B2": True, "HAS_KSCALE": True, "ACCUMULATE": True},
         lambda d: {"b_ptr": d, "b2_ptr": d, "mk_ptr": d}, gpu_dot_dtype),
    ]
    out += matmul_variants(grad_mm[:1], (f32, torch.bfloat16))
    for flags, ptrs, _ in grad_mm[:1]:  # fp16 inputs: fp32 dots on TF32 inputs (grad_dot_dtype)
        out.append(Variant(matmul_kernel, *tile_constexprs(tl.float32, flags, precision="tf32"),
                           ptrs=ptrs(torch.float16)))
    dfhat_flags, dfhat_ptrs, _ = grad_mm[1]  # d fhat: dfhat_config's tiles, whole batch tiles
    for d, dot, precs in ((f32, tl.float32, ("ieee", "tf32")), (torch.bfloat16, tl.bfloat16, ("ieee",)),
                          (torch.float16, tl.float32, ("tf32",))):
        for prec in precs:
            for block_b in sorted({dfhat_config(b, dot, prec)["BLOCK_M"] for b in BATCH_TILES}):
                cfg = dfhat_config(block_b, dot, prec)
                opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
                out.append(Variant(matmul_kernel, {**dfhat_flags, **cfg, "DOT_DTYPE": dot, "PRECISION": prec}, opts,
                                   ptrs=dfhat_ptrs(d)))
    for d, dot, precs in ((f32, tl.float32, ("ieee", "tf32")), (torch.bfloat16, tl.bfloat16, ("ieee",)),
                          (torch.float16, tl.float32, ("tf32",))):  # fp16: fp32 dots on TF32 (grad_dot_dtype)
        for prec in precs:
            for has_dt, has_dx in ((True, True), (True, False), (False, True)):
                out.append(norm_grad_variant(d, dot, prec, has_dt, has_dx))
    out.append(Variant(lse_combine_kernel, {k: COMBINE_BLOCK[k] for k in ("BLOCK_R", "BLOCK_C")},
                       {"num_warps": COMBINE_BLOCK["num_warps"]}))
    rows = {"BLOCK_R": ROW_BLOCK["BLOCK_R"], "BLOCK_C": ROW_BLOCK["BLOCK_C"]}
    row_opts = {"num_warps": ROW_BLOCK["num_warps"]}
    for d in HALF_AND_FULL:
        io = {"f_ptr": d, "t_ptr": d, "x_ptr": d}
        for has_b in (False, True):
            out.append(Variant(inv_norm_kernel, {"HAS_B": has_b, **rows}, row_opts, {"a_ptr": d, "b_ptr": d}))
        for prec in precisions(gpu_dot_dtype(d)):
            for block_b in sorted({logits_config(b, gpu_dot_dtype(d), prec)["BLOCK_M"] for b in BATCH_TILES}):
                cfg = logits_config(block_b, gpu_dot_dtype(d), prec)
                opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
                out.append(Variant(logits_kernel, {**cfg, "DOT_DTYPE": gpu_dot_dtype(d), "PRECISION": prec}, opts,
                                   {**io, "out_ptr": d}))
            out += [class_tile_variant(d, block_b, prec, grad) for block_b in BATCH_TILES for grad in (False, True)]
        for has_b, o1, o2 in ((False, True, False), (True, True, True), (True, True, False), (True, False, True)):
            out.append(Variant(norm_backward_kernel, {"HAS_B": has_b, "HAS_O1": o1, "HAS_O2": o2, **rows}, row_opts,
                               {"dv_ptr": f32, "a_ptr": d, "b_ptr": d, "o1_ptr": d, "o2_ptr": d}))
    return out
