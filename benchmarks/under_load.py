"""Gradient dropout's torch path under load: ``grad_dropout`` at the ViT-B/16 QKV shape (2304 x 768) and a
matmul with the same output (the score gradient dy.T @ x over ``tokens`` rows), each timed alone and with one
competing busy process that this script starts, pauses between phases and always stops.

    python benchmarks/under_load.py [--reps 7] [--inner 3] [--tokens 1576]

A slowdown ratio is (time under load) / (time alone). The alone and loaded phases alternate within one
process, rep by rep, so that slow drift of a shared machine touches both alike; each time is the median of
``reps`` phases. The busy process spins on Python integer arithmetic (no torch, no threads), so it takes one
core and nothing else.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time

SHAPE = (2304, 768)  # ViT-B/16 QKV projection: N = 3 * 768, K = 768


def _spin(go, stop):
    """Busy child: integer arithmetic while ``go`` is set, blocked (no CPU) while it is clear."""
    x = 1
    while not stop.is_set():
        if not go.wait(timeout=0.1):
            continue
        for _ in range(20000):
            x = (x * 1103515245 + 12345) & 0xFFFFFFFF


def _mean_of(fn, inner):
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def measure_under_load(reps: int = 7, tokens: int = 1576, inner: int = 3, settle: float = 0.05) -> dict:
    """Time ``grad_dropout`` and a matmul of the same output size alone and under one busy process.

    Returns ``dropout_alone_s``, ``dropout_load_s``, ``matmul_alone_s``, ``matmul_load_s`` (medians over
    ``reps`` phases of ``inner`` calls each, in seconds per call), ``dropout_slowdown`` and
    ``matmul_slowdown`` (loaded / alone), and ``shape``, ``tokens``, ``reps``, ``threads``, ``busy_pid``. The
    busy process has ended and been joined before this returns, also when timing raises.
    """
    if reps < 1 or inner < 1:
        raise ValueError(f"reps and inner must be >= 1, got reps={reps}, inner={inner}")
    import torch

    from fastvlm.functional import grad_dropout

    N, K = SHAPE
    g = torch.Generator().manual_seed(0)
    ga, gb = torch.randn(N, K, generator=g), torch.randn(N, K, generator=g)
    a, b = torch.randn(N, tokens, generator=g), torch.randn(tokens, K, generator=g)
    ops = {"dropout": lambda: grad_dropout(ga, gb, 0.5, 1), "matmul": lambda: a @ b}
    for fn in ops.values():  # warm-up: first-call costs (allocations, a compiled kernel) stay out of the times
        fn()
        fn()
    times = {f"{op}_{phase}": [] for op in ops for phase in ("alone", "load")}
    ctx = mp.get_context("spawn")
    go, stop = ctx.Event(), ctx.Event()
    busy = ctx.Process(target=_spin, args=(go, stop), daemon=True)
    busy.start()
    try:
        for _ in range(reps):
            for phase in ("alone", "load"):
                (go.set if phase == "load" else go.clear)()
                time.sleep(settle)  # the child wakes up (or stops spinning) before timing starts
                for op, fn in ops.items():
                    times[f"{op}_{phase}"].append(_mean_of(fn, inner))
        go.clear()
    finally:
        stop.set()
        go.set()  # release a child blocked in wait
        busy.join(timeout=2.0)
        if busy.is_alive():
            busy.terminate()
            busy.join(timeout=2.0)
    out = {f"{k}_s": statistics.median(v) for k, v in times.items()}
    for op in ops:
        out[f"{op}_slowdown"] = out[f"{op}_load_s"] / out[f"{op}_alone_s"]
    out.update(shape=SHAPE, tokens=tokens, reps=reps, threads=torch.get_num_threads(), busy_pid=busy.pid)
    return out


def main(argv=None) -> dict:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--inner", type=int, default=3, help="calls per timed phase")
    p.add_argument("--tokens", type=int, default=1576, help="rows of the matmul's inner dimension")
    args = p.parse_args(argv)
    r = measure_under_load(reps=args.reps, tokens=args.tokens, inner=args.inner)
    N, K = r["shape"]
    print(f"grad_dropout {N}x{K} vs matmul [{N}x{r['tokens']}] @ [{r['tokens']}x{K}], "
          f"{r['threads']} torch threads, median of {r['reps']} phases")
    for op in ("dropout", "matmul"):
        print(f"  {op:8s} alone {r[f'{op}_alone_s'] * 1e3:8.2f} ms   under load {r[f'{op}_load_s'] * 1e3:8.2f} ms"
              f"   slowdown {r[f'{op}_slowdown']:.2f}x")
    return r


if __name__ == "__main__":
    main()
