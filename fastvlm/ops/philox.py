r"""Gradient dropout's random stream and its torch path (formula: ``fastvlm/ops/masked.py``).

``philox_uniform`` is Triton's ``tl.rand`` (Philox 4x32, 10 rounds, counter (i_lo, i_hi, 0, 0), key
(seed_lo, seed_hi), first output word mapped to [0, 1)) reproduced bit for bit in torch, so the CPU and GPU
paths drop the same elements. ``grad_dropout_torch`` is the CPU path of ``grad_dropout``.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.rand(seed, offsets)`` for int64 ``offsets``: float32 uniforms in [0, 1).

    32-bit words held in int64: a product of two of them wraps mod 2^64 in int64 arithmetic, which keeps
    both of its 32-bit halves exact (the arithmetic shift's sign bits are masked off). Call it on chunks
    of ~64K offsets: the ~120 elementwise passes then stay in cache (8x faster than 1M-element chunks).
    """
    offsets = offsets.to(torch.int64)
    c0 = offsets & _M32
    c1 = (offsets >> 32) & _M32
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c2 = c3 = None  # zero counters in round one
    for _ in range(10):
        pa = c0 * _ROUND_A
        if c2 is None:
            c0, c1, c2, c3 = c1 ^ k0, torch.zeros_like(c0), ((pa >> 32) & _M32) ^ k1, pa & _M32
        else:
            pb = c2 * _ROUND_B
            c0, c1, c2, c3 = ((pb >> 32) & _M32) ^ c1 ^ k0, pb & _M32, ((pa >> 32) & _M32) ^ c3 ^ k1, pa & _M32
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # bitcast to int32
    x = torch.where(x < 0, -x - 1, x).to(torch.int32)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def keep_scale(ga: torch.Tensor, gb: torch.Tensor, u: torch.Tensor, ratio: float) -> torch.Tensor:
    ga, gb = ga.float(), gb.float()
    p = 0.5 * (1.0 + torch.sign(ga) * ((ga + gb) / (ga.abs() + gb.abs() + 1e-8)))
    return (1.0 - ratio) + ratio * (p > u).float()


def grad_dropout_torch(g_task, g_ref, ratio, seed, offset, out=None):
    out = torch.empty_like(g_task) if out is None else out
    flat_a, flat_b, flat_o = g_task.reshape(-1), g_ref.reshape(-1), out.view(-1)
    step = 1 << 16  # cache-sized chunks of the random stream (see philox_uniform)
    for i in range(0, flat_a.numel(), step):
        a, b = flat_a[i:i + step], flat_b[i:i + step]
        u = philox_uniform(seed, torch.arange(i, i + a.numel(), device=a.device) + offset)
        flat_o[i:i + step] = (keep_scale(a, b, u, ratio) * a.float()).to(out.dtype)
    return out
