"""The measuring harness: providers timed round-robin, the allocator's peak memory, ratios to baselines.

A ``Case`` is one op at one shape with its providers (fastvlm, the naive composition, the compiled naive
composition, peers such as nn.Linear or peft). ``run_case`` times each provider's forward, backward (after
an untimed forward, releasing the graph as training does) and forward+backward (or one whole training
``step``), one repetition of each provider in turn, and reports the
median, min, max and spread (max - min); then the peak memory of one forward+backward per provider; then
every metric's ratio to each baseline measured in the same run.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import projection

# ---------------------------------------------------------------------------------------------------------
# timing and memory
# ---------------------------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn: Callable[[], object], device, reps: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``reps`` calls after ``warmup`` calls. A ``fn.prepare`` callable, if any, runs
    before each call, outside the clock (the backward's own forward)."""
    prepare = getattr(fn, "prepare", None)
    for _ in range(warmup):
        if prepare:
            prepare()
        fn()
    _sync(device)
    out = []
    for _ in range(reps):
        if prepare:
            prepare()
            _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def settle_malloc() -> bool:
    """Time as glibc settles in a long training process: once large blocks have been freed, its dynamic
    thresholds rise (mmap up to 32 MiB, trim to twice that) and freed blocks are reused without new page
    faults. Fixed here so that neither an environment-wide ``MALLOC_MMAP_THRESHOLD_=65536`` (every large
    allocation then page-faults afresh, which makes allocation-heavy steps look several times slower than
    they are) nor the order in which cases warm the heap changes a timing. Both thresholds are set: setting
    only the mmap threshold switches the dynamic adjustment off and leaves the trim threshold at 128 KiB, so
    every freed block at the heap's top would go back to the system and be faulted in again."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 64 << 20))
    except (OSError, AttributeError):  # not glibc
        return False


@contextlib.contextmanager
def _quiet_stderr():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_allocation_peak(fn: Callable[[], object]) -> int:
    """Peak of the bytes held by torch's CPU allocator during ``fn``, above the level at its first allocation,
    read from the profiler's allocation events (each carries the running total): the quantity that
    ``torch.cuda.max_memory_allocated`` gives on a GPU.

    Not the process's resident high-water mark (VmHWM): that reads high whenever a call reuses a free heap
    block left by earlier runs (such a block stays resident after it is freed), so two calls that map the
    same bytes at their peak can differ by a quarter."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # the profiler's C++ side logs each start and stop to fd 2
        prof.__enter__()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    try:
        roots = prof.profiler.kineto_results.experimental_event_tree()
    except AttributeError as e:  # the pinned torch has it (constraints.txt)
        raise RuntimeError(f"CPU peak memory needs the profiler's allocation events, absent in torch "
                           f"{torch.__version__}") from e
    events, stack = [], list(roots)
    while stack:
        e = stack.pop()
        f = e.extra_fields
        if hasattr(f, "total_allocated") and hasattr(f, "alloc_size"):
            events.append((e.start_time_ns, f.total_allocated, f.alloc_size))
        stack.extend(e.children)
    return allocation_peak(events)


def allocation_peak(events: list[tuple[int, int, int]]) -> int:
    """Peak of the running total above the level before the first event. ``events``: (time, running total
    after the event, bytes allocated by it; negative for a free), in any order."""
    if not events:
        return 0
    events = sorted(events)
    start = events[0][1] - events[0][2]
    return max(0, max(t for _, t, _ in events) - start)


def peak_memory(fn: Callable[[], object], device, reset: Callable[[], object] | None = None) -> int:
    """Bytes above the pre-step level that one call of ``fn`` reaches at its peak: tensor memory held by
    torch's allocator (CUDA's ``max_memory_allocated``; on CPU the same figure from the profiler's
    allocation events). ``reset`` runs first, outside the measurement, to drop what an earlier call left
    behind (its gradients)."""
    if reset is not None:
        reset()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return _cpu_allocation_peak(fn)


# ---------------------------------------------------------------------------------------------------------
# cases and providers
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Provider:
    """``setup()`` returns (forward callable, tensors whose grads to clear, grad_output or None) for an op
    case, or one zero-argument training-step callable for a step case. ``compile_s``: seconds the setup
    spent compiling and warming up (set by ``compiled``)."""

    name: str
    setup: Callable[[], tuple]
    compile_s: float | None = None


@dataclass
class Case:
    op: str
    shape: dict
    providers: list[Provider]
    baseline: str | tuple  # provider(s) the ratios divide by
    flops: float = 0.0  # fwd+bwd flops of the fused op, counted as the GPU (Triton) path runs it
    bytes: float = 0.0  # fwd+bwd compulsory HBM bytes of the fused op on the GPU path
    naive_bytes: float = 0.0  # the naive composition's kernels, each reading and writing its operands
    naive_flops: float = 0.0
    dtype: torch.dtype = torch.float32  # what the case runs: picks the projection's peak
    model: Callable[[], dict] | None = None  # {"fastvlm": aot.Cost, "naive": aot.Cost}, fwd+bwd, when modelled
    size: float = 0.0  # x axis of the plots (a sweep's variable)
    notes: str = ""
    kind: str = "op"  # "op": time fwd, bwd, fwd+bwd; "step": setup gives one whole training step to time
    extra: dict = field(default_factory=dict)
    around: Callable | None = None  # () -> a context manager the whole case runs in (a busy process, say)
    derive: Callable | None = None  # rows -> more rows computed from the measured ones (source "derived")
    min_reps: int = 1  # timed repetitions at least, whatever the run's --reps

    @property
    def baselines(self) -> tuple:
        return (self.baseline,) if isinstance(self.baseline, str) else tuple(self.baseline)


COMPILED = "compiled"  # name of the torch.compile'd naive composition provider


def _compile(fn):
    return torch.compile(fn, dynamic=False)


def compiled(fn: Callable, inputs: Callable[[], tuple]) -> Provider:
    """The peer a user without fastvlm would write: the naive composition ``fn`` wrapped in ``torch.compile``
    (inductor; the same code compiles for a GPU). ``inputs()`` returns ``(args, params, grad_output)``.

    Each provider compiles its own graph for its shape (``dynamic=False``) from a reset compiler state, so
    no shape inherits another's guards or hits the recompile limit; the setup runs one forward and backward,
    so compilation happens there and never in a timed call. Its seconds are kept in ``compile_s``."""
    prov = Provider(COMPILED, None)

    def setup():
        import torch._dynamo

        torch._dynamo.reset()
        cfn = _compile(fn)
        t0 = time.perf_counter()
        args, params, grad = inputs()
        cfn(*args).backward(grad)
        for p in params:
            p.grad = None
        prov.compile_s = time.perf_counter() - t0
        return (lambda: cfn(*args)), params, grad

    prov.setup = setup
    return prov


def compiled_step(build: Callable[[Callable], Callable[[], object]]) -> Provider:
    """``compiled`` for a step case: ``build(compile)`` returns the step callable, wrapping in ``compile``
    the functions a user would compile; one step runs in the setup (compilation, not timed)."""
    prov = Provider(COMPILED, None)

    def setup():
        import torch._dynamo

        torch._dynamo.reset()
        t0 = time.perf_counter()
        step = build(_compile)
        step()
        prov.compile_s = time.perf_counter() - t0
        return step

    prov.setup = setup
    return prov


def callables(case: Case, prov: Provider) -> dict:
    """metric -> zero-argument callable for one provider (built once; timed round-robin with the others).
    Keys starting with ``_`` are not timed: ``_mem`` is the call whose peak memory is measured, ``_release``
    drops what the timed calls hold."""
    if case.kind == "step":
        step = prov.setup()
        return {"step": step, "_mem": step}
    fwd, params, grad = prov.setup()
    state = {"out": None}

    def clear():
        for p in params:
            p.grad = None

    def fwd_bwd():
        clear()
        fwd().backward(grad)

    def forward_untimed():
        clear()
        state["out"] = fwd()

    def bwd():
        out, state["out"] = state["out"], None
        out.backward(grad)

    bwd.prepare = forward_untimed

    def release():
        state["out"] = None
        clear()

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd, "_mem": fwd_bwd, "_release": release}


def shape_text(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def _row(case: Case, provider: str, metric: str, value: float, unit: str, source: str = "measured", **more) -> dict:
    row = dict(op=case.op, shape=shape_text(case.shape), provider=provider, metric=metric, value=float(value),
               unit=unit, source=source, size=case.size)
    if "sweep" in case.extra:
        row["sweep"] = case.extra["sweep"]
    row.update(more)
    return row


def time_rows(case: Case, provider: str, metric: str, times: list[float]) -> dict:
    """The row of one timed metric: median, min, max and spread (max - min) of the repetitions."""
    return _row(case, provider, f"time_{metric}", statistics.median(times), "s", spread=max(times) - min(times),
                min=min(times), max=max(times), reps=len(times))


def add_ratios(rows: list[dict], baselines) -> list[dict]:
    """For each baseline, ``ratio_to_<baseline>`` = value / the baseline's value of the same metric, on every
    other provider's measured row (same case, same run). Metrics the baseline lacks or has at 0 get none."""
    for bl in baselines:
        base = {r["metric"]: r["value"] for r in rows if r["provider"] == bl and r["source"] == "measured"}
        for r in rows:
            if r["provider"] != bl and r["source"] == "measured" and base.get(r["metric"]):
                r["ratio_to_" + bl] = r["value"] / base[r["metric"]]
    return rows


def run_case(case: Case, device, reps: int) -> list[dict]:
    """Providers are timed round-robin, one repetition of each in turn, so that a noisy machine (other
    load, frequency changes) biases none of them; the first round warms up and is not counted. The whole
    case runs inside ``case.around()`` when given; ``case.derive`` adds its rows last."""
    with (case.around or contextlib.nullcontext)():
        rows = _run_case(case, device, max(reps, case.min_reps))
    return rows + (case.derive(rows) if case.derive else [])


def _run_case(case: Case, device, reps: int) -> list[dict]:
    calls = {p.name: callables(case, p) for p in case.providers}
    metrics = [m for m in next(iter(calls.values())) if not m.startswith("_")]
    times = {(p, m): [] for p in calls for m in metrics}
    for rep in range(reps + 1):
        for m in metrics:
            for p, c in calls.items():
                t = time_it(c[m], device, 1, warmup=0)[0]
                if rep:
                    times[(p, m)].append(t)
    rows = []
    for c in calls.values():
        c.get("_release", lambda: None)()
    gc.collect()  # what the timed calls left in reference cycles goes before any peak is measured
    for p, c in calls.items():
        mem = peak_memory(c["_mem"], device, reset=c.get("_release"))
        for m in metrics:
            rows.append(time_rows(case, p, m, times[(p, m)]))
        mname = "peak_mem_step" if case.kind == "step" else "peak_mem_fwd+bwd"
        rows.append(_row(case, p, mname, mem, "B"))
    del calls
    gc.collect()
    for prov in case.providers:
        if prov.compile_s is not None:
            rows.append(_row(case, prov.name, "compile_s", prov.compile_s, "s (setup, not timed)", source="setup"))
    for p, n in case.extra.get("trainable", {}).items():
        rows.append(_row(case, p, "trainable_params", n, "params"))
    add_ratios(rows, case.baselines)
    if case.flops:
        t = next((r["value"] for r in rows if r["provider"] == "fastvlm" and r["metric"] == "time_fwd+bwd"), None)
        if t:  # the counts of the path that ran, where a case gives them apart from the GPU path's
            fl, nb = case.extra.get("run_flops", case.flops), case.extra.get("run_bytes", case.bytes)
            rows.append(_row(case, "fastvlm", "achieved_GFLOP/s", fl / t / 1e9, "GFLOP/s", source="derived"))
            rows.append(_row(case, "fastvlm", "achieved_GB/s", nb / t / 1e9, "GB/s (compulsory)", source="derived"))
        rows += projection_rows(case)
    return rows


def projection_rows(case: Case) -> list[dict]:
    """The H100 projection of the op's GPU path and of the naive composition: the ``fastvlm.aot`` cost model
    where the case has one (``case.model``), else the roofline of the case's counted bytes and FLOPs at the
    peak of the dtype that runs. A model, never a measurement."""
    out = []
    if case.model is not None:
        for provider, cost in case.model().items():
            out.append(_row(case, provider, projection.METRIC, cost.time_s, projection.UNIT, source="projection",
                            compulsory_bytes=cost.hbm, l2_bytes=cost.l2, flops=cost.flops, peak=cost.dtype,
                            launches=cost.launches))
        return out
    peak = projection.fused_peak(case.dtype)
    out.append(_row(case, "fastvlm", projection.METRIC, projection.roofline(case.flops, case.bytes, peak),
                    projection.UNIT, source="projection", compulsory_bytes=case.bytes, flops=case.flops,
                    peak=peak))
    if case.naive_bytes:
        peak = projection.composition_peak(case.dtype)
        fl = case.naive_flops or case.flops
        out.append(_row(case, "naive", projection.METRIC, projection.roofline(fl, case.naive_bytes, peak),
                        projection.UNIT, source="projection", compulsory_bytes=case.naive_bytes, flops=fl,
                        peak=peak))
    return out


# ---------------------------------------------------------------------------------------------------------
# the random-weights warning
# ---------------------------------------------------------------------------------------------------------


def warn_random_weights_once() -> None:
    """Every model build with ``pretrained=None`` logs open_clip's random-weights warning; the bench builds
    a model per tuner provider and per case, so the repeats are filtered: printed once per process, by
    the one filter ``fastvlm.models`` installs."""
    from ..models import filter_random_weights_warning

    filter_random_weights_warning()
