"""Cases of the orth family: ``orthogonal_linear`` against peft's OFT (exact Cayley and its default Neumann
series), the naive dense composition and its compiled form; the batched Cayley transform against the dense
solve.

FLOPs and bytes of ``orthogonal_linear`` (fp32) on the GPU (Triton) path: fastvlm.aot's model of what it
dispatches to while the rotation trains (:func:`model`: the rotate kernel then cuBLAS, backward cuBLAS dxr,
the rotate kernel and the block gram; the fused kernels only under FASTVLM_FUSED, see docs/kernels.md).
The naive composition builds the dense block-diagonal R (K x K), multiplies x by it, runs the linear and the
backward of both matmuls (3 x 2MK^2 FLOPs for the rotation), each kernel reading and writing its operands.
"""

from __future__ import annotations

import torch

from .harness import COMPILED, Case, Provider, compiled

FAMILY = "orth"
OPS = ("orthogonal_linear", "cayley")
E = 4


def model(M: int, N: int, K: int, b: int, dtype: torch.dtype = torch.float32) -> dict:
    """fastvlm.aot's fwd+bwd model (x and the rotation trained, W frozen): "fastvlm" the Triton default
    (the rotate kernel, then cuBLAS; backward cuBLAS dxr, the rotate kernel for dx and the block gram for dR),
    "naive" the dense composition (the K x K block-diagonal R built, x R and the linear; backward dxr, dx
    and the dense dR by cuBLAS)."""
    from .. import aot
    from .projection import model_dtype

    dt = model_dtype(dtype)
    fast = aot.orth_costs(M, N, K, b, dt)["composition"] + aot.orth_backward_costs(M, N, K, b, dt)["composition"]
    naive = (aot.elementwise(K * K, aot.BYTES[dt], dt) + aot.gemm(M, K, K, dt) + aot.gemm(M, N, K, dt)
             + aot.gemm(M, K, N, dt) + aot.gemm(M, K, K, dt) + aot.gemm(K, K, M, dt))
    return {"fastvlm": fast, "naive": naive}


def run_count(M: int, N: int, K: int, b: int, device, e: int = E) -> tuple[float, float]:
    """(FLOPs, bytes) of the path that runs on ``device``, for the achieved rates: the side the op's own
    dispatch rule picks; input side: rotate x, rotate dxr back, dR from x and dxr (3MKb); weight side:
    rotate W forward and again in backward, dR from x and dx."""
    from .. import aot
    from ..ops.orth import _kernels, rotation_side
    from .projection import model_dtype

    kernels = _kernels(torch.empty(0, device=device), b)
    if kernels is not None:  # the Triton path: the modelled work of what it dispatches to
        path, dt = ("fused" if kernels.fused("orth") else "composition"), model_dtype(torch.float32)
        c = aot.orth_costs(M, N, K, b, dt)[path] + aot.orth_backward_costs(M, N, K, b, dt)[path]
        return c.flops, c.hbm
    side = rotation_side(M, N, b, training=True, fused=False)
    rot_rows = M if side == "input" else N
    rot_flops = 3 * M * K * b if side == "input" else 2 * N * K * b + M * K * b
    return 2 * 2 * M * N * K + 2 * rot_flops, e * (2 * M * K + N * K + 2 * M * N + 2 * rot_rows * K)


def naive_count(M: int, N: int, K: int, e: int = E) -> tuple[float, float]:
    flops = 2 * 2 * M * N * K + 3 * 2 * M * K * K
    nbytes = e * (2 * K * K + (M * K + K * K + M * K) + (M * N + N * K + M * K)
                  + (M * N + N * K + M * K) + (M * K + K * K + M * K) + (2 * M * K + K * K) + K * K)
    return flops, nbytes


def _have_peft() -> bool:
    """Whether peft is installed (found, not imported: importing it loads transformers)."""
    import importlib.util

    return importlib.util.find_spec("peft") is not None


def linear_case(M: int, K: int, N: int, b: int, device,
                providers=("fastvlm", "naive-dense", COMPILED, "peft-exact", "peft-neumann")) -> Case:
    """``orthogonal_linear`` at x [M, K], W [N, K], blocks of b (peft providers only where peft imports)."""
    from ..functional import orthogonal_linear
    from ..ops.orth import n_params, orthogonal_linear_reference

    def inputs():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(M, K, generator=g).to(device).requires_grad_()
        w = (torch.randn(N, K, generator=g) / K**0.5).to(device)
        bias = torch.zeros(N).to(device)
        p = (0.1 * torch.randn(K // b, n_params(b), generator=g)).to(device).requires_grad_()
        go = torch.randn(M, N, generator=g).to(device)
        return x, w, bias, p, go

    def op_inputs():
        x, w, bias, p, go = inputs()
        return (x, w, p, bias, b), [x, p], go

    def plain(fn):
        def setup():
            args, params, go = op_inputs()
            return (lambda: fn(*args)), params, go
        return setup

    def peft_oft(neumann):
        def setup():
            from peft import OFTConfig, get_peft_model

            x, w, bias, p, go = inputs()
            lin = torch.nn.Linear(K, N).to(device)
            with torch.no_grad():
                lin.weight.copy_(w)
                lin.bias.copy_(bias)
            model = get_peft_model(torch.nn.Sequential(lin), OFTConfig(
                target_modules=["0"], oft_block_size=b, r=0, use_cayley_neumann=neumann, init_weights=False))
            rot = model.base_model.model[0].oft_R["default"].weight
            with torch.no_grad():
                rot.copy_(-p if not neumann else p)
            return (lambda: model(x)), [x, rot], go
        return setup

    provs = {"fastvlm": Provider("fastvlm", plain(orthogonal_linear)),
             "naive-dense": Provider("naive-dense", plain(orthogonal_linear_reference)),
             COMPILED: compiled(orthogonal_linear_reference, op_inputs)}
    if _have_peft():
        provs |= {"peft-exact": Provider("peft-exact", peft_oft(False)),
                  "peft-neumann": Provider("peft-neumann", peft_oft(True))}
    chosen = [provs[p] for p in providers if p in provs]
    names = [p.name for p in chosen]
    base = tuple(p for p in ("peft-exact", "peft-neumann", "naive-dense", COMPILED) if p in names)
    gpu = model(M, N, K, b)["fastvlm"]
    nflops, nbytes = naive_count(M, N, K)
    run_flops, run_bytes = run_count(M, N, K, b, device)
    return Case("orthogonal_linear", dict(tokens=M, K=K, N=N, b=b), chosen, baseline=base, flops=gpu.flops,
                bytes=gpu.hbm, naive_bytes=nbytes, naive_flops=nflops, size=K * b,
                extra={"run_flops": run_flops, "run_bytes": run_bytes}, model=lambda: model(M, N, K, b))


def cayley_case(r: int, b: int, device, providers=("fastvlm", "naive-solve", COMPILED)) -> Case:
    """The batched Cayley transform of r blocks of b x b against the dense solve.
    Naive bytes: Q, I - Q, I + Q, the LU factors and the solve each read and written once, twice backward."""
    from ..functional import cayley
    from ..ops.orth import cayley_reference, n_params

    def inputs():
        g = torch.Generator().manual_seed(1)
        p = (0.3 * torch.randn(r, n_params(b), generator=g)).to(device).requires_grad_()
        go = torch.randn(r, b, b, generator=g).to(device)
        return (p, b), [p], go

    def plain(fn):
        def setup():
            args, params, go = inputs()
            return (lambda: fn(*args)), params, go
        return setup

    provs = {"fastvlm": Provider("fastvlm", plain(cayley)), "naive-solve": Provider("naive-solve", plain(cayley_reference)),
             COMPILED: compiled(cayley_reference, inputs)}
    return Case("cayley", dict(blocks=r, b=b), [provs[p] for p in providers],
                baseline=tuple(p for p in ("naive-solve", COMPILED) if p in providers),
                flops=r * (2 * b**3 + 4 * b**3), bytes=4 * r * b * b * 4, naive_bytes=4 * r * b * b * 14,
                naive_flops=r * (2 * b**3 + 8 * b**3), size=b)


def cases(device, quick: bool, full: bool) -> list[Case]:
    M = 8 * 197
    blocks = [32] if quick else [16, 32, 64]
    shapes = [(768, 3072), (3072, 768)] + ([(1024, 4096), (4096, 1024)] if full else [])  # ViT-B/16, L/14 MLPs
    out = [linear_case(M, K, N, b, device) for K, N in shapes for b in blocks]
    return out + [cayley_case(3072 // b, b, device) for b in blocks]
