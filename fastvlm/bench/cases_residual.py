"""Cases of the residual family: TaskRes logits and cross-entropy, fused against the naive composition and
the compiled naive composition.

Byte and FLOP model (fp32, GPU path): the fused op reads features f [B, D], base t and residual x [K, D]
forward and again backward (the logits are recomputed, not stored) and writes dx; FLOPs are the forward
logits, the recomputed logits and d(normalised u) = g^T f_hat (features frozen): 3 x 2BKD. The naive
composition runs one kernel per step, each reading and writing its operands: u = t + a x, normalise u,
normalise f, the logits matmul, softmax + CE; backward: d logits, d u_hat, the normalisation's backward and
the scale by a (2 x 2BKD FLOPs, no recompute).
"""

from __future__ import annotations

import torch

from .harness import COMPILED, Case, Provider, compiled

FAMILY = "residual"
OPS = ("residual_logits", "residual_cross_entropy")
E = 4  # bytes per fp32 element


def _inputs(B, K, D, device, loss: bool):
    def make():
        g = torch.Generator().manual_seed(0)
        f = torch.randn(B, D, generator=g).to(device)
        t = torch.randn(K, D, generator=g).to(device)
        x = (0.1 * torch.randn(K, D, generator=g)).to(device).requires_grad_()
        y = torch.randint(0, K, (B,), generator=g).to(device)
        if loss:
            return (f, t, x, y), [x], None
        go = torch.randn(B, K, generator=g).to(device)
        return (f, t, x), [x], go
    return make


def naive_bytes(B, K, D, loss: bool = True) -> float:
    n = E * (3 * K * D + 2 * K * D + 2 * B * D + (B * D + K * D + B * K) + 2 * B * K + 2 * B * K
             + (B * K + B * D + K * D) + 3 * K * D + 2 * K * D)
    return n if loss else n - E * 2 * B * K


def naive_peak_estimate(B, K, D) -> float:
    """Bytes the naive cross-entropy holds at its peak, roughly: u, u_hat and their gradients (K x D each),
    the residual's gradient and the logits with their softmax and gradient (B x K). Used to leave out
    shapes that would not fit in memory."""
    return E * (5 * K * D + 3 * B * K)


def case(op: str, B: int, K: int, D: int, device, providers=("fastvlm", "naive", COMPILED)) -> Case:
    """One residual case at features [B, D], classes K; ``providers`` picks among fastvlm, naive, compiled."""
    from ..functional import residual_cross_entropy, residual_logits
    from ..ops.residual import residual_cross_entropy_reference, residual_logits_reference

    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    loss = op == "residual_cross_entropy"
    fused, reference = (residual_cross_entropy, residual_cross_entropy_reference) if loss else (
        residual_logits, residual_logits_reference)
    inputs = _inputs(B, K, D, device, loss)

    def plain(fn):
        def setup():
            args, params, grad = inputs()
            return (lambda: fn(*args)), params, grad
        return setup

    provs = {"fastvlm": Provider("fastvlm", plain(fused)), "naive": Provider("naive", plain(reference)),
             COMPILED: compiled(reference, inputs)}
    chosen = [provs[p] for p in providers]
    baseline = tuple(p for p in ("naive", COMPILED) if p in providers)
    if loss:
        cbytes = E * (2 * (B * D + 2 * K * D) + K * D)
        flops, nflops = 2 * B * K * D * 3, 2 * B * K * D * 2
    else:
        cbytes = E * (2 * (B * D + 2 * K * D) + 2 * B * K + K * D)
        flops = nflops = 2 * B * K * D * 2
    return Case(op, dict(B=B, K=K, D=D), chosen, baseline=baseline, flops=flops, bytes=cbytes,
                naive_bytes=naive_bytes(B, K, D, loss), naive_flops=nflops, size=K * D,
                model=(lambda: model(B, K, D)) if loss else None)


def model(B: int, K: int, D: int, dtype: torch.dtype = torch.float32) -> dict:
    """fastvlm.aot's fwd+bwd model of the cross-entropy as the cases train it (the residual alone):
    "fastvlm" the Triton path (class tiles + combine; per class chunk the recomputed softmax gradient, d uhat,
    the norm backward), "naive" the unfused composition. residual_logits has no such model yet (its cases
    keep the roofline of the counts above)."""
    from .. import aot
    from .projection import model_dtype

    dt = model_dtype(dtype)
    fwd = aot.residual_ce_costs(B, K, D, dt)
    bwd = aot.residual_ce_backward_costs(B, K, D, dt, train_features=False, train_base=False)
    return {"fastvlm": fwd["fused"] + bwd["fused"], "naive": fwd["composition"] + bwd["composition"]}


def cases(device, quick: bool, full: bool) -> list[Case]:
    shapes = [(256, 1000, 512), (256, 21843, 1024)] if quick else [
        (256, k, d) for k in (1000, 21843) for d in (512, 1024)]
    if full:
        shapes += [(256, 21843, 768)]
    return [case(op, B, K, D, device) for B, K, D in shapes for op in ("residual_cross_entropy", "residual_logits")]
