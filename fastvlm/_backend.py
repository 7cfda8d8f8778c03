"""Backend dispatch: the one place that decides whether an op runs its Triton kernel or its torch reference.

- ``FASTVLM_BACKEND=auto`` (default): CUDA tensors run the Triton kernels, CPU tensors the torch reference.
- ``FASTVLM_BACKEND=torch``: always the torch reference.
- ``FASTVLM_BACKEND=triton``: always the Triton kernels. On CPU tensors that needs ``TRITON_INTERPRET=1``
  set before fastvlm is imported (Triton reads it when the kernels are defined); this is how CI tests the
  kernels without a GPU.

The variable is read at every call, so tests and users can switch with :func:`backend` as well.
"""

from __future__ import annotations

import contextlib
import os

import torch

_VALID = ("auto", "torch", "triton")
_override: str | None = None


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a Linux dependency
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def current() -> str:
    mode = _override or os.environ.get("FASTVLM_BACKEND", "auto").lower()
    if mode not in _VALID:
        raise ValueError(f"FASTVLM_BACKEND must be one of {_VALID}, got {mode!r}")
    return mode


@contextlib.contextmanager
def backend(mode: str):
    """Force a backend inside a ``with`` block: ``with fastvlm.backend("torch"): ...``."""
    global _override
    if mode not in _VALID:
        raise ValueError(f"backend must be one of {_VALID}, got {mode!r}")
    old, _override = _override, mode
    try:
        yield
    finally:
        _override = old


def use_triton(t: torch.Tensor) -> bool:
    """True when the op given tensor ``t`` should run its Triton kernel."""
    mode = current()
    if mode == "torch":
        return False
    if mode == "auto":
        return t.is_cuda and triton_available()
    # forced triton
    if not triton_available():
        raise RuntimeError("FASTVLM_BACKEND=triton but triton is not installed")
    if not t.is_cuda and not interpreting():
        raise RuntimeError(
            "FASTVLM_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 in the environment before "
            "fastvlm is imported; on CPU without it, use FASTVLM_BACKEND=torch or auto"
        )
    return True


def amp_cast(*tensors):
    """Autocast policy of the matmul-like ops, as F.linear's: while autocast is on for the tensors' device,
    floating inputs are cast to the autocast dtype and the op runs with autocast off inside (so forward and
    backward see the same dtypes). Returns (tensors, context manager)."""
    first = next(t for t in tensors if t is not None)
    dev = first.device.type
    if not torch.is_autocast_enabled(dev):
        return tensors, contextlib.nullcontext()
    dt = torch.get_autocast_dtype(dev)
    cast = tuple(t.to(dt) if (t is not None and t.is_floating_point() and t.dtype != torch.float64) else t
                 for t in tensors)
    return cast, torch.autocast(dev, enabled=False)
