r"""RMT mask tuning: masked-weight linear with a straight-through score gradient, and gradient dropout
(docs/methods.md §2).

Formula::

    y = x @ (W * [S > tau]).T + b                  W frozen, scores S trainable, tau = 5e-3
    dL/dx = dy @ (W * [S > tau]),   dL/db = sum dy
    dL/dS = (dy.T @ x) * W                          straight-through estimator (dy, x flattened over leading dims)

    grad_dropout(g_a, g_b, ratio, seed, offset):
        P = 0.5 * (1 + sign(g_a) * (g_a + g_b) / (|g_a| + |g_b| + 1e-8))
        U = philox_uniform(seed, offset + i)        i = row-major element index
        out = ((1 - ratio) + ratio * [P > U]) * g_a

``philox_uniform`` is Triton's ``tl.rand`` (Philox 4x32, 10 rounds, counter (i_lo, i_hi, 0, 0), key
(seed_lo, seed_hi), first output word mapped to [0, 1)) reproduced bit for bit in torch, so the CPU and GPU
paths drop the same elements. With ``ref_grad``, ``masked_linear``'s backward returns
``grad_dropout(dL/dS, ref_grad, drop_ratio, seed, offset=0)`` and the Triton kernel fuses it into the score
gradient's epilogue: the un-dropped N x K gradient never exists.

The torch path's y and dL/dx matmuls go through ``_backend.linear`` (oneDNN on CPUs where it is faster than
torch's BLAS); dL/dS stays on torch's matmul, since oneDNN would first copy the transposed dy (M x N).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from .._checks import (check_finite, check_float, check_same_device, check_same_dtype, check_scalar, check_seed,
                       check_tensor, compiling)
from ._template import empty_for_none, fake_grads, none_for_unneeded
from .philox import grad_dropout_torch, keep_scale, philox_uniform

THRESHOLD = 5e-3

def _comparable(scores: torch.Tensor) -> torch.Tensor:
    """Scores as the mask compares them: in fp32 (fp16 would round tau = 5e-3 to 0.0050011), as the kernels
    do; fp64 kept."""
    return scores if scores.dtype in (torch.float32, torch.float64) else scores.float()


def binary_mask(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """[S > tau], compared as ``_comparable`` says."""
    return _comparable(scores) > threshold


def masked_weight(weight: torch.Tensor, scores: torch.Tensor, threshold: float, dtype=None) -> torch.Tensor:
    """``weight * [scores > threshold]`` in ``dtype`` (default: weight's), the formula's own product.

    Two passes over one N x K buffer and no other allocation: the comparison is written as 0/1 straight into
    the result, which is then multiplied by the weight in place. ``torch.where(mask, w, 0)`` is slower on CPU
    (its kernel is not vectorised) and ``w * mask`` with a bool mask allocates a float copy of the mask (twice
    the memory); docs/performance.md has the figures."""
    out = torch.empty(weight.shape, dtype=weight.dtype if dtype is None else dtype, device=weight.device)
    torch.gt(_comparable(scores), threshold, out=out)
    return out.mul_(weight)


# ---------------------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------------------


class _StraightThrough(torch.autograd.Function):
    """Forward: the binary mask [S > tau]. Backward: the gradient passes straight through to S."""

    @staticmethod
    def forward(ctx, scores, threshold):
        return binary_mask(scores, threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, g):
        return g, None


def masked_linear_reference(x, weight, scores, bias=None, threshold=THRESHOLD):
    """Naive composition: ``F.linear(x, weight * mask)`` with autograd; dL/dS = dL/dW' * W."""
    return F.linear(x, weight * _StraightThrough.apply(scores, threshold).to(weight.dtype), bias)


def grad_dropout_reference(g_task, g_ref, ratio, seed, offset=0):
    """The formula on whole tensors, in fp64 for fp64 inputs and fp32 otherwise (see fastvlm/ops/philox.py)."""
    u = philox_uniform(seed, torch.arange(g_task.numel(), device=g_task.device) + offset).view(g_task.shape)
    keep = keep_scale(g_task, g_ref, u, ratio)  # in the compute dtype
    return (keep * g_task.to(keep.dtype)).to(g_task.dtype)


def _masked_example(dtype, generator):
    N, K = 9, 13
    x = torch.randn(2, 3, K, generator=generator, dtype=dtype).requires_grad_()
    w = torch.randn(N, K, generator=generator, dtype=dtype)
    # scores away from tau (|S - tau| >= 1e-3): fp64 gradcheck's perturbations never flip a mask bit
    s = (5e-3 + torch.sign(torch.randn(N, K, generator=generator)) * (1e-3 + 1e-2 * torch.rand(N, K, generator=generator)))
    b = torch.randn(N, generator=generator, dtype=dtype).requires_grad_()
    return [x, w, s.to(dtype).requires_grad_(), b], {}


def _grad_dropout_example(dtype, generator):
    ga, gb = torch.randn(11, 6, generator=generator, dtype=dtype), torch.randn(11, 6, generator=generator, dtype=dtype)
    return [ga, gb], {"ratio": 0.6, "seed": 5, "offset": 3}


#: small inputs for each public op of this family (see fastvlm/ops/residual.py's EXAMPLES)
EXAMPLES = {"masked_linear": _masked_example, "grad_dropout": _grad_dropout_example}
#: inputs whose gradient is a straight-through estimate, not the derivative (gradcheck skips them)
STRAIGHT_THROUGH = {"masked_linear": {2}}


# ---------------------------------------------------------------------------------------------------------
# the op: forward and backward (torch path or Triton launchers), a Function and a custom op calling them
# ---------------------------------------------------------------------------------------------------------


class GradSlot:
    """The mask tuner's two-pass hand-off (not public API: see ``fastvlm/tuners/mask.py``).

    Pass 1 (the KL loss) runs with an empty slot: plain straight-through gradients. Before pass 2 the step
    puts pass 1's gradient in ``ref`` and the regulariser coefficient ``reg`` (of ``reg * ||S||_2``) here;
    pass 2's backward then takes ``ref`` out of the slot, adds ``reg * S / ||S||`` to the score gradient
    (so dropout sees all of g_a = grad of CE + reg), drops it against ``ref`` and writes the result into
    ``ref``'s own storage (the Triton kernel reads each element before writing it): pass 1's buffer is
    consumed in place and no second N x K buffer is kept per layer.
    """

    __slots__ = ("ref", "ratio", "seed", "reg")

    def __init__(self):
        self.ref, self.ratio, self.seed, self.reg = None, 0.0, 0, 0.0

    def take(self):
        ref, self.ref = self.ref, None
        return ref


def _norm_dtype(scores):
    """The scores in the precision their regulariser's norm is taken in: fp64 stays fp64, others fp32."""
    return scores if scores.dtype == torch.float64 else scores.float()


def masked_linear_forward(x2, weight, scores, bias, threshold):
    """``x2 @ (W * [S > tau]).T + bias`` for 2-D x2 [M, K]. Both paths build W * [S > tau] as a temporary
    (only x, W and S are kept for backward); the fused kernel (``FASTVLM_FUSED=masked``) masks W's tiles as
    they load instead (docs/kernels.md: modelled slower than cuBLAS on the masked copy)."""
    kernels = _backend.triton_kernels("masked", x2)
    if kernels is not None:
        if kernels.fused("masked"):
            return kernels.forward(x2, weight, scores, bias, threshold)
        # W * [S > tau] in x's dtype, then one cuBLAS GEMM: the fused kernel re-reads W and S per row tile
        return F.linear(x2, masked_weight(weight, scores, threshold, x2.dtype), bias)
    return _backend.linear(x2, masked_weight(weight, scores, threshold, x2.dtype), bias)


def masked_linear_backward(dy2, x2, weight, scores, threshold, needs, ref_grad=None, ratio=0.0, seed=0, reg=0.0,
                           out=None):
    """(dx2, d scores, d bias) for ``needs`` = (x, scores, bias), None where not needed.

    ``ref_grad``: the score gradient is dropped against it (``grad_dropout(., ref_grad, ratio, seed)``; fused
    into the kernel's epilogue on Triton). ``reg``: ``reg * S / ||S||`` is added to the score gradient before
    dropout. ``out``: where the score gradient is written (may be ``ref_grad`` itself)."""
    need_x, need_s, need_b = needs
    kernels = _backend.triton_kernels("masked", x2)
    dx = ds = db = None
    if need_x:
        if kernels is not None and kernels.fused("masked"):
            dx = kernels.grad_input(dy2, weight, scores, threshold, x2.dtype)
        elif kernels is not None:  # rebuilt, not kept from forward: no N x K buffer between the passes
            dx = (dy2 @ masked_weight(weight, scores, threshold, dy2.dtype)).to(x2.dtype)
        else:
            dx = _backend.linear(dy2, masked_weight(weight, scores, threshold, dy2.dtype).t())
    if need_s:
        add = reg / max(torch.linalg.vector_norm(_norm_dtype(scores)).item(), 1e-12) if reg else 0.0
        if kernels is not None:
            ds = kernels.grad_scores(dy2, x2, weight, ref_grad, ratio, seed, scores.dtype,
                                     scores=scores if reg else None, add_scale=add, out=out)
        else:
            ds = (dy2.T @ x2).mul_(weight).to(scores.dtype)  # torch's BLAS: oneDNN would copy dy2.T
            if reg:
                ds.add_(scores, alpha=add)
            if ref_grad is not None:
                ds = grad_dropout_torch(ds, ref_grad, ratio, seed, 0, out=ds if out is None else out)
    if need_b:
        db = dy2.sum(dim=0)
    return dx, ds, db


class MaskedLinearFunction(torch.autograd.Function):
    """Eager autograd of :func:`masked_linear` (2-D x). ``slot``: a :class:`GradSlot` (the tuner's two-pass
    step) or None."""

    @staticmethod
    def forward(ctx, x2, weight, scores, bias, threshold, ref_grad, ratio, seed, slot):
        y = masked_linear_forward(x2, weight, scores, bias, threshold)
        ctx.save_for_backward(x2, weight, scores, ref_grad)
        ctx.threshold, ctx.ratio, ctx.seed, ctx.slot = threshold, ratio, seed, slot
        return y

    @staticmethod
    def backward(ctx, dy2):
        x2, weight, scores, ref_grad = ctx.saved_tensors
        ratio, seed, reg, out, slot = ctx.ratio, ctx.seed, 0.0, None, ctx.slot
        need = ctx.needs_input_grad
        if slot is not None and need[2]:
            ref_grad, ratio, seed, reg = slot.take(), slot.ratio, slot.seed, slot.reg
            if ref_grad is not None:  # the scores may be a view (patch embedding): match its shape
                ref_grad = out = ref_grad.view(scores.shape)
        dx, ds, db = masked_linear_backward(dy2, x2, weight, scores, ctx.threshold, (need[0], need[2], need[3]),
                                            ref_grad, ratio, seed, reg, out)
        return dx, None, ds, db, None, None, None, None, None


@torch.library.custom_op("fastvlm::masked_linear", mutates_args=())
def _masked_linear_op(x2: Tensor, weight: Tensor, scores: Tensor, bias: Optional[Tensor], threshold: float,
                      ref_grad: Optional[Tensor], ratio: float, seed: int) -> Tensor:
    return masked_linear_forward(x2, weight, scores, bias, threshold)


@_masked_linear_op.register_fake
def _(x2, weight, scores, bias, threshold, ref_grad, ratio, seed):
    return x2.new_empty(x2.shape[0], weight.shape[0])


@torch.library.custom_op("fastvlm::masked_linear_backward", mutates_args=())
def _masked_linear_backward_op(dy2: Tensor, x2: Tensor, weight: Tensor, scores: Tensor, ref_grad: Optional[Tensor],
                               threshold: float, ratio: float, seed: int, need_x: bool, need_scores: bool,
                               need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    grads = masked_linear_backward(dy2, x2, weight, scores, threshold, (need_x, need_scores, need_bias), ref_grad,
                                   ratio, seed)
    return empty_for_none(grads, (x2, scores, dy2))  # each unneeded gradient empty like its input (the fake)


@_masked_linear_backward_op.register_fake
def _(dy2, x2, weight, scores, ref_grad, threshold, ratio, seed, need_x, need_scores, need_bias):
    return fake_grads([(x2, need_x), (scores, need_scores), (dy2[0], need_bias)])


def _masked_linear_setup(ctx, inputs, output):
    x2, weight, scores, bias, threshold, ref_grad, ratio, seed = inputs
    ctx.save_for_backward(x2, weight, scores, ref_grad)
    ctx.threshold, ctx.ratio, ctx.seed = threshold, ratio, seed


def _masked_linear_op_backward(ctx, dy2):
    x2, weight, scores, ref_grad = ctx.saved_tensors
    need = ctx.needs_input_grad
    needs = (need[0], need[2], need[3])
    dx, ds, db = none_for_unneeded(_masked_linear_backward_op(dy2, x2, weight, scores, ref_grad, ctx.threshold,
                                                              ctx.ratio, ctx.seed, *needs), needs)
    return dx, None, ds, db, None, None, None, None


_masked_linear_op.register_autograd(_masked_linear_op_backward, setup_context=_masked_linear_setup)


# ---------------------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------------------


def _check_seed(seed, offset=0) -> tuple[int, int]:
    return check_seed("seed", seed), check_seed("offset", offset)


def grad_dropout(g_task, g_ref, ratio, seed, offset=0):
    """Gradient dropout regularity: ``((1 - ratio) + ratio * [P > U]) * g_task`` (see the module docstring).

    Computed in g_task's precision: fp64 stays fp64 (torch path only), fp16/bf16 are computed in fp32; U is
    the fp32 stream, compared with P exactly (see fastvlm/ops/philox.py). ``ratio=0`` returns ``g_task``
    exactly. Where the signs agree, P = 0.5 (1 + (|g_a| + |g_b|) / (|g_a| + |g_b| + 1e-8)) is just below 1, so
    such elements are kept unless U lands in that gap: never for gradients well above 1e-8, but not always
    for tiny ones (the formula's 1e-8, as published).
    """
    check_tensor("g_task", g_task)
    check_tensor("g_ref", g_ref)
    on_triton = _backend.use_triton(g_task)
    check_float("g_task", g_task, on_triton)
    check_float("g_ref", g_ref, on_triton)
    if g_ref.shape != g_task.shape:
        raise ValueError(f"g_ref must have the shape of g_task {tuple(g_task.shape)}, got {tuple(g_ref.shape)}")
    check_same_device(g_task=g_task, g_ref=g_ref)
    check_scalar("ratio", ratio, 0.0, 1.0)
    seed, offset = _check_seed(seed, offset)
    if g_task.numel() == 0:
        return g_task.clone()
    if on_triton:
        return _backend.triton_kernels("masked", g_task).grad_dropout(g_task, g_ref, ratio, seed, offset)
    return grad_dropout_torch(g_task.contiguous(), g_ref.contiguous(), float(ratio), seed, offset)


def _check_masked_linear(x, weight, scores, bias, threshold, ref_grad=None):
    for n, t in (("x", x), ("weight", weight), ("scores", scores)):
        check_tensor(n, t)
    on_triton = not compiling() and _backend.use_triton(x)
    for n, t in (("x", x), ("weight", weight), ("scores", scores), ("bias", bias), ("ref_grad", ref_grad)):
        if t is not None:
            check_tensor(n, t)
            check_float(n, t, on_triton)
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"weight must be a non-empty 2-D [N, K] tensor, got shape {tuple(weight.shape)}")
    if weight.requires_grad:
        raise ValueError("weight must be frozen (requires_grad=False): masked_linear trains the scores only")
    if scores.shape != weight.shape:
        raise ValueError(f"scores must have the shape of weight {tuple(weight.shape)}, got {tuple(scores.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must end in K={weight.shape[1]} features like weight [N, K], got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if ref_grad is not None and ref_grad.shape != weight.shape:
        raise ValueError(f"ref_grad must have the shape of scores {tuple(weight.shape)}, got {tuple(ref_grad.shape)}")
    check_same_device(x=x, weight=weight, scores=scores, bias=bias, ref_grad=ref_grad)
    check_scalar("threshold", threshold)
    if torch.is_grad_enabled() and scores.requires_grad:
        check_finite("scores", scores)


def _masked_linear(x, weight, scores, bias, threshold, ref_grad, ratio, seed, slot):
    """Autocast, the dtype rule, then the Function (eager) or the custom op (compiling) on 2-D x."""
    (x, weight, bias), amp = _backend.amp_cast(x, weight, bias)  # scores stay fp32: the mask never rounds
    check_same_dtype("masked_linear", x=x, weight=weight, bias=bias)
    x2 = x.reshape(-1, x.shape[-1])
    with amp:
        if compiling():
            y = _masked_linear_op(x2, weight, scores, bias, float(threshold), ref_grad, float(ratio), seed)
        else:
            y = MaskedLinearFunction.apply(x2, weight, scores, bias, float(threshold), ref_grad, float(ratio), seed,
                                           slot)
    return y.view(*x.shape[:-1], weight.shape[0])


def masked_linear(x, weight, scores, bias=None, threshold=THRESHOLD, ref_grad=None, drop_ratio=0.0, seed=0):
    """``x @ (weight * (scores > threshold)).T + bias`` for x of any leading shape [..., K].

    weight [N, K] is frozen (must not require grad); scores [N, K] get the straight-through gradient
    ``(dy.T @ x) * weight``. With ``ref_grad`` [N, K], that gradient is returned after
    ``grad_dropout(., ref_grad, drop_ratio, seed, offset=0)``, fused into the kernel on the Triton path.
    x, weight and bias share one dtype (as in ``F.linear``; autocast casts them); scores may be any float.
    """
    _check_masked_linear(x, weight, scores, bias, threshold, ref_grad)
    check_scalar("drop_ratio", drop_ratio, 0.0, 1.0)
    seed = check_seed("seed", seed)
    ref = None if ref_grad is None else ref_grad.detach()
    return _masked_linear(x, weight, scores, bias, threshold, ref, drop_ratio, seed, None)


def masked_linear_slotted(x, weight, scores, bias, threshold, slot: GradSlot):
    """The mask tuner's two-pass entry (not public API): ``masked_linear`` whose score gradient is dropped
    against the gradient that the step put in ``slot`` between the passes (see :class:`GradSlot`).

    Under ``torch.compile`` the slot cannot cross the custom op: compiled layers give plain straight-through
    gradients and leave the slot unconsumed, which the RMT step detects and refuses."""
    if not isinstance(slot, GradSlot):
        raise TypeError(f"slot must be a GradSlot, got {type(slot).__name__}")
    _check_masked_linear(x, weight, scores, bias, threshold)
    return _masked_linear(x, weight, scores, bias, threshold, None, 0.0, 0, None if compiling() else slot)
