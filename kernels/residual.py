"""Triton kernels for the TaskRes residual classifier (formula and reference: fastvlm/ops/residual.py).

    u = t + alpha * x            (K x D, never materialised: combined as tiles load)
    logits = s * (f * rf) @ (u * ru).T,   rf / ru = 1 / max(||row||, eps)

Kernels: row inverse norms, the logits tile (forward), the cross-entropy partials (online log-sum-exp per
class tile, so no B x K logits exist), the softmax-gradient chunk, and the normalisation backward.
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


@triton.jit
def ce_partial_kernel(f_ptr, sf_b, sf_d, t_ptr, st_k, st_d, x_ptr, sx_k, sx_d, alpha, rf_ptr, ru_ptr, scale,
                      y_ptr, pmax_ptr, psum_ptr, ptgt_ptr, NKB, B, K, D,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Per (row, class tile): max logit, sum exp(logit - max), and the target logit if it falls here."""
    pid_b, pid_k = tile_ids(tl.program_id(0), B, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_b = pid_b * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    lg = _logits_tile(f_ptr, sf_b, sf_d, t_ptr, st_k, st_d, x_ptr, sx_k, sx_d, alpha, rf_ptr, ru_ptr, scale,
                      offs_b, offs_k, B, K, D, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION)
    lg = tl.where((offs_k < K)[None, :], lg, float("-inf"))
    mx = tl.max(lg, axis=1)
    sm = tl.sum(tl.exp(lg - mx[:, None]), axis=1)
    y = tl.load(y_ptr + offs_b, mask=offs_b < B, other=-1)
    tg = tl.sum(tl.where(offs_k[None, :] == y[:, None], lg, 0.0), axis=1)
    o = offs_b.to(tl.int64) * NKB + pid_k
    b_ok = offs_b < B
    tl.store(pmax_ptr + o, mx, mask=b_ok)
    tl.store(psum_ptr + o, sm, mask=b_ok)
    tl.store(ptgt_ptr + o, tg, mask=b_ok)


declare(ce_partial_kernel, {"alpha": "fp32", "scale": "fp32"}, tensor_cores=True)


@triton.jit
def ce_grad_kernel(f_ptr, sf_b, sf_d, t_ptr, st_k, st_d, x_ptr, sx_k, sx_d, alpha, rf_ptr, ru_ptr, scale,
                   y_ptr, lse_ptr, w_ptr, g_ptr, sg_b, sg_k, B, K, D,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 PRECISION: tl.constexpr):
    """G[b, k] = w[b] * (softmax(logits)[b, k] - [k == y[b]]) for one chunk of classes (t, x, ru offset)."""
    pid_b, pid_k = tile_ids(tl.program_id(0), B, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_b = pid_b * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    lg = _logits_tile(f_ptr, sf_b, sf_d, t_ptr, st_k, st_d, x_ptr, sx_k, sx_d, alpha, rf_ptr, ru_ptr, scale,
                      offs_b, offs_k, B, K, D, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION)
    b_ok = offs_b < B
    lse = tl.load(lse_ptr + offs_b, mask=b_ok, other=0.0)
    w = tl.load(w_ptr + offs_b, mask=b_ok, other=0.0)
    y = tl.load(y_ptr + offs_b, mask=b_ok, other=-1)
    g = tl.exp(lg - lse[:, None]) - tl.where(offs_k[None, :] == y[:, None], 1.0, 0.0)
    g = g * w[:, None]
    m = b_ok[:, None] & (offs_k < K)[None, :]
    tl.store(g_ptr + offs_b.to(tl.int64)[:, None] * sg_b + offs_k.to(tl.int64)[None, :] * sg_k, g, mask=m)


declare(ce_grad_kernel, {"alpha": "fp32", "scale": "fp32"}, tensor_cores=True)


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


def _tile_cfg(f, t, x):
    return _tile_cfg_dot(dot_dtype(f, t, x))


def _tile_cfg_dot(dot):
    return {**mm_config(dot), "DOT_DTYPE": dot, "PRECISION": dot_precision(dot)}


def forward(features, base, residual, alpha, scale, target=None, out_dtype=None):
    """(rf, ru, logits) when target is None, else (rf, ru, (lse, target logit)): no B x K tensor for the loss.
    Inside: f = features, t = base, x = residual, as the kernels' pointer names."""
    f, t, x = features, base, residual
    B, D = f.shape
    K = t.shape[0]
    rf, ru = inv_norm(f), inv_norm(t, x, alpha)
    cfg = _tile_cfg(f, t, x)
    nkb = triton.cdiv(K, cfg["BLOCK_N"])
    grid = tile_grid(B, K, cfg["BLOCK_M"], cfg["BLOCK_N"])
    if target is None:
        out = torch.empty(B, K, device=f.device, dtype=out_dtype)
        logits_kernel[grid](*_tile_args(f, t, x, alpha, rf, ru, scale), out, out.stride(0), out.stride(1),
                            B, K, D, **cfg)
        return rf, ru, out
    pmax = torch.empty(B, nkb, device=f.device, dtype=torch.float32)
    psum, ptgt = torch.empty_like(pmax), torch.empty_like(pmax)
    ce_partial_kernel[grid](*_tile_args(f, t, x, alpha, rf, ru, scale), target, pmax, psum, ptgt, nkb, B, K, D, **cfg)
    # combine the per-tile partials: B x cdiv(K, BLOCK_N) floats, never B x K
    m = pmax.max(dim=1).values
    lse = m + torch.log((psum * torch.exp(pmax - m[:, None])).sum(dim=1))
    return rf, ru, (lse, ptgt.sum(dim=1))


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
    """One class chunk (``rows``, ``chunk``: fastvlm.ops.residual's Rows and ClassChunk): G (the recomputed
    softmax gradient when g is None), d uhat = s G^T fhat into a chunk scratch, its normalisation backward
    into chunk.dbase / chunk.dresidual, and rows.dfhat += s G uhat_c."""
    f, rf, alpha, scale, dfhat = rows.features, rows.rf, rows.alpha, rows.scale, rows.dfhat
    tc, xc, ruc, dt_c, dx_c = chunk.base, chunk.residual, chunk.ru, chunk.dbase, chunk.dresidual
    B, D = f.shape
    Kc = tc.shape[0]
    if g is None:
        tgt, lse, w = ce
        g = torch.empty(B, Kc, device=f.device, dtype=torch.float32)
        cfg = _tile_cfg(f, tc, xc)
        grid = tile_grid(B, Kc, cfg["BLOCK_M"], cfg["BLOCK_N"])
        ce_grad_kernel[grid](*_tile_args(f, tc, xc, alpha, rf, ruc, scale), tgt, lse, w, g, g.stride(0),
                             g.stride(1), B, Kc, D, **cfg)
    dot = grad_dot_dtype(f, tc, xc)
    if dt_c is not None or dx_c is not None:
        duh = torch.empty(Kc, D, device=f.device, dtype=torch.float32)
        matmul(g.t(), f, duh, alpha=scale, kscale=rf, dot=dot, precision=grad_precision(dot, f, tc, xc))
        _norm_backward(duh, tc, ruc, b=xc, beta=alpha, out1=dt_c, scale1=1.0, out2=dx_c, scale2=alpha)
    if dfhat is not None:
        matmul(g, tc, dfhat, alpha=scale, b2=xc, beta=alpha, kscale=ruc, accumulate=True, dot=dot,
               precision=grad_precision(dot, f, tc, xc))


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
    out += matmul_variants(grad_mm, (f32, torch.bfloat16))
    for flags, ptrs, _ in grad_mm:  # fp16 inputs: fp32 dots on TF32 inputs (grad_dot_dtype)
        out.append(Variant(matmul_kernel, *tile_constexprs(tl.float32, flags, precision="tf32"),
                           ptrs=ptrs(torch.float16)))
    rows = {"BLOCK_R": ROW_BLOCK["BLOCK_R"], "BLOCK_C": ROW_BLOCK["BLOCK_C"]}
    row_opts = {"num_warps": ROW_BLOCK["num_warps"]}
    for d in HALF_AND_FULL:
        io = {"f_ptr": d, "t_ptr": d, "x_ptr": d}
        for has_b in (False, True):
            out.append(Variant(inv_norm_kernel, {"HAS_B": has_b, **rows}, row_opts, {"a_ptr": d, "b_ptr": d}))
        for prec in precisions(gpu_dot_dtype(d)):
            tile, opts = tile_constexprs(gpu_dot_dtype(d), {}, precision=prec)
            out.append(Variant(logits_kernel, tile, opts, {**io, "out_ptr": d}))
            out.append(Variant(ce_partial_kernel, tile, opts, {**io, "y_ptr": i64}))
            out.append(Variant(ce_grad_kernel, tile, opts, {**io, "y_ptr": i64}))
        for has_b, o1, o2 in ((False, True, False), (True, True, True), (True, True, False), (True, False, True)):
            out.append(Variant(norm_backward_kernel, {"HAS_B": has_b, "HAS_O1": o1, "HAS_O2": o2, **rows}, row_opts,
                               {"dv_ptr": f32, "a_ptr": d, "b_ptr": d, "o1_ptr": d, "o2_ptr": d}))
    return out
