"""Triton kernels for RMT mask tuning (formula and reference: fastvlm/ops/masked.py).

    forward:  y  = x @ (W * [S > tau]).T + b        (the mask applied as W's tiles load: no masked copy)
    backward: dx = dy @ (W * [S > tau])
              dS = (dy.T @ x) * W, then gradient dropout against ref_grad in the same kernel's epilogue
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (GROUP_M, HALF_AND_FULL, Variant, declare, dot_dtype, dot_precision, fused, gpu_dot_dtype,
                      matmul, matmul_variants, mm_config, mm_tile, precisions, tile_constexprs, tile_grid, tile_ids)

DROP_BLOCK = dict(BLOCK=1024, num_warps=4)


@triton.jit
def dropout_keep_scale(ga, gb, u, ratio):
    """((1 - ratio) + ratio * [P > u]) with P = 0.5 (1 + sign(ga) (ga + gb) / (|ga| + |gb| + 1e-8)), all in fp32:
    ratio is rounded to fp32 and 1 - ratio taken in fp32, as on the torch path (fastvlm/ops/philox.py)."""
    r = tl.cast(ratio, tl.float32)  # a no-op for the compiled kernel's fp32 argument; the interpreter passes
    # a Python float, whose 1 - ratio it would otherwise take in fp64 before rounding
    sgn = tl.where(ga > 0, 1.0, tl.where(ga < 0, -1.0, 0.0))
    q = tl.math.div_rn(ga + gb, tl.abs(ga) + tl.abs(gb) + 1e-8)  # IEEE division: same bits as torch
    p = 0.5 * (1.0 + sgn * q)
    return (1.0 - r) + r * tl.where(p > u, 1.0, 0.0)


@triton.jit
def score_grad_kernel(dy_ptr, sdy_m, sdy_n, x_ptr, sx_m, sx_k, w_ptr, sw_n, sw_k, ref_ptr, sr_n, sr_k,
                      s_ptr, ss_n, ss_k, add_scale, out_ptr, so_n, so_k, ratio, seed, N, K, M,
                      DROPOUT: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr,
                      BLOCK_TOKENS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """dS[n, k] = (sum_m dy[m, n] x[m, k]) * W[n, k] (+ add_scale * S[n, k]), dropped against ref[n, k]
    with U(seed, n*K + k). out may be ref itself: each element is read before it is written. A tile is
    BLOCK_OUT output features (rows of dS) x BLOCK_IN input features, reduced over the M tokens
    BLOCK_TOKENS at a time."""
    pid_n, pid_k = tile_ids(tl.program_id(0), N, K, BLOCK_OUT, BLOCK_IN, GROUP_M)
    offs_n = pid_n * BLOCK_OUT + tl.arange(0, BLOCK_OUT)  # rows of dS
    offs_k = pid_k * BLOCK_IN + tl.arange(0, BLOCK_IN)  # cols of dS
    acc = mm_tile(dy_ptr, sdy_n, sdy_m, x_ptr, sx_m, sx_k, x_ptr, 0, 0, 0.0, x_ptr,
                  x_ptr, 0, 0, 0.0, offs_n, offs_k, N, K, M,
                  False, False, False, BLOCK_OUT, BLOCK_IN, BLOCK_TOKENS, DOT_DTYPE, PRECISION)
    # the epilogue in two sub-tiles of BLOCK_IN / 2 columns (the even and the odd ones): the Philox dropout
    # of a whole 64 x 64 tile took 167 registers at 8 warps (one block per SM) and spilled at 4; in halves,
    # 114 registers at 8 warps (two blocks per SM; 222 at 4 warps, no spill) on sm_90a. Same elements, same
    # offsets into the random stream: the result is bit for bit the same.
    HALF: tl.constexpr = BLOCK_IN // 2
    acc_even, acc_odd = tl.split(tl.reshape(acc, (BLOCK_OUT, HALF, 2)))
    cols = pid_k * BLOCK_IN + 2 * tl.arange(0, HALF)
    _score_epilogue(acc_even, offs_n, cols, w_ptr, sw_n, sw_k, ref_ptr, sr_n, sr_k, s_ptr, ss_n, ss_k, add_scale,
                    out_ptr, so_n, so_k, ratio, seed, N, K, DROPOUT, HAS_ADD)
    _score_epilogue(acc_odd, offs_n, cols + 1, w_ptr, sw_n, sw_k, ref_ptr, sr_n, sr_k, s_ptr, ss_n, ss_k, add_scale,
                    out_ptr, so_n, so_k, ratio, seed, N, K, DROPOUT, HAS_ADD)


@triton.jit
def _score_epilogue(acc, offs_n, offs_k, w_ptr, sw_n, sw_k, ref_ptr, sr_n, sr_k, s_ptr, ss_n, ss_k, add_scale,
                    out_ptr, so_n, so_k, ratio, seed, N, K, DROPOUT: tl.constexpr, HAS_ADD: tl.constexpr):
    """dS for rows offs_n x columns offs_k of acc = (dy^T x) there: times W (+ add_scale * S), dropped
    against ref with U(seed, n*K + k), stored."""
    n64 = offs_n.to(tl.int64)
    k64 = offs_k.to(tl.int64)  # column offsets x strides reach 2^31 on transposed views
    m = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    w = tl.load(w_ptr + n64[:, None] * sw_n + k64[None, :] * sw_k, mask=m, other=0.0).to(tl.float32)
    g = acc * w
    if HAS_ADD:  # the gradient of c * ||S||_2 (add_scale = c / ||S||), so dropout sees all of g_a
        g += add_scale * tl.load(s_ptr + n64[:, None] * ss_n + k64[None, :] * ss_k, mask=m, other=0.0).to(tl.float32)
    if DROPOUT:
        gb = tl.load(ref_ptr + n64[:, None] * sr_n + k64[None, :] * sr_k, mask=m, other=0.0).to(tl.float32)
        u = tl.rand(seed, n64[:, None] * K + k64[None, :])
        g = g * dropout_keep_scale(g, gb, u, ratio)
    tl.store(out_ptr + n64[:, None] * so_n + k64[None, :] * so_k, g.to(out_ptr.dtype.element_ty), mask=m)


declare(score_grad_kernel, {"add_scale": "fp32", "ratio": "fp32", "seed": "i64"}, tensor_cores=True)


@triton.jit
def grad_dropout_kernel(ga_ptr, gb_ptr, out_ptr, ratio, seed, offset, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    ga = tl.load(ga_ptr + offs, mask=m, other=0.0).to(tl.float32)
    gb = tl.load(gb_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.rand(seed, offs + offset)
    g = ga * dropout_keep_scale(ga, gb, u, ratio)
    tl.store(out_ptr + offs, g.to(out_ptr.dtype.element_ty), mask=m)


declare(grad_dropout_kernel, {"ratio": "fp32", "seed": "i64", "offset": "i64"})


# ---------------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------------


def forward(x2, weight, scores, bias, threshold):
    """x2: [M, K] -> [M, N] = x2 @ (W * [S > tau]).T + bias."""
    M = x2.shape[0]
    N = weight.shape[0]
    out = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    return matmul(x2, weight.t(), out, scores=scores.t(), threshold=threshold, bias=bias)


def grad_input(dy2, weight, scores, threshold, dtype):
    out = torch.empty(dy2.shape[0], weight.shape[1], device=dy2.device, dtype=dtype)
    return matmul(dy2, weight, out, scores=scores, threshold=threshold)


def grad_scores(dy2, x2, weight, ref_grad, ratio, seed, dtype, scores=None, add_scale=0.0, out=None):
    """(dy2.T @ x2) * W (+ add_scale * scores), gradient-dropped against ref_grad when given; into ``out``
    (which may be ref_grad itself) or a new tensor."""
    N, K = weight.shape
    M = x2.shape[0]
    out = torch.empty(N, K, device=x2.device, dtype=dtype) if out is None else out
    dot = dot_dtype(dy2, x2)
    cfg = mm_config(dot, heavy_epilogue=ref_grad is not None)
    grid = tile_grid(N, K, cfg["BLOCK_M"], cfg["BLOCK_N"])
    ref = ref_grad if ref_grad is not None else weight
    score_grad_kernel[grid](dy2, dy2.stride(0), dy2.stride(1), x2, x2.stride(0), x2.stride(1),
                            weight, weight.stride(0), weight.stride(1), ref, ref.stride(0), ref.stride(1),
                            scores if scores is not None else weight, *(scores if scores is not None else weight).stride(),
                            float(add_scale), out, out.stride(0), out.stride(1), float(ratio), int(seed), N, K, M,
                            DROPOUT=ref_grad is not None, HAS_ADD=scores is not None, DOT_DTYPE=dot,
                            PRECISION=dot_precision(dot),
                            **score_grad_tile(cfg))
    return out


def score_grad_tile(cfg: dict) -> dict:
    """The tiled-matmul policy's (BLOCK_M, BLOCK_N, BLOCK_K) under score_grad_kernel's own names: dS's
    rows are the N output features, its columns the K input features, the reduction runs over tokens."""
    cfg = dict(cfg)
    return {"BLOCK_OUT": cfg.pop("BLOCK_M"), "BLOCK_IN": cfg.pop("BLOCK_N"), "BLOCK_TOKENS": cfg.pop("BLOCK_K"), **cfg}


def grad_dropout(g_task, g_ref, ratio, seed, offset):
    ga, gb = g_task.contiguous(), g_ref.contiguous()
    out = torch.empty_like(ga)
    n = ga.numel()
    cfg = DROP_BLOCK
    grad_dropout_kernel[(triton.cdiv(n, cfg["BLOCK"]),)](ga, gb, out, float(ratio), int(seed), int(offset), n, **cfg)
    return out


def variants():
    """Every configuration the launchers above can choose (scores, ref_grad and the score gradient in fp32,
    as the mask tuner keeps them; activations and weights in each dtype)."""
    f32 = torch.float32
    out = []
    base = dict(HAS_B2=False, HAS_KSCALE=False, HAS_BMASK=True, ACCUMULATE=False)
    out += matmul_variants([
        ({**base, "HAS_BIAS": True}, lambda d: {"a_ptr": d, "b_ptr": d, "b2_ptr": d, "bias_ptr": d, "c_ptr": d,
                                                "ks_ptr": d}, gpu_dot_dtype),  # forward with bias
        ({**base, "HAS_BIAS": False}, lambda d: {"a_ptr": d, "b_ptr": d, "b2_ptr": d, "bias_ptr": d, "c_ptr": d,
                                                 "ks_ptr": d}, gpu_dot_dtype),  # forward without / grad_input
    ])
    for d in HALF_AND_FULL:
        for dropout in (False, True):
            for has_add in (False, True):
                for prec in precisions(gpu_dot_dtype(d)):
                    tile, opts = tile_constexprs(gpu_dot_dtype(d), {"DROPOUT": dropout, "HAS_ADD": has_add},
                                                 heavy_epilogue=dropout, precision=prec)
                    out.append(Variant(score_grad_kernel, score_grad_tile(tile), opts,
                                       {"dy_ptr": d, "x_ptr": d, "w_ptr": d, "ref_ptr": f32, "s_ptr": f32,
                                        "out_ptr": f32}))
        out.append(Variant(grad_dropout_kernel, {"BLOCK": DROP_BLOCK["BLOCK"]}, {"num_warps": DROP_BLOCK["num_warps"]},
                           {"ga_ptr": d, "gb_ptr": d, "out_ptr": d}))
    return out
