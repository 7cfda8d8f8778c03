"""Triton kernels for RMT mask tuning (formula and reference: fastvlm/ops/masked.py).

    forward:  y  = x @ (W * [S > tau]).T + b        (the mask applied as W's tiles load: no masked copy)
    backward: dx = dy @ (W * [S > tau])
              dS = (dy.T @ x) * W, then gradient dropout against ref_grad in the same kernel's epilogue;
              where dS's tiles are too few to fill the GPU, split-K over tokens: fp32 partials per split,
              then one pass summing them in a fixed order with the same epilogue (deterministic)
"""

from __future__ import annotations

import functools

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
def score_grad_partial_kernel(dy_ptr, sdy_m, sdy_n, x_ptr, sx_m, sx_k, part_ptr, N, K, M, CHUNK,
                              BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_TOKENS: tl.constexpr,
                              DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Split-K over tokens, first pass: part[s, n, k] = sum over tokens m in [s CHUNK, (s + 1) CHUNK) of
    dy[m, n] x[m, k] (fp32), for the (output, input) tile program_id(0) and the split program_id(1).
    score_grad_reduce_kernel sums the splits in order and applies score_grad_kernel's epilogue."""
    pid_n, pid_k = tile_ids(tl.program_id(0), N, K, BLOCK_OUT, BLOCK_IN, GROUP_M)
    split = tl.program_id(1).to(tl.int64)
    m0 = split * CHUNK
    m_len = tl.minimum(CHUNK, M - m0)
    offs_n = pid_n * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    offs_k = pid_k * BLOCK_IN + tl.arange(0, BLOCK_IN)
    dy0, x0 = dy_ptr + m0 * sdy_m, x_ptr + m0 * sx_m
    acc = mm_tile(dy0, sdy_n, sdy_m, x0, sx_m, sx_k, x0, 0, 0, 0.0, x0,
                  x0, 0, 0, 0.0, offs_n, offs_k, N, K, m_len,
                  False, False, False, BLOCK_OUT, BLOCK_IN, BLOCK_TOKENS, DOT_DTYPE, PRECISION)
    n64 = offs_n.to(tl.int64)
    k64 = offs_k.to(tl.int64)
    m = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    tl.store(part_ptr + split * N * K + n64[:, None] * K + k64[None, :], acc, mask=m)


declare(score_grad_partial_kernel, tensor_cores=True)


@triton.jit
def score_grad_reduce_kernel(part_ptr, SPLIT, w_ptr, sw_n, sw_k, ref_ptr, sr_n, sr_k, s_ptr, ss_n, ss_k, add_scale,
                             out_ptr, so_n, so_k, ratio, seed, N, K,
                             DROPOUT: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK_R: tl.constexpr,
                             BLOCK_C: tl.constexpr):
    """Split-K, second pass: acc[n, k] = sum_{s = 0 .. SPLIT - 1} part[s, n, k] in that order (no atomics:
    the same bits every run), then score_grad_kernel's epilogue (times W, + add_scale S, the dropout against
    ref with U(seed, n*K + k)) for one BLOCK_R x BLOCK_C tile; out may be ref."""
    pid = tl.program_id(0)
    num_c = tl.cdiv(K, BLOCK_C)
    offs_n = (pid // num_c) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = (pid % num_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    o = offs_n.to(tl.int64)[:, None] * K + offs_k.to(tl.int64)[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(part_ptr + s * N.to(tl.int64) * K + o, mask=m, other=0.0)
    _score_epilogue(acc, offs_n, offs_k, w_ptr, sw_n, sw_k, ref_ptr, sr_n, sr_k, s_ptr, ss_n, ss_k, add_scale,
                    out_ptr, so_n, so_k, ratio, seed, N, K, DROPOUT, HAS_ADD)


declare(score_grad_reduce_kernel, {"add_scale": "fp32", "ratio": "fp32", "seed": "i64"})


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


def grad_scores(dy2, x2, weight, ref_grad, ratio, seed, dtype, scores=None, add_scale=0.0, out=None, split=None):
    """(dy2.T @ x2) * W (+ add_scale * scores), gradient-dropped against ref_grad when given; into ``out``
    (which may be ref_grad itself) or a new tensor. ``split``: token splits (default score_grad_split; 1:
    the one-pass kernel; more: split-K, score_grad_partial_kernel then score_grad_reduce_kernel)."""
    N, K = weight.shape
    M = x2.shape[0]
    out = torch.empty(N, K, device=x2.device, dtype=dtype) if out is None else out
    dot = dot_dtype(dy2, x2)
    cfg = mm_config(dot, heavy_epilogue=ref_grad is not None)
    grid = tile_grid(N, K, cfg["BLOCK_M"], cfg["BLOCK_N"])
    ref = ref_grad if ref_grad is not None else weight
    if split is None:
        model = "bf16" if dot != tl.float32 else ("tf32" if dot_precision(dot) == "tf32" else "fp32")
        split = score_grad_split(N, K, M, cfg, ref_grad is not None, model)
    if split > 1:
        chunk = split_chunk(M, split, cfg["BLOCK_K"])
        split = triton.cdiv(M, chunk)
        part = torch.empty(split, N, K, device=x2.device, dtype=torch.float32)
        pcfg = split_partial_config(dot, dot_precision(dot))
        score_grad_partial_kernel[(grid[0], split)](
            dy2, dy2.stride(0), dy2.stride(1), x2, x2.stride(0), x2.stride(1), part, N, K, M, chunk,
            DOT_DTYPE=dot, PRECISION=dot_precision(dot), **score_grad_tile(pcfg))
        sc = scores if scores is not None else weight
        rc = SPLIT_REDUCE
        score_grad_reduce_kernel[(triton.cdiv(N, rc["BLOCK_R"]) * triton.cdiv(K, rc["BLOCK_C"]),)](
            part, split, weight, weight.stride(0), weight.stride(1), ref, ref.stride(0), ref.stride(1),
            sc, *sc.stride(), float(add_scale), out, out.stride(0), out.stride(1), float(ratio), int(seed), N, K,
            DROPOUT=ref_grad is not None, HAS_ADD=scores is not None, **rc)
        return out
    score_grad_kernel[grid](dy2, dy2.stride(0), dy2.stride(1), x2, x2.stride(0), x2.stride(1),
                            weight, weight.stride(0), weight.stride(1), ref, ref.stride(0), ref.stride(1),
                            scores if scores is not None else weight, *(scores if scores is not None else weight).stride(),
                            float(add_scale), out, out.stride(0), out.stride(1), float(ratio), int(seed), N, K, M,
                            DROPOUT=ref_grad is not None, HAS_ADD=scores is not None, DOT_DTYPE=dot,
                            PRECISION=dot_precision(dot),
                            **score_grad_tile(cfg))
    return out


#: split-K of the score gradient when its tiles give fewer programs than this (2 per SM of an H100's 132):
#: 768 x 768 at 64 x 64 tiles is 144 programs, 55% of it
SPLIT_MIN_PROGRAMS = 264
#: at most this many token splits, each of at least SPLIT_MIN_TOKENS tokens (so small backward passes,
#: and every test of the one-pass kernel, keep it); the count itself is the cost model's (score_grad_split)
MAX_SPLIT = 8
SPLIT_MIN_TOKENS = 512
#: tile and warps of score_grad_reduce_kernel (its epilogue is score_grad_kernel's: 32 x 64 at 4 warps)
SPLIT_REDUCE = dict(BLOCK_R=32, BLOCK_C=64, num_warps=4)


def score_grad_split(N: int, K: int, M: int, cfg: dict, dropout: bool = True, model_dtype: str = "bf16") -> int:
    """Token splits of the score gradient [N, K] over M tokens at tiles ``cfg``: 1 (the one-pass kernel)
    when the tiles alone reach SPLIT_MIN_PROGRAMS; else the split count in 1 .. min(MAX_SPLIT,
    M // SPLIT_MIN_TOKENS) that fastvlm.aot's model (``score_grad_cost``, ``model_dtype``: its dtype name)
    gives the least time, the fewest on a tie. At 768 x 768 (144 tiles of 64 x 64): 2 splits at 6304 tokens
    (modelled 33 vs 47 us with the dropout), none at 1576 (15.5 vs 14.7: the partials' traffic and the second
    launch cost more than the fill gains). Depends on the shapes alone, so a shape always takes the same
    path."""
    tiles = triton.cdiv(N, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_N"])
    most = min(MAX_SPLIT, M // SPLIT_MIN_TOKENS)
    if tiles >= SPLIT_MIN_PROGRAMS or most < 2:
        return 1
    return _best_split(N, K, M, cfg["BLOCK_M"], cfg["BLOCK_N"], most, dropout, model_dtype)


@functools.lru_cache(maxsize=256)
def _best_split(N, K, M, bm, bn, most, dropout, model_dtype):
    from ..aot import score_grad_cost

    times = [score_grad_cost(M, N, K, model_dtype, dropout, split=s, tile=(bm, bn)).time_s for s in range(1, most + 1)]
    return 1 + times.index(min(times))


def split_chunk(M: int, split: int, block_tokens: int) -> int:
    """Tokens per split: M / split rounded up to whole BLOCK_TOKENS steps (the last split takes the rest)."""
    return triton.cdiv(triton.cdiv(M, split), block_tokens) * block_tokens


def split_partial_config(dot, precision: str) -> dict:
    """Tiles and warps of score_grad_partial_kernel: the plain matmul policy's (no epilogue here), with 8
    warps for IEEE fp32 dots (4 spilled 8 bytes on sm_80 with the split's 64-bit token offset)."""
    cfg = mm_config(dot)
    if dot == tl.float32 and precision == "ieee":
        cfg["num_warps"] = 8
    return cfg


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
        for prec in precisions(gpu_dot_dtype(d)):
            tile = split_partial_config(gpu_dot_dtype(d), prec)
            opts = {k: tile.pop(k) for k in ("num_warps", "num_stages")}
            tile.update(DOT_DTYPE=gpu_dot_dtype(d), PRECISION=prec)
            out.append(Variant(score_grad_partial_kernel, score_grad_tile(tile), opts,
                               {"dy_ptr": d, "x_ptr": d, "part_ptr": f32}))
        for dropout in (False, True):
            for has_add in (False, True):
                rc = {k: SPLIT_REDUCE[k] for k in ("BLOCK_R", "BLOCK_C")}
                out.append(Variant(score_grad_reduce_kernel, {"DROPOUT": dropout, "HAS_ADD": has_add, **rc},
                                   {"num_warps": SPLIT_REDUCE["num_warps"]},
                                   {"w_ptr": d, "part_ptr": f32, "ref_ptr": f32, "s_ptr": f32, "out_ptr": f32}))
        out.append(Variant(grad_dropout_kernel, {"BLOCK": DROP_BLOCK["BLOCK"]}, {"num_warps": DROP_BLOCK["num_warps"]},
                           {"ga_ptr": d, "gb_ptr": d, "out_ptr": d}))
    return out
