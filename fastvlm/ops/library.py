"""The ops as torch custom ops (``torch.library``), with fake-tensor implementations, so that a model using
them compiles under ``torch.compile`` without graph breaks. The public functions route here while
``torch.compiler.is_compiling()``; eager calls use the autograd Functions directly. Both run the same
implementations (fastvlm/ops/<family>.py), which dispatch to the torch path or the Triton kernels inside.

Not covered: ``masked_linear`` with a :class:`GradSlot` (the two-pass RMT step hands a Python object
between the passes; compile that step's loss, not its backward hand-off).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor


def _ctx(**kw):
    return SimpleNamespace(**kw)


# ---------------------------------------------------------------------------------------------------------
# residual logits / cross-entropy
# ---------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastvlm::residual_logits_fwd", mutates_args=())
def residual_logits_fwd(f: Tensor, t: Tensor, x: Tensor, alpha: float, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    from .residual import _prims, out_dtype_of

    rf, ru, out = _prims(f).forward(f, t, x, alpha, scale, out_dtype=out_dtype_of(f, t, x))
    return out, rf, ru


@residual_logits_fwd.register_fake
def _(f, t, x, alpha, scale):
    from .residual import acc_dtype, out_dtype_of

    acc = acc_dtype(f)
    return (f.new_empty(f.shape[0], t.shape[0], dtype=out_dtype_of(f, t, x)), f.new_empty(f.shape[0], dtype=acc),
            t.new_empty(t.shape[0], dtype=acc))


@torch.library.custom_op("fastvlm::residual_ce_fwd", mutates_args=())
def residual_ce_fwd(f: Tensor, t: Tensor, x: Tensor, target: Tensor, alpha: float, scale: float
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row losses (0 where target < 0) plus rf, ru, lse for the backward."""
    from .residual import _prims

    rf, ru, (lse, tlogit) = _prims(f).forward(f, t, x, alpha, scale, target=target)
    return torch.where(target >= 0, lse - tlogit, 0.0), rf, ru, lse


@residual_ce_fwd.register_fake
def _(f, t, x, target, alpha, scale):
    from .residual import acc_dtype

    acc = acc_dtype(f)
    B = f.shape[0]
    return f.new_empty(B, dtype=acc), f.new_empty(B, dtype=acc), t.new_empty(t.shape[0], dtype=acc), f.new_empty(B, dtype=acc)


@torch.library.custom_op("fastvlm::residual_bwd", mutates_args=())
def residual_bwd(f: Tensor, t: Tensor, x: Tensor, rf: Tensor, ru: Tensor, grad: Tensor | None, target: Tensor | None,
                 lse: Tensor | None, w: Tensor | None, alpha: float, scale: float, need_f: bool, need_t: bool,
                 need_x: bool) -> tuple[Tensor, Tensor, Tensor]:
    from .residual import _backward, _prims

    ctx = _ctx(alpha=alpha, scale=scale, needs_input_grad=(need_f, need_t, need_x))
    ce = None if grad is not None else (target, lse, w)
    df, dt, dx = _backward(_prims(f), ctx, f, t, x, rf, ru, grad=grad, ce=ce)
    empty = f.new_empty(0)
    return (df if df is not None else empty, dt if dt is not None else empty, dx if dx is not None else empty)


@residual_bwd.register_fake
def _(f, t, x, rf, ru, grad, target, lse, w, alpha, scale, need_f, need_t, need_x):
    e = f.new_empty(0)
    return (torch.empty_like(f) if need_f else e, torch.empty_like(t) if need_t else e,
            torch.empty_like(x) if need_x else e)


def _logits_setup(ctx, inputs, output):
    f, t, x, alpha, scale = inputs
    _, rf, ru = output
    ctx.save_for_backward(f, t, x, rf, ru)
    ctx.alpha, ctx.scale = alpha, scale


def _logits_backward(ctx, grad, _g_rf, _g_ru):
    f, t, x, rf, ru = ctx.saved_tensors
    ctx.needs = (True, True, True)  # see _masked_backward
    df, dt, dx = residual_bwd(f, t, x, rf, ru, grad.to(rf.dtype), None, None, None, ctx.alpha, ctx.scale, *ctx.needs)
    return (df if ctx.needs[0] else None, dt if ctx.needs[1] else None, dx if ctx.needs[2] else None, None, None)


residual_logits_fwd.register_autograd(_logits_backward, setup_context=_logits_setup)


def _ce_setup(ctx, inputs, output):
    f, t, x, target, alpha, scale = inputs
    _, rf, ru, lse = output
    ctx.save_for_backward(f, t, x, target, rf, ru, lse)
    ctx.alpha, ctx.scale = alpha, scale


def _ce_backward(ctx, grad, _a, _b, _c):
    f, t, x, target, rf, ru, lse = ctx.saved_tensors
    ctx.needs = (True, True, True)  # see _masked_backward
    w = (target >= 0).to(rf.dtype) * grad.to(rf.dtype)  # per-row weights: d loss_b
    df, dt, dx = residual_bwd(f, t, x, rf, ru, None, target, lse, w, ctx.alpha, ctx.scale, *ctx.needs)
    return (df if ctx.needs[0] else None, dt if ctx.needs[1] else None, dx if ctx.needs[2] else None,
            None, None, None)


residual_ce_fwd.register_autograd(_ce_backward, setup_context=_ce_setup)


def residual_logits(f, t, x, alpha, scale):
    return residual_logits_fwd(f, t, x, alpha, scale)[0]


def residual_cross_entropy(f, t, x, target, alpha, scale, reduction, ignore_index):
    from .residual import out_dtype_of, reduce_loss

    valid = target != ignore_index
    loss = residual_ce_fwd(f, t, x, torch.where(valid, target, -1), alpha, scale)[0]
    return reduce_loss(loss, valid, reduction).to(out_dtype_of(f, t, x))


# ---------------------------------------------------------------------------------------------------------
# masked linear
# ---------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastvlm::masked_linear_fwd", mutates_args=())
def masked_linear_fwd(x: Tensor, weight: Tensor, scores: Tensor, bias: Tensor | None, threshold: float,
                      ref_grad: Tensor | None, ratio: float, seed: int) -> Tensor:
    from .masked import MaskedLinear

    with torch.no_grad():
        return MaskedLinear.forward(_ctx(save_for_backward=lambda *a: None), x, weight, scores, bias, threshold,
                                    ref_grad, ratio, seed)


@masked_linear_fwd.register_fake
def _(x, weight, scores, bias, threshold, ref_grad, ratio, seed):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("fastvlm::masked_linear_bwd", mutates_args=())
def masked_linear_bwd(dy: Tensor, x: Tensor, weight: Tensor, scores: Tensor, ref_grad: Tensor | None,
                      threshold: float, ratio: float, seed: int, need_x: bool, need_s: bool, need_b: bool
                      ) -> tuple[Tensor, Tensor, Tensor]:
    from .. import _backend
    from .masked import MaskedLinear

    km = None
    if _backend.use_triton(x):
        from ..kernels import masked as km
    ctx = _ctx(saved_tensors=(x, weight, scores, ref_grad), kernels=km, threshold=threshold, ratio=ratio, seed=seed,
               has_bias=need_b, slot=None, needs_input_grad=(need_x, False, need_s, need_b))
    dx, _, ds, db = MaskedLinear.backward(ctx, dy)[:4]
    e = x.new_empty(0)
    return (dx if dx is not None else e, ds if ds is not None else e, db if db is not None else e)


@masked_linear_bwd.register_fake
def _(dy, x, weight, scores, ref_grad, threshold, ratio, seed, need_x, need_s, need_b):
    e = x.new_empty(0)
    return (torch.empty_like(x) if need_x else e, torch.empty_like(scores) if need_s else e,
            dy.new_empty(weight.shape[0]) if need_b else e)


def _masked_setup(ctx, inputs, output):
    x, weight, scores, bias, threshold, ref_grad, ratio, seed = inputs
    ctx.save_for_backward(x, weight, scores, ref_grad)
    ctx.threshold, ctx.ratio, ctx.seed, ctx.has_bias = threshold, ratio, seed, bias is not None


def _masked_backward(ctx, dy):
    x, weight, scores, ref_grad = ctx.saved_tensors
    # every gradient the op can give: needs_input_grad is not reliable while AOT autograd traces the backward
    needs = (True, True, ctx.has_bias)
    dx, ds, db = masked_linear_bwd(dy, x, weight, scores, ref_grad, ctx.threshold, ctx.ratio, ctx.seed, *needs)
    return (dx if needs[0] else None, None, ds if needs[1] else None, db if needs[2] else None, None, None, None, None)


masked_linear_fwd.register_autograd(_masked_backward, setup_context=_masked_setup)


# ---------------------------------------------------------------------------------------------------------
# Cayley and block rotation
# ---------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastvlm::cayley_fwd", mutates_args=())
def cayley_fwd(q: Tensor) -> Tensor:
    from .orth import Cayley

    return Cayley.forward(_ctx(save_for_backward=lambda *a: None), q)


@cayley_fwd.register_fake
def _(q):
    return torch.empty_like(q)


@torch.library.custom_op("fastvlm::cayley_bwd", mutates_args=())
def cayley_bwd(r: Tensor, g: Tensor) -> Tensor:
    from .orth import Cayley, _kernels

    return Cayley.backward(_ctx(saved_tensors=(r,), ko=_kernels(r, r.shape[-1])), g)


@cayley_bwd.register_fake
def _(r, g):
    return torch.empty_like(r)


cayley_fwd.register_autograd(lambda ctx, g: cayley_bwd(ctx.saved_tensors[0], g),
                             setup_context=lambda ctx, inputs, output: ctx.save_for_backward(output))


@torch.library.custom_op("fastvlm::block_rotate_fwd", mutates_args=())
def block_rotate_fwd(x2: Tensor, r: Tensor, transpose: bool) -> Tensor:
    from .orth import BlockRotate

    return BlockRotate.forward(_ctx(save_for_backward=lambda *a: None), x2, r, transpose)


@block_rotate_fwd.register_fake
def _(x2, r, transpose):
    return torch.empty_like(x2)


@torch.library.custom_op("fastvlm::block_rotate_bwd", mutates_args=())
def block_rotate_bwd(x2: Tensor, r: Tensor, dy: Tensor, transpose: bool, need_x: bool, need_r: bool
                     ) -> tuple[Tensor, Tensor]:
    from .orth import BlockRotate, _kernels

    ctx = _ctx(saved_tensors=(x2, r), ko=_kernels(x2, r.shape[-1]), transpose=transpose,
               needs_input_grad=(need_x, need_r))
    dx, dr, _ = BlockRotate.backward(ctx, dy)
    e = x2.new_empty(0)
    return (dx if dx is not None else e, dr if dr is not None else e)


@block_rotate_bwd.register_fake
def _(x2, r, dy, transpose, need_x, need_r):
    e = x2.new_empty(0)
    return (torch.empty_like(x2) if need_x else e, torch.empty_like(r) if need_r else e)


def _rot_setup(ctx, inputs, output):
    x2, r, transpose = inputs
    ctx.save_for_backward(x2, r)
    ctx.transpose = transpose


def _rot_backward(ctx, dy):
    x2, r = ctx.saved_tensors
    ctx.needs = (True, True)  # see _masked_backward
    dx, dr = block_rotate_bwd(x2, r, dy, ctx.transpose, *ctx.needs)
    return (dx if ctx.needs[0] else None, dr if ctx.needs[1] else None, None)


block_rotate_fwd.register_autograd(_rot_backward, setup_context=_rot_setup)
