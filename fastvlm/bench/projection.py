"""The H100 roofline projection: a lower bound on an op's time from its counted bytes and FLOPs.

``roofline(flops, bytes, peak) = max(bytes / HBM bandwidth, flops / peak FLOP rate)``, with the FLOP rate of
the dtype the matmuls actually run in (dense, H100 SXM datasheet):

- fp32 inputs on IEEE FMA units: 67 TFLOP/s. fastvlm's Triton kernels run fp32 dots with
  ``input_precision="ieee"`` (kernels/), so every fp32 fused op uses this peak.
- fp32 inputs on tensor cores as TF32: ~495 TFLOP/s. cuBLAS (the naive composition) does this when
  ``torch.get_float32_matmul_precision()`` is ``"high"`` or ``"medium"``; at the default ``"highest"`` it
  runs IEEE fp32 too.
- bf16 / fp16 on tensor cores: 989 TFLOP/s.
- HBM3: 3.35 TB/s.

A projection is a model of a GPU run, not a measurement: its rows carry ``source = "projection"`` and the
metric ``H100_projected_s``. The FLOPs and bytes are counted as the GPU (Triton) path runs the op (each case
module states its count), including recomputation that the kernels' tiling implies.
"""

from __future__ import annotations

import torch

H100 = {
    "name": "H100 SXM",
    "bytes_per_s": 3.35e12,
    "flops_per_s": {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12, "fp16": 989e12},
}
METRIC = "H100_projected_s"
UNIT = "s (H100 projection)"


def roofline(flops: float, nbytes: float, peak: str) -> float:
    """Seconds: max(bytes / HBM bandwidth, flops / the ``peak`` rate), ``peak`` one of H100's FLOP rates."""
    if peak not in H100["flops_per_s"]:
        raise ValueError(f"peak must be one of {sorted(H100['flops_per_s'])}, got {peak!r}")
    return max(nbytes / H100["bytes_per_s"], flops / H100["flops_per_s"][peak])


def _half(dtype: torch.dtype) -> str | None:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)


def fused_peak(dtype: torch.dtype) -> str:
    """The peak fastvlm's Triton kernels run at for inputs of ``dtype``: half types on tensor cores, fp32
    as IEEE dots whatever torch's float32 matmul precision says."""
    return _half(dtype) or "fp32"


def composition_peak(dtype: torch.dtype, precision: str | None = None) -> str:
    """The peak torch's own matmuls (cuBLAS) run at: half types on tensor cores, fp32 as TF32 when the
    float32 matmul precision (``precision``, default torch's current setting) allows it, else IEEE."""
    half = _half(dtype)
    if half:
        return half
    precision = precision or torch.get_float32_matmul_precision()
    return "fp32" if precision == "highest" else "tf32"
