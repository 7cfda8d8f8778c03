"""``fastvlm bench``: every op and tuner step against its baselines, one table (plus CSV, JSON and plots).

Each case builds its inputs once per provider and times forward, backward and forward+backward (median of
several runs, with the spread), then measures the peak memory of one forward+backward. Ratios compare
providers measured in the same run. Peak memory is the most tensor memory torch's allocator holds during
the step above what it held before: ``torch.cuda.max_memory_allocated`` on CUDA, the same figure from the
profiler's allocation events on CPU (allocator caches and BLAS workspaces are not counted on either).

For every op the report also gives its compulsory memory traffic and FLOPs and the H100 roofline lower
bound they imply, beside the same bound for the naive composition's sequence of kernels: a labelled
projection, not a measurement.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

H100 = {"name": "H100 SXM", "bytes_per_s": 3.35e12, "flops_bf16": 989e12}


# ---------------------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn: Callable[[], object], device, reps: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``reps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def _settle_malloc() -> bool:
    """Time as glibc settles in a long training process: once large blocks have been freed, its dynamic
    thresholds rise (mmap up to 32 MiB, trim to twice that) and freed blocks are reused without new page
    faults. Fixed here so that neither an environment-wide ``MALLOC_MMAP_THRESHOLD_=65536`` (every large
    allocation fresh page faults: the allocation-heavy two-pass RMT step looked 5x slower than it is) nor
    the order in which cases warm the heap changes a timing. Both thresholds are set: setting only the mmap
    threshold switches the dynamic adjustment off and leaves the trim threshold at 128 KiB, and every freed
    block at the heap's top then went back to the system (a fresh 7 MiB buffer cost 2 ms to fill, not 0.2)."""
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

    It replaced the process's resident high-water mark (VmHWM), which read high whenever a call reused a
    free heap block left by earlier runs (such a block stays resident after it is freed): masked_linear
    measured 1.27x nn.Linear that way, though strace showed both mapping exactly 25.23 MiB at their peak."""
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
    if not events:
        return 0
    events.sort()
    start = events[0][1] - events[0][2]
    return max(0, max(t for _, t, _ in events) - start)


def peak_memory(fn: Callable[[], object], device, reset: Callable[[], object] | None = None) -> int:
    """Bytes above the pre-step level that one call of ``fn`` reaches at its peak: tensor memory held by
    torch's allocator (CUDA's ``max_memory_allocated``; on CPU the same figure from the profiler's
    allocation events). ``reset`` runs first, outside the measurement, to drop what an earlier call left
    behind (its gradients)."""
    if reset is not None:
        reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return _cpu_allocation_peak(fn)


# ---------------------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Provider:
    """``setup()`` returns (forward callable, tensors whose grads to clear, grad_output or None)."""

    name: str
    setup: Callable[[], tuple]


@dataclass
class Case:
    op: str
    shape: dict
    providers: list[Provider]
    baseline: str | tuple  # provider(s) the ratios divide by
    flops: float = 0.0  # fwd+bwd flops of the fused op
    bytes: float = 0.0  # fwd+bwd compulsory bytes (each input read once, each output written once)
    naive_bytes: float = 0.0  # the naive composition's kernels, each reading and writing its operands
    naive_flops: float = 0.0
    size: float = 0.0  # x axis of the plots
    notes: str = ""
    kind: str = "op"  # "op": time fwd, bwd, fwd+bwd; "step": setup gives one whole training step to time
    extra: dict = field(default_factory=dict)


def _roofline(flops: float, nbytes: float) -> float:
    return max(nbytes / H100["bytes_per_s"], flops / H100["flops_bf16"])


def _callables(case: Case, prov: Provider) -> dict:
    """metric -> zero-argument callable for one provider (built once; timed round-robin with the others)."""
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

    def bwd():
        if state["out"] is None:
            state["out"] = fwd()
        clear()
        state["out"].backward(grad, retain_graph=True)

    def release():
        state["out"] = None
        clear()

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd, "_mem": fwd_bwd, "_release": release}


def run_case(case: Case, device, reps: int) -> list[dict]:
    """Providers are timed round-robin, one repetition of each in turn, so that a noisy machine (other
    load, frequency changes) biases none of them; the median of ``reps`` and the spread (max - min)."""
    calls = {p.name: _callables(case, p) for p in case.providers}
    metrics = [m for m in next(iter(calls.values())) if not m.startswith("_")]
    times = {(p, m): [] for p in calls for m in metrics}
    for rep in range(reps + 1):  # the first round warms up
        for m in metrics:
            for p, c in calls.items():
                t = time_it(c[m], device, 1, warmup=0)[0]
                if rep:
                    times[(p, m)].append(t)
    rows = []
    for p, c in calls.items():
        c.get("_release", lambda: None)()
    for p, c in calls.items():
        mem = peak_memory(c["_mem"], device, reset=c.get("_release"))
        for m in metrics:
            ts = times[(p, m)]
            rows.append(dict(op=case.op, provider=p, metric=f"time_{m}", value=statistics.median(ts),
                             spread=max(ts) - min(ts), unit="s", **_shape_cols(case)))
        mname = "peak_mem_step" if case.kind == "step" else "peak_mem_fwd+bwd"
        rows.append(dict(op=case.op, provider=p, metric=mname, value=float(mem), spread=0.0, unit="B",
                         **_shape_cols(case)))
    del calls
    gc.collect()
    for p, n in case.extra.get("trainable", {}).items():
        rows.append(dict(op=case.op, provider=p, metric="trainable_params", value=float(n), spread=0.0, unit="params",
                         **_shape_cols(case)))
    # ratios to each baseline, same run
    for bl in (case.baseline,) if isinstance(case.baseline, str) else case.baseline:
        base = {r["metric"]: r["value"] for r in rows if r["provider"] == bl}
        for r in rows:
            if r["provider"] != bl and base.get(r["metric"]):
                r["ratio_to_" + bl] = r["value"] / base[r["metric"]]
    if case.flops:
        t = next(r["value"] for r in rows if r["provider"] == "fastvlm" and r["metric"] == "time_fwd+bwd")
        rows.append(dict(op=case.op, provider="fastvlm", metric="achieved_GFLOP/s", value=case.flops / t / 1e9,
                         spread=0.0, unit="GFLOP/s", **_shape_cols(case)))
        rows.append(dict(op=case.op, provider="fastvlm", metric="achieved_GB/s", value=case.bytes / t / 1e9,
                         spread=0.0, unit="GB/s (compulsory)", **_shape_cols(case)))
        rows.append(dict(op=case.op, provider="fastvlm", metric="H100_roofline_bound", value=_roofline(case.flops, case.bytes),
                         spread=0.0, unit="s (projection)", compulsory_bytes=case.bytes, flops=case.flops, **_shape_cols(case)))
        if case.naive_bytes:
            rows.append(dict(op=case.op, provider="naive", metric="H100_roofline_bound",
                             value=_roofline(case.naive_flops or case.flops, case.naive_bytes), spread=0.0,
                             unit="s (projection)", compulsory_bytes=case.naive_bytes,
                             flops=case.naive_flops or case.flops, **_shape_cols(case)))
    return rows


def _shape_cols(case: Case) -> dict:
    return {"shape": " ".join(f"{k}={v}" for k, v in case.shape.items()), "size": case.size}


# ---------------------------------------------------------------------------------------------------------
# the op catalogue (each op family adds its cases here)
# ---------------------------------------------------------------------------------------------------------


def residual_cases(device, quick: bool, full: bool) -> list[Case]:
    from .functional import residual_cross_entropy, residual_logits
    from .ops.residual import residual_cross_entropy_reference, residual_logits_reference

    shapes = [(256, 1000, 512), (256, 21843, 1024)] if quick else [
        (256, k, d) for k in (1000, 21843) for d in (512, 1024)]
    if full:
        shapes += [(256, 21843, 768)]
    cases = []
    for B, K, D in shapes:
        def mk(op, reference, loss: bool, B=B, K=K, D=D):
            def setup():
                g = torch.Generator().manual_seed(0)
                f = torch.randn(B, D, generator=g).to(device)
                t = torch.randn(K, D, generator=g).to(device)
                x = (0.1 * torch.randn(K, D, generator=g)).to(device).requires_grad_()
                y = torch.randint(0, K, (B,), generator=g).to(device)
                if loss:
                    return (lambda: op(f, t, x, y)), [x], None
                go = torch.randn(B, K, generator=g).to(device)
                return (lambda: op(f, t, x)), [x], go
            return setup

        e = 4  # fp32
        # fused: read f, t, x forward and again backward (recompute), write dx
        cbytes = e * (2 * (B * D + 2 * K * D) + K * D)
        # naive kernels: u=t+ax (3KD), normalize u (2KD), normalize f (2BD), matmul (BD+KD+BK), CE/softmax
        # (2BK), backward: dlogits (2BK), d uhat = g^T fhat (BK+BD+KD), normalize bwd (3KD), scale (2KD)
        nbytes = e * (3 * K * D + 2 * K * D + 2 * B * D + (B * D + K * D + B * K) + 2 * B * K + 2 * B * K
                      + (B * K + B * D + K * D) + 3 * K * D + 2 * K * D)
        fl_fused = 2 * B * K * D * 3  # fwd logits, recomputed logits, d uhat (features frozen)
        fl_naive = 2 * B * K * D * 2
        shape = dict(B=B, K=K, D=D)
        cases.append(Case("residual_cross_entropy", shape, [
            Provider("fastvlm", mk(residual_cross_entropy, None, True)),
            Provider("naive", mk(residual_cross_entropy_reference, None, True)),
        ], baseline="naive", flops=fl_fused, bytes=cbytes, naive_bytes=nbytes, naive_flops=fl_naive, size=K * D))
        lbytes = e * (2 * (B * D + 2 * K * D) + 2 * B * K + K * D)
        cases.append(Case("residual_logits", shape, [
            Provider("fastvlm", mk(residual_logits, None, False)),
            Provider("naive", mk(residual_logits_reference, None, False)),
        ], baseline="naive", flops=2 * B * K * D * 2, bytes=lbytes, naive_bytes=nbytes - e * 2 * B * K,
            naive_flops=2 * B * K * D * 2, size=K * D))
    return cases


def masked_cases(device, quick: bool, full: bool) -> list[Case]:
    import torch.nn.functional as F

    from .functional import grad_dropout, masked_linear
    from .ops.masked import masked_linear_reference

    batches = [8] if quick else [8, 32]
    layers = [("qkv", 2304, 768)] + ([] if quick else [("out_proj", 768, 768)]) + (
        [("mlp_fc", 3072, 768), ("L14_qkv", 3072, 1024)] if full else [])
    cases = []
    for b in batches:
        M = b * 197
        for lname, N, K in layers:
            def inputs(M=M, N=N, K=K):
                g = torch.Generator().manual_seed(0)
                x = torch.randn(M, K, generator=g).to(device).requires_grad_()
                w = (0.02 * torch.randn(N, K, generator=g)).to(device)
                s = (0.02 * torch.rand(N, K, generator=g)).to(device).requires_grad_()
                bias = torch.randn(N, generator=g).to(device)
                go = torch.randn(M, N, generator=g).to(device)
                ref = torch.randn(N, K, generator=g).to(device)
                return x, w, s, bias, go, ref

            def fused(inputs=inputs):
                x, w, s, bias, go, _ = inputs()
                return (lambda: masked_linear(x, w, s, bias)), [x, s], go

            def naive(inputs=inputs):
                x, w, s, bias, go, _ = inputs()
                return (lambda: masked_linear_reference(x, w, s, bias)), [x, s], go

            def linear(inputs=inputs):
                x, w, s, bias, go, _ = inputs()
                w = w.clone().requires_grad_()
                return (lambda: F.linear(x, w, bias)), [x, w], go

            e = 4
            shape = dict(tokens=M, N=N, K=K, layer=lname)
            cbytes = e * (2 * M * K + 3 * N * K + 2 * M * N)
            nbytes = e * (2 * N * K + 3 * N * K + (M * K + N * K + M * N) + (M * N + N * K + M * K)
                          + (M * N + M * K + N * K) + 3 * N * K)
            cases.append(Case("masked_linear", shape, [Provider("fastvlm", fused), Provider("naive", naive),
                                                       Provider("nn.Linear", linear)],
                              baseline=("naive", "nn.Linear"), flops=6 * M * N * K, bytes=cbytes, naive_bytes=nbytes,
                              size=M * N * K))

            def gdr_fused(inputs=inputs):
                x, w, s, bias, go, ref = inputs()

                def step():
                    masked_linear(x, w, s, bias, ref_grad=ref, drop_ratio=0.5, seed=1).backward(go)
                    x.grad = s.grad = None  # each measured step starts with no gradients held
                return step

            def gdr_naive(inputs=inputs):
                x, w, s, bias, go, ref = inputs()

                def step():
                    masked_linear_reference(x, w, s, bias).backward(go)
                    s.grad = grad_dropout(s.grad, ref, 0.5, 1)
                    x.grad = s.grad = None
                return step

            cases.append(Case("masked_linear+gdr", shape, [Provider("fastvlm", gdr_fused), Provider("naive", gdr_naive)],
                              baseline="naive", kind="step", size=M * N * K))
    cases += rmt_step_cases(device, quick, full)
    return cases


def _clip_batch(model_name: str, batch: int, device, seed=0):
    from .models import load_clip
    from .train.common import image_norm

    torch.manual_seed(seed)
    model, *_ = load_clip(model_name, None, device)
    size, _, _ = image_norm(model)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, 10, (batch,), generator=g).to(device)
    dim = model.text_projection.shape[1] if model.text_projection is not None else model.visual.output_dim
    cls = torch.nn.functional.normalize(torch.randn(10, dim, generator=g), dim=-1).to(device)
    return model, images, labels, cls


def rmt_step_cases(device, quick: bool, full: bool) -> list[Case]:
    """The two-pass RMT step against one plain backward of L_a (lambda = 0), same model and batch."""
    from .train.rmt import RMTRecipe, rmt_step
    from .tuners.mask import apply_masks, score_parameters

    model_name, batch = ("ViT-B-32", 2) if quick else ("ViT-B-16", 8)

    def provider(drop):
        def setup():
            model, images, labels, cls = _clip_batch(model_name, batch, device)
            apply_masks(model)
            opt = torch.optim.Adam(score_parameters(model), lr=1e-5)
            recipe = RMTRecipe(drop_ratio=drop)

            def step():
                rmt_step(model, images, labels, cls, opt, recipe, 0)
                opt.zero_grad(set_to_none=True)  # each measured step starts with no gradients held
            return step
        return setup

    return [Case("rmt_step", dict(model=model_name, batch=batch),
                 [Provider("two-pass", provider(1.0)), Provider("one-backward", provider(0.0))],
                 baseline="one-backward", kind="step", size=batch)]


def orth_cases(device, quick: bool, full: bool) -> list[Case]:
    """orthogonal_linear vs peft OFT (exact and its default Neumann series) at ViT-B/16 MLP shapes, and the
    batched Cayley transform vs the dense solve."""
    import torch.nn.functional as F

    from .functional import cayley, orthogonal_linear
    from .ops.orth import _kernels, cayley_reference, n_params, rotation_side

    try:
        import peft  # noqa: F401

        have_peft = True
    except ImportError:  # pragma: no cover - CI installs peft
        have_peft = False
    batch = 8
    M = batch * 197
    blocks = [32] if quick else [16, 32, 64]
    shapes = [(768, 3072), (3072, 768)] + ([(1024, 4096), (4096, 1024)] if full else [])  # ViT-B/16, ViT-L/14 MLPs
    cases = []
    for K, N in shapes:
        for b in blocks:
            def inputs(K=K, N=N, b=b):
                g = torch.Generator().manual_seed(0)
                x = torch.randn(M, K, generator=g).to(device).requires_grad_()
                w = (torch.randn(N, K, generator=g) / K**0.5).to(device)
                bias = torch.zeros(N).to(device)
                p = (0.1 * torch.randn(K // b, n_params(b), generator=g)).to(device).requires_grad_()
                go = torch.randn(M, N, generator=g).to(device)
                return x, w, bias, p, go

            def ours(b=b, inputs=inputs):
                x, w, bias, p, go = inputs()
                return (lambda: orthogonal_linear(x, w, p, bias, b)), [x, p], go

            def peft_oft(neumann, b=b, K=K, N=N, inputs=inputs):
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

            def naive(b=b, inputs=inputs):  # dense block-diagonal rotation, exact, by plain autograd
                x, w, bias, p, go = inputs()
                from .ops.orth import orthogonal_linear_reference
                return (lambda: orthogonal_linear_reference(x, w, p, bias, b)), [x, p], go

            provs = [Provider("fastvlm", ours), Provider("naive-dense", naive)]
            base = ["naive-dense"]
            if have_peft:
                provs += [Provider("peft-exact", peft_oft(False)), Provider("peft-neumann", peft_oft(True))]
                base = ["peft-exact", "peft-neumann", "naive-dense"]
            e = 4
            fused = _kernels(torch.empty(0, device=device), b) is not None  # the op's own dispatch rule
            side = rotation_side(M, N, b, training=True, fused=fused)
            rot_rows = M if side == "input" else N
            # the frozen linear forward and dx (2 matmuls); input side: rotate x, rotate dxr back, dR from x
            # and dxr (3 MKb); weight side: rotate W forward and again in backward, dR from x and dx
            rot_flops = 3 * M * K * b if side == "input" else 2 * N * K * b + M * K * b
            flops = 2 * 2 * M * N * K + 2 * rot_flops
            cbytes = e * (2 * M * K + N * K + 2 * M * N + 2 * rot_rows * K)
            # naive: dense blockdiag(R) (K x K) built, x @ it (read MK + KK, write MK), linear, and the
            # backward of both matmuls (dxr, dx, d blockdiag: K x K written) and the block gather
            nbytes = e * (2 * K * K + (M * K + K * K + M * K) + (M * K + N * K + M * N)
                          + (M * N + N * K + M * K) + (M * K + K * K + M * K) + (2 * M * K + K * K) + K * K)
            nflops = 2 * 2 * M * N * K + 3 * 2 * M * K * K  # x @ dense, dxr @ dense^T, x^T dxr: 3 MKK
            cases.append(Case("orthogonal_linear", dict(tokens=M, K=K, N=N, b=b), provs, baseline=tuple(base),
                              flops=flops, bytes=cbytes, naive_bytes=nbytes, naive_flops=nflops, size=K * b))
    for b in ([32] if quick else [16, 32, 64]):
        r = 3072 // b

        def ours_c(b=b, r=r):
            g = torch.Generator().manual_seed(1)
            p = (0.3 * torch.randn(r, n_params(b), generator=g)).to(device).requires_grad_()
            go = torch.randn(r, b, b, generator=g).to(device)
            return (lambda: cayley(p, b)), [p], go

        def ref_c(b=b, r=r):
            g = torch.Generator().manual_seed(1)
            p = (0.3 * torch.randn(r, n_params(b), generator=g)).to(device).requires_grad_()
            go = torch.randn(r, b, b, generator=g).to(device)
            return (lambda: cayley_reference(p, b)), [p], go

        # naive: Q, I - Q, I + Q, the LU factors and the solve each read and written once, twice in backward
        cases.append(Case("cayley", dict(blocks=r, b=b), [Provider("fastvlm", ours_c), Provider("naive-solve", ref_c)],
                          baseline="naive-solve", flops=r * (2 * b**3 + 4 * b**3), bytes=4 * r * b * b * 4,
                          naive_bytes=4 * r * b * b * 14, naive_flops=r * (2 * b**3 + 8 * b**3), size=b))
    del F
    return cases


def tuner_cases(device, quick: bool, full: bool) -> list[Case]:
    """Each tuner's training step (forward + CE on the zero-shot classifier + backward + Adam) against the
    frozen model's forward + backward to the input, same model and batch; plus trainable parameter counts."""
    import torch.nn.functional as F

    from .tuners.mask import apply_masks
    from .tuners.orth import OrthConfig, apply_orth
    from .tuners.pack import apply_method

    model_name, batch = ("ViT-B-32", 4) if quick else ("ViT-B-16", 8)
    attachers = {
        "vpt": lambda m: apply_method(m, "vpt"),
        "lora": lambda m: apply_method(m, "lora"),
        "adapter": lambda m: apply_method(m, "adapter"),
        "mask": lambda m: apply_masks(m),
        "orth": lambda m: apply_orth(m, OrthConfig(towers=("visual",))),
    }
    counts = {}

    def provider(name):
        def setup():
            model, images, labels, cls = _clip_batch(model_name, batch, device)
            if name == "frozen":
                for p in model.parameters():
                    p.requires_grad_(False)
                x = images.clone().requires_grad_()

                def step():
                    F.cross_entropy(100 * F.normalize(model.encode_image(x), dim=-1) @ cls.T, labels).backward()
                    x.grad = None
                return step
            attachers[name](model)
            params = [p for p in model.parameters() if p.requires_grad]
            counts[name] = sum(p.numel() for p in params)
            opt = torch.optim.Adam(params, lr=1e-5)

            def step():
                F.cross_entropy(100 * F.normalize(model.encode_image(images), dim=-1) @ cls.T, labels).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return step
        return setup

    case = Case("tuner_step", dict(model=model_name, batch=batch),
                [Provider("frozen", provider("frozen"))] + [Provider(n, provider(n)) for n in attachers],
                baseline="frozen", kind="step", size=batch, extra={"trainable": counts})
    return [case]


#: op family name -> function(device, quick, full) -> cases; families register themselves below
CATALOGUE: dict[str, Callable] = {"residual": residual_cases, "masked": masked_cases, "orth": orth_cases,
                                  "tuners": tuner_cases}


# ---------------------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device) -> dict:
    import triton

    import fastvlm

    from . import _backend

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU {_cpu_name()} x{os.cpu_count()} threads={torch.get_num_threads()}")
    with _backend.backend("auto"):
        probe = torch.empty(1, device=device)
        backend_name = "triton" if _backend.use_triton(probe) else "torch"
    # which matmul the CPU torch path's fp32 linears use (FASTVLM_CPU_GEMM; auto times both once): asked only
    # there, so a GPU run does not time CPU matmuls for a column it leaves empty
    gemm = _backend.cpu_gemm_choice() if device.type == "cpu" and backend_name == "torch" else ""
    return {"device": dev, "torch": torch.__version__, "triton": triton.__version__, "fastvlm": fastvlm.__version__,
            "python": platform.python_version(), "backend": backend_name, "cpu_gemm": gemm}


def _fmt(v: float, unit: str) -> str:
    if unit == "s":
        return f"{v * 1e3:9.2f} ms"
    if unit == "B":
        return f"{v / 2**20:9.1f} MiB"
    if unit.startswith("s ("):
        return f"{v * 1e6:9.1f} us"
    if unit == "params":
        return f"{v:9.0f}"
    if unit.startswith("GB/s"):
        return f"{v:9.2f} GB/s"
    return f"{v:9.2f} {unit}"


def print_table(rows: list[dict], env: dict, file=None) -> None:
    file = file or sys.stdout
    gemm = f" ({env['cpu_gemm']} matmuls)" if env.get("cpu_gemm") else ""
    print(f"device: {env['device']} | backend: {env['backend']}{gemm} | torch {env['torch']} | triton {env['triton']}",
          file=file)
    hdr = f"{'op':24} {'shape':22} {'provider':10} {'metric':20} {'median':>14} {'spread':>12}  ratios"
    print(hdr, file=file)
    print("-" * len(hdr), file=file)
    for r in rows:
        ratio = " ".join(f"{k[9:]}:{v:.2f}" for k, v in r.items() if k.startswith("ratio_to_"))
        spread = _fmt(r["spread"], r["unit"]) if r["spread"] else ""
        print(f"{r['op']:24} {r['shape']:22} {r['provider']:10} {r['metric']:20} {_fmt(r['value'], r['unit']):>14} "
              f"{spread:>12}  {ratio}", file=file)


def write_outputs(rows: list[dict], env: dict, out: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    full = [{**r, **env} for r in rows]
    cols = sorted({k for r in full for k in r}, key=lambda k: (k not in ("op", "shape", "provider", "metric"), k))
    paths = [os.path.join(out, "bench.csv"), os.path.join(out, "bench.json")]
    with open(paths[0], "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(full)
    with open(paths[1], "w") as fh:
        json.dump({"environment": env, "rows": rows}, fh, indent=1)
    paths += plot(rows, env, out)
    return paths


def plot(rows: list[dict], env: dict, out: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'fastvlm[bench]')", file=sys.stderr)
        return []
    paths = []
    for op in sorted({r["op"] for r in rows}):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        step = any(r["op"] == op and r["metric"] == "time_step" for r in rows)
        tm, mm = ("time_step", "peak_mem_step") if step else ("time_fwd+bwd", "peak_mem_fwd+bwd")
        for ax, metric, scale, label in ((axes[0], tm, 1e3, f"{tm} median (ms)"),
                                         (axes[1], mm, 1 / 2**20, f"{mm} (MiB)")):
            sel = [r for r in rows if r["op"] == op and r["metric"] == metric]
            provs = sorted({r["provider"] for r in sel})
            shapes = list(dict.fromkeys(r["shape"] for r in sel))
            width = 0.8 / max(1, len(provs))
            for i, p in enumerate(provs):
                vals = [next((r["value"] * scale for r in sel if r["provider"] == p and r["shape"] == s), 0) for s in shapes]
                ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=p)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, rotation=20, fontsize=7)
            ax.set_ylabel(label)
            ax.legend()
        fig.suptitle(f"{op} on {env['device']} ({env['backend']} backend)", fontsize=9)
        fig.tight_layout()
        p = os.path.join(out, f"{op}.png")
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    return paths


# ---------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------


def run(ops: list[str] | None = None, quick: bool = True, full: bool = False, out: str = "bench-out",
        device: str | None = None, reps: int | None = None, progress: bool = True) -> list[dict]:
    from tqdm.auto import tqdm

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reps = reps or (3 if quick else 7)
    _settle_malloc()
    families = ops or list(CATALOGUE)
    unknown = [f for f in families if f not in CATALOGUE]
    if unknown:
        raise ValueError(f"ops must be among {sorted(CATALOGUE)}, got {unknown}")
    cases = [c for f in families for c in CATALOGUE[f](dev, quick, full)]
    env = environment(dev)
    rows = []
    for case in tqdm(cases, desc="fastvlm bench", disable=not progress):
        rows += run_case(case, dev, reps)
    print_table(rows, env)
    for p in write_outputs(rows, env, out):
        print(f"wrote {p}")
    return rows


def main(args) -> int:
    """CLI entry (``fastvlm bench``)."""
    run(args.ops, quick=not args.full, full=args.full, out=args.out, device=args.device, reps=args.reps,
        progress=not args.no_progress)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark every op and tuner step against its baselines")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="a few real CLIP shapes, minutes on a 2-core CPU (default)")
    g.add_argument("--full", action="store_true", help="the whole sweep")
    p.add_argument("--ops", nargs="*", default=None, help="families to run (default all)")
    p.add_argument("--out", default="bench-out", help="folder for bench.csv, bench.json and the plots")
    p.add_argument("--device", default=None)
    p.add_argument("--reps", type=int, default=None, help="timed runs per metric (default 3 quick, 7 full)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)
