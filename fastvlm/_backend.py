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
