r"""TaskRes residual-classifier logits and the fused cross-entropy (METHODS.md section 1).

Formula::

    u      = base + alpha * residual                       (K x D)
    logits = logit_scale * norm(features) @ norm(u).T      (B x K), norm = row L2 normalisation,
                                                            v / max(||v||, 1e-12) as F.normalize
    loss   = cross_entropy(logits, target, reduction)

Gradients, with g = dL/dlogits, fhat = norm(f), uhat = norm(u):
    d uhat = s g.T fhat,  d u = (d uhat - uhat <uhat, d uhat>_row) / ||u||,  d residual = alpha d u,  d base = d u
    d fhat = s g uhat,    d f = (d fhat - fhat <fhat, d fhat>_row) / ||f||
and for the cross-entropy g = w_b (softmax(logits) - onehot(target)), w_b = 1/#valid (mean), 1 (sum), or
grad_output_b (none).

Three implementations of the same math live here and in kernels/residual.py:
- ``*_reference``: the naive autograd composition, readable and exact: the test oracle.
- ``_TorchPrims``: the torch path that CPU tensors run. Chunked over classes: no more than one class chunk
  of logits (at most 2^21 elements) and no K x D normalised copy is ever held, and backward recomputes each
  chunk (online log-sum-exp for the loss); when all classes fit in one chunk, the loss keeps that chunk's
  softmax for backward instead (see ResidualCrossEntropy). Its fp32 class matmuls go through
  ``_backend.linear`` (oneDNN on CPUs where it is faster than torch's BLAS).
- ``fastvlm.kernels.residual``: the Triton kernels behind the same three primitives (``forward``,
  ``backward_prologue``/``backward_chunk``, ``norm_backward``), fused tile by tile.
The autograd Functions below drive the primitives, so both backends share one algorithm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend
from .._checks import check_float, check_matrix, check_same_device, check_scalar, check_target, compiling

EPS = 1e-12
#: elements (B x chunk and chunk x D) a class chunk may take in the torch path and in the Triton backward
CHUNK_ELEMENTS = 1 << 21


def class_chunk(B: int, D: int, K: int) -> int:
    return max(1, min(K, CHUNK_ELEMENTS // max(B, D, 1)))


# ---------------------------------------------------------------------------------------------------------
# references (naive composition): the oracle
# ---------------------------------------------------------------------------------------------------------


def residual_logits_reference(features, base, residual, alpha=0.5, logit_scale=100.0):
    return logit_scale * F.normalize(features, dim=-1) @ F.normalize(base + alpha * residual, dim=-1).T


def residual_cross_entropy_reference(features, base, residual, target, alpha=0.5, logit_scale=100.0,
                                     reduction="mean", ignore_index=-100):
    lg = residual_logits_reference(features, base, residual, alpha, logit_scale)
    return F.cross_entropy(lg, target, reduction=reduction, ignore_index=ignore_index)


# ---------------------------------------------------------------------------------------------------------
# torch primitives (the CPU path): the same signatures as the Triton launchers
# ---------------------------------------------------------------------------------------------------------


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 accumulation, fp64 kept (so gradcheck runs on the torch path in float64)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _up(t):
    return t.to(acc_dtype(t))


def out_dtype_of(f, t, x) -> torch.dtype:
    """The logits' / loss's dtype: the promotion of the three inputs' dtypes."""
    return torch.promote_types(torch.promote_types(f.dtype, t.dtype), x.dtype)


def reduce_loss(loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """F.cross_entropy's reductions of per-row losses (0 on ignored rows); mean is nan when none is valid."""
    if reduction == "mean":
        return loss.sum() / valid.sum()
    if reduction == "sum":
        return loss.sum()
    return loss


class _TorchPrims:
    """The CPU path. Per class chunk, uhat_c = norm(t_c + alpha x_c) is built once and used for everything."""

    @staticmethod
    def _uhat(tc, xc, alpha):
        u = torch.add(_up(tc), _up(xc), alpha=alpha)
        ru = 1.0 / torch.linalg.vector_norm(u, dim=1).clamp_min_(EPS)
        return u.mul_(ru[:, None]), ru

    @staticmethod
    def inv_norm(a):
        return 1.0 / torch.linalg.vector_norm(_up(a), dim=1).clamp_min(EPS)

    @staticmethod
    def forward(f, t, x, alpha, scale, target=None, out_dtype=None):
        """(rf, ru, logits) when target is None, else (rf, ru, (lse, target logit)); class chunk by chunk."""
        B, D = f.shape
        K = t.shape[0]
        rf = _TorchPrims.inv_norm(f)
        fh = _up(f) * (scale * rf)[:, None]
        ru = torch.empty(K, dtype=rf.dtype, device=f.device)
        if target is None:
            out = torch.empty(B, K, dtype=out_dtype, device=f.device)
        else:
            m = torch.full((B,), float("-inf"), device=f.device, dtype=rf.dtype)
            ssum, tgt = torch.zeros_like(m), torch.zeros_like(m)
        step = class_chunk(B, D, K)
        for k0 in range(0, K, step):
            k1 = min(k0 + step, K)
            uh, ru[k0:k1] = _TorchPrims._uhat(t[k0:k1], x[k0:k1], alpha)
            lg = _backend.linear(fh, uh)  # fh @ uh.T, on oneDNN where it is faster
            if target is None:
                out[:, k0:k1] = lg
                continue
            m_new = torch.maximum(m, lg.max(dim=1).values)  # online log-sum-exp
            ssum = ssum * torch.exp(m - m_new) + torch.exp(lg - m_new[:, None]).sum(dim=1)
            m = m_new
            inside = (target >= k0) & (target < k1)
            idx = (target - k0).clamp(0, k1 - k0 - 1)
            tgt += torch.where(inside, lg.gather(1, idx[:, None])[:, 0], 0.0)
        if target is None:
            return rf, ru, out
        return rf, ru, (m + torch.log(ssum), tgt)

    @staticmethod
    def backward_prologue(f, rf, scale):
        return _up(f) * (scale * rf)[:, None]  # s * fhat, shared by every chunk

    @staticmethod
    def backward_chunk(fh, f, rf, tc, xc, ruc, alpha, scale, g, ce, dt_c, dx_c, dfhat):
        """One class chunk of the backward. g: this chunk of dL/dlogits, or None to recompute it from
        ce = (target - k0, lse, w). Writes dt_c / dx_c (when given) and accumulates s * g @ uhat_c into dfhat."""
        uh = torch.add(_up(tc), _up(xc), alpha=alpha).mul_(ruc[:, None])
        if g is None:
            tgt, lse, w = ce
            g = torch.exp_(_backend.linear(fh, uh).sub_(lse[:, None]))
            inside = (tgt >= 0) & (tgt < g.shape[1])
            rows = inside.nonzero()[:, 0]
            g[rows, tgt[rows]] -= 1.0
            g.mul_(w[:, None])
        if dfhat is not None:
            if _backend.use_onednn(g, uh.t()):
                dfhat.add_(_backend.linear(g, uh.t()), alpha=scale)
            else:
                dfhat.addmm_(g, uh, alpha=scale)
        if dt_c is not None or dx_c is not None:
            duh = torch.mm(g.T, fh)  # = s * g.T @ fhat
            dot = (uh * duh).sum(dim=1, keepdim=True)
            du = duh.sub_(uh.mul_(dot)).mul_(ruc[:, None])  # (d uhat - uhat <uhat, d uhat>) / ||u||
            if dt_c is not None:
                dt_c.copy_(du)
            if dx_c is not None:
                dx_c.copy_(du.mul_(alpha))

    @staticmethod
    def norm_backward(dvhat, a, r, out):
        vhat = _up(a) * r[:, None]
        out.copy_((dvhat - vhat * (vhat * dvhat).sum(dim=1, keepdim=True)) * r[:, None])


def _prims(t: torch.Tensor):
    if _backend.use_triton(t):
        from ..kernels import residual as kr

        return kr
    return _TorchPrims


# ---------------------------------------------------------------------------------------------------------
# shared backward: chunk over classes, g_chunk from grad_output (logits) or recomputed (cross-entropy)
# ---------------------------------------------------------------------------------------------------------


def _backward(P, ctx, f, t, x, rf, ru, grad=None, ce=None):
    alpha, scale = ctx.alpha, ctx.scale
    need_f, need_t, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    B, D = f.shape
    K = t.shape[0]
    df = dt = dx = None
    dfhat = torch.zeros(B, D, device=f.device, dtype=rf.dtype) if need_f else None
    if need_t:
        dt = torch.empty_like(t, memory_format=torch.contiguous_format)
    if need_x:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    fh = P.backward_prologue(f, rf, scale)
    step = class_chunk(B, D, K)
    for k0 in range(0, K, step):
        k1 = min(k0 + step, K)
        g = None if grad is None else grad[:, k0:k1]
        ce_c = None if ce is None else (ce[0] - k0, ce[1], ce[2])
        P.backward_chunk(fh, f, rf, t[k0:k1], x[k0:k1], ru[k0:k1], alpha, scale, g, ce_c,
                         dt[k0:k1] if need_t else None, dx[k0:k1] if need_x else None, dfhat)
    if need_f:
        df = torch.empty_like(f, memory_format=torch.contiguous_format)
        P.norm_backward(dfhat, f, rf, df)
    return df, dt, dx


class ResidualLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f, t, x, alpha, scale):
        P = _prims(f)
        rf, ru, out = P.forward(f, t, x, alpha, scale, out_dtype=out_dtype_of(f, t, x))
        ctx.save_for_backward(f, t, x, rf, ru)
        ctx.alpha, ctx.scale, ctx.prims = alpha, scale, P
        return out

    @staticmethod
    def backward(ctx, grad):
        f, t, x, rf, ru = ctx.saved_tensors
        df, dt, dx = _backward(ctx.prims, ctx, f, t, x, rf, ru, grad=grad.to(rf.dtype))
        return df, dt, dx, None, None


class ResidualCrossEntropy(torch.autograd.Function):
    """Class chunk by chunk, the softmax gradient recomputed in backward (a third class matmul) so that no
    B x K logits are held between the passes. Exception, torch path only: when all K classes fit in one
    chunk (B x K within the chunk budget), the forward's one chunk of logits is turned into
    softmax - onehot and kept, and the backward skips the recompute: no more than that one chunk, which the
    forward held anyway (at B=256, K=1000, D=512 this took the op from 1.36x to ~1.0x the naive time)."""

    @staticmethod
    def forward(ctx, f, t, x, target, alpha, scale, reduction, ignore_index):
        P = _prims(f)
        valid = target != ignore_index
        tgt = torch.where(valid, target, -1)  # -1 never matches a class
        keep = (P is _TorchPrims and class_chunk(f.shape[0], f.shape[1], t.shape[0]) >= t.shape[0]
                and any(ctx.needs_input_grad[:3]))
        soft = None
        if keep:  # one chunk: the whole B x K logits, as the chunked forward would build them
            rf, ru, lg = P.forward(f, t, x, alpha, scale, out_dtype=acc_dtype(f))
            lse = torch.logsumexp(lg, dim=1)
            rows = valid.nonzero()[:, 0]
            tlogit = torch.zeros_like(lse)
            tlogit[rows] = lg[rows, tgt[rows]]
            soft = lg.sub_(lse[:, None]).exp_()  # softmax in place, then minus the one-hot target
            soft[rows, tgt[rows]] -= 1.0
        else:
            rf, ru, (lse, tlogit) = P.forward(f, t, x, alpha, scale, target=tgt)
        loss = torch.where(valid, lse - tlogit, 0.0)
        ctx.save_for_backward(f, t, x, rf, ru, tgt, lse, valid, soft)
        ctx.alpha, ctx.scale, ctx.reduction, ctx.prims, ctx.n_valid = alpha, scale, reduction, P, valid.sum()
        return reduce_loss(loss, valid, reduction).to(out_dtype_of(f, t, x))

    @staticmethod
    def backward(ctx, grad):
        f, t, x, rf, ru, tgt, lse, valid, soft = ctx.saved_tensors
        grad = grad.to(rf.dtype)
        if ctx.reduction == "mean":
            w = valid.to(grad.dtype) * (grad / ctx.n_valid)
        else:  # "sum": grad is a scalar; "none": one per row
            w = valid.to(grad.dtype) * grad
        if soft is not None:
            df, dt, dx = _backward(ctx.prims, ctx, f, t, x, rf, ru, grad=soft * w[:, None])
        else:
            df, dt, dx = _backward(ctx.prims, ctx, f, t, x, rf, ru, ce=(tgt, lse, w))
        return df, dt, dx, None, None, None, None, None


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
    check_scalar("alpha", alpha)
    check_scalar("logit_scale", logit_scale)


def residual_logits(features, base, residual, alpha=0.5, logit_scale=100.0):
    """``logit_scale * norm(features) @ norm(base + alpha * residual).T`` (B x K).

    features: [B, D]; base, residual: [K, D]; any float dtype, any strides. Gradients for every input that
    requires grad. CUDA tensors run the fused Triton kernel, CPU tensors the chunked torch path.
    """
    _check(features, base, residual, alpha, logit_scale)
    (features, base, residual), amp = _backend.amp_cast(features, base, residual)
    with amp:
        if compiling():
            from . import library

            return library.residual_logits(features, base, residual, float(alpha), float(logit_scale))
        return ResidualLogits.apply(features, base, residual, float(alpha), float(logit_scale))


def residual_cross_entropy(features, base, residual, target, alpha=0.5, logit_scale=100.0, reduction="mean",
                           ignore_index=-100):
    """``F.cross_entropy(residual_logits(...), target, reduction=reduction)`` without holding more than one
    class chunk of the B x K logits or their gradient: class chunks with an online log-sum-exp forward,
    recomputed in backward (on CPU, when all classes fit in one chunk, that chunk is kept instead).

    target: [B] int class indices (``ignore_index`` rows contribute nothing, as in F.cross_entropy).
    """
    _check(features, base, residual, alpha, logit_scale)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    check_target("target", target, features.shape[0], base.shape[0], ignore_index, device=features.device)
    (features, base, residual), amp = _backend.amp_cast(features, base, residual)
    with amp:
        if compiling():
            from . import library

            return library.residual_cross_entropy(features, base, residual, target.long(), float(alpha),
                                                  float(logit_scale), reduction, int(ignore_index))
        return ResidualCrossEntropy.apply(features, base, residual, target.long(), float(alpha), float(logit_scale),
                                          reduction, int(ignore_index))
