"""Scaling sweeps (``fastvlm bench --full`` or ``--sweep NAME``): how time and peak memory grow with the
work, with a least-squares line ``value = slope * x + intercept`` per provider, so that a regression shows as
a number (seconds per class, per token, ...).

- ``residual_classes``: residual cross-entropy at B=256, D=768 against the number of classes K (1K to
  200K), fastvlm and the naive composition. The naive composition holds several K x D and B x K buffers;
  shapes whose estimated naive peak exceeds half the memory available are left out for it.
- ``masked_tokens`` / ``orth_tokens``: masked_linear (ViT-B/16 QKV, 768 -> 2304) and orthogonal_linear
  (ViT-B/16 MLP fc, 768 -> 3072, b=32) against tokens, 197 to 16 x 197.
- ``masked_width`` / ``orth_width``: the same ops at 8 x 197 tokens against the layer's width: the MLP fc of
  ViT-B/16 (768 -> 3072), ViT-L/14 (1024 -> 4096) and ViT-bigG (1664 -> 8192); x = N * K weights.
- ``tuner_batch``: every tuner's training step and the frozen model's on ViT-B/16 against batch size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from . import cases_masked, cases_orth, cases_residual, cases_tuners
from .harness import Case

TOKENS = [197 * n for n in (1, 2, 4, 8, 16)]
WIDTHS = [(768, 3072, "B/16"), (1024, 4096, "L/14"), (1664, 8192, "bigG")]  # (K, N) of the MLP fc
CLASSES = [1000, 5000, 21843, 50000, 100000, 200000]
BATCHES = [1, 2, 4, 8, 16]


@dataclass
class Sweep:
    name: str
    family: str
    unit: str  # what one step of x is: the slope is per this
    build: Callable  # (device, points or None) -> list[Case]
    points: list  # the default x values (or shapes)


def available_bytes() -> float:
    """MemAvailable from /proc/meminfo (or total memory elsewhere), in bytes."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _tag(cases: list[Case], name: str, xs) -> list[Case]:
    for c, x in zip(cases, xs):
        c.size = x
        c.extra["sweep"] = name
    return cases


def _residual(device, points, B=256, D=768):
    budget = 0.5 * available_bytes()
    out = []
    for K in points:
        provs = ("fastvlm", "naive") if cases_residual.naive_peak_estimate(B, K, D) <= budget else ("fastvlm",)
        out.append(cases_residual.case("residual_cross_entropy", B, K, D, device, providers=provs))
    return _tag(out, "residual_classes", points)


def _masked_tokens(device, points, N=2304, K=768):
    out = [cases_masked.linear_case(M, N, K, device, providers=("fastvlm", "naive", "nn.Linear")) for M in points]
    return _tag(out, "masked_tokens", points)


def _masked_width(device, points, M=8 * 197):
    out = [cases_masked.linear_case(M, N, K, device, layer=w, providers=("fastvlm", "naive", "nn.Linear"))
           for K, N, w in points]
    return _tag(out, "masked_width", [K * N for K, N, _ in points])


def _orth_tokens(device, points, K=768, N=3072, b=32):
    out = [cases_orth.linear_case(M, K, N, b, device, providers=("fastvlm", "naive-dense", "peft-exact"))
           for M in points]
    return _tag(out, "orth_tokens", points)


def _orth_width(device, points, M=8 * 197, b=32):
    out = [cases_orth.linear_case(M, K, N, b, device, providers=("fastvlm", "naive-dense", "peft-exact"))
           for K, N, _ in points]
    return _tag(out, "orth_width", [K * N for K, N, _ in points])


def _tuner_batch(device, points, model="ViT-B-16"):
    return _tag([cases_tuners.step_case(model, b, device) for b in points], "tuner_batch", points)


SWEEPS = {s.name: s for s in (
    Sweep("residual_classes", "residual", "class", _residual, CLASSES),
    Sweep("masked_tokens", "masked", "token", _masked_tokens, TOKENS),
    Sweep("masked_width", "masked", "weight", _masked_width, WIDTHS),
    Sweep("orth_tokens", "orth", "token", _orth_tokens, TOKENS),
    Sweep("orth_width", "orth", "weight", _orth_width, WIDTHS),
    Sweep("tuner_batch", "tuners", "image", _tuner_batch, BATCHES),
)}


def build(name: str, device, points=None) -> list[Case]:
    if name not in SWEEPS:
        raise ValueError(f"sweep must be one of {sorted(SWEEPS)}, got {name!r}")
    s = SWEEPS[name]
    return s.build(device, list(points) if points is not None else s.points)


def fit_line(xs, ys) -> tuple[float, float]:
    """Least-squares (slope, intercept) of ys against xs; needs two distinct xs."""
    xs, ys = [float(x) for x in xs], [float(y) for y in ys]
    if len(xs) != len(ys) or len(set(xs)) < 2:
        raise ValueError(f"fit_line needs matching xs and ys with two distinct xs, got {len(xs)} xs "
                         f"({len(set(xs))} distinct) and {len(ys)} ys")
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


def slope_rows(rows: list[dict]) -> list[dict]:
    """One row per (sweep, provider, time or peak metric) with the fitted slope per x unit and the
    intercept; ``source = "fit"``."""
    out = []
    keys = dict.fromkeys((r["sweep"], r["op"], r["provider"], r["metric"]) for r in rows
                         if r.get("sweep") and r["source"] == "measured"
                         and r["metric"] in ("time_fwd+bwd", "time_step", "peak_mem_fwd+bwd", "peak_mem_step"))
    for sweep, op, prov, metric in keys:
        pts = [(r["size"], r["value"]) for r in rows if r.get("sweep") == sweep and r["provider"] == prov
               and r["metric"] == metric and r["source"] == "measured"]
        if len({x for x, _ in pts}) < 2:
            continue
        slope, icpt = fit_line(*zip(*pts))
        unit = SWEEPS[sweep].unit if sweep in SWEEPS else "x"
        out.append(dict(op=op, shape="", provider=prov, metric=f"slope_{metric}", value=slope,
                        unit=("s" if metric.startswith("time") else "B") + f" per {unit}", source="fit",
                        sweep=sweep, intercept=icpt, points=len(pts), size=0.0))
    return out
