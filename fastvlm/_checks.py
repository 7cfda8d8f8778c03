"""Argument checks shared by every public op: each error names the argument and what was expected."""

from __future__ import annotations

import math
import numbers
import operator

import torch

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_matrix(name: str, t) -> None:
    check_tensor(name, t)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")


def check_float(name: str, t: torch.Tensor, triton_path: bool = False) -> None:
    if t.dtype not in FLOATS:
        raise TypeError(f"{name} must be a floating tensor (fp32, fp16, bf16, or fp64 on the torch path), got {t.dtype}")
    if triton_path and t.dtype == torch.float64:
        raise TypeError(f"{name}: the Triton path takes fp32/fp16/bf16, got float64 (use FASTVLM_BACKEND=torch)")


def compiling() -> bool:
    """Under torch.compile, value-dependent checks (NaN scans, label ranges) would break the graph: they are
    skipped there; shape, dtype and device checks still run."""
    return torch.compiler.is_compiling()


def check_finite(name: str, t: torch.Tensor) -> None:
    if compiling():
        return
    # A NaN or inf anywhere makes the sum NaN or inf, so one reduction (no N x K temporaries) clears the
    # common case; only a non-finite sum, which an overflow of finite values can also give, looks closer.
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")


def check_same_dtype(op: str, **tensors) -> None:
    """The floating inputs that meet in one matmul share a dtype, as ``F.linear`` requires; mixed precision
    is autocast's job (the ops follow its casts)."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    if len({t.dtype for _, t in items}) > 1:
        got = ", ".join(f"{n} is {t.dtype}" for n, t in items)
        raise TypeError(f"{op}: {got}; they must share one dtype, as in F.linear (cast them, or run under "
                        "torch.autocast)")


def check_seed(name: str, v) -> int:
    """An integer of any kind (int, numpy integer, 0-d integer tensor) in [0, 2**62); returns it as int."""
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point() and v.dtype != torch.bool:
        v = int(v.item())
    if isinstance(v, (bool, torch.Tensor)):  # a bool, or a tensor that is not one integer (bool tensors too)
        raise ValueError(f"{name} must be an int in [0, 2**62), got {v!r}")
    try:
        i = operator.index(v)
    except TypeError:
        raise ValueError(f"{name} must be an int in [0, 2**62), got {v!r}") from None
    if not 0 <= i < 2**62:
        raise ValueError(f"{name} must be an int in [0, 2**62), got {v!r}")
    return i


def check_same_device(**tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    n0, t0 = items[0]
    for n, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{n} is on {t.device} but {n0} is on {t0.device}: all inputs must be on one device")


def check_scalar(name: str, v, lo: float | None = None, hi: float | None = None, lo_open=False, hi_open=False) -> None:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise ValueError(f"{name} must be a finite real number, got {v!r}")
    v = float(v)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {v}")


def check_target(name: str, target, batch: int, classes: int, ignore_index: int, device) -> None:
    check_tensor(name, target)
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{name} must hold integer class indices, got {target.dtype}")
    if target.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) to match features, got {tuple(target.shape)}")
    if target.device != device:
        raise ValueError(f"{name} is on {target.device} but features is on {device}")
    if compiling():
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if bool(bad.any()):
        v = int(target[bad][0])
        raise ValueError(f"{name} holds class index {v}, outside [0, {classes}) (K={classes} classes)")
