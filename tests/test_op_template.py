"""Every public op, found through ``fastvlm.functional.__all__`` (nothing listed here by hand), follows the op
template (``fastvlm/ops/_template.py``): its family module has ``<op>_reference`` and an ``EXAMPLES`` entry,
and the op agrees with the reference on the example, forward and every gradient, on both paths; in fp64 by
gradcheck; under torch.compile (fullgraph) with eager's results; and with non-contiguous inputs. A new op
is picked up here by being exported from fastvlm.functional."""

import importlib

import pytest
import torch

import fastvlm
import fastvlm.functional as FV

from .helpers import assert_close

OPS = list(FV.__all__)


def _family(op):
    return importlib.import_module(getattr(FV, op).__module__)


def _example(op, dtype, seed=0):
    args, kwargs = _family(op).EXAMPLES[op](dtype, torch.Generator().manual_seed(seed))
    return args, kwargs


def _differentiable(op, args):
    st = getattr(_family(op), "STRAIGHT_THROUGH", {}).get(op, set())
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad and i not in st]


def _run(fn, args, kwargs):
    out = fn(*args, **kwargs)
    grad_in = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if not grad_in or not out.requires_grad:
        return out.detach(), []
    go = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    return out.detach(), list(torch.autograd.grad(out, grad_in, go))


@pytest.mark.parametrize("op", OPS)
def test_op_has_the_template_pieces(op):
    family = _family(op)
    assert family.__name__.startswith("fastvlm.ops."), f"{op} must live in fastvlm/ops/<family>.py"
    assert callable(getattr(family, f"{op}_reference", None)), f"{family.__name__} needs {op}_reference"
    assert op in family.EXAMPLES, f"{family.__name__}.EXAMPLES needs an entry for {op}"
    assert getattr(FV, op).__doc__, f"{op} needs a docstring with its math"


@pytest.mark.parametrize("op", OPS)
def test_op_matches_its_reference(op, backend):
    args, kwargs = _example(op, torch.float32)
    reference = getattr(_family(op), f"{op}_reference")
    got, g_got = _run(getattr(FV, op), args, kwargs)
    want, g_want = _run(reference, args, kwargs)
    assert_close(f"{op} forward", got, want, torch.float32)
    assert len(g_got) == len(g_want)
    for a, b in zip(g_got, g_want):
        assert_close(f"{op} gradient", a, b, torch.float32)


@pytest.mark.parametrize("op", OPS)
def test_op_gradcheck_fp64(op):
    args, kwargs = _example(op, torch.float64)
    diff = _differentiable(op, args)
    if not diff:
        with fastvlm.backend("torch"):
            got = getattr(FV, op)(*args, **kwargs)
        want = getattr(_family(op), f"{op}_reference")(*args, **kwargs)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)  # fp64 stays fp64
        return

    def fn(*xs):
        full = list(args)
        for i, x in zip(diff, xs):
            full[i] = x
        return getattr(FV, op)(*full, **kwargs)

    with fastvlm.backend("torch"):
        assert torch.autograd.gradcheck(fn, [args[i] for i in diff])


@pytest.mark.parametrize("op", OPS)
def test_op_compiles_without_graph_breaks(op):
    torch._dynamo.reset()
    args, kwargs = _example(op, torch.float32)
    fn = getattr(FV, op)
    with fastvlm.backend("torch"):
        eager, g_eager = _run(fn, args, kwargs)
        compiled, g_compiled = _run(torch.compile(fn, fullgraph=True, backend="aot_eager"), args, kwargs)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", OPS)
def test_op_takes_non_contiguous_inputs(op, backend):
    args, kwargs = _example(op, torch.float32)
    strided = [a.detach().T.contiguous().T.requires_grad_(a.requires_grad)
               if isinstance(a, torch.Tensor) and a.dim() == 2 and a.is_floating_point() else a for a in args]
    assert any(isinstance(a, torch.Tensor) and not a.is_contiguous() for a in strided)
    got, g_got = _run(getattr(FV, op), strided, kwargs)
    want, g_want = _run(getattr(FV, op), args, kwargs)
    assert_close(f"{op} forward", got, want, torch.float32)
    for a, b in zip(g_got, g_want):
        assert_close(f"{op} gradient", a, b, torch.float32)
