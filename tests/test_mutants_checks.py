"""Exact behaviour of every argument check in fastvlm/_checks.py, called directly: what passes, what is
refused, the exception type, and that the message names the argument and what was expected. Bounds are
tested on both sides of each edge. The "meta" device stands in for a second device."""

import numpy as np
import pytest
import torch

from fastvlm import _checks as C


def test_check_tensor():
    C.check_tensor("x", torch.zeros(1))
    with pytest.raises(TypeError, match=r"^x must be a torch.Tensor, got list$"):
        C.check_tensor("x", [1.0])


def test_check_matrix():
    C.check_matrix("w", torch.zeros(1, 1))
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        C.check_matrix("w", 3)
    for shape in [(3,), (1, 1, 1)]:
        with pytest.raises(ValueError, match=rf"^w must be 2-D, got shape {tuple(shape)}$".replace("(", r"\(").replace(")", r"\)")):
            C.check_matrix("w", torch.zeros(shape))
    for shape in [(0, 3), (3, 0)]:
        with pytest.raises(ValueError, match=r"^w must not be empty, got shape"):
            C.check_matrix("w", torch.zeros(shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_check_float_accepts_the_floats(dtype):
    C.check_float("x", torch.zeros(1, dtype=dtype))
    if dtype != torch.float64:
        C.check_float("x", torch.zeros(1, dtype=dtype), True)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_check_float_refuses_the_rest(dtype):
    with pytest.raises(TypeError, match=rf"^x must be a floating tensor .* got {dtype}$"):
        C.check_float("x", torch.zeros(1, dtype=dtype))


def test_check_float_refuses_fp64_on_triton_only():
    C.check_float("x", torch.zeros(1, dtype=torch.float64), False)
    with pytest.raises(TypeError, match=r"^x: the Triton path takes fp32/fp16/bf16, got float64"):
        C.check_float("x", torch.zeros(1, dtype=torch.float64), True)


def test_compiling_is_false_in_eager():
    assert C.compiling() is False


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 4])
def test_check_finite_refuses_one_non_finite(bad, where):
    t = torch.ones(5)
    t[where] = bad
    with pytest.raises(ValueError, match=r"^s contains NaN or inf$"):
        C.check_finite("s", t)


def test_check_finite_accepts_finite_values_whose_sum_overflows():
    C.check_finite("s", torch.full((4,), 3e38))
    C.check_finite("s", torch.tensor([-3e38, -3e38, 1.0]))
    C.check_finite("s", torch.zeros(0))


def test_check_same_dtype():
    a, b = torch.zeros(1), torch.zeros(1, dtype=torch.float16)
    C.check_same_dtype("op", x=a, w=a.clone(), bias=None)
    C.check_same_dtype("op", x=a)
    C.check_same_dtype("op")
    with pytest.raises(TypeError, match=r"^op: x is torch.float32, w is torch.float16; they must share one dtype"):
        C.check_same_dtype("op", x=a, w=b, bias=None)
    with pytest.raises(TypeError, match=r"x is torch.float32, w is torch.float32, bias is torch.float16"):
        C.check_same_dtype("op", x=a, w=a, bias=b)


@pytest.mark.parametrize("v,want", [(0, 0), (1, 1), (2**62 - 1, 2**62 - 1), (np.int64(5), 5), (np.uint8(3), 3),
                                    (torch.tensor(9), 9), (torch.tensor([4], dtype=torch.int32), 4)])
def test_check_seed_accepts_integers_of_any_kind(v, want):
    got = C.check_seed("seed", v)
    assert got == want and type(got) is int


@pytest.mark.parametrize("v", [-1, 2**62, 2**64, True, False, 1.0, 2.5, "3", None, torch.tensor(2.0),
                               torch.tensor([1, 2])])
def test_check_seed_refuses(v):
    with pytest.raises(ValueError, match=r"^seed must be an int in \[0, 2\*\*62\), got "):
        C.check_seed("seed", v)


def test_check_same_device():
    cpu, meta = torch.zeros(1), torch.zeros(1, device="meta")
    C.check_same_device(x=cpu, w=cpu, bias=None)
    C.check_same_device(x=cpu)
    with pytest.raises(ValueError, match=r"^w is on meta but x is on cpu: all inputs must be on one device$"):
        C.check_same_device(x=cpu, w=meta)
    with pytest.raises(ValueError, match=r"^b is on meta but x is on cpu"):
        C.check_same_device(x=cpu, bias=None, w=cpu, b=meta)
    with pytest.raises(ValueError, match=r"^w is on cpu but x is on meta"):
        C.check_same_device(bias=None, x=meta, w=cpu)


@pytest.mark.parametrize("v", [0.0, 0.5, 1.0, 1, torch.tensor(0.25), torch.tensor([1.0]), np.float32(0.5)])
def test_check_scalar_closed_bounds_accept(v):
    C.check_scalar("r", v, 0.0, 1.0)


@pytest.mark.parametrize("v,match", [(-1e-9, r"^r must be >= 0.0, got -1e-09$"), (1.5, r"^r must be <= 1.0, got 1.5$")])
def test_check_scalar_closed_bounds_refuse(v, match):
    with pytest.raises(ValueError, match=match):
        C.check_scalar("r", v, 0.0, 1.0)


def test_check_scalar_open_bounds():
    C.check_scalar("r", 0.5, 0.0, 1.0, lo_open=True, hi_open=True)
    with pytest.raises(ValueError, match=r"^r must be > 0.0, got 0.0$"):
        C.check_scalar("r", 0.0, 0.0, 1.0, lo_open=True)
    with pytest.raises(ValueError, match=r"^r must be < 1.0, got 1.0$"):
        C.check_scalar("r", 1.0, 0.0, 1.0, hi_open=True)
    C.check_scalar("r", 1.0, 0.0, 1.0, lo_open=True)  # each flag opens its own bound only
    C.check_scalar("r", 0.0, 0.0, 1.0, hi_open=True)


def test_check_scalar_unbounded():
    C.check_scalar("t", -1e30)
    C.check_scalar("t", 1e30)
    C.check_scalar("t", -5.0, None, 0.0)
    C.check_scalar("t", 5.0, 0.0, None)


@pytest.mark.parametrize("v", [float("nan"), float("inf"), -float("inf"), True, "1", None, 1 + 2j,
                               torch.tensor(float("nan")), torch.tensor([1.0, 2.0])])
def test_check_scalar_refuses_non_finite_and_non_real(v):
    with pytest.raises(ValueError, match=r"^x must be a finite real number, got "):
        C.check_scalar("x", v)


def _target(*v, dtype=torch.int64):
    return torch.tensor(v, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_check_target_accepts_integer_classes_and_the_ignore_index(dtype):
    C.check_target("y", _target(0, 4, 2, dtype=dtype), 3, 5, -100, torch.device("cpu"))
    C.check_target("y", _target(-100, 4, -100), 3, 5, -100, torch.device("cpu"))
    C.check_target("y", _target(7, 0), 2, 5, 7, torch.device("cpu"))  # an ignore_index past K is still ignored


def test_check_target_refuses():
    cpu = torch.device("cpu")
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        C.check_target("y", [0], 1, 5, -100, cpu)
    for dtype in (torch.float32, torch.int8, torch.bool):
        with pytest.raises(TypeError, match=rf"^y must hold integer class indices, got {dtype}$"):
            C.check_target("y", torch.zeros(2, dtype=dtype), 2, 5, -100, cpu)
    with pytest.raises(ValueError, match=r"^y must have shape \(3,\) to match features, got \(2,\)$"):
        C.check_target("y", _target(0, 1), 3, 5, -100, cpu)
    with pytest.raises(ValueError, match=r"^y must have shape \(2,\)"):
        C.check_target("y", _target(0, 1).view(2, 1), 2, 5, -100, cpu)
    with pytest.raises(ValueError, match=r"^y is on meta but features is on cpu$"):
        C.check_target("y", torch.zeros(2, dtype=torch.int64, device="meta"), 2, 5, -100, cpu)
    with pytest.raises(ValueError, match=r"^y holds class index 5, outside \[0, 5\) \(K=5 classes\)$"):
        C.check_target("y", _target(4, 5, 6), 3, 5, -100, cpu)
    with pytest.raises(ValueError, match=r"^y holds class index -1, outside \[0, 5\)"):
        C.check_target("y", _target(0, -1), 2, 5, -100, cpu)
    with pytest.raises(ValueError, match=r"^y holds class index -100, outside"):
        C.check_target("y", _target(0, -100), 2, 5, -1, cpu)
