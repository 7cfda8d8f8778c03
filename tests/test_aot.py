"""GPU readiness without a GPU: every kernel configuration compiles for sm_80 and sm_90a, within resources,
on tensor cores where it multiplies matrices at fp16/bf16; and the configurations compiled are exactly the
ones the launchers choose."""

import csv
import os
import subprocess
import sys

import pytest
import torch

ENV = {**os.environ, "TRITON_INTERPRET": "0"}


def test_every_configuration_compiles_clean(tmp_path):
    out = tmp_path / "kernels.csv"
    p = subprocess.run([sys.executable, "-m", "fastvlm.cli", "kernels", "--csv", str(out)], env=ENV,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = list(csv.DictReader(open(out)))
    assert len(rows) >= 150
    assert {r["target"] for r in rows} == {"sm_80", "sm_90a"}
    assert all(r["ok"] == "True" and int(r["spill_bytes"]) == 0 for r in rows)
    half_mm = [r for r in rows if r["kernel"] in ("matmul_kernel", "logits_kernel", "score_grad_kernel", "rotate_kernel")
               and r["config"].split()[0].split(",")[0] in ("fp16", "bf16")]
    assert half_mm and all(r["tensor_cores"] == "True" for r in half_mm)
    assert "0 with problems" in p.stdout


CHECK = r"""
import sys, torch, triton.language as tl
from fastvlm import aot
from fastvlm.kernels._common import Variant, matmul_kernel
flags = dict(HAS_B2=False, HAS_KSCALE=False, HAS_BMASK=False, HAS_BIAS=False, ACCUMULATE=False, PRECISION="ieee")
spill = Variant(matmul_kernel, {**flags, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "DOT_DTYPE": tl.float32},
                {"num_warps": 4, "num_stages": 3})
bad = Variant(matmul_kernel, {**flags, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 8, "DOT_DTYPE": tl.float16},
              {"num_warps": 4, "num_stages": 3}, {"a_ptr": torch.float16, "b_ptr": torch.float16})
aot.all_variants = lambda: [("t", spill), ("t", bad)]
a, b = aot.compile_one(0, "sm_80"), aot.compile_one(1, "sm_90a")
print("SPILL", a["ok"], a["problems"]); print("BAD", b["ok"], b.get("error", "")[:80])
"""


def test_the_check_catches_spills_and_compile_errors():
    p = subprocess.run([sys.executable, "-c", CHECK], env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "SPILL True ['spills']" in p.stdout  # IEEE fp32 dots at 64x64x32 spill (why fp32 uses 64x32x16)
    assert "BAD False" in p.stdout  # a tl.dot with K=8 does not compile for a GPU (the interpreter runs it)


def test_launchers_choose_only_enumerated_configurations(monkeypatch):
    """Record every kernel launch the ops make in the interpreter; each must be one of the variants."""
    from triton.runtime.interpreter import InterpretedFunction

    import fastvlm
    from fastvlm import aot
    from fastvlm.functional import (block_rotate, cayley, grad_dropout, masked_linear, orthogonal_linear,
                                    residual_cross_entropy, residual_logits)

    launches = []
    real_run = InterpretedFunction.run

    def run(self, *args, **kwargs):
        launches.append((self.fn.__name__, {k: v for k, v in kwargs.items() if k != "grid"}))
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    g = torch.Generator().manual_seed(0)
    with fastvlm.backend("triton"):
        for dt in (torch.float32, torch.float16):
            f = torch.randn(5, 40, generator=g).to(dt).requires_grad_()
            t, x = torch.randn(7, 40, generator=g).to(dt), torch.randn(7, 40, generator=g).to(dt).requires_grad_()
            y = torch.randint(0, 7, (5,), generator=g)
            residual_logits(f, t, x).sum().backward()
            residual_cross_entropy(f, t, x, y).backward()
            xs = torch.randn(6, 24, generator=g).to(dt).requires_grad_()
            w, s = torch.randn(9, 24, generator=g).to(dt), (0.01 * torch.rand(9, 24, generator=g)).requires_grad_()
            masked_linear(xs, w, s, torch.randn(9).to(dt)).sum().backward()
            masked_linear(xs, w, s, ref_grad=torch.randn(9, 24), drop_ratio=0.5).sum().backward()
            grad_dropout(torch.randn(30).to(dt), torch.randn(30).to(dt), 0.5, 1)
            from fastvlm.kernels import masked as km  # split-K of the score gradient (realistic shapes pick it)

            km.grad_scores(torch.randn(1030, 9).to(dt), xs.detach().new_empty(1030, 24).normal_(), w,
                           torch.randn(9, 24), 0.5, 1, torch.float32, split=2)
            for b in (3, 32, 64):
                p = (0.1 * torch.randn(2, b * (b - 1) // 2, generator=g)).requires_grad_()
                xo = torch.randn(4, 2 * b, generator=g).to(dt).requires_grad_()
                orthogonal_linear(xo, torch.randn(5, 2 * b).to(dt), p, None, b).sum().backward()
                block_rotate(xo, cayley(p, b), transpose=True).sum().backward()
    variants = [v for _, v in aot.all_variants()]
    assert len({name for name, _ in launches}) >= 12
    for name, kw in launches:
        ok = any(v.name == name and all(kw.get(k) == val for k, val in v.constexprs.items())
                 and all(kw.get(k, val) == val for k, val in v.options.items()) for v in variants)
        assert ok, f"launch of {name} with {kw} is not among the compiled variants"


def test_blocks_per_sm_from_registers_shared_memory_and_threads():
    from fastvlm import aot

    # 167 registers x 8 warps: 5,376 per warp (units of 256) x 8 = 43,008 of 65,536: one block per SM
    assert aot.blocks_per_sm(167, 25600, 8, "sm_90a") == 1
    # 72 registers x 4 warps = 9,216: 7 by registers (shared memory would allow 12, threads 16)
    assert aot.blocks_per_sm(72, 17408, 4, "sm_90a") == 7
    # 100 KiB of shared memory: 2 on sm_90a (228 KiB), 1 on sm_80 (164 KiB)
    assert aot.blocks_per_sm(32, 100 * 1024, 4, "sm_90a") == 2 and aot.blocks_per_sm(32, 100 * 1024, 4, "sm_80") == 1


def test_realistic_launches_are_specialised_as_triton_does_at_run_time():
    """Strides equal to 1 become constants, sizes and strides divisible by 16 carry the hint, every pointer
    is 16-byte aligned; the unspecialised variants keep their integers free."""
    from fastvlm import aot

    real = [v for _, v in aot.realistic_variants()]
    names = {v.name for v in real}
    assert {"score_grad_kernel", "rotate_kernel", "ce_class_tile_kernel"} <= names
    # 768 x 768 at 6304 tokens: split-K's two launches, 2 splits of 3168 tokens
    split = {v.name: v for v in real if v.label == "6304x768->768 split 2"}
    assert set(split) == {"score_grad_partial_kernel", "score_grad_reduce_kernel"}
    assert split["score_grad_partial_kernel"].spec["CHUNK"] == 3168 and split["score_grad_reduce_kernel"].spec["SPLIT"] == 2
    v = next(v for v in real if v.name == "score_grad_kernel" and v.label.startswith("6304"))
    sig, consts, attrs = aot.specialisation(v)
    args = v.kernel.arg_names
    assert sig["sdy_n"] == "constexpr" and consts["sdy_n"] == 1 and sig["sx_k"] == "constexpr"
    assert attrs[(args.index("sdy_m"),)] == [["tt.divisibility", 16]]  # 2304
    assert attrs[(args.index("M"),)] == [["tt.divisibility", 16]]  # 6304 = 16 x 394
    assert attrs[(args.index("dy_ptr"),)] == [["tt.divisibility", 16]]
    v1576 = next(v for v in real if v.name == "score_grad_kernel" and v.label.startswith("1576"))
    assert (args.index("M"),) not in aot.specialisation(v1576)[2]  # 1576 = 16 x 98.5
    plain = next(v for _, v in aot.all_variants() if v.name == "score_grad_kernel" and not v.spec)
    sig, _, attrs = aot.specialisation(plain)
    assert sig["sdy_n"] == "i32" and not attrs


def test_compiling_shows_progress_on_stderr_and_the_report_on_stdout():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-m", "fastvlm.cli", "kernels", "--only", "cayley_fwd", "--target", "sm_80"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "compiling kernels" in out.stderr and "3/3" in out.stderr  # b padded to 16, 32, 64: three variants
    assert "compiling kernels" not in out.stdout and "3 kernel configurations compiled" in out.stdout


def test_compile_workers_die_with_their_parent(tmp_path):
    """A killed ``fastvlm kernels`` leaves no compile worker behind: the pool's initializer asks the kernel to
    end each worker when its parent dies."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import os, sys, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from fastvlm.aot import die_with_parent\n"
        "ex = ProcessPoolExecutor(max_workers=1, initializer=die_with_parent)\n"
        "print(ex.submit(os.getpid).result(), flush=True)\n"
        "ex.submit(time.sleep, 120)\n"
        "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    os.kill(worker, 0)  # alive
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(worker, signal.SIGKILL)
    raise AssertionError(f"worker {worker} outlived its killed parent")
