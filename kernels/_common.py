"""Triton helpers shared by every op family: the tiled matmul core and the launch-configuration policy.

Every kernel casts to fp32 right after each load, so the same code is right in the interpreter (which runs
bf16 arithmetic and bf16 ``tl.dot`` wrongly) and on a GPU. On a GPU, fp16/bf16 operands are fed to
``tl.dot`` in their own dtype (tensor cores, fp32 accumulation); fp32 operands follow
``torch.get_float32_matmul_precision()`` as torch's own matmuls do: "highest" runs IEEE fp32 dots, "high"
and "medium" TF32 products (10-bit mantissa; torch's "high" allows TF32 too). Triton's tf32x3 (three TF32
products) spills in eight of the fp32 configurations on sm_80/sm_90a (``fastvlm kernels``), so "high" does
not take it. The choice is a constexpr of each launch (``PRECISION``), so ``fastvlm kernels`` compiles each;
the interpreter ignores it.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from .._backend import interpreting

# ---------------------------------------------------------------------------------------------------------
# configuration policy (the `fastvlm kernels` report enumerates exactly these choices)
# ---------------------------------------------------------------------------------------------------------

#: matmul tiles by dot dtype: one config each, no autotuning, so the first step is as fast as the last and
#: compile time is predictable (autotuning is a known source of slow first steps and out-of-memory reports in
#: other kernel libraries). Chosen with `fastvlm kernels`: IEEE fp32 dots at 64x64x32 spill on sm_80 and
#: sm_90a (255 registers), 64x32x16 does not; a heavy epilogue (the Philox dropout,
#: in two column sub-tiles) runs 8 warps at 64x64: 114 registers, two blocks per SM on sm_90a.
MM_HALF = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
MM_FP32 = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2)


def mm_config(dot, heavy_epilogue: bool = False) -> dict:
    cfg = dict(MM_FP32 if dot == tl.float32 else MM_HALF)
    if heavy_epilogue and dot != tl.float32:
        cfg["num_warps"] = 8
    return cfg


def gpu_dot_dtype(*dtypes: torch.dtype):
    """The dtype a GPU launch feeds tl.dot: fp16/bf16 (tensor cores) when every operand has that dtype,
    else IEEE fp32."""
    dts = set(dtypes)
    if dts == {torch.float16}:
        return tl.float16
    if dts == {torch.bfloat16}:
        return tl.bfloat16
    return tl.float32


#: torch.get_float32_matmul_precision() -> tl.dot's input_precision for fp32 operands
FP32_PRECISION = {"highest": "ieee", "high": "tf32", "medium": "tf32"}


def dot_precision(dot) -> str:
    """``PRECISION`` of a launch whose tl.dot runs in ``dot``: for fp32, what torch's float32 matmul
    precision asks for; fp16/bf16 dots ignore it ("ieee" by convention, so one variant each)."""
    return FP32_PRECISION[torch.get_float32_matmul_precision()] if dot == tl.float32 else "ieee"


def precisions(dot) -> tuple:
    """Every PRECISION a launch with this dot dtype can take (what ``fastvlm kernels`` compiles)."""
    return tuple(dict.fromkeys(FP32_PRECISION.values())) if dot == tl.float32 else ("ieee",)


def dot_dtype(*tensors: torch.Tensor):
    """gpu_dot_dtype of the operands; in the interpreter bf16 dots run as fp32 (its bf16 tl.dot is wrong),
    fp16 dots run as on a GPU."""
    d = gpu_dot_dtype(*(t.dtype for t in tensors))
    return tl.float32 if (interpreting() and d == tl.bfloat16) else d


# ---------------------------------------------------------------------------------------------------------
# fused kernels or the composition
# ---------------------------------------------------------------------------------------------------------

#: families whose fused matmul kernels the ops can run instead of the composition (cuBLAS GEMMs + Triton
#: epilogues); docs/kernels.md models why the composition is the default
FUSED_ENV = "FASTVLM_FUSED"
FUSIBLE = ("masked", "orth")
_fused_override = None


def fused(family: str) -> bool:
    """True when ``family`` ("masked" or "orth") runs its fused matmul kernel: ``FASTVLM_FUSED`` (a
    comma-separated list of families, or ``all``; read at every call) or :func:`fused_kernels` says so."""
    if _fused_override is not None:
        return family in _fused_override
    names = {n.strip() for n in os.environ.get(FUSED_ENV, "").lower().split(",") if n.strip()}
    bad = names - set(FUSIBLE) - {"all"}
    if bad:
        raise ValueError(f"{FUSED_ENV} must name families among {FUSIBLE} or 'all', got {sorted(bad)}")
    return family in names or "all" in names


@contextlib.contextmanager
def fused_kernels(*families: str):
    """Inside the block, exactly ``families`` run their fused kernels (none given: the composition)."""
    global _fused_override
    bad = set(families) - set(FUSIBLE)
    if bad:
        raise ValueError(f"families must be among {FUSIBLE}, got {sorted(bad)}")
    old, _fused_override = _fused_override, tuple(families)
    try:
        yield
    finally:
        _fused_override = old


# ---------------------------------------------------------------------------------------------------------
# launch variants: every configuration a launcher can choose, for `fastvlm kernels` to compile ahead of time
# ---------------------------------------------------------------------------------------------------------

_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64"}


def declare(kernel, scalars: dict | None = None, tensor_cores: bool = False) -> None:
    """Declare, right after a kernel's definition, what ``fastvlm kernels`` compiles it with: the type of
    each scalar argument that is not an i32 size or stride (``"fp32"``, ``"i64"``), and whether its
    fp16/bf16 variants must run on tensor cores. (A call, not a decorator: Triton's interpreter re-executes
    the kernel's source and must find ``@triton.jit`` alone on it.)"""
    kernel.scalar_types = dict(scalars or {})
    kernel.tensor_cores = tensor_cores


class Variant:
    """One compilable configuration: the kernel, its constexprs, the dtype behind each pointer argument
    (fp32 where not named) and the launch options (num_warps, num_stages). Scalar types and the tensor-core
    requirement come from the kernel's :func:`declare`. ``spec``: the integer arguments of one real launch
    (name -> value), which ``fastvlm kernels`` specialises as Triton does at run time; ``label`` names it."""

    def __init__(self, kernel, constexprs: dict, options: dict | None = None, ptrs: dict | None = None,
                 spec: dict | None = None, label: str = ""):
        self.kernel, self.constexprs, self.ptrs, self.options = kernel, constexprs, ptrs or {}, options or {}
        self.spec, self.label = spec or {}, label

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__

    def signature(self) -> dict:
        sig = {}
        for a in self.kernel.arg_names:
            if a in self.constexprs:
                sig[a] = "constexpr"
            elif a.endswith("_ptr"):
                sig[a] = "*" + _TYPE[self.ptrs.get(a, torch.float32)]
            else:
                sig[a] = self.kernel.scalar_types.get(a, "i32")
        return sig

    @property
    def needs_tensor_cores(self) -> bool:
        """A kernel declared to use tensor cores, in a variant whose dot runs in fp16/bf16."""
        dot = self.constexprs.get("DOT_DTYPE")
        return self.kernel.tensor_cores and dot is not None and dot != tl.float32

    def describe(self) -> str:
        flags = " ".join(f"{k}={_short(v)}" for k, v in self.constexprs.items())
        ptrs = ",".join(sorted({_TYPE[v] for v in self.ptrs.values()})) or "fp32"
        opts = " ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{ptrs} {flags} {opts}" + (f" @ {self.label}" if self.label else "")


def _short(v):
    return str(v).replace("triton.language.", "").replace("tl.", "") if not isinstance(v, bool) else ("T" if v else "F")


HALF_AND_FULL = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------
# the tiled matmul core
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def mm_tile(
    a_ptr, sa_m, sa_k,
    b_ptr, sb_k, sb_n,
    b2_ptr, sb2_k, sb2_n, beta,
    ks_ptr,
    mk_ptr, smk_k, smk_n, threshold,
    offs_m, offs_n, M, N, K,
    HAS_B2: tl.constexpr, HAS_KSCALE: tl.constexpr, HAS_BMASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc[m, n] = sum_k A[m, k] * Bop[k, n] for one (BLOCK_M, BLOCK_N) tile, fp32 accumulation, where

    Bop[k, n] = (B[k, n] + beta * B2[k, n]) * kscale[k] * (score[k, n] > threshold)

    (each factor only with its flag). Any strides: transposed and non-contiguous operands load in place.
    """
    offs_m64 = offs_m.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        offs_k64 = offs_k.to(tl.int64)
        a = tl.load(a_ptr + offs_m64[:, None] * sa_m + offs_k64[None, :] * sa_k,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        bmask = k_ok[:, None] & n_ok[None, :]
        b = tl.load(b_ptr + offs_k64[:, None] * sb_k + offs_n64[None, :] * sb_n, mask=bmask, other=0.0).to(tl.float32)
        if HAS_B2:
            b2 = tl.load(b2_ptr + offs_k64[:, None] * sb2_k + offs_n64[None, :] * sb2_n, mask=bmask, other=0.0)
            b = b + beta * b2.to(tl.float32)
        if HAS_BMASK:
            sc = tl.load(mk_ptr + offs_k64[:, None] * smk_k + offs_n64[None, :] * smk_n, mask=bmask, other=0.0)
            b = tl.where(sc.to(tl.float32) > threshold, b, 0.0)
        if HAS_KSCALE:
            ks = tl.load(ks_ptr + offs_k, mask=k_ok, other=0.0)
            b = b * ks[:, None]
        if DOT_DTYPE == tl.float32:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        else:
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)
    return acc


#: rows of tiles swept together by a 1-D launch (grouped ordering): the GROUP_M row tiles of a group share
#: each column tile's B operand while it is in L2
GROUP_M = tl.constexpr(8)
#: CUDA's launch limits: grid axis 0 takes up to 2^31 - 1 programs, axes 1 and 2 up to 65,535
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def tile_grid(M: int, N: int, block_m: int, block_n: int) -> tuple:
    """1-D launch grid of an (M, N) output tiled by (block_m, block_n): every tile on axis 0 (2^31 - 1
    programs), so no dimension meets axis 1's limit of 65,535 (at 64-wide class tiles K = 21843 is 342
    tiles; a 4.2M-class table would be 65,536 and fail on axis 1)."""
    n = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    if n > GRID_LIMITS[0]:
        raise ValueError(f"output of {M} x {N} needs {n} tiles of {block_m} x {block_n}, over the launch limit "
                         f"of {GRID_LIMITS[0]} programs")
    return (n,)


@triton.jit
def tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    """(row tile, column tile) of program ``pid`` in a 1-D grid of cdiv(M, BLOCK_M) x cdiv(N, BLOCK_N) tiles,
    grouped: GROUP row tiles run column tile by column tile, so consecutive programs share B's tile."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP * num_n
    group = pid // in_group
    first_m = group * GROUP
    size_m = tl.minimum(num_m - first_m, GROUP)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def matmul_kernel(
    a_ptr, sa_m, sa_k,
    b_ptr, sb_k, sb_n,
    b2_ptr, sb2_k, sb2_n, beta,
    ks_ptr,
    mk_ptr, smk_k, smk_n, threshold,
    bias_ptr,
    c_ptr, sc_m, sc_n, alpha,
    M, N, K,
    HAS_B2: tl.constexpr, HAS_KSCALE: tl.constexpr, HAS_BMASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """C = alpha * A @ Bop (+ bias[None, :]) (+ C when ACCUMULATE), Bop as in mm_tile. 1-D grid (tile_grid)."""
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = mm_tile(a_ptr, sa_m, sa_k, b_ptr, sb_k, sb_n, b2_ptr, sb2_k, sb2_n, beta, ks_ptr,
                  mk_ptr, smk_k, smk_n, threshold, offs_m, offs_n, M, N, K,
                  HAS_B2, HAS_KSCALE, HAS_BMASK, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE, PRECISION)
    acc = acc * alpha
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    cptr = c_ptr + offs_m.to(tl.int64)[:, None] * sc_m + offs_n.to(tl.int64)[None, :] * sc_n
    cmask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if ACCUMULATE:
        acc += tl.load(cptr, mask=cmask, other=0.0).to(tl.float32)
    tl.store(cptr, acc.to(c_ptr.dtype.element_ty), mask=cmask)


declare(matmul_kernel, {"beta": "fp32", "threshold": "fp32", "alpha": "fp32"}, tensor_cores=True)


def matmul(a, b, out, *, alpha=1.0, b2=None, beta=0.0, kscale=None, scores=None, threshold=0.0, bias=None,
           accumulate=False, dot=None, precision=None, config=None):
    """Launch ``out = alpha * a @ Bop + bias (+ out)``, ``Bop = (b + beta*b2) * kscale[:, None] * (scores >
    threshold)``; a: [M, K], b/b2/scores: [K, N] (any strides: pass transposed views), bias: [N].
    ``dot``: the tl.dot dtype (default: from a and b, see dot_dtype); ``precision``: its input precision
    for fp32 dots (default: dot_precision); ``config``: tiles, warps and stages (default: mm_config), for
    a caller whose shape wants others (its variants() must list them)."""
    M, K = a.shape
    N = b.shape[1]
    dot = dot if dot is not None else dot_dtype(a, b)
    cfg = dict(config) if config is not None else mm_config(dot)
    grid = tile_grid(M, N, cfg["BLOCK_M"], cfg["BLOCK_N"])
    b2_ = b if b2 is None else b2
    matmul_kernel[grid](
        a, a.stride(0), a.stride(1),
        b, b.stride(0), b.stride(1),
        b2_, b2_.stride(0), b2_.stride(1), float(beta),
        kscale if kscale is not None else a,
        scores if scores is not None else b, *(scores.stride() if scores is not None else (0, 0)), float(threshold),
        bias if bias is not None else a,
        out, out.stride(0), out.stride(1), float(alpha),
        M, N, K,
        HAS_B2=b2 is not None, HAS_KSCALE=kscale is not None, HAS_BMASK=scores is not None,
        HAS_BIAS=bias is not None, ACCUMULATE=accumulate,
        DOT_DTYPE=dot, PRECISION=precision if precision is not None else dot_precision(dot),
        **cfg,
    )
    return out


def matmul_variants(flag_sets, dtypes=HALF_AND_FULL):
    """matmul_kernel variants for the given (flags, pointer-dtype function, dot-dtype function) uses."""
    out = []
    for dt in dtypes:
        for flags, ptrs, dot in flag_sets:
            for prec in precisions(dot(dt)):
                out.append(Variant(matmul_kernel, *tile_constexprs(dot(dt), flags, precision=prec), ptrs=ptrs(dt)))
    return out


def tile_constexprs(dot, extra: dict, heavy_epilogue: bool = False, precision: str = "ieee"):
    """(constexprs, launch options) of a tiled-matmul kernel for this dot dtype: the launchers' policy."""
    cfg = mm_config(dot, heavy_epilogue)
    opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
    return {**extra, **cfg, "DOT_DTYPE": dot, "PRECISION": precision}, opts
