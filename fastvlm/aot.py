"""``fastvlm kernels``: compile every Triton kernel, in every configuration its launchers can choose, for real
GPUs (sm_80 and sm_90a) with no GPU present, and check each one's resources.

For each kernel x configuration x target: compiled or the compiler's error, registers per thread, spill
bytes (local memory), shared memory, and whether the machine code uses tensor-core instructions (HMMA on
sm_80, HGMMA or HMMA on sm_90a). Exits non-zero if any configuration fails to compile, spills, exceeds the
target's shared memory, or a matrix-multiplying kernel at fp16/bf16 does not use the tensor cores.

The configurations come from each kernel module's ``variants()``, built from the same policy (block
sizes, warps, stages, dot dtype) the launchers use, so what is compiled here is what would run there.
The variants are compiled unspecialised (they stand for every shape and alignment); the realistic
launches (``realistic_variants``: the issue's shapes) are compiled with the specialisation Triton applies
at run time (16-byte aligned pointers, ==1 constants, divisible-by-16 hints), so their registers and shared
memory are those of what runs. Blocks per SM come from registers, shared memory and warps (``blocks_per_sm``).
After the table: the cost model's projection for an H100 SXM (modelled, never measured; docs/kernels.md).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

TARGETS = {"sm_80": (80, 166912), "sm_90a": (90, 232448)}  # (capability, max dynamic shared bytes per block)


def kernel_families() -> list[str]:
    """Every op family with Triton kernels: each public module of ``fastvlm.kernels`` (found, not listed)."""
    from . import kernels

    return sorted(m.name for m in pkgutil.iter_modules(kernels.__path__) if not m.name.startswith("_"))


def all_variants():
    """(family, Variant) for every launch configuration of every family's ``variants()``, then the realistic
    launches (:func:`realistic_variants`) specialised as they run."""
    out = []
    for family in kernel_families():
        mod = importlib.import_module(f"{__package__}.kernels.{family}")
        out += [(family, v) for v in mod.variants()]
    return out + realistic_variants()


def _pick(family, name, **want):
    import torch

    mod = importlib.import_module(f"{__package__}.kernels.{family}")
    for v in mod.variants():
        ptr = next(iter(v.ptrs.values()), torch.float32)
        if v.name == name and all((ptr if k == "dtype" else v.constexprs.get(k)) == x for k, x in want.items()):
            return v
    raise LookupError(f"no {name} variant with {want}")


def realistic_variants():
    """The launches that run on the Triton path at the issue's shapes (tokens 1576 / 6304 through the CLIP
    linears, TaskRes B = 256 x K = 1000 / 21843 x D = 512 / 1024, rotation blocks 16 / 32 / 64), each with
    its integer arguments, one per distinct run-time specialisation (sizes and strides equal to 1 or
    divisible by 16)."""
    import torch

    from .kernels._common import Variant

    import triton.language as tl

    launches = []
    bf16, f32 = torch.bfloat16, torch.float32
    for M, K, N in LINEAR_SHAPES:
        for drop in (False, True):
            v = _pick("masked", "score_grad_kernel", dtype=bf16, DROPOUT=drop, HAS_ADD=False)
            launches.append(("masked", v, f"{M}x{K}->{N}", dict(
                sdy_m=N, sdy_n=1, sx_m=K, sx_k=1, sw_n=K, sw_k=1, sr_n=K, sr_k=1, ss_n=K, ss_k=1, so_n=K, so_k=1,
                N=N, K=K, M=M)))
        from .kernels import masked as km

        cfg = km.mm_config(tl.bfloat16, heavy_epilogue=True)
        split = km.score_grad_split(N, K, M, cfg)
        if split > 1:  # split-K of the score gradient (768 x 768 at 6304 tokens)
            chunk = km.split_chunk(M, split, cfg["BLOCK_K"])
            v = _pick("masked", "score_grad_partial_kernel", dtype=bf16)
            launches.append(("masked", v, f"{M}x{K}->{N} split {split}", dict(
                sdy_m=N, sdy_n=1, sx_m=K, sx_k=1, N=N, K=K, M=M, CHUNK=chunk)))
            v = _pick("masked", "score_grad_reduce_kernel", dtype=bf16, DROPOUT=True, HAS_ADD=False)
            launches.append(("masked", v, f"{M}x{K}->{N} split {split}", dict(
                SPLIT=-(-M // chunk), sw_n=K, sw_k=1, sr_n=K, sr_k=1, ss_n=K, ss_k=1, so_n=K, so_k=1, N=N, K=K)))
        for b in (16, 32, 64):
            v = _pick("orth", "rotate_kernel", dtype=bf16, BLOCK=b)
            launches.append(("orth", v, f"{M}x{K} b={b}", dict(sx_m=K, sx_k=1, sr_r=b * b, sr_j=b, sr_c=1, so_m=K,
                                                             so_k=1, M=M, b=b)))
    from .kernels.residual import backward_chunk_classes, batch_tile, class_tile_variant, norm_grad_variant

    for B, K, D in RESIDUAL_SHAPES:
        ints = dict(sf_b=D, sf_d=1, st_k=D, st_d=1, sx_k=D, sx_d=1, B=B, K=K, D=D)
        for prec in ("ieee", "tf32"):
            for grad in (False, True):  # the forward's partials, the backward's softmax gradient (one chunk)
                v = class_tile_variant(f32, batch_tile(B), prec, grad)
                kc = backward_chunk_classes(B, D, K) if grad else K
                nkb = -(-kc // v.constexprs["BLOCK_N"])
                launches.append(("residual", v, f"B={B} K={K} D={D}", {
                    **ints, "K": kc, "NKB": nkb, "NBB": -(-B // batch_tile(B)), "sg_b": kc, "sg_k": 1}))
            v = norm_grad_variant(f32, tl.float32, prec, False, True)  # TaskRes: the residual alone trains
            kc = backward_chunk_classes(B, D, K)
            launches.append(("residual", v, f"B={B} K={K} D={D}", {
                **ints, "K": kc, "NBB": -(-B // batch_tile(B)), "sg_b": kc, "sg_k": 1, "sdt_k": D, "sdx_k": D}))
    out, seen = [], set()
    for family, v, label, ints in launches:
        ints = {k: x for k, x in ints.items() if k in v.kernel.arg_names}
        key = (v.name, v.describe(), tuple(sorted((k, x == 1, x % 16 == 0) for k, x in ints.items())))
        if key not in seen:
            seen.add(key)
            out.append((family, Variant(v.kernel, v.constexprs, v.options, v.ptrs, ints, label)))
    return out


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def specialisation(v) -> tuple:
    """(signature, constexprs, attrs) of variant ``v`` as Triton's launcher specialises a launch: with
    ``v.spec`` (a real launch's integer values), every pointer 16-byte aligned (torch's allocations are),
    integers equal to 1 compiled as constants and those divisible by 16 marked so. Without a spec nothing is
    specialised: the variant then stands for every shape and alignment."""
    sig, consts, attrs = v.signature(), dict(v.constexprs), {}
    for i, a in enumerate(v.kernel.arg_names):
        if sig[a].startswith("*") and v.spec:
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif a in v.spec and sig[a] == "i32":
            if v.spec[a] == 1:
                sig[a], consts[a] = "constexpr", 1
            elif v.spec[a] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def source_ir(v, target: str = "sm_90a") -> str:
    """The Triton IR of variant ``v`` as the front end emits it (before any lowering): what the kernel's
    source asks for, e.g. the integer type of each pointer offset. Fast (no LLVM, no ptxas)."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    tgt = GPUTarget("cuda", TARGETS[target][0], 32)
    backend = make_backend(tgt)
    options = backend.parse_options(dict(v.options))
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    src = ASTSource(v.kernel, v.signature(), v.constexprs)
    return str(src.make_ir(tgt, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                           context))


def narrow_tile_offsets(v) -> int:
    """How many 2-D tiles of pointers variant ``v`` forms with 32-bit offsets: each such offset is an
    index times a stride that wraps past 2^31 (a transposed view of a [K, N] tensor with K x N >= 2^31)."""
    return len(re.findall(r"tt\.addptr [^\n]*: tensor<\d+x\d+x!tt\.ptr<\w+>>, tensor<\d+x\d+xi32>", source_ir(v)))


#: per SM: registers, shared memory, resident threads and blocks (sm_80 = A100, sm_90a = H100)
SM_LIMITS = {"sm_80": (65536, 167936, 2048, 32), "sm_90a": (65536, 233472, 2048, 32)}


def blocks_per_sm(regs: int, smem: int, warps: int, target: str) -> int:
    """Blocks of this kernel resident on one SM: registers (allocated per warp in units of 256), shared
    memory (+1 KiB the driver reserves per block), threads and the block limit, the smallest."""
    reg_file, smem_sm, threads, max_blocks = SM_LIMITS[target]
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = reg_file // (per_warp * warps)
    by_smem = smem_sm // (smem + 1024)
    return max(0, min(by_regs, by_smem, threads // (32 * warps), max_blocks))


def compile_one(index: int, target: str) -> dict:
    """Compile variant ``index`` for ``target``; returns its report row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    family, v = all_variants()[index]
    cap, smem_max = TARGETS[target]
    row = {"family": family, "kernel": v.name, "config": v.describe(), "target": target}
    try:
        k = triton.compile(ASTSource(v.kernel, *specialisation(v)), target=GPUTarget("cuda", cap, 32),
                           options=dict(v.options))
    except Exception as e:  # the compiler's own message, first line
        row.update(ok=False, error=str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__)
        return row
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(k.asm["cubin"])
        fh.flush()
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", fh.name], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", fh.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    regs, stack, static_smem, local = (int(g) for g in m.groups()) if m else (-1, 0, 0, 0)
    smem = int(k.metadata.shared) + static_smem
    tc = bool(re.search(r"\bH(G)?MMA\b", sass))
    row.update(ok=True, regs=regs, spill_bytes=local + stack, shared_bytes=smem, tensor_cores=tc,
               blocks_per_sm=blocks_per_sm(regs, smem, v.options.get("num_warps", 4), target))
    problems = []
    if local + stack:
        problems.append("spills")
    if smem > smem_max:
        problems.append(f"shared {smem} > {smem_max}")
    if v.needs_tensor_cores and not tc:
        problems.append("no tensor cores at fp16/bf16")
    row["problems"] = problems
    return row


def die_with_parent() -> None:
    """Worker initializer: ask Linux to send this process SIGTERM when its parent dies (prctl
    PR_SET_PDEATHSIG), so compile workers never outlive a ``fastvlm kernels`` killed mid-run (a pool's
    workers otherwise finish their compiles as orphans). Does nothing where prctl is not available."""
    import ctypes
    import signal

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


def run(targets=("sm_80", "sm_90a"), jobs: int | None = None, only: str | None = None) -> list[dict]:
    variants = all_variants()
    idx = [i for i, (_, v) in enumerate(variants) if only is None or only in v.name]
    work = [(i, t) for i in idx for t in targets]
    jobs = jobs or max(1, min(len(work), os.cpu_count() or 1))
    env_ok = os.environ.get("TRITON_INTERPRET", "0") != "1"
    if not env_ok:
        raise RuntimeError("fastvlm kernels must run with TRITON_INTERPRET unset (the interpreter replaces the compiler)")
    if not work:
        return []
    from tqdm.auto import tqdm

    # a cold compile takes tens of seconds to minutes: a bar on stderr, the report stays on stdout
    with ProcessPoolExecutor(max_workers=jobs, initializer=die_with_parent) as ex, \
            tqdm(total=len(work), desc="compiling kernels", unit="kernel", leave=False, file=sys.stderr,
                 mininterval=0, miniters=1) as bar:  # every kernel drawn: cached compiles finish within tqdm's 0.1 s
        rows = []
        for row in ex.map(compile_one, *zip(*work)):
            rows.append(row)
            bar.update(1)
        return rows


def print_report(rows: list[dict], file=None) -> None:
    file = file or sys.stdout
    hdr = f"{'kernel':22} {'target':7} {'regs':>4} {'spill':>5} {'smem':>7} {'blk/SM':>6} {'TC':>3}  {'status':14} config"
    print(hdr, file=file)
    print("-" * len(hdr), file=file)
    for r in rows:
        if not r["ok"]:
            print(f"{r['kernel']:22} {r['target']:7} {'':>4} {'':>5} {'':>7} {'':>6} {'':>3}  {'FAILED':14} {r['config']}  "
                  f"({r['error']})", file=file)
            continue
        status = "ok" if not r["problems"] else ",".join(r["problems"])
        print(f"{r['kernel']:22} {r['target']:7} {r['regs']:>4} {r['spill_bytes']:>5} {r['shared_bytes']:>7} "
              f"{r['blocks_per_sm']:>6} {'yes' if r['tensor_cores'] else 'no':>3}  {status:14} {r['config']}",
              file=file)
    bad = [r for r in rows if not r["ok"] or r["problems"]]
    print(f"{len(rows)} kernel configurations compiled, {len(bad)} with problems", file=file)


def main(args) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":  # re-run without the interpreter
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        return subprocess.call([sys.executable, "-m", "fastvlm.cli", *args.argv], env=env)
    if getattr(args, "projection", False):
        print_projection()
        return 0
    rows = run(tuple(args.target), args.jobs, args.only)
    print_report(rows)
    print_projection()
    if args.csv:
        import csv

        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r}))
            w.writeheader()
            w.writerows(rows)
    return 0 if all(r["ok"] and not r["problems"] for r in rows) else 1


def add_parser(sub) -> None:
    p = sub.add_parser("kernels", help="compile every Triton kernel configuration for sm_80/sm_90a and check resources")
    p.add_argument("--target", nargs="+", default=["sm_80", "sm_90a"], choices=sorted(TARGETS))
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count)")
    p.add_argument("--only", default=None, help="only kernels whose name contains this")
    p.add_argument("--csv", default=None, help="also write the report as CSV")
    p.add_argument("--projection", action="store_true",
                   help="only print the cost model's projection (H100 SXM, modelled: nothing is measured)")
    p.set_defaults(func=main)


if __name__ == "__main__":  # pragma: no cover
    ns = argparse.Namespace(target=["sm_80", "sm_90a"], jobs=None, only=None, csv=None, projection=False,
                            argv=sys.argv[1:])
    sys.exit(main(ns))


# ---------------------------------------------------------------------------------------------------------
# the cost model: a projection for an H100 SXM, never a measurement
# ---------------------------------------------------------------------------------------------------------

#: dense peaks of an H100 SXM by the dtype the matmul runs in (fp32: FMA on the CUDA cores), FLOP/s
PEAK_FLOPS = {"fp32": 67e12, "tf32": 495e12, "bf16": 989e12, "fp16": 989e12}
HBM_BYTES_PER_S = 3.35e12
#: L2 bandwidth: an assumption (about 3x HBM), not a datasheet figure
L2_BYTES_PER_S = 10e12
#: the output tile the unfused composition's cuBLAS GEMMs are modelled with
CUBLAS_TILE = (128, 256)
BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2}


class Cost:
    """Modelled work of one kernel or composition: FLOPs (recompute included) at a dtype's peak, bytes from
    HBM (each tensor once: what the tiling re-reads is assumed to hit L2) and bytes from L2 (everything the
    tiles load, re-reads included). ``time_s`` is the projection: the slowest of the three rates, plus
    ``launches`` x 3 us of launch overhead for the whole chain (kernels don't overlap)."""

    LAUNCH_S = 3e-6

    def __init__(self, flops=0.0, hbm=0.0, l2=0.0, dtype="bf16", launches=1):
        self.flops, self.hbm, self.l2, self.dtype, self.launches = float(flops), float(hbm), float(l2), dtype, launches

    def __add__(self, other: "Cost") -> "Cost":
        """Two kernels run one after the other: their times add (the sum's dtype is kept only for display)."""
        out = Cost(self.flops + other.flops, self.hbm + other.hbm, self.l2 + other.l2, self.dtype,
                   self.launches + other.launches)
        out._time = self.time_s + other.time_s
        return out

    @property
    def time_s(self) -> float:
        if hasattr(self, "_time"):
            return self._time
        return max(self.flops / PEAK_FLOPS[self.dtype], self.hbm / HBM_BYTES_PER_S,
                   self.l2 / L2_BYTES_PER_S) + self.launches * self.LAUNCH_S

    def row(self) -> dict:
        return {"flops": self.flops, "hbm_bytes": self.hbm, "l2_bytes": self.l2, "time_us": self.time_s * 1e6}


def _cdiv(a, b):
    return -(-a // b)


def tiled_matmul(M, N, K, *, a_bytes, b_bytes, out_bytes, tile, dtype, extra_flops=0.0, launches=1):
    """C [M, N] = A [M, K] @ B [K, N] tiled by ``tile`` = (BM, BN): A is loaded once per column tile and B
    (``b_bytes`` per element: every tensor the B side loads, e.g. a weight and its fp32 scores) once per row
    tile; from HBM each tensor once. ``extra_flops``: work recomputed in the loop (e.g. a rotation)."""
    bm, bn = tile
    l2 = M * K * a_bytes * _cdiv(N, bn) + K * N * b_bytes * _cdiv(M, bm) + M * N * out_bytes
    hbm = M * K * a_bytes + K * N * b_bytes + M * N * out_bytes
    return Cost(2.0 * M * N * K + extra_flops, hbm, l2, dtype, launches)


def gemm(M, N, K, dtype, out_bytes=None):
    """A cuBLAS GEMM of operands in ``dtype`` (its tile: CUBLAS_TILE)."""
    e = BYTES[dtype]
    return tiled_matmul(M, N, K, a_bytes=e, b_bytes=e, out_bytes=e if out_bytes is None else out_bytes,
                        tile=CUBLAS_TILE, dtype=dtype)


def elementwise(n, bytes_per_element, dtype="fp32", launches=1):
    """A memory-bound pass over n elements moving ``bytes_per_element`` (reads + writes) each."""
    b = n * bytes_per_element
    return Cost(0.0, b, b, dtype, launches)


def masked_costs(M, N, K, dtype="bf16"):
    """{path: Cost} of masked_linear's forward y = x @ (W*[S>tau]).T (M tokens, K -> N), the fused kernel
    (64x64 tiles, W and the fp32 scores on the B side) and the composition (one pass builds W*[S>tau] in x's
    dtype, then a cuBLAS GEMM). The dx matmul has the same shape with N and K swapped."""
    e = BYTES[dtype]
    fused = tiled_matmul(M, N, K, a_bytes=e, b_bytes=e + 4, out_bytes=e, tile=(64, 64), dtype=dtype)
    comp = elementwise(N * K, 4 + e + e, dtype) + gemm(M, N, K, dtype)
    return {"fused": fused, "composition": comp}


def orth_costs(M, N, K, b, dtype="bf16"):
    """{path: Cost} of orthogonal_linear's forward y = (x @ blockdiag(R)) @ W^T: the fused kernel (x @ R
    recomputed for every 32-column output tile, 64-row tiles) and the composition (the rotate kernel writes
    x @ blockdiag(R) once, then a cuBLAS GEMM)."""
    e = BYTES[dtype]
    bn = 32
    fused = tiled_matmul(M, N, K, a_bytes=e, b_bytes=e, out_bytes=e, tile=(64, bn), dtype=dtype,
                         extra_flops=2.0 * M * K * b * _cdiv(N, bn))
    return {"fused": fused, "composition": rotate_cost(M, K, b, dtype) + gemm(M, N, K, dtype)}


def _fill(cost, programs):
    """``cost`` for a grid of ``programs`` blocks: below SPLIT_MIN_PROGRAMS (2 per SM) the SMs' FLOPs and L2
    bandwidth are modelled as used in proportion (a grid of 144 blocks runs at 144 / 264 of them); HBM is
    not scaled (a few blocks per SM still saturate it). Only the score-gradient kernels are modelled so."""
    from .kernels.masked import SPLIT_MIN_PROGRAMS

    f = min(1.0, programs / SPLIT_MIN_PROGRAMS)
    cost._time = max(cost.flops / PEAK_FLOPS[cost.dtype] / f, cost.hbm / HBM_BYTES_PER_S,
                     cost.l2 / L2_BYTES_PER_S / f) + cost.launches * Cost.LAUNCH_S
    return cost


def score_grad_cost(M, N, K, dtype="bf16", dropout=True, split=None, tile=(64, 64)):
    """The score gradient dS [N, K] = (dy^T x) * W over M tokens (kernels/masked.py), gradient-dropped
    against the fp32 reference gradient when ``dropout``, as the launcher runs it: ``split`` token splits
    (default: score_grad_split's choice for this shape). One pass (split 1): score_grad_kernel, 64 x 64
    output tiles, dy re-read once per 64-column tile and x once per 64-row tile; its epilogue reads W (and
    the reference gradient) and writes dS in fp32. Split-K: score_grad_partial_kernel writes split fp32
    partials of N x K over tiles x split programs, then score_grad_reduce_kernel reads them (in order), W
    and the reference gradient and writes dS. Both with the grid's fill (:func:`_fill`)."""
    import triton.language as tl

    from .kernels.masked import mm_config, score_grad_split

    e = BYTES[dtype]
    tiles = _cdiv(N, tile[0]) * _cdiv(K, tile[1])
    if split is None:
        dot = tl.float32 if dtype in ("fp32", "tf32") else tl.bfloat16
        split = score_grad_split(N, K, M, {**mm_config(dot, heavy_epilogue=dropout), "BLOCK_M": tile[0],
                                           "BLOCK_N": tile[1]}, dropout, dtype)
    if split == 1:
        return _fill(tiled_matmul(N, K, M, a_bytes=e, b_bytes=e, out_bytes=e + 4 + (4 if dropout else 0),
                                  tile=tile, dtype=dtype), tiles)
    part = _fill(tiled_matmul(N, K, M, a_bytes=e, b_bytes=e, out_bytes=4 * split, tile=tile, dtype=dtype),
                 tiles * split)
    return part + elementwise(N * K, 4 * split + e + 4 + (4 if dropout else 0), dtype)


def masked_backward_costs(M, N, K, dtype="bf16", dropout=True):
    """{path: Cost} of masked_linear's backward (x and the scores trained, M tokens, K -> N): dx = dy @
    (W*[S>tau]) and the score gradient dS = (dy^T x) * W, gradient-dropped against the fp32 reference
    gradient when ``dropout``.

    - "fused" (FASTVLM_FUSED=masked): the fused masked matmul for dx (64 x 64 tiles, W and the fp32 scores on
      the B side), then the score-gradient kernel.
    - "composition" (the Triton default): one pass rebuilds W*[S>tau] in dy's dtype, cuBLAS dx, then the
      same score-gradient kernel (its epilogue keeps the un-dropped N x K gradient from ever existing).
    - "unfused": the same dx, then cuBLAS dy^T x into an fp32 N x K buffer and one elementwise pass (times W,
      the dropout against the reference) over it."""
    e = BYTES[dtype]
    sg = score_grad_cost(M, N, K, dtype, dropout)
    dx_fused = tiled_matmul(M, K, N, a_bytes=e, b_bytes=e + 4, out_bytes=e, tile=(64, 64), dtype=dtype)
    dx_comp = elementwise(N * K, 4 + e + e, dtype) + gemm(M, K, N, dtype)
    ds_unfused = gemm(N, K, M, dtype, out_bytes=4) + elementwise(N * K, 4 + e + (4 if dropout else 0) + 4, dtype)
    return {"fused": dx_fused + sg, "composition": dx_comp + sg, "unfused": dx_comp + ds_unfused}


def rotate_cost(M, K, b, dtype="bf16"):
    """The rotate kernel: out = x @ blockdiag(R) (or R^T), x read and out written once, R negligible."""
    e = BYTES[dtype]
    return Cost(2.0 * M * K * b, 2 * M * K * e, 2 * M * K * e, dtype)


def orth_backward_costs(M, N, K, b, dtype="bf16"):
    """{path: Cost} of orthogonal_linear's backward on the input side (x and the rotation trained, W frozen).

    - "fused" (FASTVLM_FUSED=orth): one kernel per (64-row tile, rotation block): dxr = dy @ W[:, block] in
      registers (dy's row tile re-read for every one of the K/b blocks, W's column block for every row tile),
      then dx = dxr R^T and the tile's share of dR (fp32 partials, M/64 x K/b x b^2, summed afterwards).
    - "composition" (the Triton default): cuBLAS dxr = dy @ W, the rotate kernel dx = dxr @ blockdiag(R)^T
      and the block-gram kernel dR_j = x_j^T dxr_j (reads x and dxr once; K/b programs, one per block)."""
    e = BYTES[dtype]
    nb, row_tiles = _cdiv(K, b), _cdiv(M, 64)
    partials = row_tiles * nb * b * b * 4
    fused = Cost(2.0 * M * N * K + 4.0 * M * K * b,
                 (M * N + N * K + 2 * M * K) * e + 2 * partials,
                 M * N * e * nb + N * K * e * row_tiles + 2 * M * K * e + 2 * partials, dtype)
    fused = fused + elementwise(partials // 4, 4, "fp32")  # the partials' sum
    gram = Cost(2.0 * M * K * b, 2 * M * K * e + nb * b * b * 4, 2 * M * K * e + nb * b * b * 4, dtype)
    comp = gemm(M, K, N, dtype) + rotate_cost(M, K, b, dtype) + gram
    return {"fused": fused, "composition": comp}


def _class_tiles(B, K, dtype):
    """(BLOCK_N, BLOCK_B) of the Triton loss kernel (kernels/residual.py: ce_class_tile_kernel) for a model
    dtype: "fp32" (IEEE dots), "tf32", "bf16"/"fp16"."""
    from .kernels import residual as kr

    cfg = {"fp32": kr.CLASS_TILE_IEEE, "tf32": kr.CLASS_TILE_TF32}.get(dtype, kr.CLASS_TILE_HALF)
    return cfg["BLOCK_N"], kr.batch_tile(B)


def class_tile_cost(B, K, D, dtype, out_bytes):
    """One launch of the loss kernel over K classes: class tiles of BLOCK_N x batch tiles of BLOCK_B (the
    whole batch when B <= 256). f is loaded once per class tile, t and x once per batch tile; the norms come
    from the same tiles (||u||^2 and u = t + alpha x: 4 FLOPs per element of t per batch tile, ||f||^2: 2 per
    element of f per class tile). ``out_bytes``: what it writes, the partials (3 floats per row and class
    tile) or the softmax gradient (B x K fp32)."""
    e = BYTES[dtype]
    bn, bb = _class_tiles(B, K, dtype)
    nkb, nbb = _cdiv(K, bn), _cdiv(B, bb)
    flops = 2.0 * B * K * D + 4.0 * K * D * nbb + 2.0 * B * D * nkb
    hbm = (B * D + 2 * K * D) * e + out_bytes + 4 * (B + K)
    l2 = B * D * e * nkb + 2 * K * D * e * nbb + out_bytes + 4 * (B + K)
    return Cost(flops, hbm, l2, dtype)


def residual_ce_costs(B, K, D, dtype="fp32"):
    """{path: Cost} of the residual cross-entropy's forward. Fused (the Triton path): the class-tile kernel
    (:func:`class_tile_cost`, writing 3 partial floats per row and class tile) and the one-launch combine of
    the partials into the log-sum-exp; no B x K tensor, no norm pass. Composition: u = t + alpha x, its
    normalisation, a cuBLAS GEMM writing fp32 logits, a log-softmax pass. ``dtype``: the dot's, "fp32" for
    IEEE fp32 (``torch.get_float32_matmul_precision() == "highest"``), "tf32" for "high"/"medium"."""
    e = BYTES[dtype]
    partials = 3 * 4 * B * _cdiv(K, _class_tiles(B, K, dtype)[0])
    combine = Cost(0.0, partials + 8 * B, partials + 8 * B, dtype)
    fused = class_tile_cost(B, K, D, dtype, partials) + combine
    comp = (elementwise(K * D, 3 * e, dtype) + elementwise(K * D, 2 * e, dtype)
            + gemm(B, K, D, dtype, out_bytes=4) + elementwise(B * K, 4, dtype))
    return {"fused": fused, "composition": comp}


def residual_logits_costs(B, K, D, dtype="fp32", tile=None):
    """{path: Cost} of residual_logits' forward, logits [B, K] in the inputs' dtype. Fused (the Triton path,
    kernels/residual.py: forward without a target): ``inv_norm_kernel`` over f (B x D read, rf written),
    the same over t + alpha x (t and x read, ru written), then ``logits_kernel``, the tiled matmul of f
    against u^T with t and x combined as they load (both on the B side: 2 operands of ``e`` bytes) and the
    norms applied in its epilogue, at the launcher's tiles (kernels/residual.py: logits_config, batch tiles
    of up to 256 rows at IEEE fp32 and 128 at TF32 / half), so t and x are re-read from L2 once per batch
    tile. ``tile``: another (BLOCK_M, BLOCK_N) to model (the 64-row defaults were (64, 32) and (64, 64)).
    Composition (as :func:`residual_ce_costs`' without its log-softmax pass): u = t + alpha x, its
    normalisation, a cuBLAS GEMM writing the logits in ``e`` bytes; f's normalisation (B x D) is left out
    of both, as there."""
    import triton.language as tl

    from .kernels.residual import logits_config

    e = BYTES[dtype]
    if tile is None:
        dot = tl.float32 if dtype in ("fp32", "tf32") else tl.bfloat16
        cfg = logits_config(B, dot, "tf32" if dtype == "tf32" else "ieee")
        tile = (cfg["BLOCK_M"], cfg["BLOCK_N"])
    norms = Cost(0.0, B * D * e + 4 * B, B * D * e + 4 * B, dtype) + Cost(0.0, 2 * K * D * e + 4 * K,
                                                                          2 * K * D * e + 4 * K, dtype)
    mm = tiled_matmul(B, K, D, a_bytes=e, b_bytes=2 * e, out_bytes=e, tile=tile, dtype=dtype)
    mm.hbm += 4 * (B + K)  # rf, ru in the epilogue
    mm.l2 += 4 * (B * _cdiv(K, tile[1]) + K * _cdiv(B, tile[0]))
    comp = elementwise(K * D, 3 * e, dtype) + elementwise(K * D, 2 * e, dtype) + gemm(B, K, D, dtype)
    return {"fused": norms + mm, "composition": comp}


def _grad_dtype(dtype):
    """The dot of the backward's two matmuls on the fp32 softmax gradient (kernels/residual.py:
    grad_dot_dtype): fp16 inputs run TF32 dots (fp16 would flush G ~ p / B), the others their own."""
    return "tf32" if dtype == "fp16" else dtype


def residual_ce_backward_costs(B, K, D, dtype="fp32", train_features=True, train_base=True):
    """{path: Cost} of the residual cross-entropy's backward, the residual trained, the features and the
    base as the flags say (a frozen one drops its matmul / output). Fused (the Triton path as launched): per
    class chunk (kernels/residual.py: backward_chunk_classes), the class-tile kernel recomputes
    G (B x Kc, fp32) and its sums of G * logit per batch tile, norm_grad_kernel computes d uhat = s G^T fhat
    tile by tile with the normalisation backward in its epilogue (G^T re-read once per column tile of D, f
    once per 64-class tile, t and x read and d t, d x written once; 64 x 32 tiles at fp32 dots, 64 x 64 at
    half), and the matmul kernel accumulates d fhat += s G uhat (B x D fp32, dfhat_config's batch tiles);
    then the features' norm backward. Composition (the eager reference's autograd at its best): the softmax gradient from the kept
    log-probabilities (B x K, read and written in fp32), cuBLAS d uhat = G^T fhat and d fhat = G uhat, the
    normalisation backward of u (a reduction pass, then a pass writing d u) and d residual = alpha d u, the
    features' norm backward."""
    import triton.language as tl

    from .kernels.residual import backward_chunk_classes, dfhat_config

    e = BYTES[dtype]
    gd = _grad_dtype(dtype)
    mm_tile = (64, 32) if gd in ("fp32", "tf32") else (64, 64)  # kernels/_common.py: MM_FP32, MM_HALF
    dfc = dfhat_config(B, tl.bfloat16 if gd in ("bf16", "fp16") else tl.float32, "tf32" if gd == "tf32" else "ieee")
    dfhat_tile = (dfc["BLOCK_M"], dfc["BLOCK_N"])
    kc = backward_chunk_classes(B, D, K)
    nbb = _cdiv(B, _class_tiles(B, K, dtype)[1])
    f_norm_bwd = elementwise(B * D, 4 + 4 + e + e, dtype)  # d fhat, its re-read, f, d f
    outs = 2 if train_base else 1  # d t and d x, or d x alone
    fused = None
    for k0 in range(0, K, kc):
        c = min(kc, K - k0)
        gdot = 4 * nbb * c
        fold = tiled_matmul(c, D, B, a_bytes=4, b_bytes=e, out_bytes=(2 + outs) * e, tile=mm_tile, dtype=gd)
        fold.hbm += gdot
        fold.l2 += gdot * _cdiv(D, mm_tile[1])
        chunk = class_tile_cost(B, c, D, dtype, 4 * B * c + gdot) + fold
        if train_features:  # d fhat: dfhat_config's tiles (batch tiles x the class tile's width)
            chunk = chunk + tiled_matmul(B, D, c, a_bytes=4, b_bytes=2 * e, out_bytes=8, tile=dfhat_tile, dtype=gd)
        fused = chunk if fused is None else fused + chunk
    comp = (elementwise(B * K, 8, dtype) + gemm(K, D, B, dtype) + elementwise(K * D, 2 * e, dtype)
            + elementwise(K * D, 3 * e, dtype) + elementwise(K * D, 2 * e, dtype))
    if train_features:
        fused, comp = fused + f_norm_bwd, comp + gemm(B, D, K, dtype) + f_norm_bwd
    return {"fused": fused, "composition": comp}


#: H100 SXM: SMs, and the clock the latency terms assume (an assumption: the sustained clock under load)
SMS = 132
CLOCK_HZ = 1.755e9
#: cycles of one block-wide reduction of a register tile (shuffles, a shared-memory exchange, a barrier):
#: an assumption, not measured
REDUCE_CYCLES = 150
#: the Cayley kernel's work per elimination step (kernels/orth.py: cayley_fwd_kernel), counted from its
#: source: element operations on the BLOCK x BLOCK tiles (selects, multiply-subtracts, the reductions'
#: adds) and block-wide reductions. Pivoted: the column, the pivot's argmax, rows i and p of [A | I], the
#: swap, the pivot and its column entry; unpivoted (before): row i of [A | I], the column, the pivot.
CAYLEY_STEP = {True: dict(tile_ops=20, reductions=8), False: dict(tile_ops=11, reductions=4)}
#: blocks per SM of the Cayley kernel by padded block size, from `fastvlm kernels` on sm_90a (registers x
#: warps): pivoted (4 warps at 16 and 32, 8 at 64) and the unpivoted kernel it replaced (4 warps)
CAYLEY_BLOCKS_PER_SM = {True: {16: 16, 32: 5, 64: 1}, False: {16: 16, 32: 7, 64: 2}}


def cayley_cost(r, b, pivoting=True, launches=1):
    """The Cayley kernel over r blocks of size b (one program per block, b serial elimination steps),
    split into ``launches`` equal launches one after the other (one per layer) or one launch of the stack.
    Not a roofline: the kernel is latency-bound. Per step an SM issues 128 thread-operations per cycle, so
    ``tile_ops x BLOCK^2 / 128`` cycles per block; each block also waits ``reductions x REDUCE_CYCLES``. With
    k blocks resident on an SM (at most CAYLEY_BLOCKS_PER_SM) a step takes max(k x issue, issue + waits):
    the waits of one block overlap the others' issue. Time: waves x b steps at CLOCK_HZ, plus 3 us per
    launch; HBM (Q read, R written: 8 b^2 bytes a block) is negligible and counted."""
    from .kernels.orth import block_pad

    BLOCK = block_pad(b)
    step = CAYLEY_STEP[pivoting]
    issue = step["tile_ops"] * BLOCK * BLOCK / 128
    wait = step["reductions"] * REDUCE_CYCLES
    per_launch = _cdiv(r, launches)
    k = min(CAYLEY_BLOCKS_PER_SM[pivoting][BLOCK], _cdiv(per_launch, SMS))
    waves = _cdiv(per_launch, SMS * k)
    step_cycles = max(k * issue, issue + wait)
    c = Cost(step["tile_ops"] * BLOCK * BLOCK * b * r, 8 * b * b * r, 8 * b * b * r, "fp32", launches)
    c._time = launches * (waves * b * step_cycles / CLOCK_HZ + Cost.LAUNCH_S)
    return c


#: OrthCR's default sites on ViT-B/16 (open_clip): the MLP's c_fc (in 768 / 512) and c_proj (in 3072 /
#: 2048) of the 12 image and 12 text blocks: 48 rotated linears, 76,800 input features
ORTH_LAYER_WIDTHS = [768, 3072] * 12 + [512, 2048] * 12


def cayley_table() -> list[dict]:
    """Per block size: the modelled time of every Cayley transform of one training step on ORTH_LAYER_WIDTHS,
    one launch per layer (as the tuner calls it) and one launch of the stacked blocks, pivoted and
    unpivoted (before). A projection for an H100 SXM, not a measurement."""
    rows = []
    for b in (16, 32, 64):
        r = sum(w // b for w in ORTH_LAYER_WIDTHS)
        n = len(ORTH_LAYER_WIDTHS)
        rows.append({"b": b, "blocks": r, "layers": n,
                     "per_layer_us": sum(cayley_cost(w // b, b).time_s for w in ORTH_LAYER_WIDTHS) * 1e6,
                     "stacked_us": cayley_cost(r, b).time_s * 1e6,
                     "per_layer_unpivoted_us": sum(cayley_cost(w // b, b, False).time_s
                                                   for w in ORTH_LAYER_WIDTHS) * 1e6,
                     "stacked_unpivoted_us": cayley_cost(r, b, False).time_s * 1e6})
    return rows


#: the shapes of issue's realistic list: (tokens, in, out) for the linears, (B, K, D) for TaskRes
LINEAR_SHAPES = [(t, k, n) for t in (1576, 6304) for k, n in ((768, 2304), (768, 768), (768, 3072), (3072, 768),
                                                              (1024, 3072))]
RESIDUAL_SHAPES = [(256, k, d) for k in (1000, 21843) for d in (512, 1024)]


def projection_table(dtype="bf16") -> list[dict]:
    """Per op, pass and shape: modelled time of each path (``<path>_us``) and the path the ops dispatch to
    (``chosen``): a projection for an H100 SXM, not a measurement. Linears in ``dtype`` with x (and the
    scores / rotation) trained; the residual cross-entropy in fp32 inputs at IEEE ("fp32") and TF32 dots, its
    backward with the residual alone trained (TaskRes) and with every input trained ("bwd all")."""
    rows = []

    def add(op, shape, dt, costs, chosen):
        rows.append({"op": op, "shape": shape, "dtype": dt, "chosen": chosen,
                     **{f"{p}_us": c.time_s * 1e6 for p, c in costs.items()}})

    for tokens, k, n in LINEAR_SHAPES:
        shape = f"{tokens}x{k}->{n}"
        add("masked_linear fwd", shape, dtype, masked_costs(tokens, n, k, dtype), "composition")
        add("masked_linear bwd", shape, dtype, masked_backward_costs(tokens, n, k, dtype), "composition")
        add("orthogonal_linear fwd b=32", shape, dtype, orth_costs(tokens, n, k, 32, dtype), "composition")
        add("orthogonal_linear bwd b=32", shape, dtype, orth_backward_costs(tokens, n, k, 32, dtype), "composition")
    for B, K, D in RESIDUAL_SHAPES:
        for dot in ("fp32", "tf32"):
            add("residual_ce fwd", f"B={B} K={K} D={D}", dot, residual_ce_costs(B, K, D, dot), "fused")
            add("residual_ce bwd", f"B={B} K={K} D={D}", dot,  # TaskRes: the residual alone trains
                residual_ce_backward_costs(B, K, D, dot, train_features=False, train_base=False), "fused")
            add("residual_ce bwd all", f"B={B} K={K} D={D}", dot, residual_ce_backward_costs(B, K, D, dot), "fused")
            add("residual_logits fwd", f"B={B} K={K} D={D}", dot, residual_logits_costs(B, K, D, dot), "fused")
    return rows


def print_projection(file=None) -> None:
    """The projection table (docs/kernels.md): modelled times, labelled as such."""
    file = file or sys.stdout
    print("\nPROJECTION for an H100 SXM from the cost model (fastvlm/aot.py), not a measurement:", file=file)
    print(f"{'op':28} {'shape':22} {'dot':5} {'fused us':>9} {'comp. us':>9} {'unfused':>9}  dispatch", file=file)
    for r in projection_table():
        unfused = f"{r['unfused_us']:>9.1f}" if "unfused_us" in r else f"{'-':>9}"
        print(f"{r['op']:28} {r['shape']:22} {r['dtype']:5} {r['fused_us']:>9.1f} {r['composition_us']:>9.1f} "
              f"{unfused}  {r['chosen']}", file=file)
    print("\ncayley fwd, every rotation of one step (OrthCR's ViT-B/16 MLP sites), modelled us: latency-bound, "
          "see aot.cayley_cost", file=file)
    print(f"{'b':>3} {'blocks':>6} {'per layer':>10} {'stacked':>8} {'unpivoted: per layer':>21} {'stacked':>8}",
          file=file)
    for r in cayley_table():
        print(f"{r['b']:>3} {r['blocks']:>6} {r['per_layer_us']:>10.1f} {r['stacked_us']:>8.1f} "
              f"{r['per_layer_unpivoted_us']:>21.1f} {r['stacked_unpivoted_us']:>8.1f}", file=file)
