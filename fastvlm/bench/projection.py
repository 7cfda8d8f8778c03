"""The H100 projection of the bench's cases: a model of a GPU run, never a measurement.

Cases whose op has a cost model in ``fastvlm.aot`` (masked_linear, orthogonal_linear,
residual_cross_entropy: the same model as ``fastvlm kernels`` and docs/kernels.md) give it as
``Case.model``: the projection is then that model's time for the path the GPU ops dispatch to
("fastvlm") and for the unfused composition ("naive"), forward + backward, L2 re-reads and launches
included, at the peak of the dot the path runs (:func:`model_dtype`). The other cases keep the roofline
below from their own counts:

``roofline(flops, bytes, peak) = max(bytes / HBM bandwidth, flops / peak FLOP rate)``, with the FLOP rate of
the dtype the matmuls actually run in (dense, H100 SXM datasheet):

- fp32 inputs on IEEE FMA units: 67 TFLOP/s, at ``torch.get_float32_matmul_precision() == "highest"``
  (the default);
- fp32 inputs on tensor cores as TF32: ~495 TFLOP/s at ``"high"`` or ``"medium"``. fastvlm's Triton
  kernels' fp32 dots follow that setting as cuBLAS (the naive composition) does;
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
    as torch's float32 matmul precision says (:func:`model_dtype`)."""
    return model_dtype(dtype)


def composition_peak(dtype: torch.dtype, precision: str | None = None) -> str:
    """The peak torch's own matmuls (cuBLAS) run at: half types on tensor cores, fp32 as TF32 when the
    float32 matmul precision (``precision``, default torch's current setting) allows it, else IEEE."""
    half = _half(dtype)
    if half:
        return half
    precision = precision or torch.get_float32_matmul_precision()
    return "fp32" if precision == "highest" else "tf32"


def model_dtype(dtype: torch.dtype, precision: str | None = None) -> str:
    """The ``fastvlm.aot`` cost model's dtype for matmuls on inputs of ``dtype``: half types as they are,
    fp32 as TF32 or IEEE by ``precision`` (default: torch's float32 matmul precision), which the Triton
    kernels' fp32 dots follow as cuBLAS does."""
    half = _half(dtype)
    if half:
        return half
    precision = precision or torch.get_float32_matmul_precision()
    return "fp32" if precision == "highest" else "tf32"
