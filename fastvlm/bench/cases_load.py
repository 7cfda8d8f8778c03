"""Case of the load family: gradient dropout's CPU random stream on a busy machine.

``grad_dropout`` at the ViT-B/16 QKV shape (2304 x 768) and a plain matmul with the same output (the score
gradient dy.T @ x over ``tokens`` rows), each timed alone and with one competing busy process that the case
starts itself; the dropout twice, as it runs now (``fastvlm``: the compiled C pass where a C compiler
exists) and on the torch-ops path (``torch-ops``: ``FASTVLM_PHILOX=torch``, what runs without a compiler).

Every provider has a loaded twin (``<name>@load``) whose calls run while the busy process spins; the busy
process is stopped (``SIGSTOP``, no CPU) for the others. All six are timed round-robin in one run, so drift
of a shared machine touches alone and loaded alike. Derived rows:

- ``load_slowdown`` = time under load / time alone, per op (fastvlm, torch-ops, matmul): the dropout's
  should be no worse than the matmul's;
- ``ratio_to_torch-ops`` on fastvlm's rows alone: its time and peak over the torch-ops path's.

The busy process is a bare Python interpreter (``-S``, no torch, no threads) spinning on integer arithmetic:
one core's worth of load and nothing else. It ends, and is reaped, when the case does, also when a timing
raises. POSIX only (it is paused and resumed by signals); CPU only (the Triton kernels do not share cores).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import torch

from .harness import Case, Provider, add_ratios

FAMILY = "load"
OPS = ("grad_dropout_load",)
SHAPE = (2304, 768)  # ViT-B/16 QKV projection: N = 3 * 768, K = 768
TOKENS = 8 * 197  # ViT-B/16 at batch 8: the rows the score gradient sums over
DROP, SEED = 0.5, 1
LOADED = "@load"  # suffix of the provider that runs under the busy process
TORCH_OPS = "torch-ops"
SLOWDOWN = "load_slowdown"
_SPIN = "x = 1\nwhile True:\n    x = (x * 1103515245 + 12345) & 0xFFFFFFFF\n"


class BusyProcess:
    """One child process spinning on one core while ``load(True)``, stopped (no CPU) while ``load(False)``.
    A context manager: entering starts it stopped, leaving kills and reaps it. ``settle``: seconds waited
    after each switch, so that the child is running (or off the CPU) when the next timing starts."""

    def __init__(self, settle: float = 0.02):
        self.settle, self.proc, self.running = settle, None, False

    def __enter__(self):
        if not hasattr(signal, "SIGSTOP"):
            raise RuntimeError("the load case pauses its busy process with SIGSTOP, which this OS lacks")
        self.proc = subprocess.Popen([sys.executable, "-S", "-c", _SPIN], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.running = True  # it spins from its start
        self.load(False)
        return self

    def load(self, on: bool) -> None:
        if self.proc is None:
            raise RuntimeError("BusyProcess.load outside its with block")
        if on != self.running:
            os.kill(self.proc.pid, signal.SIGCONT if on else signal.SIGSTOP)
            self.running = on
        time.sleep(self.settle)

    def __exit__(self, *exc):
        proc, self.proc, self.running = self.proc, None, False
        if proc is not None:
            proc.kill()  # SIGKILL ends a stopped process too
            proc.wait()
        return False


@contextlib.contextmanager
def philox_implementation(name: str | None):
    """``FASTVLM_PHILOX`` set to ``name`` (None: as it was) inside the block, restored after it."""
    old = os.environ.get("FASTVLM_PHILOX")
    if name is not None:
        os.environ["FASTVLM_PHILOX"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FASTVLM_PHILOX", None)
        else:
            os.environ["FASTVLM_PHILOX"] = old


def derive(rows: list[dict]) -> list[dict]:
    """fastvlm's ``ratio_to_torch-ops`` (set on its rows) and one ``load_slowdown`` row per op."""
    add_ratios([r for r in rows if r["provider"] in ("fastvlm", TORCH_OPS)], (TORCH_OPS,))
    times = {r["provider"]: r for r in rows if r["metric"] == "time_step" and r["source"] == "measured"}
    out = []
    for name in ("fastvlm", TORCH_OPS, "matmul"):
        alone, loaded = times.get(name), times.get(name + LOADED)
        if alone and loaded and alone["value"] > 0:
            out.append(dict(alone, metric=SLOWDOWN, value=loaded["value"] / alone["value"],
                            unit="x (time under load / time alone)", source="derived", alone_s=alone["value"],
                            loaded_s=loaded["value"]))
            for k in ("spread", "min", "max", "reps", f"ratio_to_{TORCH_OPS}"):
                out[-1].pop(k, None)
    return out


def case(N: int = SHAPE[0], K: int = SHAPE[1], tokens: int = TOKENS, settle: float = 0.02,
         min_reps: int = 7) -> Case:
    """The load case at gradients [N, K] and the matmul [N, tokens] @ [tokens, K]; CPU tensors."""
    from ..functional import grad_dropout

    busy = BusyProcess(settle)

    def provider(name, fn, shapes, implementation, loaded):
        def setup():
            g = torch.Generator().manual_seed(0)
            args = [torch.randn(*s, generator=g) for s in shapes]

            def step():
                with philox_implementation(implementation):
                    return fn(*args)

            step.prepare = lambda: busy.load(loaded)
            step()  # builds the C pass on first use (cached on disk), outside every timing
            return step
        return Provider(name + (LOADED if loaded else ""), setup)

    def dropout(ga, gb):
        return grad_dropout(ga, gb, DROP, SEED)

    def matmul(a, b):
        return a @ b

    grads, factors = ((N, K), (N, K)), ((N, tokens), (tokens, K))  # g_task, g_ref; dy.T, x
    provs = [provider(n, fn, shapes, impl, loaded) for loaded in (False, True)
             for n, fn, shapes, impl in (("fastvlm", dropout, grads, None), (TORCH_OPS, dropout, grads, "torch"),
                                         ("matmul", matmul, factors, None))]
    return Case("grad_dropout_load", dict(N=N, K=K, tokens=tokens), provs, baseline=(), kind="step", size=N * K,
                around=lambda: busy, derive=derive, min_reps=min_reps)


def cases(device, quick: bool, full: bool) -> list[Case]:
    """The load case on a CPU (where the C pass and the torch ops run); none on a GPU."""
    return [case()] if torch.device(device).type == "cpu" else []
