"""fastvlm: fused Triton kernels and thin tuners for parameter-efficient fine-tuning of CLIP."""

from . import functional
from ._backend import backend, cpu_gemm

__version__ = "0.1.0"
__all__ = ["functional", "backend", "cpu_gemm", "__version__"]
