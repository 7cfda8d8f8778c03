r"""RMT mask tuning: masked-weight linear with a straight-through score gradient, and gradient dropout
(METHODS.md section 2).

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

import torch
import torch.nn.functional as F

from .. import _backend
from .philox import grad_dropout_torch, keep_scale, philox_uniform
from .._checks import check_finite, check_float, check_same_device, check_scalar, check_tensor, compiling

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
    the result, which is then multiplied by the weight in place. ``torch.where(mask, w, 0)`` was 5x slower
    on CPU (its kernel is not vectorised) and ``w * mask`` with a bool mask allocates a float copy of the mask
    (twice the memory)."""
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


# ---------------------------------------------------------------------------------------------------------
# torch path and autograd Function
# ---------------------------------------------------------------------------------------------------------


class GradSlot:
    """Hand-off for the two-pass gradient dropout step (fastvlm/train/rmt.py).

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


class MaskedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scores, bias, threshold, ref_grad, ratio, seed):
        x2 = x.reshape(-1, x.shape[-1])
        if _backend.use_triton(x):
            from ..kernels import masked as km

            y = km.forward(x2, weight, scores, bias, threshold)
            ctx.kernels = km
        else:
            w_eff = masked_weight(weight, scores, threshold, x.dtype)  # a temporary: only x, W, S are saved
            y = _backend.linear(x2, w_eff, bias)  # oneDNN on CPUs where it is faster
            del w_eff
            ctx.kernels = None
        slot = ref_grad if isinstance(ref_grad, GradSlot) else None
        ctx.save_for_backward(x, weight, scores, None if slot is not None else ref_grad)
        ctx.threshold, ctx.ratio, ctx.seed, ctx.has_bias, ctx.slot = threshold, ratio, seed, bias is not None, slot
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, weight, scores, ref_grad = ctx.saved_tensors
        km = ctx.kernels
        dy2 = dy.reshape(-1, dy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        dx = ds = db = None
        if ctx.needs_input_grad[0]:
            if km is not None:
                dx = km.grad_input(dy2, weight, scores, ctx.threshold, x.dtype).view(x.shape)
            else:
                dx = _backend.linear(dy2, masked_weight(weight, scores, ctx.threshold, dy2.dtype).t()).view(x.shape)
        if ctx.needs_input_grad[2]:
            ratio, seed, reg, slot = ctx.ratio, ctx.seed, 0.0, ctx.slot
            if slot is not None:
                ref_grad, ratio, seed, reg = slot.take(), slot.ratio, slot.seed, slot.reg
                if ref_grad is not None:  # the scores may be a view (patch embedding): match its shape
                    ref_grad = ref_grad.view(scores.shape)
            add = reg / max(torch.linalg.vector_norm(scores.float()).item(), 1e-12) if reg else 0.0
            inplace = slot is not None and ref_grad is not None
            if km is not None:
                ds = km.grad_scores(dy2, x2, weight, ref_grad, ratio, seed, scores.dtype,
                                    scores=scores if reg else None, add_scale=add, out=ref_grad if inplace else None)
            else:
                ds = (dy2.T @ x2).mul_(weight).to(scores.dtype)  # torch's BLAS: oneDNN would copy dy2.T
                if reg:
                    ds.add_(scores, alpha=add)
                if ref_grad is not None:  # two-pass step: the result goes into pass 1's buffer
                    ds = grad_dropout_torch(ds, ref_grad, ratio, seed, 0, out=ref_grad if inplace else ds)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = dy2.sum(dim=0)
        return dx, None, ds, db, None, None, None, None


# ---------------------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------------------


def _check_seed(seed, offset=0):
    for name, v in (("seed", seed), ("offset", offset)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**62:
            raise ValueError(f"{name} must be an int in [0, 2**62), got {v!r}")


def grad_dropout(g_task, g_ref, ratio, seed, offset=0):
    """Gradient dropout regularity: ``((1 - ratio) + ratio * [P > U]) * g_task`` (see the module docstring).

    Computed in g_task's precision: fp64 stays fp64 (torch path only), fp16/bf16 are computed in fp32; U is
    the fp32 stream, compared with P exactly (see fastvlm/ops/philox.py). ``ratio=0`` returns ``g_task``
    exactly; elements whose signs agree (P = 1) are always kept.
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
    _check_seed(seed, offset)
    if g_task.numel() == 0:
        return g_task.clone()
    if on_triton:
        from ..kernels import masked as km

        return km.grad_dropout(g_task, g_ref, ratio, seed, offset)
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


def masked_linear(x, weight, scores, bias=None, threshold=THRESHOLD, ref_grad=None, drop_ratio=0.0, seed=0):
    """``x @ (weight * (scores > threshold)).T + bias`` for x of any leading shape [..., K].

    weight [N, K] is frozen (must not require grad); scores [N, K] get the straight-through gradient
    ``(dy.T @ x) * weight``. With ``ref_grad`` [N, K], that gradient is returned after
    ``grad_dropout(., ref_grad, drop_ratio, seed, offset=0)``, fused into the kernel on the Triton path.
    """
    _check_masked_linear(x, weight, scores, bias, threshold, ref_grad)
    check_scalar("drop_ratio", drop_ratio, 0.0, 1.0)
    _check_seed(seed)
    (x, weight, bias), amp = _backend.amp_cast(x, weight, bias)  # scores stay fp32: the mask never rounds
    with amp:
        ref = None if ref_grad is None else ref_grad.detach()
        if compiling():
            from . import library

            return library.masked_linear_fwd(x, weight, scores, bias, float(threshold), ref, float(drop_ratio),
                                             int(seed))
        return MaskedLinear.apply(x, weight, scores, bias, float(threshold), ref, float(drop_ratio), int(seed))


def masked_linear_slotted(x, weight, scores, bias, threshold, slot: GradSlot):
    """The mask tuner's two-pass entry (not public API): ``masked_linear`` whose score gradient is dropped
    against the gradient that the step put in ``slot`` between the passes (see :class:`GradSlot`).

    Under ``torch.compile`` the slot cannot cross the custom op: compiled layers give plain straight-through
    gradients and leave the slot unconsumed, which the RMT step detects and refuses."""
    if not isinstance(slot, GradSlot):
        raise TypeError(f"slot must be a GradSlot, got {type(slot).__name__}")
    _check_masked_linear(x, weight, scores, bias, threshold)
    (x, weight, bias), amp = _backend.amp_cast(x, weight, bias)
    with amp:
        if compiling():
            from . import library

            return library.masked_linear_fwd(x, weight, scores, bias, float(threshold), None, 0.0, 0)
        return MaskedLinear.apply(x, weight, scores, bias, float(threshold), slot, 0.0, 0)
