r"""TaskRes residual-classifier logits and the fused cross-entropy (docs/methods.md §1).

Formula::

    u      = base + alpha * residual                       (K x D)
    logits = logit_scale * norm(features) @ norm(u).T      (B x K), norm = row L2 normalisation,
                                                            v / max(||v||, 1e-12) as F.normalize
    loss   = cross_entropy(logits, target, reduction)

Gradients, with g = dL/dlogits, fhat = norm(f), uhat = norm(u):
    d uhat = s g.T fhat,  d u = (d uhat - uhat <uhat, d uhat>_row) / ||u||,  d residual = alpha d u,  d base = d u
    d fhat = s g uhat,    d f = (d fhat - fhat <fhat, d fhat>_row) / ||f||
    d s     = sum_bk g_bk <fhat_b, uhat_k>                  (when the logit scale s trains)
and for the cross-entropy g = w_b (softmax(logits) - onehot(target)), w_b = 1/#valid (mean), 1 (sum), or
grad_output_b (none), and w_b = 0 on ignored rows.

Three implementations of the same math live here and in kernels/residual.py:
- ``*_reference``: the naive autograd composition, readable and exact: the test oracle.
- ``TorchPath``: the torch path that CPU tensors run. Chunked over classes: no more than one class chunk
  of logits (at most 2^21 elements) and no K x D normalised copy is ever held, and backward recomputes each
  chunk (online log-sum-exp for the loss); when all classes fit in one chunk or B <= D, the loss keeps
  softmax - onehot for backward instead (keeps_softmax), and the row weights of the loss's gradient go on
  the B x D side (residual_backward's ``row_weight``). d uhat is written into the returned gradient and
  projected there in place (TorchPath.backward_chunk), so with frozen features the backward allocates no
  K x D tensor besides its result. Its class matmuls run on torch's own BLAS, not
  oneDNN: logit_scale amplifies the matmul's rounding into the softmax, and oneDNN's fp32 linear rounds
  more than torch's (its summation order; figures in docs/performance.md), which the gradients showed.
- ``fastvlm.kernels.residual``: the Triton kernels behind the same three primitives (``forward``,
  ``backward_prologue``/``backward_chunk``, ``norm_backward``), fused tile by tile.
``residual_*_forward`` / ``residual_backward`` drive either path's primitives, so both backends share one
algorithm; the autograd Functions (eager) and the custom ops (torch.compile) call those functions.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from . import _native
from .._checks import (check_float, check_matrix, check_same_device, check_same_dtype, check_scalar, check_target,
                       compiling)
from ._template import empty_for_none, fake_grads, none_for_unneeded

EPS = 1e-12
#: elements (B x chunk and chunk x D) a class chunk may take in the torch path and in the Triton backward
CHUNK_ELEMENTS = 1 << 21
#: elements per row block of the torch path's in-place projection of d uhat (two such temporaries at most)
PROJECT_ELEMENTS = 1 << 17


#: below this a softmax probability has lost relative precision to underflow (fp32's smallest normal is
#: 1.2e-38): the torch path takes such a target's -log p from the logits instead
TINY_PROBABILITY = 1e-30

#: exp's argument floor on the torch path: exp(-87) = 1.6e-38, the smallest normal fp32 is 1.2e-38
EXP_FLOOR = -87.0


def _exp_(t: torch.Tensor) -> torch.Tensor:
    """exp(max(t, EXP_FLOOR)) in place. torch's vectorised CPU exp takes a per-element slow path for every
    lane whose result is subnormal or zero (arguments below about -87.3): with logit_scale 100 the logits
    span up to 200, and exp(logits - max) over such rows ran about 100x slower. The floor changes each such
    term by under 1.7e-38, nothing next to the row's largest term, 1 (the softmax's sum is at least 1)."""
    return t.clamp_min_(EXP_FLOOR).exp_()


def class_chunk(B: int, D: int, K: int) -> int:
    return max(1, min(K, CHUNK_ELEMENTS // max(B, D, 1)))


def keeps_softmax(B: int, D: int, K: int) -> bool:
    """Whether the torch path's cross-entropy keeps softmax - onehot [B, K] for backward instead of
    recomputing each chunk's logits there: when all classes fit in one chunk, or when B <= D, so that the
    kept B x K is no larger than the K x D gradient the op returns anyway (the peak stays within about twice
    that floor, as with one chunk). Keeping saves the backward's logits matmul, a third of the op's FLOPs:
    at B=256, K=21843, D=1024 the peak is the same either way (the recomputing backward holds a chunk's
    uhat, logits and projection temporaries instead)."""
    return class_chunk(B, D, K) >= K or B <= D


# ---------------------------------------------------------------------------------------------------------
# references (naive composition): the oracle
# ---------------------------------------------------------------------------------------------------------


def residual_logits_reference(features, base, residual, alpha=0.5, logit_scale=100.0):
    return logit_scale * F.normalize(features, dim=-1) @ F.normalize(base + alpha * residual, dim=-1).T


def residual_cross_entropy_reference(features, base, residual, target, alpha=0.5, logit_scale=100.0,
                                     reduction="mean", ignore_index=-100):
    lg = residual_logits_reference(features, base, residual, alpha, logit_scale)
    return F.cross_entropy(lg, target, reduction=reduction, ignore_index=ignore_index)


def _residual_example(dtype, generator, loss):
    B, K, D = 5, 7, 12
    f = torch.randn(B, D, generator=generator, dtype=dtype).requires_grad_()
    t = torch.randn(K, D, generator=generator, dtype=dtype).requires_grad_()
    x = (0.3 * torch.randn(K, D, generator=generator, dtype=dtype)).requires_grad_()
    if not loss:
        return [f, t, x], {"alpha": 0.7, "logit_scale": 20.0}
    y = torch.randint(0, K, (B,), generator=generator)
    y[1] = -100
    return [f, t, x, y], {"alpha": 0.7, "logit_scale": 20.0, "reduction": "sum"}


#: small inputs for each public op of this family (tensors, keyword arguments), which the generic op tests
#: (tests/test_op_template.py) run against the reference: forward, gradients, fp64 gradcheck, compile
EXAMPLES = {
    "residual_logits": lambda dtype, g: _residual_example(dtype, g, loss=False),
    "residual_cross_entropy": lambda dtype, g: _residual_example(dtype, g, loss=True),
}


# ---------------------------------------------------------------------------------------------------------
# the torch path (CPU tensors): the same primitives, with the same signatures, as fastvlm.kernels.residual
# ---------------------------------------------------------------------------------------------------------


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 accumulation, fp64 kept (so gradcheck runs on the torch path in float64)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _up(t):
    return t.to(acc_dtype(t))


def out_dtype_of(features, base, residual) -> torch.dtype:
    """The logits' / loss's dtype: the promotion of the three inputs' dtypes."""
    return torch.promote_types(torch.promote_types(features.dtype, base.dtype), residual.dtype)


def reduce_loss(loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """F.cross_entropy's reductions of per-row losses (0 on ignored rows); mean is nan when none is valid."""
    if reduction == "mean":
        return loss.sum() / valid.sum()
    if reduction == "sum":
        return loss.sum()
    return loss


class Rows(NamedTuple):
    """What every class chunk of the backward shares: the features, their 1/||f||, the prologue's
    s * fhat (None where the kernels scale on the fly), the d fhat accumulator (None when neither the
    features nor the scale need a gradient), alpha and the logit scale s."""

    features: torch.Tensor
    rf: torch.Tensor
    scaled_fhat: Optional[torch.Tensor]
    dfhat: Optional[torch.Tensor]
    alpha: float
    scale: float


class ClassChunk(NamedTuple):
    """One chunk of classes: its rows of base and residual, their 1/||u||, and where their gradients go
    (None when not needed)."""

    base: torch.Tensor
    residual: torch.Tensor
    ru: torch.Tensor
    dbase: Optional[torch.Tensor]
    dresidual: Optional[torch.Tensor]


#: the torch path's row kernels in C (fastvlm/ops/_native.py), one pass each where the torch ops take four to
#: eight: the row's D values stay in L1 between its two sweeps. Every dot product accumulates in the input's
#: dtype in 16 lanes (each lane a plain sum of every 16th term, the lanes added in order), as torch's own
#: vectorised reductions keep several partial sums.
_ROWS_SOURCE = r"""
#include <stdint.h>
#include <math.h>
#define FV_LANES 16

#define FV_ROWS(SUF, T)                                                                                       \
/* uhat_k = (t_k + a x_k) r_k. compute_r: r_k = 1 / max(||t_k + a x_k||, eps), written to r; else r read. */  \
void fv_uhat_##SUF(const T *t, int64_t ts, const T *x, int64_t xs, T *out, int64_t os, T *r, int64_t rows,    \
                   int64_t D, T alpha, T eps, int compute_r) {                                                \
    for (int64_t k = 0; k < rows; ++k) {                                                                      \
        const T *tk = t + k * ts, *xk = x + k * xs;                                                           \
        T *ok = out + k * os;                                                                                 \
        T rk;                                                                                                 \
        if (compute_r) {                                                                                      \
            T acc[FV_LANES] = {0};                                                                            \
            int64_t j = 0;                                                                                    \
            for (; j + FV_LANES <= D; j += FV_LANES)                                                          \
                for (int l = 0; l < FV_LANES; ++l) {                                                          \
                    const T u = tk[j + l] + alpha * xk[j + l];                                                \
                    ok[j + l] = u;                                                                            \
                    acc[l] += u * u;                                                                          \
                }                                                                                             \
            for (; j < D; ++j) {                                                                              \
                const T u = tk[j] + alpha * xk[j];                                                            \
                ok[j] = u;                                                                                    \
                acc[0] += u * u;                                                                              \
            }                                                                                                 \
            T ss = 0;                                                                                         \
            for (int l = 0; l < FV_LANES; ++l) ss += acc[l];                                                  \
            const T n = (T)sqrt((double)ss);                                                                  \
            rk = (T)1 / (n > eps ? n : eps);                                                                  \
            r[k] = rk;                                                                                        \
            for (j = 0; j < D; ++j) ok[j] *= rk;                                                              \
        } else {                                                                                              \
            rk = r[k];                                                                                        \
            for (int64_t j = 0; j < D; ++j) ok[j] = (tk[j] + alpha * xk[j]) * rk;                             \
        }                                                                                                     \
    }                                                                                                         \
}                                                                                                             \
/* d_k <- s r_k (d_k - uhat_k <uhat_k, d_k>) with uhat_k = u_k r_k, u_k = t_k + a x_k (rebuilt, not read):    \
   d_k <- (d_k - u_k (<u_k, d_k> r_k r_k)) (r_k s) */                                                         \
void fv_project_##SUF(const T *t, int64_t ts, const T *x, int64_t xs, T *d, int64_t ds, const T *r,           \
                      int64_t rows, int64_t D, T alpha, T s) {                                                \
    for (int64_t k = 0; k < rows; ++k) {                                                                      \
        const T *tk = t + k * ts, *xk = x + k * xs;                                                           \
        T *dk = d + k * ds;                                                                                   \
        T acc[FV_LANES] = {0};                                                                                \
        int64_t j = 0;                                                                                        \
        for (; j + FV_LANES <= D; j += FV_LANES)                                                              \
            for (int l = 0; l < FV_LANES; ++l)                                                                \
                acc[l] += (tk[j + l] + alpha * xk[j + l]) * dk[j + l];                                        \
        for (; j < D; ++j) acc[0] += (tk[j] + alpha * xk[j]) * dk[j];                                         \
        T c = 0;                                                                                              \
        for (int l = 0; l < FV_LANES; ++l) c += acc[l];                                                       \
        const T rk = r[k], coef = (T)c * rk * rk, scale = rk * s;                                             \
        for (j = 0; j < D; ++j) dk[j] = (dk[j] - (tk[j] + alpha * xk[j]) * coef) * scale;                     \
    }                                                                                                         \
}
FV_ROWS(f32, float)
FV_ROWS(f64, double)
"""


def _rows_signatures():
    p, i = ctypes.c_void_p, ctypes.c_int64
    sig = {}
    for suffix, real in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
        sig[f"fv_uhat_{suffix}"] = [p, i, p, i, p, i, p, i, i, real, real, ctypes.c_int]
        sig[f"fv_project_{suffix}"] = [p, i, p, i, p, i, p, i, i, real, real]
    return sig


_ROWS = _native.Library("residual_rows", _ROWS_SOURCE, _rows_signatures())
#: elements per piece of a threaded row kernel (whole rows: at least one)
_ROW_PIECE = 1 << 16
#: below this many elements a row kernel runs on the calling thread alone. torch's OpenMP workers spin for a
#: while after each parallel region, so a pool thread handed a short kernel right after a matmul shares its
#: core with a spinning worker: at B=256, K=1000, D=512 on 2 threads the pooled kernels made the op 5-8%
#: slower than the torch ops, the calling thread alone level with them (docs/performance.md).
_ROW_THREADED_MIN = 1 << 20


def _row_kernel(name: str, *tensors: torch.Tensor):
    """The C row kernel ``name`` for these [rows, D] tensors, or None where the torch ops must run: not all
    fp32 or all fp64 CPU tensors with unit column stride, tracked by autograd, or no C library."""
    dt = tensors[0].dtype
    if dt not in (torch.float32, torch.float64):
        return None
    for t in tensors:
        if (t.device.type != "cpu" or t.dtype != dt or (t.shape[1] > 1 and t.stride(1) != 1)
                or (t.requires_grad and torch.is_grad_enabled())):
            return None
    lib = _ROWS.get()
    return None if lib is None else getattr(lib, f"{name}_{'f64' if dt == torch.float64 else 'f32'}")


def _over_rows(rows: int, D: int, run) -> None:
    if rows * D < _ROW_THREADED_MIN:
        run(0, rows)
        return
    _native.in_pieces(rows, max(1, _ROW_PIECE // max(D, 1)), run)


def _run_rows(kernel, mats, vec, *scalars) -> None:
    """``kernel(m0, m0 row stride, ..., vec, rows, D, *scalars)`` over row pieces (``_over_rows``): ``mats``
    the [rows, D] matrices (unit column stride), ``vec`` a contiguous [rows] vector, each piece's pointers
    moved to its first row."""
    rows, D = mats[0].shape
    e = mats[0].element_size()
    assert vec.stride(0) == 1 or rows <= 1
    ptrs = [(m.data_ptr(), m.stride(0)) for m in mats]
    pv = vec.data_ptr()

    def run(i, j):
        args = [a for p, st in ptrs for a in (p + e * st * i, st)]
        kernel(*args, pv + e * i, j - i, D, *scalars)

    _over_rows(rows, D, run)


class TorchPath:
    """The CPU path. Per class chunk, uhat_c = norm(base_c + alpha residual_c) is built once and used for
    everything."""

    @staticmethod
    def _uhat(base_c, residual_c, alpha):
        """(uhat_c, 1/||u_c||) with u_c = base_c + alpha residual_c: one C pass where it can run."""
        kernel = _row_kernel("fv_uhat", base_c, residual_c)
        if kernel is not None:
            rows, D = base_c.shape
            uh = torch.empty(rows, D, dtype=base_c.dtype)
            ru = torch.empty(rows, dtype=base_c.dtype)
            _run_rows(kernel, (base_c, residual_c, uh), ru, alpha, EPS, 1)
            return uh, ru
        u = torch.add(_up(base_c), _up(residual_c), alpha=alpha)
        ru = 1.0 / torch.linalg.vector_norm(u, dim=1).clamp_min_(EPS)
        return u.mul_(ru[:, None]), ru

    @staticmethod
    def inv_norm(a):
        return 1.0 / torch.linalg.vector_norm(_up(a), dim=1).clamp_min(EPS)

    @staticmethod
    def forward(features, base, residual, alpha, scale, target=None, out_dtype=None):
        """(rf, ru, logits) when target is None, else (rf, ru, (lse, target logit)); class chunk by chunk."""
        B, D = features.shape
        K = base.shape[0]
        rf = TorchPath.inv_norm(features)
        fh = _up(features) * (scale * rf)[:, None]
        ru = torch.empty(K, dtype=rf.dtype, device=features.device)
        if target is None:
            out = torch.empty(B, K, dtype=out_dtype, device=features.device)
        else:
            m = torch.full((B,), float("-inf"), device=features.device, dtype=rf.dtype)
            ssum, tgt = torch.zeros_like(m), torch.zeros_like(m)
        step = class_chunk(B, D, K)
        for k0 in range(0, K, step):
            k1 = min(k0 + step, K)
            uh, ru[k0:k1] = TorchPath._uhat(base[k0:k1], residual[k0:k1], alpha)
            if target is None:
                if k1 - k0 == K and out.dtype == fh.dtype:
                    torch.mm(fh, uh.T, out=out)  # one chunk: straight into the logits, no B x K copy
                else:
                    out[:, k0:k1] = fh @ uh.T
                continue
            lg = fh @ uh.T
            m_new = torch.maximum(m, lg.max(dim=1).values)  # online log-sum-exp
            ssum = ssum * torch.exp(m - m_new) + _exp_(lg - m_new[:, None]).sum(dim=1)
            m = m_new
            inside = (target >= k0) & (target < k1)
            idx = (target - k0).clamp(0, k1 - k0 - 1)
            tgt += torch.where(inside, lg.gather(1, idx[:, None])[:, 0], 0.0)
        if target is None:
            return rf, ru, out
        return rf, ru, (m + torch.log(ssum), tgt)

    @staticmethod
    def backward_prologue(features, rf, scale):
        return _up(features) * (scale * rf)[:, None]  # s * fhat, shared by every chunk

    @staticmethod
    def backward_chunk(rows: Rows, chunk: ClassChunk, g, ce):
        """One class chunk of the backward. g: this chunk of dL/dlogits, or None to recompute it from
        ce = (target - k0, lse, w). Writes chunk.dbase / chunk.dresidual (when given) and accumulates
        s * g @ uhat_c into rows.dfhat.

        Memory: d uhat = s g.T fhat is written straight into the output gradient and the projection
        (d uhat - uhat <uhat, d uhat>) / ||u|| runs in place on it (``_project``); the chunk's uhat is built
        whole only when the logits are recomputed or the features train (g @ uhat). So when the upstream
        gradient is given and the features are frozen, no chunk x D tensor is allocated beyond the returned
        gradient."""
        fh = rows.scaled_fhat
        uh = None
        if g is None:
            tgt, lse, w = ce
            uh = TorchPath._chunk_uhat(chunk, rows.alpha)
            g = _exp_((fh @ uh.T).sub_(lse[:, None]))
            inside = (tgt >= 0) & (tgt < g.shape[1])
            hit = inside.nonzero()[:, 0]
            g[hit, tgt[hit]] -= 1.0
            g.mul_(w[:, None])
        if rows.dfhat is not None:
            uh = TorchPath._chunk_uhat(chunk, rows.alpha) if uh is None else uh
            rows.dfhat.addmm_(g, uh, alpha=rows.scale)
        if chunk.dbase is None and chunk.dresidual is None:
            return
        first = chunk.dbase if chunk.dbase is not None else chunk.dresidual
        direct = first.dtype == fh.dtype and first.is_contiguous()
        du = torch.mm(g.T, fh, out=first) if direct else torch.mm(g.T, fh)  # = s * g.T @ fhat
        only_residual = direct and chunk.dbase is None  # du is d residual itself: alpha goes into the projection
        TorchPath._project(du, uh, chunk, rows.alpha, rows.alpha if only_residual else 1.0)
        if chunk.dbase is not None and not direct:
            chunk.dbase.copy_(du)
        if chunk.dresidual is not None and not only_residual:  # d residual = alpha d u (one dtype with base)
            if not direct:
                chunk.dresidual.copy_(du.mul_(rows.alpha))  # du is a temporary (d base already copied)
            else:
                torch.mul(du, rows.alpha, out=chunk.dresidual)  # du is d base

    @staticmethod
    def _chunk_uhat(chunk: ClassChunk, alpha):
        kernel = _row_kernel("fv_uhat", chunk.base, chunk.residual, chunk.ru[:, None])
        if kernel is not None:
            uh = torch.empty(chunk.base.shape, dtype=chunk.base.dtype)
            _run_rows(kernel, (chunk.base, chunk.residual, uh), chunk.ru.contiguous(), alpha, EPS, 0)
            return uh
        return torch.add(_up(chunk.base), _up(chunk.residual), alpha=alpha).mul_(chunk.ru[:, None])

    @staticmethod
    def _project(du, uh, chunk: ClassChunk, alpha, out_scale=1.0):
        """du <- out_scale (du - uhat <uhat, du>_row) / ||u|| in place. With the chunk's ``uh`` (consumed:
        scaled in place) in one pass; without, in row blocks of PROJECT_ELEMENTS, or of a quarter of the
        chunk where that is more, so that no chunk-sized temporary is made where none was needed, and a
        large chunk takes 4 blocks, not hundreds: each op is a parallel region, and on a busy machine every
        region can wait for a descheduled thread. A rebuilt block uses v = base + alpha residual as it is:
        uhat <uhat, du> = v ((<v, du> r) r) with r = 1/||u||, one pass over the block fewer than
        normalising v first (the products in that order stay in range whatever ||u||)."""
        kernel = _row_kernel("fv_project", chunk.base, chunk.residual, du, chunk.ru[:, None])
        if kernel is not None:  # one pass, u rebuilt from base and residual (uh, when given, is not read)
            _run_rows(kernel, (chunk.base, chunk.residual, du), chunk.ru.contiguous(), alpha, out_scale)
            return
        rows = du.shape[0] if uh is not None else max(1, PROJECT_ELEMENTS // max(du.shape[1], 1),
                                                      -(-du.shape[0] // 4))
        for i in range(0, du.shape[0], rows):
            d, r = du[i:i + rows], chunk.ru[i:i + rows, None]
            if uh is not None:
                u = uh[i:i + rows]
                coef = torch.linalg.vecdot(u, d)[:, None]
            else:
                u = torch.add(_up(chunk.base[i:i + rows]), _up(chunk.residual[i:i + rows]), alpha=alpha)
                coef = (torch.linalg.vecdot(u, d)[:, None] * r).mul_(r)
            d.sub_(u.mul_(coef)).mul_(r if out_scale == 1.0 else r * out_scale)

    @staticmethod
    def norm_backward(dvhat, a, r, out):
        vhat = _up(a) * r[:, None]
        out.copy_((dvhat - vhat * (vhat * dvhat).sum(dim=1, keepdim=True)) * r[:, None])


def _path(features: torch.Tensor):
    """The primitives this call runs: the Triton launchers, or the torch path."""
    kernels = _backend.triton_kernels("residual", features)
    return kernels if kernels is not None else TorchPath


# ---------------------------------------------------------------------------------------------------------
# the ops: forward and backward (one algorithm over either path's primitives), Functions and custom ops
# ---------------------------------------------------------------------------------------------------------


def residual_logits_forward(features, base, residual, alpha, scale):
    """(logits [B, K], 1/||f|| [B], 1/||u|| [K]) in the inputs' promoted dtype, class chunk by chunk."""
    rf, ru, out = _path(features).forward(features, base, residual, alpha, scale,
                                          out_dtype=out_dtype_of(features, base, residual))
    return out, rf, ru


def residual_ce_forward(features, base, residual, target, alpha, scale, keep_softmax):
    """Per-row losses (0 on rows whose target is -1), rf, ru, the rows' log-sum-exp, and, with
    ``keep_softmax`` (torch path, see keeps_softmax), softmax - onehot [B, K] for the backward (an empty
    tensor otherwise). Without it no B x K tensor is kept: the backward recomputes each chunk."""
    path = _path(features)
    valid = target >= 0
    soft = None
    if keep_softmax:  # the whole B x K logits (chunk by chunk), then softmax: one fused pass
        rf, ru, lg = path.forward(features, base, residual, alpha, scale, out_dtype=acc_dtype(features))
        soft = torch.softmax(lg, dim=1)  # its own exp, without torch.exp's slow subnormal lanes
        tgt = target.clamp_min(0)[:, None]
        l_t, p_t = lg.gather(1, tgt)[:, 0], soft.gather(1, tgt)[:, 0]
        nll = torch.log(p_t).neg_()  # -log p_t = lse - l_t, to p_t's rounding
        far = p_t < TINY_PROBABILITY
        if bool(far.any()):  # p_t underflowed (a target far below the row's largest logit): from the logits
            rows = far.nonzero()[:, 0]
            nll[rows] = torch.logsumexp(lg[rows], dim=1) - l_t[rows]
        del lg
        loss = torch.where(valid, nll, 0.0)
        lse = nll + l_t  # the row's log-sum-exp (l - log p at any column)
        soft.scatter_add_(1, tgt, valid[:, None].to(soft.dtype).neg_())  # minus the one-hot target
    else:
        rf, ru, (lse, tlogit) = path.forward(features, base, residual, alpha, scale, target=target)
        loss = torch.where(valid, lse - tlogit, 0.0)
    return loss, rf, ru, lse, (features.new_empty(0, dtype=rf.dtype) if soft is None else soft)


def residual_backward(features, base, residual, rf, ru, alpha, scale, needs, grad=None, ce=None, row_weight=None):
    """(d features, d base, d residual, d scale) for ``needs`` = (features, base, residual, scale), None
    where not needed. The upstream gradient is either ``grad`` = dL/dlogits [B, K] or, for the
    cross-entropy, ``ce`` = (target, lse, w): each chunk's dL/dlogits = w_b (softmax - onehot) is recomputed.
    ``row_weight`` w [B] with ``grad``: dL/dlogits = w_b grad_b (the kept softmax - onehot). On the torch
    path w goes on the B x D side instead of forming that B x K product: d uhat = s (w g).T fhat
    = s g.T (w fhat) and d fhat = s (w g) uhat = w (s g uhat), row by row.

    d scale = sum_bk g_bk <fhat_b, uhat_k> = sum_b <fhat_b, dfhat_b> / s, with dfhat = s g uhat the
    accumulator the features' gradient uses anyway: one reduction more."""
    need_f, need_t, need_x, need_s = needs
    path = _path(features)
    if row_weight is not None and path is not TorchPath:
        grad, row_weight = grad * row_weight[:, None], None
    B, D = features.shape
    K = base.shape[0]
    df = dt = dx = ds = None
    dfhat = torch.zeros(B, D, device=features.device, dtype=rf.dtype) if (need_f or need_s) else None
    if need_t:
        dt = torch.empty_like(base, memory_format=torch.contiguous_format)
    if need_x:
        dx = torch.empty_like(residual, memory_format=torch.contiguous_format)
    prologue = path.backward_prologue(features, rf, scale)
    if row_weight is not None:
        prologue.mul_(row_weight[:, None])  # w s fhat: the torch prologue is a new tensor of this call
    rows = Rows(features, rf, prologue, dfhat, alpha, scale)
    step = getattr(path, "backward_chunk_classes", class_chunk)(B, D, K)  # the path's own chunk, if it has one
    for k0 in range(0, K, step):
        k1 = min(k0 + step, K)
        chunk = ClassChunk(base[k0:k1], residual[k0:k1], ru[k0:k1], dt[k0:k1] if need_t else None,
                           dx[k0:k1] if need_x else None)
        path.backward_chunk(rows, chunk, None if grad is None else grad[:, k0:k1],
                            None if ce is None else (ce[0] - k0, ce[1], ce[2]))
    if row_weight is not None and dfhat is not None:
        dfhat.mul_(row_weight[:, None])
    if need_s:
        ds = (_up(features) * rf[:, None] * dfhat).sum() / scale
    if need_f:
        df = torch.empty_like(features, memory_format=torch.contiguous_format)
        path.norm_backward(dfhat, features, rf, df)
    return df, dt, dx, ds


def _ce_row_weights(target, grad_rows, dtype):
    """w_b = d loss / d loss_b, 0 on ignored rows (whatever the reduction's gradient there, also inf when
    every row is ignored and the mean divides by 0, as F.cross_entropy's zero gradients)."""
    return torch.where(target >= 0, grad_rows.to(dtype), 0.0)


def _scale_grad(ds, scale_tensor):
    return None if ds is None else ds.reshape(scale_tensor.shape).to(scale_tensor.dtype)


class ResidualLogitsFunction(torch.autograd.Function):
    """Eager autograd of :func:`residual_logits`; ``scale_tensor``: the logit scale when it trains, else None."""

    @staticmethod
    def forward(ctx, features, base, residual, alpha, scale, scale_tensor):
        out, rf, ru = residual_logits_forward(features, base, residual, alpha, scale)
        ctx.save_for_backward(features, base, residual, rf, ru, scale_tensor)
        ctx.alpha, ctx.scale = alpha, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        features, base, residual, rf, ru, scale_tensor = ctx.saved_tensors
        n = ctx.needs_input_grad
        df, dt, dx, ds = residual_backward(features, base, residual, rf, ru, ctx.alpha, ctx.scale,
                                           (n[0], n[1], n[2], n[5]), grad=grad.to(rf.dtype))
        return df, dt, dx, None, None, _scale_grad(ds, scale_tensor)


class ResidualCrossEntropyFunction(torch.autograd.Function):
    """Eager autograd of the per-row losses of :func:`residual_cross_entropy` (target -1 on ignored rows)."""

    @staticmethod
    def forward(ctx, features, base, residual, target, alpha, scale, scale_tensor, keep_softmax):
        loss, rf, ru, lse, soft = residual_ce_forward(features, base, residual, target, alpha, scale, keep_softmax)
        ctx.save_for_backward(features, base, residual, target, rf, ru, lse, soft, scale_tensor)
        ctx.alpha, ctx.scale = alpha, scale
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        features, base, residual, target, rf, ru, lse, soft, scale_tensor = ctx.saved_tensors
        n = ctx.needs_input_grad
        w = _ce_row_weights(target, grad_rows, rf.dtype)
        needs = (n[0], n[1], n[2], n[6])
        if soft.numel():
            grads = residual_backward(features, base, residual, rf, ru, ctx.alpha, ctx.scale, needs, grad=soft,
                                      row_weight=w)
        else:
            grads = residual_backward(features, base, residual, rf, ru, ctx.alpha, ctx.scale, needs,
                                      ce=(target, lse, w))
        df, dt, dx, ds = grads
        return df, dt, dx, None, None, None, _scale_grad(ds, scale_tensor), None


@torch.library.custom_op("fastvlm::residual_logits", mutates_args=())
def _residual_logits_op(features: Tensor, base: Tensor, residual: Tensor, alpha: float, scale: float
                        ) -> tuple[Tensor, Tensor, Tensor]:
    return residual_logits_forward(features, base, residual, alpha, scale)


@_residual_logits_op.register_fake
def _(features, base, residual, alpha, scale):
    acc = acc_dtype(features)
    return (features.new_empty(features.shape[0], base.shape[0], dtype=out_dtype_of(features, base, residual)),
            features.new_empty(features.shape[0], dtype=acc), base.new_empty(base.shape[0], dtype=acc))


@torch.library.custom_op("fastvlm::residual_ce", mutates_args=())
def _residual_ce_op(features: Tensor, base: Tensor, residual: Tensor, target: Tensor, alpha: float, scale: float,
                    keep_softmax: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return residual_ce_forward(features, base, residual, target, alpha, scale, keep_softmax)


@_residual_ce_op.register_fake
def _(features, base, residual, target, alpha, scale, keep_softmax):
    acc = acc_dtype(features)
    B, K = features.shape[0], base.shape[0]
    rows = features.new_empty(B, dtype=acc)
    soft = features.new_empty((B, K) if keep_softmax else (0,), dtype=acc)
    return rows, torch.empty_like(rows), base.new_empty(K, dtype=acc), torch.empty_like(rows), soft


@torch.library.custom_op("fastvlm::residual_backward", mutates_args=())
def _residual_backward_op(features: Tensor, base: Tensor, residual: Tensor, rf: Tensor, ru: Tensor,
                          grad: Optional[Tensor], target: Optional[Tensor], lse: Optional[Tensor],
                          w: Optional[Tensor], alpha: float, scale: float, need_features: bool, need_base: bool,
                          need_residual: bool, need_scale: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # grad given: dL/dlogits = w_b grad_b when w is given too (the kept softmax); else ce = (target, lse, w)
    ce = None if grad is not None else (target, lse, w)
    grads = residual_backward(features, base, residual, rf, ru, alpha, scale,
                              (need_features, need_base, need_residual, need_scale), grad=grad, ce=ce,
                              row_weight=w if grad is not None else None)
    return empty_for_none(grads, (features, base, residual, rf))  # each unneeded gradient empty like its input


@_residual_backward_op.register_fake
def _(features, base, residual, rf, ru, grad, target, lse, w, alpha, scale, need_features, need_base,
      need_residual, need_scale):
    return fake_grads([(features, need_features), (base, need_base), (residual, need_residual),
                       (rf.new_empty(()), need_scale)])


def _logits_setup(ctx, inputs, output):
    features, base, residual, alpha, scale = inputs
    _, rf, ru = output
    ctx.save_for_backward(features, base, residual, rf, ru)
    ctx.alpha, ctx.scale = alpha, scale


def _logits_backward(ctx, grad, _grad_rf, _grad_ru):
    features, base, residual, rf, ru = ctx.saved_tensors
    needs = (*ctx.needs_input_grad[:3], False)
    grads = _residual_backward_op(features, base, residual, rf, ru, grad.to(rf.dtype), None, None, None, ctx.alpha,
                                  ctx.scale, *needs)
    df, dt, dx, _ = none_for_unneeded(grads, needs)
    return df, dt, dx, None, None


_residual_logits_op.register_autograd(_logits_backward, setup_context=_logits_setup)


def _ce_setup(ctx, inputs, output):
    features, base, residual, target, alpha, scale, keep_softmax = inputs
    _, rf, ru, lse, soft = output
    ctx.save_for_backward(features, base, residual, target, rf, ru, lse, soft)
    ctx.alpha, ctx.scale, ctx.keep_softmax = alpha, scale, keep_softmax


def _ce_backward(ctx, grad_rows, _grad_rf, _grad_ru, _grad_lse, _grad_soft):
    features, base, residual, target, rf, ru, lse, soft = ctx.saved_tensors
    needs = (*ctx.needs_input_grad[:3], False)
    w = _ce_row_weights(target, grad_rows, rf.dtype)
    if ctx.keep_softmax:
        grads = _residual_backward_op(features, base, residual, rf, ru, soft, None, None, w, ctx.alpha, ctx.scale,
                                      *needs)
    else:
        grads = _residual_backward_op(features, base, residual, rf, ru, None, target, lse, w, ctx.alpha, ctx.scale,
                                      *needs)
    df, dt, dx, _ = none_for_unneeded(grads, needs)
    return df, dt, dx, None, None, None, None


_residual_ce_op.register_autograd(_ce_backward, setup_context=_ce_setup)


class _NormalizedClassSum(torch.autograd.Function):
    """sum_k norm(base_k + alpha residual_k) [D], class chunk by chunk (no K x D normalised copy held);
    backward: d u_k = (g - uhat_k <uhat_k, g>) / ||u_k||, d base = d u, d residual = alpha d u."""

    @staticmethod
    def forward(ctx, base, residual, alpha):
        step = class_chunk(1, base.shape[1], base.shape[0])
        total = torch.zeros(base.shape[1], dtype=acc_dtype(base), device=base.device)
        for k0 in range(0, base.shape[0], step):
            total += TorchPath._uhat(base[k0:k0 + step], residual[k0:k0 + step], alpha)[0].sum(dim=0)
        ctx.save_for_backward(base, residual)
        ctx.alpha = alpha
        return total

    @staticmethod
    def backward(ctx, g):
        base, residual = ctx.saved_tensors
        n = ctx.needs_input_grad
        db = torch.empty_like(base) if n[0] else None
        dr = torch.empty_like(residual) if n[1] else None
        step = class_chunk(1, base.shape[1], base.shape[0])
        for k0 in range(0, base.shape[0], step):
            uh, ru = TorchPath._uhat(base[k0:k0 + step], residual[k0:k0 + step], ctx.alpha)
            du = (g[None, :] - uh * (uh @ g)[:, None]) * ru[:, None]
            if db is not None:
                db[k0:k0 + step] = du
            if dr is not None:
                dr[k0:k0 + step] = du * ctx.alpha
        return db, dr, None


def smoothing_term(features, base, residual, target, alpha, scale, scale_tensor=None):
    """Per-row ``logit_t - mean_k logit_k`` (0 on rows whose target is -1), by autograd over B x D and a
    chunked K x D pass, never B x K. Label smoothing eps turns the cross-entropy into
    ``ce_b + eps * (logit_t - mean_k logit_k)`` (softmax's log-sum-exp appears with weight 1 either way)."""
    valid = target >= 0
    tgt = target.clamp_min(0)
    u_t = base[tgt] + alpha * residual[tgt]
    mean_u = _NormalizedClassSum.apply(base, residual, alpha) / base.shape[0]
    fhat = F.normalize(features.to(acc_dtype(features)), dim=-1, eps=EPS)
    uhat_t = F.normalize(u_t.to(acc_dtype(features)), dim=-1, eps=EPS)
    s = scale if scale_tensor is None else scale_tensor
    return torch.where(valid, s * (fhat * (uhat_t - mean_u)).sum(dim=1), 0.0)


# ---------------------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------------------


def _check(features, base, residual, alpha, logit_scale):
    check_matrix("features", features)
    check_matrix("base", base)
    check_matrix("residual", residual)
    on_triton = not compiling() and _backend.use_triton(features)
    for n, v in (("features", features), ("base", base), ("residual", residual)):
        check_float(n, v, triton_path=on_triton)
    check_same_device(features=features, base=base, residual=residual)
    if residual.shape != base.shape:
        raise ValueError(f"residual must have the shape of base {tuple(base.shape)}, got {tuple(residual.shape)}")
    if features.shape[1] != base.shape[1]:
        raise ValueError(f"features must have D={base.shape[1]} columns like base (K x D), got {features.shape[1]}")
    if isinstance(alpha, torch.Tensor) and alpha.requires_grad:
        raise ValueError("alpha must be a number or a tensor that does not require grad: the residual ops give "
                         "no gradient for it (train the residual instead)")
    check_scalar("alpha", alpha)
    check_scalar("logit_scale", logit_scale)


def _number(v) -> float:
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)


def _trained_scale(logit_scale):
    """The logit scale as a tensor when it takes a gradient (CLIP's learnable ``logit_scale`` after exp),
    else None. Only in eager mode: under torch.compile a scale that requires grad is refused."""
    if not (isinstance(logit_scale, torch.Tensor) and logit_scale.requires_grad and torch.is_grad_enabled()):
        return None
    if compiling():
        raise ValueError("logit_scale that requires grad is supported in eager mode only; under torch.compile "
                         "pass it as a number or detach it")
    return logit_scale


def residual_logits(features, base, residual, alpha=0.5, logit_scale=100.0):
    """``logit_scale * norm(features) @ norm(base + alpha * residual).T`` (B x K).

    features: [B, D]; base, residual: [K, D]; one float dtype (as F.linear; autocast casts them), any
    strides. Gradients for every input that requires grad, ``logit_scale`` included when it is a tensor that
    requires grad (a learnable CLIP scale). CUDA tensors run the fused Triton kernels, CPU tensors the
    chunked torch path.
    """
    _check(features, base, residual, alpha, logit_scale)
    scale_tensor = _trained_scale(logit_scale)
    (features, base, residual), amp = _backend.amp_cast(features, base, residual)
    check_same_dtype("residual_logits", features=features, base=base, residual=residual)
    alpha, scale = _number(alpha), _number(logit_scale)
    with amp:
        if compiling():
            return _residual_logits_op(features, base, residual, alpha, scale)[0]
        return ResidualLogitsFunction.apply(features, base, residual, alpha, scale, scale_tensor)


def residual_cross_entropy(features, base, residual, target, alpha=0.5, logit_scale=100.0, reduction="mean",
                           ignore_index=-100, label_smoothing=0.0):
    """``F.cross_entropy(residual_logits(...), target, reduction=reduction, ignore_index=ignore_index,
    label_smoothing=label_smoothing)``
    without holding more than one class chunk of the B x K logits or their gradient: class chunks with an
    online log-sum-exp forward, recomputed in backward (on CPU, when all classes fit in one chunk or the
    batch is no larger than D, softmax - onehot is kept instead: ``keeps_softmax``).

    target: [B] int class indices; ``ignore_index`` rows contribute nothing, and when every row is ignored
    the mean is NaN with zero gradients, as in F.cross_entropy. ``label_smoothing`` eps in [0, 1] mixes the
    one-hot target with the uniform distribution as F.cross_entropy does: per row
    ``(1 - eps) (lse - logit_t) + eps (lse - mean_k logit_k)``. The loss is in the inputs' promoted dtype,
    and in fp32 under autocast (torch's autocast runs losses in fp32).
    """
    _check(features, base, residual, alpha, logit_scale)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    check_scalar("label_smoothing", label_smoothing, 0.0, 1.0)
    check_target("target", target, features.shape[0], base.shape[0], ignore_index, device=features.device)
    scale_tensor = _trained_scale(logit_scale)
    autocasting = torch.is_autocast_enabled(features.device.type)
    (features, base, residual), amp = _backend.amp_cast(features, base, residual)
    check_same_dtype("residual_cross_entropy", features=features, base=base, residual=residual)
    valid = target != ignore_index
    tgt = torch.where(valid, target.long(), -1)  # -1 never matches a class
    alpha, scale = _number(alpha), _number(logit_scale)
    keep = (not _backend.use_triton(features) and keeps_softmax(*features.shape, base.shape[0])
            and torch.is_grad_enabled() and any(t.requires_grad for t in (features, base, residual)))
    with amp:
        if compiling():
            rows = _residual_ce_op(features, base, residual, tgt, alpha, scale, keep)[0]
        else:
            rows = ResidualCrossEntropyFunction.apply(features, base, residual, tgt, alpha, scale, scale_tensor, keep)
        if label_smoothing:
            rows = rows + float(label_smoothing) * smoothing_term(features, base, residual, tgt, alpha, scale,
                                                                 scale_tensor)
    loss = reduce_loss(rows, valid, reduction)
    return loss.float() if autocasting else loss.to(out_dtype_of(features, base, residual))
