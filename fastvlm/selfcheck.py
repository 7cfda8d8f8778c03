"""``fastvlm selfcheck``: one command that verifies and measures every Triton kernel on a GPU, within a fixed
time budget, and writes everything under one folder (docs/gpu.md).

Parts, each in its own process with its own time limit (a crash, a hang or a poisoned CUDA context in one part
is reported, and the next part still runs):

- ``environment``: device, capability, memory, versions of python/torch/triton/CUDA and the optional packages.
- ``kernels``: every kernel at every launch configuration the launchers can choose: the public ops are driven
  at small shapes in each dtype with each flag combination, every launch is recorded and matched against the
  kernels' ``variants()`` (the list ``fastvlm kernels`` compiles), outputs and gradients must be finite.
- ``optests``: the op tests (tests/test_residual.py, test_masked.py, test_orth.py) with ``pytest --device``,
  summarised per file and dtype.
- ``targets``: the GPU targets, timed here with CUDA events (median of repeated fwd+bwd steps, warm caches)
  and ``torch.cuda.max_memory_allocated``; each gets a PASS / FAIL / NOT RUN line (TARGETS below).
- ``bench``: ``fastvlm bench --quick`` through its command line; its peak memory and achieved rates are
  set against the device's datasheet peaks (DEVICE_PEAKS) when its JSON has them.

``--dry-run`` runs the same parts on CPU (Triton's interpreter, tiny shapes, short budgets): the GPU targets are
then NOT RUN, and the figures it prints are of the rehearsal, not of any GPU.

Output folder: ``summary.md``, ``selfcheck.json`` (everything), ``<part>.log`` (each part's output),
``kernels.csv``, ``optests.csv``, ``targets.csv``, ``bench/`` (the bench's own CSV, JSON and PNGs),
``bench_rates.csv`` and ``targets.png``. The summary and the JSON are rewritten after every part, so a run cut
short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

PARTS = ("environment", "kernels", "optests", "targets", "bench")
#: seconds per part on a GPU (sum 450 s: the whole check fits 8 minutes with process start-up) and in --dry-run
BUDGET = {"environment": 30, "kernels": 90, "optests": 150, "targets": 60, "bench": 120}
DRY_BUDGET = {"environment": 60, "kernels": 120, "optests": 120, "targets": 90, "bench": 30}
OP_TEST_FILES = ("tests/test_residual.py", "tests/test_masked.py", "tests/test_orth.py")
#: op tests in the dry run: one per file, each runs the kernels in the interpreter
DRY_OP_TESTS = ("(test_mask_threshold_is_strict_and_applied or test_zero_params_give_identity or "
                "test_only_residual_requires_grad) and triton")

#: datasheet peaks, dense (no sparsity): bytes/s of HBM, FLOP/s of bf16/fp16 tensor cores and of fp32 FMA units.
#: Matched by substring of torch.cuda.get_device_name, first match wins (so "H100 PCIe" before "H100").
DEVICE_PEAKS = [
    ("H200", dict(bytes_per_s=4.8e12, flops_half=989e12, flops_fp32=67e12)),
    ("H100 PCIe", dict(bytes_per_s=2.0e12, flops_half=756e12, flops_fp32=51e12)),
    ("H100 NVL", dict(bytes_per_s=3.9e12, flops_half=835e12, flops_fp32=60e12)),
    ("H100", dict(bytes_per_s=3.35e12, flops_half=989e12, flops_fp32=67e12)),
    ("A100-SXM4-80GB", dict(bytes_per_s=2.039e12, flops_half=312e12, flops_fp32=19.5e12)),
    ("A100", dict(bytes_per_s=1.555e12, flops_half=312e12, flops_fp32=19.5e12)),
]

#: the GPU targets (stated aims, checked on a GPU): name -> (statement, metric, comparison, threshold)
TARGETS = {
    "masked_linear": ("masked_linear fwd+bwd within 1.1x of cuBLAS nn.Linear training",
                      "time ratio masked_linear / nn.Linear", "<=", 1.1),
    "residual_ce_time": ("residual CE >= 3x faster than eager at K=21843",
                         "time ratio eager / fused", ">=", 3.0),
    "residual_ce_memory": ("residual CE <= 0.25x the eager peak memory at K=21843",
                           "peak memory ratio fused / eager", "<=", 0.25),
    "cayley_rotation": ("Cayley + rotation within 1.1x of the base GEMM",
                        "time ratio orthogonal_linear (with Cayley) / F.linear", "<=", 1.1),
    "grad_dropout": ("fused gradient-dropout backward no slower than a plain backward + 10%",
                     "time ratio fused-dropout backward / plain backward", "<=", 1.1),
}


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def device_peaks(name: str) -> dict | None:
    for key, peaks in DEVICE_PEAKS:
        if key in name:
            return {"matched": key, **peaks}
    return None


# ---------------------------------------------------------------------------------------------------------
# the driver: runs the parts as subprocesses, one budget each, and writes the report after each
# ---------------------------------------------------------------------------------------------------------


def _bootstrap(out: Path) -> dict:
    """Environment for the parts' processes. fastvlm.kernels lives in the top-level kernels/ folder (mapped by
    the package install); on a machine where fastvlm runs from a copied tree without an install, a
    sitecustomize in ``out/_bootstrap`` maps it, and the tree goes on PYTHONPATH."""
    import importlib.util

    env = dict(os.environ)
    root = str(repo_root())
    paths = [root]
    if importlib.util.find_spec("fastvlm.kernels") is None:
        boot = out / "_bootstrap"
        boot.mkdir(parents=True, exist_ok=True)
        (boot / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(kernels=repr(str(repo_root() / "kernels"))))
        paths.insert(0, str(boot))
        _install_kernels_finder(str(repo_root() / "kernels"))
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


_SITECUSTOMIZE = '''"""Written by fastvlm selfcheck: maps fastvlm.kernels to the tree's kernels/ (what the package install does)."""
import importlib.util
import os
import sys


class _KernelsFinder:
    def find_spec(self, name, path=None, target=None):
        if name != "fastvlm.kernels":
            return None
        return importlib.util.spec_from_file_location(name, os.path.join({kernels}, "__init__.py"),
                                                      submodule_search_locations=[{kernels}])


sys.meta_path.append(_KernelsFinder())
'''


class _KernelsFinder:
    def __init__(self, path: str):
        self.path = path

    def find_spec(self, name, path=None, target=None):
        if name != "fastvlm.kernels":
            return None
        import importlib.util

        return importlib.util.spec_from_file_location(name, os.path.join(self.path, "__init__.py"),
                                                      submodule_search_locations=[self.path])


def _install_kernels_finder(path: str) -> None:
    if not any(isinstance(f, _KernelsFinder) for f in sys.meta_path):
        sys.meta_path.append(_KernelsFinder(path))


def _run_cmds(cmds: list[list[str]], env: dict, timeout: float, log: Path) -> tuple[int | None, float, str]:
    """Run the commands side by side, each in its own process group, with one deadline; a command still
    running at the deadline has its group ended. Their outputs go to ``log`` one after the other. Returns
    (the largest exit status, or None if any timed out; seconds; the output)."""
    t0 = time.monotonic()
    logs = [log.with_suffix(f".{i}.log") for i in range(len(cmds))]
    procs = []
    for cmd, lg in zip(cmds, logs):
        with open(lg, "w") as fh:
            procs.append(subprocess.Popen(cmd, cwd=repo_root(), env=env, stdout=fh, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, timeout - (time.monotonic() - t0))))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            codes.append(None)
    text = ""
    for lg in logs:
        text += lg.read_text(errors="replace")
        lg.unlink()
    log.write_text(text)
    return (None if None in codes else max(codes)), time.monotonic() - t0, text


#: the dtypes the kernels part drives, one process each (compilation is CPU-bound: they compile side by side)
KERNEL_DTYPES = ("float32", "float16", "bfloat16")


def _part_cmds(name: str, args, out: Path) -> list[list[str]]:
    """The part's commands, run side by side: the op test files and the kernels' dtypes each in their own
    process (on a GPU their Triton compilations then share the host's cores)."""
    py = sys.executable
    dev = "cpu" if args.dry_run else args.device
    if name == "optests":
        cmd = [py, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rfE", "--tb=line", "--device", dev]
        if args.dry_run:  # one process: the interpreter's three selected tests are quick, start-up is not
            return [cmd + [*OP_TEST_FILES, "-k", DRY_OP_TESTS]]
        return [cmd + [f] for f in OP_TEST_FILES]
    if name == "bench":
        cmd = [py, "-m", "fastvlm.cli", "bench", "--quick", "--device", dev, "--out", str(out / "bench"),
               "--no-progress"]
        return [cmd + (["--ops", "residual", "--reps", "1"] if args.dry_run else [])]
    cmd = [py, "-m", "fastvlm.selfcheck", "--part", name, "--device", dev, "--out", str(out)]
    cmd += ["--dry-run"] if args.dry_run else []
    if name == "kernels":  # the dry run: fp32 only (the interpreter is slow, and runs bf16 wrongly)
        return [cmd + ["--dtype", d] for d in (KERNEL_DTYPES[:1] if args.dry_run else KERNEL_DTYPES)]
    return [cmd]


def _forced_failure(name: str) -> list[str]:
    return [sys.executable, "-c", f"import sys; print('forced failure of part {name} (--force-fail)'); sys.exit(3)"]


def _part_env(name: str, args, base: dict) -> dict:
    env = dict(base)
    env["TRITON_INTERPRET"] = "1" if args.dry_run else "0"
    env.pop("FASTVLM_TEST_DEVICE", None)
    if name in ("kernels", "targets"):
        env["FASTVLM_BACKEND"] = "triton"  # the kernels, also on CPU tensors in the dry run
    else:
        env.pop("FASTVLM_BACKEND", None)
    return env


def run_check(args) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    budgets = dict(DRY_BUDGET if args.dry_run else BUDGET)
    for item in args.budget:
        k, _, v = item.partition("=")
        if k not in budgets or not v:
            raise ValueError(f"--budget must be PART=SECONDS with PART among {PARTS}, got {item!r}")
        budgets[k] = float(v)
    deadline = time.monotonic() + args.total
    env = _bootstrap(out)
    report = {"command": " ".join(["fastvlm", *getattr(args, "argv", [])]), "dry_run": args.dry_run,
              "device": "cpu" if args.dry_run else args.device, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "budgets_s": budgets, "total_budget_s": args.total, "parts": {}}
    for name in PARTS:
        part = {"status": "not run", "seconds": 0.0, "budget_s": budgets[name]}
        if name not in args.parts:
            part["note"] = "not selected (--parts)"
        elif deadline - time.monotonic() < 5:
            part["note"] = "no time left in the total budget"
        else:
            timeout = min(budgets[name], deadline - time.monotonic())
            print(f"[selfcheck] {name} (budget {timeout:.0f} s) ...", flush=True)
            for stale in [out / "bench" / "bench.json"] if name == "bench" else out.glob(f"{name}*.json"):
                if stale.exists():  # a previous run's, which would be taken for this run's
                    stale.unlink()
            cmds = [_forced_failure(name)] if name in args.force_fail else _part_cmds(name, args, out)
            rc, secs, text = _run_cmds(cmds, _part_env(name, args, env), timeout, out / f"{name}.log")
            part.update(seconds=round(secs, 1), exit_status=rc, commands=[" ".join(c[1:]) for c in cmds])
            part.update(_collect(name, out, rc, text))
            if rc is None:
                part["status"] = "timeout"
                part["note"] = f"stopped after {timeout:.0f} s (its budget); " + part.get("note", "")
            print(f"[selfcheck] {name}: {part['status']} in {secs:.1f} s", flush=True)
        report["parts"][name] = part
        report["targets"] = _target_lines(report)
        _write_report(report, out)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    _write_report(report, out)
    print((out / "summary.md").read_text())
    failed = [n for n, p in report["parts"].items() if p["status"] not in ("ok", "not run")]
    return 1 if failed or any(t["verdict"] == "FAIL" for t in report["targets"]) else 0


def _tail(text: str, n: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def _collect(name: str, out: Path, rc, text: str) -> dict:
    """The part's status and results from what it left: its JSON (python parts), pytest's output, the bench's
    JSON."""
    if name == "optests":
        res = parse_pytest(text)
        _write_csv(out / "optests.csv", res.pop("rows"))
        ok = rc == 0 and res["counts"].get("failed", 0) == 0 and res["counts"].get("error", 0) == 0
        if not res["counts"]:
            res["note"] = "no test ran: " + _tail(text, 5)
        return {"status": "ok" if ok else "failed", **res}
    if name == "bench":
        res = parse_bench(out / "bench")
        status = "ok" if rc == 0 else "failed"
        if rc not in (0, None):
            res["note"] = "bench exited with status %s: %s" % (rc, _tail(text, 5))
        return {"status": status, **res}
    path = out / f"{name}.json"  # written as the part goes: what a part cut short measured is kept
    res = {}
    if name == "kernels":
        res = _merge_kernels(sorted(out.glob("kernels-*.json")))
        _write_csv(out / "kernels.csv", res.pop("rows", []))
        if res:
            path.write_text(json.dumps(res, indent=1))
    elif path.exists():
        try:
            res = json.loads(path.read_text())
        except ValueError:  # cut short while writing
            res = {}
    if name == "targets":
        _write_csv(out / "targets.csv", res.get("rows", []))
        _plot_targets(res.get("rows", []), out)
    if rc == 0 and res:
        return {"status": "ok" if not res.get("problems") else "failed", **res}
    return {"status": "failed", **res, "note": f"exit status {rc}: " + _tail(text, 3).replace("\n", " / ")}


def _merge_kernels(paths: list[Path]) -> dict:
    """One report from the kernels part's processes (one per dtype, each over the same variants list): a
    variant counts as launched when any process launched it."""
    parts = []
    for p in paths:
        try:
            parts.append(json.loads(p.read_text()))
        except ValueError:  # cut short while writing
            pass
    if not parts:
        return {}
    rows = [dict(r) for r in parts[0]["rows"]]
    for other in parts[1:]:
        for r, o in zip(rows, other["rows"]):
            r["launched"] += o["launched"]
            firsts = [t for t in (r["first_launch_s"], o["first_launch_s"]) if t is not None]
            r["first_launch_s"] = min(firsts) if firsts else None
    missing = {}
    for r in rows:
        if not r["launched"]:
            missing[r["dtypes"]] = missing.get(r["dtypes"], 0) + 1
    union = lambda key: sorted({u for p in parts for u in p.get(key, [])})  # noqa: E731
    return {"rows": rows, "variants": len(rows), "variants_launched": sum(1 for r in rows if r["launched"]),
            "launches": sum(p["launches"] for p in parts), "dtypes": [d for p in parts for d in p["dtypes"]],
            "unlisted": union("unlisted"), "pointer_dtype_differs": union("pointer_dtype_differs"),
            "problems": [e for p in parts for e in p["problems"]], "not_launched_by_dtype": missing,
            "ops_completed": sum(p["ops_completed"] for p in parts)}


def parse_pytest(text: str) -> dict:
    """Per-test outcomes from ``pytest -v`` output (complete or cut short), counted per file and dtype."""
    rows, seen = [], set()
    for m in re.finditer(r"^(tests/[\w/]+\.py)::(\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", text, re.M):
        key = (m.group(1), m.group(2))
        if key in seen:  # an ERROR in teardown after a PASSED: keep the worse
            if m.group(3) not in ("ERROR", "FAILED"):
                continue
            rows = [r for r in rows if (r["file"], r["test"]) != key]
        seen.add(key)
        ids = re.split(r"[\[\]-]", m.group(2))
        dtype = next((d for d in ("fp32", "fp16", "bf16") if d in ids), "other")
        rows.append({"file": m.group(1), "test": m.group(2), "dtype": dtype, "outcome": m.group(3).lower()})
    counts, table = {}, {}
    for r in rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        cell = table.setdefault(f"{r['file']} {r['dtype']}", {})
        cell[r["outcome"]] = cell.get(r["outcome"], 0) + 1
    failures = re.findall(r"^(?:FAILED|ERROR) (tests/\S+.*)$", text, re.M)
    return {"rows": rows, "counts": counts, "by_file_dtype": table, "failures": failures[:40]}


def parse_bench(folder: Path) -> dict:
    """Peak memory and achieved rates from the bench's JSON, against the device's peaks."""
    path = folder / "bench.json"
    if not path.exists():
        return {"note": "the bench wrote no bench.json"}
    try:
        data = json.loads(path.read_text())
        rows, env = data["rows"], data.get("environment", {})
    except (ValueError, KeyError, TypeError) as e:
        return {"note": f"bench.json not in the expected form ({type(e).__name__}: {e})"}
    peaks = device_peaks(str(env.get("device", "")))
    keep = []
    for r in rows:
        metric = str(r.get("metric", ""))
        if not (metric.startswith("peak_mem") or metric.startswith("achieved_")):
            continue
        row = {k: r.get(k) for k in ("op", "shape", "provider", "metric", "value", "unit")}
        if peaks and metric == "achieved_GB/s":
            row["fraction_of_peak"] = r["value"] * 1e9 / peaks["bytes_per_s"]
            row["peak"] = f"{peaks['bytes_per_s'] / 1e12:.2f} TB/s ({peaks['matched']} HBM)"
        if peaks and metric == "achieved_GFLOP/s":
            row["fraction_of_peak"] = r["value"] * 1e9 / peaks["flops_half"]
            row["peak"] = f"{peaks['flops_half'] / 1e12:.0f} TFLOP/s ({peaks['matched']} bf16 dense)"
        keep.append(row)
    _write_csv(folder.parent / "bench_rates.csv", keep)
    return {"bench_device": env.get("device"), "bench_backend": env.get("backend"), "rates": keep,
            "plots": sorted(p.name for p in folder.glob("*.png"))}


def _target_lines(report: dict) -> list[dict]:
    """One line per target: PASS / FAIL when measured on a GPU, else NOT RUN with the reason."""
    part = report["parts"].get("targets", {})
    measured = {r["target"]: r for r in part.get("rows", [])}
    lines = []
    for key, (statement, metric, op, thr) in TARGETS.items():
        r = measured.get(key)
        line = {"target": key, "statement": statement, "metric": metric, "threshold": f"{op} {thr}"}
        if r is None or r.get("value") is None:
            why = (r or {}).get("error") or f"the targets part: {part.get('status', 'not run')}"
            line.update(verdict="NOT RUN", detail=why)
        elif report["dry_run"] or r.get("device_type") != "cuda":
            line.update(verdict="NOT RUN", value=r["value"],
                        detail="dry run on CPU (interpreter, tiny shapes): figure of the rehearsal, not of a GPU")
        else:
            ok = r["value"] <= thr if op == "<=" else r["value"] >= thr
            line.update(verdict="PASS" if ok else "FAIL", value=r["value"], detail=r.get("detail", ""))
        lines.append(line)
    return lines


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def _plot_targets(rows: list[dict], out: Path) -> None:
    rows = [r for r in rows if r.get("value") is not None]
    if not rows:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = [r["target"] for r in rows]
    ax.bar(names, [r["value"] for r in rows], color="tab:blue", label="measured")
    ax.scatter(names, [TARGETS[r["target"]][3] for r in rows], color="tab:red", marker="_", s=900, label="target")
    ax.set_ylabel("ratio (see targets.csv)")
    ax.tick_params(axis="x", labelsize=7, rotation=15)
    ax.legend()
    fig.suptitle(f"GPU targets on {rows[0].get('device', '?')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "targets.png", dpi=90)
    plt.close(fig)


def _fmt_value(v) -> str:
    return "" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))


def _write_report(report: dict, out: Path) -> None:
    (out / "selfcheck.json").write_text(json.dumps(report, indent=1, default=str))
    parts = report["parts"]
    env = parts.get("environment", {})
    L = [f"# fastvlm selfcheck{' (dry run: CPU, Triton interpreter, tiny shapes)' if report['dry_run'] else ''}", "",
         f"- command: `{report['command']}`", f"- started: {report['started']}"
         + (f", finished: {report['finished']}" if report.get("finished") else " (in progress or cut short)"),
         f"- device: {env.get('device_name', '?')} | torch {env.get('torch', '?')} | triton {env.get('triton', '?')}"
         f" | CUDA {env.get('cuda', '?')} | python {env.get('python', '?')}", ""]
    L += ["## Parts", "", "| part | status | seconds | budget | note |", "|---|---|---|---|---|"]
    for n in PARTS:
        p = parts.get(n)
        if p is None:
            L.append(f"| {n} | pending | | | |")
            continue
        note = str(p.get("note", "")).replace("\n", " ").replace("|", "/")[:300]
        L.append(f"| {n} | {p['status'].upper()} | {p['seconds']} | {p['budget_s']:.0f} | {note} |")
    L += ["", "## GPU targets", ""]
    for t in report.get("targets", []):
        val = f" measured {_fmt_value(t.get('value'))}" if t.get("value") is not None else ""
        L.append(f"- {t['verdict']}: {t['statement']} ({t['metric']} {t['threshold']}){val}. {t.get('detail', '')}")
    trows = [r for r in parts.get("targets", {}).get("rows", []) if r.get("value") is not None]
    if trows:
        L += ["", "| target | shape | ours | baseline | ratio | ours rate | fraction of peak |", "|---|---|---|---|---|---|---|"]
        for r in trows:
            L.append(f"| {r['target']} | {r.get('shape', '')} | {_fmt_value(r.get('ours'))} {r.get('unit', '')} | "
                     f"{_fmt_value(r.get('baseline'))} {r.get('unit', '')} | {_fmt_value(r.get('value'))} | "
                     f"{r.get('rate', '')} | {_fmt_value(r.get('fraction_of_peak'))} |")
    op = parts.get("optests", {})
    L += ["", "## Op tests", ""]
    if op.get("counts"):
        L.append("totals: " + ", ".join(f"{k} {v}" for k, v in sorted(op["counts"].items())))
        L += ["", "| file dtype | passed | failed | skipped | error |", "|---|---|---|---|---|"]
        for k, c in sorted(op.get("by_file_dtype", {}).items()):
            L.append(f"| {k} | {c.get('passed', 0)} | {c.get('failed', 0)} | {c.get('skipped', 0)} | {c.get('error', 0)} |")
        for f in op.get("failures", []):
            L.append(f"- FAILED {f}")
    else:
        L.append(f"not run or no result: {op.get('note', op.get('status', 'pending'))}")
    k = parts.get("kernels", {})
    L += ["", "## Kernel launch configurations", ""]
    if "variants" in k:
        L.append(f"{k['variants_launched']} of {k['variants']} configurations in the kernels' variants() launched "
                 f"(dtypes driven: {', '.join(k.get('dtypes', []))}); {k.get('launches', 0)} launches; "
                 f"{len(k.get('unlisted', []))} launch configurations not among the variants.")
        for u in k.get("unlisted", [])[:20]:
            L.append(f"- not in variants(): {u}")
        for u in k.get("pointer_dtype_differs", [])[:20]:
            L.append(f"- in variants() but with other pointer dtypes (a different compiled specialisation): {u}")
        for e in k.get("problems", [])[:20]:
            L.append(f"- problem: {e}")
        if k.get("not_launched_by_dtype"):
            L.append("- variants not launched, by pointer dtype: " + ", ".join(
                f"{d} {n}" for d, n in sorted(k["not_launched_by_dtype"].items())))
    else:
        L.append(f"not run or no result: {k.get('note', k.get('status', 'pending'))}")
    b = parts.get("bench", {})
    L += ["", "## Bench (`fastvlm bench --quick`)", ""]
    if b.get("rates"):
        L += ["| op | shape | provider | metric | value | fraction of peak |", "|---|---|---|---|---|---|"]
        for r in b["rates"]:
            L.append(f"| {r['op']} | {r['shape']} | {r['provider']} | {r['metric']} | {_fmt_value(r['value'])} "
                     f"{r.get('unit', '')} | {_fmt_value(r.get('fraction_of_peak'))} |")
    else:
        L.append(f"no figures: {b.get('note', b.get('status', 'pending'))}")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "_bootstrap" not in p.parts)
    L += ["", "## Files", "", ", ".join(files), ""]
    (out / "summary.md").write_text("\n".join(L))


# ---------------------------------------------------------------------------------------------------------
# the parts that run in a fastvlm process (python -m fastvlm.selfcheck --part NAME)
# ---------------------------------------------------------------------------------------------------------


def part_environment(dev, dry: bool, save=lambda res: None) -> dict:
    import importlib.metadata as md

    import torch
    import triton

    import fastvlm

    res = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "triton": triton.__version__, "fastvlm": fastvlm.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}
    pk = {}
    for name in ("pytest", "numpy", "safetensors", "tqdm", "open_clip_torch", "peft", "matplotlib"):
        try:
            pk[name] = md.version(name)
        except md.PackageNotFoundError:
            pk[name] = None
    res["packages"] = pk
    try:
        res["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        res["git_commit"] = None
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        res.update(device_name=p.name, capability=f"sm_{p.major}{p.minor}", sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1), device_count=torch.cuda.device_count(),
                   peaks=device_peaks(p.name))
        a = torch.randn(256, 256, device=dev)
        torch.cuda.synchronize()
        res["matmul_ok"] = bool(torch.allclose((a @ a).cpu(), a.cpu() @ a.cpu(), rtol=1e-3, atol=1e-3))
        if not res["matmul_ok"]:
            res["problems"] = ["a 256x256 fp32 matmul on the device disagrees with the same on the CPU"]
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            res["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.SubprocessError) as e:
            res["nvidia_smi"] = f"not available ({type(e).__name__})"
    else:
        res.update(device_name=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)")
    for k in ("device_name", "capability", "memory_gib", "torch", "triton", "cuda", "python"):
        if k in res:
            print(f"{k}: {res[k]}")
    return res


class _LaunchRecorder:
    """Records every Triton kernel launch: kernel name, keyword arguments (constexprs, launch options), the
    dtypes of the pointer arguments, and the wall time of the launch call (compilation included on the first)."""

    def __init__(self):
        self.launches = []

    def __enter__(self):
        from triton.runtime.jit import JITFunction

        classes = [JITFunction]
        try:
            from triton.runtime.interpreter import InterpretedFunction

            classes.append(InterpretedFunction)
        except ImportError:  # pragma: no cover
            pass
        self.saved = [(c, c.run) for c in classes]
        rec = self

        def wrap(real):
            def run(self, *args, **kwargs):
                import torch

                t0 = time.perf_counter()
                result = real(self, *args, **kwargs)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                names = list(getattr(self, "arg_names", []))
                ptrs = {n: a.dtype for n, a in zip(names, args) if n.endswith("_ptr") and hasattr(a, "dtype")}
                ptrs.update({n: a.dtype for n, a in kwargs.items() if n.endswith("_ptr") and hasattr(a, "dtype")})
                rec.launches.append((self.fn.__name__, {k: v for k, v in kwargs.items()
                                                         if k not in ("grid", "warmup") and not k.endswith("_ptr")},
                                     ptrs, time.perf_counter() - t0))
                return result
            return run

        for c, real in self.saved:
            c.run = wrap(real)
        return self

    def __exit__(self, *exc):
        for c, real in self.saved:
            c.run = real


def _drive_ops(dev, dt, problems: list, finite: list, blocks=(3, 16, 32, 64)) -> None:
    """Every public op (and the mask tuner's slotted entry) at small shapes, with each flag combination the
    launchers distinguish: trained/frozen inputs, bias or none, dropout and the score regulariser, rotation
    blocks (``blocks``: padded to 16, 32 and 64), both rotation sides."""
    import torch

    from .functional import block_rotate, cayley, grad_dropout, masked_linear, orthogonal_linear
    from .functional import residual_cross_entropy, residual_logits
    from .ops.masked import THRESHOLD

    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0, dtype=dt, grad=False):
        return (scale * torch.randn(*shape, generator=g)).to(dev, dtype).requires_grad_(grad)

    def call(label, fn):
        try:
            outs = fn()
            for o in outs:
                if o is not None and not torch.isfinite(o.float()).all():
                    problems.append(f"{label} {dt}: non-finite values")
            finite.append(label)
        except Exception as e:  # reported, and the next op still runs
            problems.append(f"{label} {dt}: {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}")

    def grads(loss, *ts):
        ts = [t for t in ts if t.requires_grad]
        return list(torch.autograd.grad(loss, ts)) + [loss]

    B, K, D = 5, 7, 40
    for fg, tg, xg in ((False, False, True), (False, True, True), (False, True, False), (True, False, False)):
        f, t, x = r(B, D, grad=fg), r(K, D, grad=tg), r(K, D, scale=0.3, grad=xg)
        y = torch.randint(0, K, (B,), generator=g).to(dev)
        call(f"residual_logits grads(f={fg},t={tg},x={xg})",
             lambda: grads(residual_logits(f, t, x).float().sum(), f, t, x))
        call(f"residual_cross_entropy grads(f={fg},t={tg},x={xg})",
             lambda: grads(residual_cross_entropy(f, t, x, y), f, t, x))

    M, N, Kin = 6, 9, 24
    x, w = r(M, Kin, grad=True), r(N, Kin)
    s = (0.01 * torch.rand(N, Kin, generator=g)).to(dev).requires_grad_()
    bias = r(N)
    call("masked_linear bias", lambda: grads(masked_linear(x, w, s, bias).float().sum(), x, s))
    call("masked_linear", lambda: grads(masked_linear(x, w, s).float().sum(), x, s))
    ref = torch.randn(N, Kin, generator=g).to(dev)
    call("masked_linear ref_grad", lambda: grads(masked_linear(x, w, s, ref_grad=ref, drop_ratio=0.5,
                                                               seed=3).float().sum(), x, s))
    call("grad_dropout", lambda: [grad_dropout(r(300), r(300), 0.5, 1)])

    def slotted(with_ref):
        from .ops.masked import GradSlot, masked_linear_slotted

        slot = GradSlot()
        slot.reg, slot.ratio, slot.seed = 0.1, 0.5, 4
        slot.ref = torch.randn(N, Kin, generator=g).to(dev) if with_ref else None
        return grads(masked_linear_slotted(x, w, s, None, THRESHOLD, slot).float().sum(), s)

    call("masked_linear_slotted reg", lambda: slotted(False))
    call("masked_linear_slotted reg ref", lambda: slotted(True))

    from .ops.orth import n_params

    for b in blocks:
        p = (0.1 * torch.randn(2, n_params(b), generator=g)).to(dev).requires_grad_()
        xo, wo, bo = r(4, 2 * b, grad=True), r(5, 2 * b), r(5)
        call(f"orthogonal_linear b={b} bias", lambda: grads(orthogonal_linear(xo, wo, p, bo, b).float().sum(), xo, p))
        call(f"orthogonal_linear b={b}", lambda: grads(orthogonal_linear(xo, wo, p, None, b).float().sum(), xo, p))
        call(f"block_rotate b={b}", lambda: grads(block_rotate(xo, cayley(p, b), transpose=True).float().sum(), xo, p))
        many = r(40, 2 * b)

        def infer():
            with torch.no_grad():  # inference: the weight side for many rows
                return [orthogonal_linear(many, wo, p, bo, b)]

        call(f"orthogonal_linear b={b} inference", infer)


def _match(variants, launches):
    """(variant index -> launches, unlisted launch descriptions): a launch matches a variant when the kernel,
    every constexpr, every launch option it passes and every pointer dtype agree."""
    import torch

    hits = {i: [] for i in range(len(variants))}
    unlisted, ptr_only = [], []
    for name, kw, ptrs, secs in launches:
        found = loose = False
        for i, (_, v) in enumerate(variants):
            if v.name != name or any(kw.get(k) != val for k, val in v.constexprs.items()):
                continue
            if any(kw.get(k, val) != val for k, val in v.options.items()):
                continue
            loose = True
            if any(ptrs.get(a, torch.float32) != v.ptrs.get(a, torch.float32) for a in ptrs):
                continue
            hits[i].append(secs)
            found = True
        if not found:
            desc = f"{name} " + " ".join(f"{k}={kw[k]}" for k in sorted(kw)) + " ptrs=" + ",".join(
                f"{a}:{str(d).replace('torch.', '')}" for a, d in sorted(ptrs.items()))
            (ptr_only if loose else unlisted).append(desc)
    return hits, sorted(set(unlisted)), sorted(set(ptr_only))


def part_kernels(dev, dry: bool, save=lambda res: None, dtype: str = "float32") -> dict:
    import torch

    from . import aot

    # the dry run: blocks padded to 16 and 32 only (the interpreter is slow)
    dtypes = [getattr(torch, dtype)]
    variants = aot.all_variants()
    problems, done = [], []
    from .kernels._common import FUSIBLE, fused_kernels

    with _LaunchRecorder() as rec:
        for i, dt in enumerate(dtypes):
            _drive_ops(dev, dt, problems, done, blocks=(3, 32) if dry else (3, 16, 32, 64))
            if not dry:  # the fused masked/orth kernels too (FASTVLM_FUSED): configurations the ops can choose
                with fused_kernels(*FUSIBLE):
                    _drive_ops(dev, dt, problems, done, blocks=(3, 16, 32, 64))
            res = _kernel_report(variants, rec.launches, dtypes[: i + 1], problems, done)
            save(res)
    print(f"{res['variants_launched']} of {res['variants']} variants launched, {res['launches']} launches, "
          f"{len(res['unlisted'])} unlisted, {len(problems)} problems")
    for p in problems:
        print("problem:", p)
    return res


def _kernel_report(variants, launches, dtypes, problems, done) -> dict:
    hits, unlisted, ptr_only = _match(variants, launches)
    rows, missing = [], {}
    for i, (family, v) in enumerate(variants):
        n = len(hits[i])
        dts = ",".join(sorted({str(d).replace("torch.", "") for d in v.ptrs.values()})) or "float32"
        rows.append({"family": family, "kernel": v.name, "config": v.describe(), "dtypes": dts, "launched": n,
                     "first_launch_s": round(hits[i][0], 4) if n else None})
        if not n:
            missing[dts] = missing.get(dts, 0) + 1
    return {"rows": rows, "variants": len(rows), "variants_launched": sum(1 for r in rows if r["launched"]),
            "launches": len(launches), "dtypes": [str(d).replace("torch.", "") for d in dtypes],
            "unlisted": unlisted, "pointer_dtype_differs": ptr_only, "problems": list(problems),
            "not_launched_by_dtype": missing, "ops_completed": len(done)}


def _timer(dev):
    import torch

    def measure(fn, reps: int, warmup: int = 2) -> float:
        """Median seconds of ``fn`` over ``reps`` calls after ``warmup``: CUDA events on a GPU, else wall time."""
        for _ in range(warmup):
            fn()
        ts = []
        if dev.type == "cuda":
            torch.cuda.synchronize()
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b) / 1e3)
        else:
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    return measure


def _peak_bytes(fn, dev, clear) -> int | None:
    """Peak tensor memory of one call above what was allocated before it (CUDA only)."""
    import gc

    import torch

    if dev.type != "cuda":
        return None
    clear()
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(dev) - base


def _step(fn, params, go=None):
    """One forward+backward of ``fn`` with the grads of ``params`` cleared first."""
    def clear():
        for p in params:
            p.grad = None

    def step():
        clear()
        out = fn()
        out.backward(go) if go is not None else out.backward()

    return step, clear


def part_targets(dev, dry: bool, save=lambda res: None) -> dict:
    """Each target at its real shape on a GPU (tiny shapes in the dry run), ours against its baseline measured
    in the same process the same way."""
    import torch
    import torch.nn.functional as F

    from .functional import masked_linear, orthogonal_linear, residual_cross_entropy
    from .ops.orth import n_params
    from .ops.residual import residual_cross_entropy_reference

    measure = _timer(dev)
    reps, warmup = (1, 1) if dry else (20, 3)
    half = torch.float32 if dry else torch.bfloat16  # the interpreter runs bf16 wrongly: fp32 in the dry run
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    peaks = device_peaks(name) or {}
    g = torch.Generator().manual_seed(0)
    rows = []

    def rnd(*shape, scale=1.0, dtype=torch.float32, grad=False):
        return (scale * torch.randn(*shape, generator=g)).to(dev, dtype).requires_grad_(grad)

    def row(target, shape, ours, base, value, unit, flops=None, nbytes=None, flops_peak=None, detail=""):
        r = {"target": target, "shape": shape, "ours": ours, "baseline": base, "value": value, "unit": unit,
             "device": name, "device_type": dev.type, "detail": detail}
        if flops and ours:
            r["rate"] = f"{flops / ours / 1e12:.1f} TFLOP/s"
            if flops_peak:
                r["fraction_of_peak"] = flops / ours / flops_peak
        if nbytes and ours:
            r["rate"] = f"{nbytes / ours / 1e9:.0f} GB/s (compulsory bytes)"
            if peaks.get("bytes_per_s"):
                r["fraction_of_peak"] = nbytes / ours / peaks["bytes_per_s"]
        rows.append(r)
        print(f"{target}: {value:.3f} ({shape})")

    def guarded(target, fn):
        try:
            fn()
        except Exception as e:
            rows.append({"target": target, "value": None, "device": name, "device_type": dev.type,
                         "error": f"{type(e).__name__}: {str(e).strip()[:300]}"})
            print(f"{target}: error {type(e).__name__}: {e}")
        save({"rows": rows, "reps": reps})

    # masked_linear vs nn.Linear training, and the fused gradient dropout vs the plain backward
    M, N, K = (64, 48, 40) if dry else (6304, 2304, 768)  # 32 images x 197 tokens, ViT-B/16 QKV

    def masked():
        x = rnd(M, K, dtype=half, grad=True)
        w = rnd(N, K, scale=0.02, dtype=half)
        s = (0.01 * torch.rand(N, K, generator=g)).to(dev).requires_grad_()
        b = rnd(N, dtype=half)
        go = rnd(M, N, dtype=half)
        lin = torch.nn.Linear(K, N).to(dev, half)
        ours, _ = _step(lambda: masked_linear(x, w, s, b), [x, s], go)
        base, _ = _step(lambda: lin(x), [x, *lin.parameters()], go)
        t_ours, t_base = measure(ours, reps, warmup), measure(base, reps, warmup)
        fl = 3 * 2 * M * N * K
        row("masked_linear", f"M={M} N={N} K={K} {str(half)[6:]}", t_ours, t_base, t_ours / t_base, "s", flops=fl,
            flops_peak=peaks.get("flops_half") if half != torch.float32 else peaks.get("flops_fp32"))
        # backward only: the same forward graph, its backward timed with and without the dropout epilogue
        ref = torch.randn(N, K, generator=g).to(dev)
        y_plain = masked_linear(x, w, s, b)
        y_drop = masked_linear(x, w, s, b, ref_grad=ref, drop_ratio=1.0, seed=7)
        t_drop = measure(lambda: torch.autograd.grad(y_drop, [x, s], go, retain_graph=True), reps, warmup)
        t_plain = measure(lambda: torch.autograd.grad(y_plain, [x, s], go, retain_graph=True), reps, warmup)
        row("grad_dropout", f"M={M} N={N} K={K} {str(half)[6:]}", t_drop, t_plain, t_drop / t_plain, "s")

    guarded("masked_linear", masked)

    # residual cross-entropy (TaskRes, fp32 as the tuner trains it) vs the eager composition
    B, Kc, D = (16, 200, 32) if dry else (256, 21843, 1024)

    def residual():
        f, t = rnd(B, D), rnd(Kc, D)
        x = rnd(Kc, D, scale=0.1, grad=True)
        y = torch.randint(0, Kc, (B,), generator=g).to(dev)
        ours, c1 = _step(lambda: residual_cross_entropy(f, t, x, y), [x])
        eager, c2 = _step(lambda: residual_cross_entropy_reference(f, t, x, y), [x])
        t_ours, t_eager = measure(ours, reps, warmup), measure(eager, reps, warmup)
        nbytes = 4 * (2 * (B * D + 2 * Kc * D) + Kc * D)  # f, t, x read forward and backward, dx written
        shape = f"B={B} K={Kc} D={D} fp32"
        row("residual_ce_time", shape, t_ours, t_eager, t_eager / t_ours, "s", nbytes=nbytes)
        m_ours, m_eager = _peak_bytes(ours, dev, c1), _peak_bytes(eager, dev, c2)
        if m_ours is not None and m_eager:
            row("residual_ce_memory", shape, m_ours, m_eager, m_ours / m_eager, "B")
        else:
            rows.append({"target": "residual_ce_memory", "value": None, "device": name, "device_type": dev.type,
                         "error": "peak memory is measured on CUDA only (torch.cuda.max_memory_allocated)"})

    guarded("residual_ce_time", residual)

    # Cayley + rotation (orthogonal_linear, the Cayley transform included) vs the base GEMM it wraps
    Mo, Ko, No, bs = (64, 64, 48, 32) if dry else (6304, 768, 3072, 32)

    def orth():
        x = rnd(Mo, Ko, dtype=half, grad=True)
        w = rnd(No, Ko, scale=Ko ** -0.5, dtype=half)
        b = rnd(No, dtype=half)
        p = rnd(Ko // bs, n_params(bs), scale=0.05, grad=True)
        go = rnd(Mo, No, dtype=half)
        ours, _ = _step(lambda: orthogonal_linear(x, w, p, b, bs), [x, p], go)
        base, _ = _step(lambda: F.linear(x, w, b), [x], go)
        t_ours, t_base = measure(ours, reps, warmup), measure(base, reps, warmup)
        fl = 2 * 2 * Mo * No * Ko
        row("cayley_rotation", f"M={Mo} K={Ko} N={No} b={bs} {str(half)[6:]}", t_ours, t_base, t_ours / t_base, "s",
            flops=fl, flops_peak=peaks.get("flops_half") if half != torch.float32 else peaks.get("flops_fp32"),
            detail="rate: the base GEMM's FLOPs (fwd + dx) over our time")

    guarded("cayley_rotation", orth)
    errors = [f"{r['target']}: {r['error']}" for r in rows if r.get("error") and "CUDA only" not in r["error"]]
    return {"rows": rows, "problems": errors, "reps": reps}


def part_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastvlm.selfcheck")
    p.add_argument("--part", required=True, choices=("environment", "kernels", "targets"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", required=True)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--dtype", default="float32", choices=KERNEL_DTYPES, help="kernels: the dtype to drive")
    a = p.parse_args(argv)
    import torch

    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no CUDA device")
    path = Path(a.out, f"{a.part}-{a.dtype}.json" if a.part == "kernels" else f"{a.part}.json")

    def save(res):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1, default=str))
        tmp.replace(path)

    if a.part == "kernels":
        save(part_kernels(dev, a.dry_run, save, a.dtype))
    else:
        save({"environment": part_environment, "targets": part_targets}[a.part](dev, a.dry_run, save))
    return 0


# ---------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------


def main(args) -> int:
    if not args.dry_run:
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            print("fastvlm selfcheck: torch sees no CUDA device; on a CPU machine run `fastvlm selfcheck --dry-run`",
                  file=sys.stderr)
            return 2
    unknown = [p for p in args.parts + args.force_fail if p not in PARTS]
    if unknown:
        raise ValueError(f"parts must be among {PARTS}, got {unknown}")
    return run_check(args)


def add_parser(sub) -> None:
    p = sub.add_parser("selfcheck", help="verify and measure every kernel on a GPU in minutes (docs/gpu.md)")
    p.add_argument("--device", default="cuda", help="the GPU to check (default cuda)")
    p.add_argument("--dry-run", action="store_true",
                   help="rehearse on CPU: Triton interpreter, tiny shapes, short budgets; GPU targets NOT RUN")
    p.add_argument("--out", default="bench-out/selfcheck", help="folder for summary.md, selfcheck.json, CSVs, PNGs, logs")
    p.add_argument("--parts", nargs="+", default=list(PARTS), help=f"parts to run (default all: {' '.join(PARTS)})")
    p.add_argument("--budget", nargs="*", default=[], metavar="PART=SECONDS", help="override a part's time budget")
    p.add_argument("--total", type=float, default=470.0, help="seconds for the whole check (default 470)")
    p.add_argument("--force-fail", nargs="*", default=[], metavar="PART",
                   help="make these parts fail (to test that a failing part is reported and the rest still runs)")
    p.set_defaults(func=main)


if __name__ == "__main__":
    sys.exit(part_main())
