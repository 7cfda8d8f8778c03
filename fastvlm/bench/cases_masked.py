"""Cases of the masked family: ``masked_linear`` against the naive composition (weight * mask, then
F.linear, by autograd), its compiled form and a plain nn.Linear; the score gradient with gradient dropout
(``masked_linear+gdr``); and the whole two-pass RMT step against one plain backward.

Byte and FLOP model (fp32, GPU path): forward reads x [M, K], W and S [N, K], writes y [M, N]; backward
reads dy, x, W, S and writes dx and dS: 2MK + 3NK + 2MN elements, 6MNK FLOPs (y, dx and dS = (dy^T x) * W).
The naive composition materialises the mask and W' = W * mask, runs F.linear and its backward (dx, dW'),
then dS = dW' * W, each kernel reading and writing its operands.
"""

from __future__ import annotations

import torch

from .harness import COMPILED, Case, Provider, compiled, compiled_step

FAMILY = "masked"
OPS = ("masked_linear", "masked_linear+gdr", "rmt_step")
E = 4
DROP, SEED = 0.5, 1


def _inputs(M, N, K, device):
    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(M, K, generator=g).to(device).requires_grad_()
        w = (0.02 * torch.randn(N, K, generator=g)).to(device)
        s = (0.02 * torch.rand(N, K, generator=g)).to(device).requires_grad_()
        bias = torch.randn(N, generator=g).to(device)
        go = torch.randn(M, N, generator=g).to(device)
        ref = torch.randn(N, K, generator=g).to(device)
        return x, w, s, bias, go, ref
    return make


def linear_case(M: int, N: int, K: int, device, layer: str = "",
                providers=("fastvlm", "naive", "nn.Linear", COMPILED)) -> Case:
    """``masked_linear`` at x [M, K], W [N, K]."""
    import torch.nn.functional as F

    from ..functional import masked_linear
    from ..ops.masked import masked_linear_reference

    inputs = _inputs(M, N, K, device)

    def op_inputs():
        x, w, s, bias, go, _ = inputs()
        return (x, w, s, bias), [x, s], go

    def plain(fn):
        def setup():
            args, params, go = op_inputs()
            return (lambda: fn(*args)), params, go
        return setup

    def linear():
        x, w, s, bias, go, _ = inputs()
        w = w.clone().requires_grad_()
        return (lambda: F.linear(x, w, bias)), [x, w], go

    provs = {"fastvlm": Provider("fastvlm", plain(masked_linear)),
             "naive": Provider("naive", plain(masked_linear_reference)),
             "nn.Linear": Provider("nn.Linear", linear), COMPILED: compiled(masked_linear_reference, op_inputs)}
    shape = dict(tokens=M, N=N, K=K) | (dict(layer=layer) if layer else {})
    cbytes = E * (2 * M * K + 3 * N * K + 2 * M * N)
    nbytes = E * (2 * N * K + 3 * N * K + (M * K + N * K + M * N) + (M * N + N * K + M * K)
                  + (M * N + M * K + N * K) + 3 * N * K)
    return Case("masked_linear", shape, [provs[p] for p in providers],
                baseline=tuple(p for p in ("naive", "nn.Linear", COMPILED) if p in providers),
                flops=6 * M * N * K, bytes=cbytes, naive_bytes=nbytes, size=M * N * K,
                model=lambda: model(M, N, K))


def model(M: int, N: int, K: int, dtype: torch.dtype = torch.float32) -> dict:
    """fastvlm.aot's fwd+bwd model (x and the scores trained, no dropout): "fastvlm" is the Triton default
    (W*[S>tau] built, cuBLAS y and dx, the fused score-gradient kernel), "naive" the unfused composition
    (the same y and dx, then cuBLAS dy^T x and one pass for dS)."""
    from .. import aot
    from .projection import model_dtype

    dt = model_dtype(dtype)
    fwd, bwd = aot.masked_costs(M, N, K, dt)["composition"], aot.masked_backward_costs(M, N, K, dt, dropout=False)
    return {"fastvlm": fwd + bwd["composition"], "naive": fwd + bwd["unfused"]}


def gdr_case(M: int, N: int, K: int, device, layer: str = "", providers=("fastvlm", "naive", COMPILED)) -> Case:
    """One masked_linear forward + backward whose score gradient goes through gradient dropout against a
    reference gradient (the second pass of the RMT step): fused into the score-gradient kernel, against the
    naive backward followed by ``grad_dropout`` and against both compiled."""
    from ..functional import grad_dropout, masked_linear
    from ..ops.masked import grad_dropout_reference, masked_linear_reference

    inputs = _inputs(M, N, K, device)

    def fused():
        x, w, s, bias, go, ref = inputs()

        def step():
            masked_linear(x, w, s, bias, ref_grad=ref, drop_ratio=DROP, seed=SEED).backward(go)
            x.grad = s.grad = None  # each measured step starts with no gradients held
        return step

    def naive():
        x, w, s, bias, go, ref = inputs()

        def step():
            masked_linear_reference(x, w, s, bias).backward(go)
            s.grad = grad_dropout(s.grad, ref, DROP, SEED)
            x.grad = s.grad = None
        return step

    def build_compiled(compile):
        x, w, s, bias, go, ref = inputs()
        fwd, drop = compile(masked_linear_reference), compile(grad_dropout_reference)

        def step():
            fwd(x, w, s, bias).backward(go)
            s.grad = drop(s.grad, ref, DROP, SEED)
            x.grad = s.grad = None
        return step

    provs = {"fastvlm": Provider("fastvlm", fused), "naive": Provider("naive", naive),
             COMPILED: compiled_step(build_compiled)}
    shape = dict(tokens=M, N=N, K=K) | (dict(layer=layer) if layer else {})
    return Case("masked_linear+gdr", shape, [provs[p] for p in providers],
                baseline=tuple(p for p in ("naive", COMPILED) if p in providers), kind="step", size=M * N * K)


def rmt_step_case(model_name: str, batch: int, device) -> Case:
    """The two-pass RMT step against one plain backward of L_a (lambda = 0), same model and batch."""
    from ..train.rmt import RMTRecipe, rmt_step
    from ..tuners.mask import apply_masks, score_parameters
    from .cases_tuners import clip_batch

    def provider(drop):
        def setup():
            model, images, labels, cls = clip_batch(model_name, batch, device)
            apply_masks(model)
            opt = torch.optim.Adam(score_parameters(model), lr=1e-5)
            recipe = RMTRecipe(drop_ratio=drop)

            def step():
                rmt_step(model, images, labels, cls, opt, recipe, 0)
                opt.zero_grad(set_to_none=True)  # each measured step starts with no gradients held
            return step
        return setup

    return Case("rmt_step", dict(model=model_name, batch=batch),
                [Provider("two-pass", provider(1.0)), Provider("one-backward", provider(0.0))],
                baseline="one-backward", kind="step", size=batch)


def cases(device, quick: bool, full: bool) -> list[Case]:
    batches = [8] if quick else [8, 32]
    layers = [("qkv", 2304, 768)] + ([] if quick else [("out_proj", 768, 768)]) + (
        [("mlp_fc", 3072, 768), ("L14_qkv", 3072, 1024)] if full else [])
    out = []
    for b in batches:
        for lname, N, K in layers:
            out.append(linear_case(b * 197, N, K, device, lname))
            out.append(gdr_case(b * 197, N, K, device, lname))
    model_name, batch = ("ViT-B-32", 2) if quick else ("ViT-B-16", 8)
    return out + [rmt_step_case(model_name, batch, device)]
