"""Backend dispatch: the one place that decides whether an op runs its Triton kernel or its torch reference.

- ``FASTVLM_BACKEND=auto`` (default): CUDA tensors run the Triton kernels, CPU tensors the torch reference.
- ``FASTVLM_BACKEND=torch``: always the torch reference.
- ``FASTVLM_BACKEND=triton``: always the Triton kernels. On CPU tensors that needs ``TRITON_INTERPRET=1``
  set before fastvlm is imported (Triton reads it when the kernels are defined); this is how CI tests the
  kernels without a GPU.

The variable is read at every call, so tests and users can switch with :func:`backend` as well.

On the torch path, fp32 CPU matmuls of the ops go to torch's BLAS or to oneDNN, whichever is faster on the
machine (:func:`linear`, ``FASTVLM_CPU_GEMM`` / :func:`cpu_gemm`): torch's fp32 ``F.linear`` calls MKL, which
takes its 256-bit code paths on some non-Intel processors with AVX-512, while oneDNN (in every x86 torch
build) picks its code by CPU features. A one-time timing decides; the measurements behind this are in
docs/performance.md. The residual family keeps torch's matmul for accuracy (see fastvlm/ops/residual.py).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import statistics
import time

import torch
import torch.nn.functional as F


class _Setting:
    """A mode read from an environment variable at every call, which a ``with`` block can force."""

    def __init__(self, env: str, api: str, valid: tuple):
        self.env, self.api, self.valid, self.override = env, api, valid, None

    def get(self) -> str:
        mode = self.override or os.environ.get(self.env, "auto").lower()
        if mode not in self.valid:
            raise ValueError(f"{self.env} must be one of {self.valid}, got {mode!r}")
        return mode

    @contextlib.contextmanager
    def force(self, mode: str):
        if mode not in self.valid:
            raise ValueError(f"{self.api} must be one of {self.valid}, got {mode!r}")
        old, self.override = self.override, mode
        try:
            yield
        finally:
            self.override = old


_BACKEND = _Setting("FASTVLM_BACKEND", "backend", ("auto", "torch", "triton"))
_GEMM = _Setting("FASTVLM_CPU_GEMM", "cpu_gemm", ("auto", "onednn", "torch"))


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a Linux dependency
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def current() -> str:
    return _BACKEND.get()


def backend(mode: str):
    """Force a backend inside a ``with`` block: ``with fastvlm.backend("torch"): ...``."""
    return _BACKEND.force(mode)


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


def triton_kernels(family: str, t: torch.Tensor):
    """The op template's one dispatch: the Triton launchers of ``fastvlm.kernels.<family>`` when the op given
    tensor ``t`` runs on Triton (:func:`use_triton`), else None (the torch path)."""
    if not use_triton(t):
        return None
    return importlib.import_module(f"fastvlm.kernels.{family}")


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


# ---------------------------------------------------------------------------------------------------------
# CPU matmuls: torch's BLAS or oneDNN
# ---------------------------------------------------------------------------------------------------------

AUTO_MIN_MACS = 1 << 21  # smaller matmuls stay on torch's in auto mode (call overhead, see use_onednn)


def cpu_gemm_mode() -> str:
    """``FASTVLM_CPU_GEMM``: ``auto`` (default: oneDNN where a one-time timing finds it faster, for matmuls
    of at least ``AUTO_MIN_MACS`` multiply-adds), ``onednn`` (every eligible matmul) or ``torch``."""
    return _GEMM.get()


def cpu_gemm(mode: str):
    """Choose the CPU matmul inside a ``with`` block: ``with fastvlm.cpu_gemm("torch"): ...``."""
    return _GEMM.force(mode)


def _onednn_op():
    """oneDNN's linear as torch registers it (inductor's CPU linear), or None where this build lacks it."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return None
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


@functools.lru_cache(maxsize=None)
def _onednn_faster(threads: int) -> bool:
    """Time both on a [512, 768] x [768, 768] fp32 linear (5 interleaved runs each, once per
    thread count); oneDNN when its median is at least 10% lower."""
    op = _onednn_op()
    if op is None:
        return False
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(512, 768, generator=g), torch.randn(768, 768, generator=g)
    calls = {"torch": lambda: F.linear(x, w), "onednn": lambda: op(x, w, None, "none", [], "")}
    times = {k: [] for k in calls}
    with torch.no_grad():
        for rep in range(6):
            for k, f in calls.items():
                t0 = time.perf_counter()
                f()
                if rep:
                    times[k].append(time.perf_counter() - t0)
    return statistics.median(times["onednn"]) < 0.9 * statistics.median(times["torch"])


def use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when ``x @ weight.T`` should run on oneDNN: fp32 CPU 2-D operands, x row-major, the weight
    row-major or the transpose of a row-major matrix (oneDNN reads both in place, no copy)."""
    mode = cpu_gemm_mode()
    if mode == "torch" or x.device.type != "cpu" or weight.device.type != "cpu":
        return False
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or x.dim() != 2 or weight.dim() != 2:
        return False
    if not x.is_contiguous() or not (weight.is_contiguous() or weight.t().is_contiguous()) or x.numel() == 0:
        return False
    from ._checks import compiling

    if compiling():
        return False
    if _onednn_op() is None:
        if mode == "onednn":
            raise RuntimeError("FASTVLM_CPU_GEMM=onednn but this torch build has no oneDNN linear "
                               "(torch.ops.mkldnn._linear_pointwise) or torch.backends.mkldnn is disabled")
        return False
    if mode == "onednn":
        return True
    # auto: a oneDNN call has a larger fixed cost than MKL's, so small matmuls stay on torch's
    if x.shape[0] * x.shape[1] * weight.shape[0] < AUTO_MIN_MACS:
        return False
    return _onednn_faster(torch.get_num_threads())


def cpu_gemm_choice() -> str:
    """What the torch path's large fp32 CPU matmuls run on now: ``"onednn"`` or ``"torch"``."""
    big = torch.empty(128, 128)
    return "onednn" if use_onednn(big, big) else "torch"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for 2-D x [M, K] and weight [N, K], on oneDNN where :func:`use_onednn` says so,
    else ``F.linear``. Records no autograd on the oneDNN path: call it inside an autograd Function."""
    recording = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    plain_bias = bias is None or (bias.dtype == torch.float32 and bias.shape == weight.shape[:1] and bias.is_contiguous())
    if not recording and plain_bias and use_onednn(x, weight):
        return _onednn_op()(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
