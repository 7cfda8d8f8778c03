"""A linear layer over a frozen weight whose matmuls go through ``_backend.linear`` (oneDNN on CPUs where it
is faster than torch's BLAS, see ``fastvlm/_backend.py``).

    y = x @ W^T + bias,   dL/dx = dy @ W,   dL/dbias = sum dy        (W frozen: no dL/dW)

The ops' autograd Functions call ``_backend.linear`` directly; :func:`frozen_linear` is for the places that
otherwise leave a plain ``F.linear`` to autograd (the input side of ``orthogonal_linear``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend


class FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias):
        ctx.save_for_backward(weight)
        ctx.has_bias = bias is not None
        return _backend.linear(x2, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        (weight,) = ctx.saved_tensors
        dx = _backend.linear(dy, weight.t()) if ctx.needs_input_grad[0] else None
        db = dy.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, None, db


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x [..., K]; through :class:`FrozenLinear` where the weight takes no
    gradient and oneDNN applies, else ``F.linear`` itself (same result, same saved tensors: the weight)."""
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if (weight.requires_grad and torch.is_grad_enabled()) or not _backend.use_onednn(x2, weight):
        return F.linear(x, weight, bias)
    return FrozenLinear.apply(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])
