"""``fastvlm kernels``: compile every Triton kernel, in every configuration its launchers can choose, for real
GPUs (sm_80 and sm_90a) with no GPU present, and check each one's resources.

For each kernel x configuration x target: compiled or the compiler's error, registers per thread, spill
bytes (local memory), shared memory, and whether the machine code uses tensor-core instructions (HMMA on
sm_80, HGMMA or HMMA on sm_90a). Exits non-zero if any configuration fails to compile, spills, exceeds the
target's shared memory, or a matrix-multiplying kernel at fp16/bf16 does not use the tensor cores.

The configurations come from each kernel module's ``variants()``, built from the same policy (block
sizes, warps, stages, dot dtype) the launchers use, so what is compiled here is what would run there.
Integer arguments are compiled unspecialised (Triton may additionally specialise divisible-by-16 strides at
run time).
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
    """(family, Variant) for every launch configuration of every family's ``variants()``."""
    out = []
    for family in kernel_families():
        mod = importlib.import_module(f"{__package__}.kernels.{family}")
        out += [(family, v) for v in mod.variants()]
    return out


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


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


def compile_one(index: int, target: str) -> dict:
    """Compile variant ``index`` for ``target``; returns its report row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    family, v = all_variants()[index]
    cap, smem_max = TARGETS[target]
    row = {"family": family, "kernel": v.name, "config": v.describe(), "target": target}
    try:
        k = triton.compile(ASTSource(v.kernel, v.signature(), v.constexprs), target=GPUTarget("cuda", cap, 32),
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
    row.update(ok=True, regs=regs, spill_bytes=local + stack, shared_bytes=smem, tensor_cores=tc)
    problems = []
    if local + stack:
        problems.append("spills")
    if smem > smem_max:
        problems.append(f"shared {smem} > {smem_max}")
    if v.needs_tensor_cores and not tc:
        problems.append("no tensor cores at fp16/bf16")
    row["problems"] = problems
    return row


def run(targets=("sm_80", "sm_90a"), jobs: int | None = None, only: str | None = None) -> list[dict]:
    variants = all_variants()
    idx = [i for i, (_, v) in enumerate(variants) if only is None or only in v.name]
    work = [(i, t) for i in idx for t in targets]
    jobs = jobs or max(1, min(len(work), os.cpu_count() or 1))
    env_ok = os.environ.get("TRITON_INTERPRET", "0") != "1"
    if not env_ok:
        raise RuntimeError("fastvlm kernels must run with TRITON_INTERPRET unset (the interpreter replaces the compiler)")
    with ProcessPoolExecutor(max_workers=jobs) as ex:
        return list(ex.map(compile_one, *zip(*work))) if work else []


def print_report(rows: list[dict], file=None) -> None:
    file = file or sys.stdout
    hdr = f"{'kernel':22} {'target':7} {'regs':>4} {'spill':>5} {'smem':>7} {'TC':>3}  {'status':14} config"
    print(hdr, file=file)
    print("-" * len(hdr), file=file)
    for r in rows:
        if not r["ok"]:
            print(f"{r['kernel']:22} {r['target']:7} {'':>4} {'':>5} {'':>7} {'':>3}  {'FAILED':14} {r['config']}  "
                  f"({r['error']})", file=file)
            continue
        status = "ok" if not r["problems"] else ",".join(r["problems"])
        print(f"{r['kernel']:22} {r['target']:7} {r['regs']:>4} {r['spill_bytes']:>5} {r['shared_bytes']:>7} "
              f"{'yes' if r['tensor_cores'] else 'no':>3}  {status:14} {r['config']}", file=file)
    bad = [r for r in rows if not r["ok"] or r["problems"]]
    print(f"{len(rows)} kernel configurations compiled, {len(bad)} with problems", file=file)


def main(args) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":  # re-run without the interpreter
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        return subprocess.call([sys.executable, "-m", "fastvlm.cli", *args.argv], env=env)
    rows = run(tuple(args.target), args.jobs, args.only)
    print_report(rows)
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
    p.set_defaults(func=main)


if __name__ == "__main__":  # pragma: no cover
    ns = argparse.Namespace(target=["sm_80", "sm_90a"], jobs=None, only=None, csv=None, argv=sys.argv[1:])
    sys.exit(main(ns))
