"""The report: the environment, a short summary on stdout (one line per op and shape: the time and peak
memory ratios to each baseline), the full table, CSV and JSON files, and plots."""

from __future__ import annotations

import csv
import json
import os
import platform
import sys

import torch

WIDTH = 100  # the summary's widest line


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

    from .. import _backend

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU {_cpu_name()} x{os.cpu_count()} threads={torch.get_num_threads()}")
    with _backend.backend("auto"):
        probe = torch.empty(1, device=device)
        backend_name = "triton" if _backend.use_triton(probe) else "torch"
    # which matmul the CPU torch path's fp32 linears use (FASTVLM_CPU_GEMM; auto times both once): asked only
    # there, so a GPU run does not time CPU matmuls for a column it leaves empty
    gemm = _backend.cpu_gemm_choice() if device.type == "cpu" and backend_name == "torch" else ""
    return {"device": dev, "torch": torch.__version__, "triton": triton.__version__, "fastvlm": fastvlm.__version__,
            "python": platform.python_version(), "backend": backend_name, "cpu_gemm": gemm,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def header_lines(env: dict) -> list[str]:
    gemm = f" ({env['cpu_gemm']} matmuls)" if env.get("cpu_gemm") else ""
    return [f"device: {env['device']}"[:WIDTH],
            f"backend: {env['backend']}{gemm} | torch {env['torch']} | triton {env['triton']}"[:WIDTH]]


# ---------------------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------------------


def _main_metrics(rows) -> tuple[str, str]:
    step = any(r["metric"] == "time_step" for r in rows)
    return ("time_step", "peak_mem_step") if step else ("time_fwd+bwd", "peak_mem_fwd+bwd")


def _groups(rows: list[dict]) -> dict:
    """(op, sweep) -> shape -> that case's measured rows, in order of appearance."""
    out: dict = {}
    for r in rows:
        if r["source"] != "measured":
            continue
        out.setdefault((r["op"], r.get("sweep", "")), {}).setdefault(r["shape"], []).append(r)
    return out


NOISY = "~"


def noisy(row: dict | None) -> bool:
    """A timing whose spread (max - min of the repetitions) is more than half its median."""
    return bool(row) and row.get("spread", 0.0) > 0.5 * row["value"]


def summary_lines(rows: list[dict]) -> list[str]:
    """For each op, a header naming the columns, then one line per shape: the subject's median time and,
    per baseline, ``time ratio/peak memory ratio``. The subject is the one provider compared with every
    baseline (fastvlm; the two-pass step); where several are compared with one baseline (the tuners), each
    is a column and the time shown is the baseline's. A time ratio marked ``~`` is noisy: the spread of
    the subject's or the baseline's repetitions exceeds half its median."""
    lines, flagged = [], False
    for (op, sweep), shapes in _groups(rows).items():
        all_rows = [r for rs in shapes.values() for r in rs]
        tm, mm = _main_metrics(all_rows)
        bases = list(dict.fromkeys(k[9:] for r in all_rows for k in r if k.startswith("ratio_to_")))
        subjects = list(dict.fromkeys(r["provider"] for r in all_rows if any(k.startswith("ratio_to_") for k in r)
                                      and r["provider"] not in bases))
        if not bases or not subjects:
            continue
        one = len(subjects) == 1
        cols = bases if one else subjects
        who = subjects[0] if one else bases[0]
        title = f"{op}" + (f" [sweep {sweep}]" if sweep else "")
        if one:
            lines.append(f"{title}: {who}'s time/peak over each baseline's (<1: better)"[:WIDTH])
        else:
            lines.append(f"{title}: each one's time/peak over {who}'s"[:WIDTH])
        sw = min(32, max(len(s) for s in shapes))
        cw = max(11, max(len(c) for c in cols) + 2)
        if 2 + sw + 11 + cw * len(cols) > WIDTH:
            cw = max(11, (WIDTH - 2 - sw - 11) // len(cols))
        lines.append(("  " + f"{'shape':{sw}}" + f"{who + ' ms':>11}" + "".join(f"{c[:cw - 2]:>{cw}}" for c in cols))
                     [:WIDTH])
        for shape, rs in shapes.items():
            def get(p, m):
                return next((r for r in rs if r["provider"] == p and r["metric"] == m), None)

            t = get(who, tm)
            cells = []
            for c in cols:
                s, b = (who, c) if one else (c, who)
                rt, rm = get(s, tm), get(s, mm)
                ft = f"{rt['ratio_to_' + b]:.2f}" if rt and "ratio_to_" + b in rt else "-"
                if ft != "-" and (noisy(rt) or noisy(get(b, tm))):
                    ft += NOISY
                    flagged = True
                fm = f"{rm['ratio_to_' + b]:.2f}" if rm and "ratio_to_" + b in rm else "-"
                cells.append(f"{ft}/{fm}")
            ms = f"{t['value'] * 1e3:.2f}" if t else "-"
            lines.append(("  " + f"{shape[:sw]:{sw}}" + f"{ms:>11}" + "".join(f"{c:>{cw}}" for c in cells))[:WIDTH])
    if flagged:
        lines.append(f"{NOISY}: a timing's spread (max - min) exceeds half its median: that ratio is noisy")
    compile_s = [r["value"] for r in rows if r["metric"] == "compile_s"]
    if compile_s:
        lines.append(f"torch.compile: {sum(compile_s):.1f} s compiling {len(compile_s)} naive compositions "
                     f"(in setup, not in any timing)"[:WIDTH])
    return lines


def _si(v: float, unit: str) -> str:
    if unit.startswith("s"):
        for scale, name in ((1, "s"), (1e-3, "ms"), (1e-6, "us"), (1e-9, "ns")):
            if abs(v) >= scale or scale == 1e-9:
                return f"{v / scale:.3g} {name}"
    for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"), (1, "B")):
        if abs(v) >= scale or scale == 1:
            return f"{v / scale:.3g} {name}"
    return f"{v:.3g}"


def load_lines(rows: list[dict]) -> list[str]:
    """One block per case with ``load_slowdown`` rows (the load family): per op, its time alone, under one
    busy process, and the slowdown (loaded / alone)."""
    from .cases_load import SLOWDOWN

    lines = []
    slow = [r for r in rows if r["metric"] == SLOWDOWN]
    for op, shape in dict.fromkeys((r["op"], r["shape"]) for r in slow):
        lines.append(f"{op} {shape}: beside one busy process, slowdown = loaded / alone"[:WIDTH])
        for r in slow:
            if (r["op"], r["shape"]) == (op, shape):
                lines.append(f"  {r['provider']:14} alone {_si(r['alone_s'], 's'):>10}   loaded "
                             f"{_si(r['loaded_s'], 's'):>10}   slowdown {r['value']:.2f}x"[:WIDTH])
    return lines


def slope_lines(rows: list[dict]) -> list[str]:
    """One block per sweep: per provider, the fitted time and peak memory per unit of x."""
    from .sweeps import SWEEPS

    lines = []
    fits = [r for r in rows if r["source"] == "fit"]
    for sweep in dict.fromkeys(r["sweep"] for r in fits):
        unit = SWEEPS[sweep].unit if sweep in SWEEPS else "x"
        lines.append(f"sweep {sweep}: least-squares line per provider (slope per {unit} + intercept)"[:WIDTH])
        for prov in dict.fromkeys(r["provider"] for r in fits if r["sweep"] == sweep):
            parts = []
            for r in fits:
                if r["sweep"] == sweep and r["provider"] == prov:
                    u = "s" if r["metric"].startswith("slope_time") else "B"
                    what = "time" if u == "s" else "peak"
                    parts.append(f"{what} {_si(r['value'], u)}/{unit} + {_si(r['intercept'], u)}")
            lines.append(f"  {prov:14}" + "   ".join(parts)[:WIDTH - 16])
    return lines


# ---------------------------------------------------------------------------------------------------------
# the full table and files
# ---------------------------------------------------------------------------------------------------------


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
    return f"{v:9.3g} {unit}"


def print_table(rows: list[dict], env: dict, file=None) -> None:
    """Every row: op, shape, provider, metric, median, spread, ratios, and where it comes from (measured,
    derived from a measured time, setup, fit, or projection)."""
    file = file or sys.stdout
    for line in header_lines(env):
        print(line, file=file)
    hdr = (f"{'op':24} {'shape':34} {'provider':13} {'metric':22} {'median':>14} {'spread':>12} {'source':10} "
           f"ratios")
    print(hdr, file=file)
    print("-" * len(hdr), file=file)
    for r in rows:
        ratio = " ".join(f"{k[9:]}:{v:.2f}" for k, v in r.items() if k.startswith("ratio_to_"))
        spread = _fmt(r["spread"], r["unit"]) if r.get("spread") else ""
        print(f"{r['op']:24} {r['shape']:34} {r['provider']:13} {r['metric']:22} {_fmt(r['value'], r['unit']):>14} "
              f"{spread:>12} {r['source']:10} {ratio}", file=file)


def write_outputs(rows: list[dict], env: dict, out: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    full = [{**r, **env} for r in rows]
    first = ("op", "shape", "provider", "metric", "value", "unit", "source")
    cols = sorted({k for r in full for k in r}, key=lambda k: (k not in first, first.index(k) if k in first else 0, k))
    paths = [os.path.join(out, "bench.csv"), os.path.join(out, "bench.json"), os.path.join(out, "table.txt")]
    with open(paths[0], "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(full)
    with open(paths[1], "w") as fh:
        json.dump({"environment": env, "rows": rows}, fh, indent=1)
    with open(paths[2], "w") as fh:
        print_table(rows, env, file=fh)
    return paths + plot(rows, env, out)


# ---------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------


def wants_log(values) -> bool:
    """A log axis where the plotted values span a factor of 10 or more."""
    pos = [v for v in values if v > 0]
    return len(pos) > 1 and max(pos) >= 10 * min(pos)


def _errors(sel, scale):
    lo = [(r["value"] - r.get("min", r["value"])) * scale for r in sel]
    hi = [(r.get("max", r["value"]) - r["value"]) * scale for r in sel]
    return [lo, hi]


def _count(x: float) -> str:
    for scale, name in ((1e6, "M"), (1e3, "K")):
        if x >= scale:
            return f"{x / scale:.3g}{name}"
    return f"{x:g}"


def plot(rows: list[dict], env: dict, out: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'fastvlm[bench]')", file=sys.stderr)
        return []
    paths = []
    measured = [r for r in rows if r["source"] == "measured"]
    title = f"on {env['device']} ({env['backend']} backend); error bars: min to max of the repetitions"
    for op in dict.fromkeys(r["op"] for r in measured if not r.get("sweep")):
        sel_op = [r for r in measured if r["op"] == op and not r.get("sweep")]
        tm, mm = _main_metrics(sel_op)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, metric, scale, label in ((axes[0], tm, 1e3, f"{tm}, median (ms)"),
                                         (axes[1], mm, 1 / 2**20, f"{mm} (MiB)")):
            sel = [r for r in sel_op if r["metric"] == metric]
            provs = list(dict.fromkeys(r["provider"] for r in sel))
            shapes = list(dict.fromkeys(r["shape"] for r in sel))
            width = 0.8 / max(1, len(provs))
            for i, p in enumerate(provs):
                pts = [(j, r) for j, s in enumerate(shapes) for r in sel if r["provider"] == p and r["shape"] == s]
                xs = [j + i * width for j, _ in pts]
                vals = [r["value"] * scale for _, r in pts]
                err = _errors([r for _, r in pts], scale) if metric.startswith("time") else None
                ax.bar(xs, vals, width, yerr=err, capsize=2, label=p)
            if wants_log([r["value"] for r in sel]):
                ax.set_yscale("log")
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, rotation=15, fontsize=7)
            ax.set_ylabel(label)
            ax.legend(fontsize=7)
        fig.suptitle(f"{op} {title}", fontsize=8)
        fig.tight_layout()
        p = os.path.join(out, f"{op}.png")
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    for sweep in dict.fromkeys(r["sweep"] for r in measured if r.get("sweep")):
        sel_sw = [r for r in measured if r.get("sweep") == sweep]
        tm, mm = _main_metrics(sel_sw)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, metric, scale, label in ((axes[0], tm, 1e3, f"{tm}, median (ms)"),
                                         (axes[1], mm, 1 / 2**20, f"{mm} (MiB)")):
            sel = [r for r in sel_sw if r["metric"] == metric]
            for p in dict.fromkeys(r["provider"] for r in sel):
                pts = sorted((r for r in sel if r["provider"] == p), key=lambda r: r["size"])
                err = _errors(pts, scale) if metric.startswith("time") else None
                ax.errorbar([r["size"] for r in pts], [r["value"] * scale for r in pts], yerr=err, marker="o",
                            capsize=2, label=p)
            if wants_log([r["size"] for r in sel]):
                ax.set_xscale("log")
                ax.minorticks_off()
            xs = sorted({r["size"] for r in sel})
            ax.set_xticks(xs, [_count(x) for x in xs], fontsize=7)
            if wants_log([r["value"] for r in sel]):
                ax.set_yscale("log")
            ax.set_xlabel(sweep.split("_", 1)[1])
            ax.set_ylabel(label)
            ax.legend(fontsize=7)
        fig.suptitle(f"sweep {sweep} {title}", fontsize=8)
        fig.tight_layout()
        p = os.path.join(out, f"sweep_{sweep}.png")
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    return paths

