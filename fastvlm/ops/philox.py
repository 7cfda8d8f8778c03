r"""Gradient dropout's random stream and its torch path (formula: ``fastvlm/ops/masked.py``).

``philox_uniform`` is Triton's ``tl.rand`` (Philox 4x32, 10 rounds, counter (i_lo, i_hi, 0, 0), key
(seed_lo, seed_hi), first output word x read as int32, mapped to ``(x < 0 ? -x - 1 : x) * 4.6566127342e-10``
in fp32) reproduced bit for bit, so the CPU and GPU paths drop the same elements. ``grad_dropout_torch`` is
the torch path of ``grad_dropout``.

Precision. P and the keep scale are computed in the compute dtype: fp64 for fp64 inputs, fp32 otherwise
(fp16/bf16 are widened to fp32, as the Triton kernels do). U is always the fp32 stream; in fp64, ``P > U``
compares P with U widened to fp64, which is exact (every fp32 value is an fp64 value). The ratio is rounded
to the compute dtype first and ``1 - ratio`` is taken in that dtype, as the Triton kernels do with their
fp32 argument (the fp32 rounding of the real ``1 - 0.8`` is one ulp away from ``1 - fp32(0.8)``).

Two implementations of the same arithmetic:

* on CPU, one pass of a small C kernel (``_C_SOURCE``), built and cached by ``fastvlm/ops/_native.py``:
  unsigned 32-bit words, 64-bit products, no multiply-add fused (fp32 results are those of the IEEE
  operations in the formula's order). Up to ``torch.get_num_threads()``
  threads take 64K-element pieces until none is left (``_in_pieces``): one pass over the data and one join
  per call, so a busy machine slows it like a matmul instead of stalling a thread team on every one of
  ~100 elementwise ops;
* elsewhere (no compiler, ``FASTVLM_PHILOX=torch`` or ``FASTVLM_NATIVE=torch``, non-CPU tensors, under ``torch.compile``, inputs that
  autograd must differentiate through), torch ops on int64 words. A product of two 32-bit words wraps mod
  2^64 and keeps both halves exact; the arithmetic shift's sign bits are masked off before a word enters
  the next product. On CPU the ops run on chunks of ``_EAGER_CHUNK`` elements, below torch's parallel grain
  size, so they too run on the calling thread.
"""

from __future__ import annotations

import ctypes

import torch

from . import _native

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_SCALE = 4.6566127342e-10  # tl.rand's int32 -> [0, 1) factor (fp32)
_EAGER_CHUNK = 1 << 15  # at::internal::GRAIN_SIZE: smaller ops are not split across threads
_PIECE = 1 << 16  # elements per task of the threaded C pass

_C_SOURCE = r"""
#include <stdint.h>

#define FV_BLOCK 512

static inline float fv_uniform(uint64_t seed, uint64_t ctr) {
    uint32_t c0 = (uint32_t)ctr, c1 = (uint32_t)(ctr >> 32), c2 = 0, c3 = 0;
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; ++r) {
        uint64_t pa = (uint64_t)c0 * 0xD2511F53u, pb = (uint64_t)c2 * 0xCD9E8D57u;
        uint32_t n0 = (uint32_t)(pb >> 32) ^ c1 ^ k0, n2 = (uint32_t)(pa >> 32) ^ c3 ^ k1;
        c1 = (uint32_t)pb;
        c3 = (uint32_t)pa;
        c0 = n0;
        c2 = n2;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    int32_t x = (int32_t)c0;
    x ^= x >> 31;  /* x < 0 ? -x - 1 : x */
    return (float)x * 4.6566127342e-10f;
}

/* The stream for one block, in a loop of its own so that it vectorises. */
static inline void fv_fill(uint64_t seed, uint64_t start, int64_t n, float *out) {
    for (int64_t i = 0; i < n; ++i) out[i] = fv_uniform(seed, start + (uint64_t)i);
}

void fv_uniform_at(uint64_t seed, const int64_t *offsets, int64_t n, float *out) {
    for (int64_t i = 0; i < n; ++i) out[i] = fv_uniform(seed, (uint64_t)offsets[i]);
}

/* out[i] = ga[i] * ((1 - r) + r * [P > U]) in T; out may be ga or gb (a block is read before it is
   written). (1 - r) + r * 1 and (1 - r) + r * 0 are the two keep scales. */
#define FV_DROPOUT(NAME, T, EPS, ABS)                                                                      \
void NAME(const T *ga, const T *gb, T *out, int64_t n, uint64_t seed, uint64_t start, T ratio) {           \
    const T keep0 = (T)1 - ratio, keep1 = keep0 + ratio;                                                   \
    float u[FV_BLOCK];                                                                                     \
    T res[FV_BLOCK];                                                                                       \
    for (int64_t i0 = 0; i0 < n; i0 += FV_BLOCK) {                                                         \
        const int64_t m = n - i0 < FV_BLOCK ? n - i0 : FV_BLOCK;                                           \
        const T *a_ = ga + i0, *b_ = gb + i0;                                                              \
        fv_fill(seed, start + (uint64_t)i0, m, u);                                                         \
        for (int64_t j = 0; j < m; ++j) {                                                                  \
            const T a = a_[j], b = b_[j];                                                                  \
            const T sgn = a > 0 ? (T)1 : (a < 0 ? (T)-1 : (T)0);                                           \
            const T q = (a + b) / (ABS(a) + ABS(b) + EPS);                                                 \
            const T p = (T)0.5 * ((T)1 + sgn * q);                                                         \
            res[j] = a * (p > (T)u[j] ? keep1 : keep0);                                                    \
        }                                                                                                  \
        for (int64_t j = 0; j < m; ++j) out[i0 + j] = res[j];                                              \
    }                                                                                                      \
}
FV_DROPOUT(fv_grad_dropout_f32, float, 1e-8f, __builtin_fabsf)
FV_DROPOUT(fv_grad_dropout_f64, double, 1e-8, __builtin_fabs)
"""

_LIB = _native.Library("philox", _C_SOURCE, {
    "fv_uniform_at": [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p],
    "fv_grad_dropout_f32": [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_float],
    "fv_grad_dropout_f64": [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint64,
                                                    ctypes.c_double],
}, env="FASTVLM_PHILOX")


def _kernels():
    """The C kernels, or None where the torch implementation must run (``FASTVLM_PHILOX=torch`` or
    ``FASTVLM_NATIVE=torch``, no compiler, a failed build, or inside ``torch.compile``)."""
    return _LIB.get()


def _in_pieces(n: int, run) -> None:
    _native.in_pieces(n, _PIECE, run)


def stream_implementation() -> str:
    """Which implementation CPU tensors get now: ``"c"`` (the compiled kernel) or ``"torch"``."""
    return "c" if _kernels() is not None else "torch"


# ---------------------------------------------------------------------------------------------------------
# torch implementation
# ---------------------------------------------------------------------------------------------------------


def _philox_words(offsets: torch.Tensor, seed: int) -> torch.Tensor:
    """First Philox output word (in the low 32 bits of an int64, high bits zero) for int64 ``offsets``."""
    c0 = offsets & _M32
    c1 = (offsets >> 32) & _M32
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    # round 1 (c2 = c3 = 0): c0' = c1 ^ k0, c1' = 0, c2' = hi(c0 A) ^ k1, c3' = lo(c0 A)
    pa = c0.mul_(_ROUND_A)
    c0, c1 = c1.bitwise_xor_(k0), None
    c2 = (pa >> 32).bitwise_and_(_M32).bitwise_xor_(k1)
    c3 = pa.bitwise_and_(_M32)
    for r in range(1, 10):
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
        pb = c2 * _ROUND_B
        hb = (pb >> 32).bitwise_and_(_M32).bitwise_xor_(k0)
        c0_next = hb if c1 is None else hb.bitwise_xor_(c1)
        if r == 9:
            return c0_next
        pa = c0.mul_(_ROUND_A)
        c2 = (pa >> 32).bitwise_and_(_M32).bitwise_xor_(c3).bitwise_xor_(k1)
        c0, c1, c3 = c0_next, pb.bitwise_and_(_M32), pa.bitwise_and_(_M32)
    raise AssertionError("unreachable")


def _to_uniform(word: torch.Tensor) -> torch.Tensor:
    x = word.to(torch.int32)  # two's complement truncation: the int32 bitcast of the low word
    x = x.bitwise_xor_(x >> 31)  # x < 0 ? -x - 1 : x
    return x.to(torch.float32).mul_(_SCALE)


def _philox_uniform_torch(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    return _to_uniform(_philox_words(offsets.to(torch.int64, copy=True), seed))


def _chunk(t: torch.Tensor) -> int:
    """Elements per pass of the torch implementation: below the parallel grain size on CPU, all elsewhere
    and under ``torch.compile`` (which fuses the ops: one graph, not one per chunk)."""
    if t.device.type == "cpu" and not torch.compiler.is_compiling():
        return _EAGER_CHUNK
    return max(t.numel(), 1)


# ---------------------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------------------


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.rand(seed, offsets)`` for int64 ``offsets`` (read as uint64): float32 uniforms in [0, 1)."""
    offsets = offsets.to(torch.int64)
    lib = _kernels() if offsets.device.type == "cpu" else None
    if lib is not None:
        src = offsets.contiguous()
        out = torch.empty(offsets.shape, dtype=torch.float32)
        p_src, p_out = src.data_ptr(), out.data_ptr()
        _in_pieces(src.numel(), lambda i, j: lib.fv_uniform_at(seed, p_src + 8 * i, j - i, p_out + 4 * i))
        return out
    out = torch.empty(offsets.shape, dtype=torch.float32, device=offsets.device)
    flat, flat_o = offsets.reshape(-1), out.view(-1)
    step = _chunk(flat)
    for i in range(0, flat.numel(), step):
        flat_o[i:i + step] = _philox_uniform_torch(seed, flat[i:i + step])
    return out


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype gradient dropout computes P and the keep scale in: fp64 for fp64, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def keep_scale(ga: torch.Tensor, gb: torch.Tensor, u: torch.Tensor, ratio: float) -> torch.Tensor:
    """``(1 - ratio) + ratio * [P > u]`` in ``compute_dtype(ga.dtype)`` (u: the fp32 stream)."""
    dt = compute_dtype(ga.dtype)
    ga, gb = ga.to(dt), gb.to(dt)
    r = torch.tensor(ratio, dtype=dt, device=ga.device)
    p = 0.5 * (1.0 + torch.sign(ga) * ((ga + gb) / (ga.abs() + gb.abs() + 1e-8)))
    return (1.0 - r) + r * (p > u.to(dt)).to(dt)


def grad_dropout_torch(g_task, g_ref, ratio, seed, offset, out=None):
    """``((1 - ratio) + ratio * [P > U]) * g_task`` with ``U = philox_uniform(seed, offset + i)``, into
    ``out`` (which may be ``g_task`` or ``g_ref`` itself: each element is read before it is written) or a new
    tensor of ``g_task``'s dtype. g_task and g_ref must be contiguous."""
    out = torch.empty_like(g_task, memory_format=torch.contiguous_format) if out is None else out
    n = g_task.numel()
    dt = compute_dtype(g_task.dtype)
    differentiable = torch.is_grad_enabled() and (g_task.requires_grad or g_ref.requires_grad)
    lib = _kernels() if g_task.device.type == "cpu" and not differentiable else None
    if lib is not None:
        a, b = g_task.to(dt).contiguous(), g_ref.to(dt).contiguous()
        dst = out if (out.dtype == dt and out.is_contiguous()) else torch.empty(out.shape, dtype=dt)
        kernel = lib.fv_grad_dropout_f64 if dt == torch.float64 else lib.fv_grad_dropout_f32
        pa, pb, po, e = a.data_ptr(), b.data_ptr(), dst.data_ptr(), a.element_size()
        _in_pieces(n, lambda i, j: kernel(pa + e * i, pb + e * i, po + e * i, j - i, seed, offset + i, ratio))
        if dst is not out:
            out.copy_(dst)
        return out
    flat_a, flat_b, flat_o = g_task.reshape(-1), g_ref.reshape(-1), out.view(-1)
    step = _chunk(flat_a)
    for i in range(0, n, step):
        a, b = flat_a[i:i + step].to(dt), flat_b[i:i + step].to(dt)
        u = _philox_uniform_torch(seed, torch.arange(offset + i, offset + i + a.numel(), device=a.device))
        flat_o[i:i + step] = keep_scale(a, b, u, ratio) * a
    return out
