"""Test setup: the device the op tests run on, and the Triton mode that goes with it.

``pytest --device cuda`` (or ``FASTVLM_TEST_DEVICE=cuda``) builds the op tests' inputs on the GPU, where the
Triton kernels run compiled; the default, ``cpu``, runs them in Triton's interpreter on CPU tensors. Triton
reads ``TRITON_INTERPRET`` when it defines a kernel, so it is set in ``pytest_configure``: after the options are
parsed, before any test module (and so fastvlm's kernels) is imported. The op tests build their inputs with
``helpers.on_device``; the other test files build CPU tensors and need the interpreter, so on CUDA they are
skipped (run them without ``--device``). Parameters marked ``helpers.cuda_only`` (bf16 kernels, real CLIP
widths) are skipped on CPU, with the reason.
"""

import os

import pytest
import torch

from . import helpers

# one thread per pytest-xdist worker (``-n N`` runs N workers side by side: more threads would oversubscribe
# the cores, which slows OpenMP regions by orders of magnitude), else up to two
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))

#: the files whose tests build their inputs on the suite's device
DEVICE_AWARE = {"test_residual.py", "test_masked.py", "test_orth.py"}


def pytest_addoption(parser):
    parser.addoption("--device", default=None, choices=("cpu", "cuda"),
                     help="device of the op tests' inputs: cpu (Triton interpreted, the default) or cuda (Triton "
                          "compiled); default from FASTVLM_TEST_DEVICE")


def pytest_configure(config):
    name = config.getoption("device") or os.environ.get("FASTVLM_TEST_DEVICE", "cpu")
    if name not in ("cpu", "cuda"):
        raise pytest.UsageError(f"FASTVLM_TEST_DEVICE must be 'cpu' or 'cuda', got {name!r}")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
        os.environ["TRITON_INTERPRET"] = "0"
        # the references are IEEE fp32, like the kernels' fp32 dots
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    else:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    helpers.set_device(name)
    config.addinivalue_line("markers", "cuda_only(reason): runs only with --device cuda (skipped on CPU)")


def pytest_collection_modifyitems(config, items):
    on_cuda = helpers.device().type == "cuda"
    for item in items:
        mark = item.get_closest_marker("cuda_only")
        if mark is not None and not on_cuda:
            item.add_marker(pytest.mark.skip(reason=mark.kwargs.get("reason", helpers.CUDA_ONLY_REASON)))
        elif on_cuda and item.path.name not in DEVICE_AWARE:
            item.add_marker(pytest.mark.skip(reason="builds CPU tensors for Triton's interpreter: run it without --device"))


@pytest.fixture(params=["torch", "onednn", "triton"])
def backend(request):
    """Run a test on the torch path with torch's matmuls, on the torch path with its fp32 CPU matmuls on oneDNN
    (``fastvlm.cpu_gemm``; CPU only), and on the Triton kernels (interpreted on CPU, compiled on CUDA)."""
    import fastvlm
    from fastvlm import _backend

    path, gemm = ("torch", request.param) if request.param != "triton" else ("triton", "torch")
    if gemm == "onednn" and helpers.device().type != "cpu":
        pytest.skip("oneDNN is the CPU torch path's matmul")
    if gemm == "onednn" and _backend._onednn_op() is None:
        pytest.skip("this torch build has no oneDNN linear")
    with fastvlm.backend(path), fastvlm.cpu_gemm(gemm):
        yield path


@pytest.fixture
def device():
    """The device the op tests build their inputs on (``--device``)."""
    return helpers.device()


@pytest.fixture
def launches(monkeypatch):
    """The names of the Triton kernels launched in Triton's interpreter from here on, in order (a list the
    test reads; clear it to start counting later)."""
    from triton.runtime.interpreter import InterpretedFunction

    names = []
    real_run = InterpretedFunction.run

    def run(self, *args, **kwargs):
        names.append(self.fn.__name__)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return names
