"""The op template that every family in ``fastvlm/ops/<family>.py`` follows (how to add one:
``docs/contributing.md``).

1. Formula in the module docstring; ``<op>_reference``: the naive autograd composition, the test oracle.
2. ``<op>_forward(...)`` / ``<op>_backward(..., needs)``: plain functions, tensors and numbers in, tensors
   out. They are the one implementation: each asks ``_backend.triton_kernels("<family>", tensor)`` for the
   Triton launchers (``fastvlm.kernels.<family>``) and runs the torch path when it answers None. The
   backward computes only the gradients ``needs`` asks for and returns None for the others.
3. A thin ``torch.autograd.Function`` (eager) and a ``torch.library`` custom op with its fake
   implementation and ``register_autograd`` (under ``torch.compile``), both calling the same two functions
   and honouring ``ctx.needs_input_grad``.
4. The public function (re-exported by ``fastvlm/functional.py``): checks that name the argument,
   autocast, then the Function, or the custom op while compiling.

Custom ops cannot return None: backward ops return an empty tensor for a gradient nobody asked for, and
these helpers convert between the two conventions.
"""

from __future__ import annotations

import torch


def empty_for_none(tensors, like) -> tuple:
    """Each None as an empty tensor of its own (a custom op's outputs must be tensors that alias nothing),
    made like ``like``, or like the matching entry where ``like`` is a sequence of tensors (one per output:
    the input each gradient belongs to, so that an empty one has the dtype :func:`fake_grads` gives it)."""
    likes = like if isinstance(like, (tuple, list)) else (like,) * len(tensors)
    return tuple(ref.new_empty(0) if t is None else t for t, ref in zip(tensors, likes))


def none_for_unneeded(tensors, needs) -> tuple:
    """Each tensor whose gradient was not asked for as None (what autograd expects back)."""
    return tuple(t if need else None for t, need in zip(tensors, needs))


def fake_grads(pairs) -> tuple:
    """Fake backward outputs: ``torch.empty_like(t)`` where needed, else an empty tensor; pairs of
    (tensor, needed)."""
    return tuple(torch.empty_like(t) if need else t.new_empty(0) for t, need in pairs)
