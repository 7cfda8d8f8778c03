"""Test setup. The Triton kernels run in the interpreter on CPU tensors: TRITON_INTERPRET must be set before
triton defines the kernels, so it is set here, before anything imports fastvlm. The op tests build CPU
tensors; running them on a GPU needs their inputs moved to `DEVICE` (not done yet: no GPU has been lent)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

DEVICE = "cuda" if (os.environ["TRITON_INTERPRET"] != "1" and torch.cuda.is_available()) else "cpu"


@pytest.fixture(params=["torch", "onednn", "triton"])
def backend(request):
    """Run a test on the torch path with torch's matmuls, on the torch path with its fp32 CPU matmuls on oneDNN
    (``fastvlm.cpu_gemm``), and on the Triton kernels (interpreted on CPU)."""
    import fastvlm
    from fastvlm import _backend

    path, gemm = ("torch", request.param) if request.param != "triton" else ("triton", "torch")
    if gemm == "onednn" and _backend._onednn_op() is None:
        pytest.skip("this torch build has no oneDNN linear")
    with fastvlm.backend(path), fastvlm.cpu_gemm(gemm):
        yield path


@pytest.fixture
def device():
    return DEVICE
