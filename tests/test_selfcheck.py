"""fastvlm selfcheck: the GPU check rehearsed on CPU (--dry-run), and its parsing and verdicts on hand-made
inputs. The dry run forces one part to fail and gives the bench a budget it cannot meet: the report must say
so, and every other part must still have run."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastvlm import selfcheck


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("selfcheck")
    env = {k: v for k, v in os.environ.items() if k not in ("FASTVLM_BACKEND", "TRITON_INTERPRET")}
    # budgets far above the ~40 CPU-seconds the parts need, so that a loaded machine cannot time them out;
    # only the bench gets one it cannot meet
    budgets = ["kernels=600", "optests=600", "targets=600", "bench=4"]
    p = subprocess.run([sys.executable, "-m", "fastvlm.cli", "selfcheck", "--dry-run", "--out", str(out),
                        "--force-fail", "environment", "--budget", *budgets, "--total", "2000"],
                       env=env, capture_output=True, text=True, timeout=2100)
    return p, out, json.loads((out / "selfcheck.json").read_text()), (out / "summary.md").read_text()


def test_dry_run_reports_every_part_and_the_forced_failure(dry_run):
    p, out, report, summary = dry_run
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]  # a part failed: the check fails
    parts = report["parts"]
    assert list(parts) == list(selfcheck.PARTS)
    assert parts["environment"]["status"] == "failed" and "forced failure" in parts["environment"]["note"]
    assert parts["bench"]["status"] == "timeout"  # 4 s: not enough to import torch and run a case
    for name in ("kernels", "optests", "targets"):  # ran after the failure
        assert parts[name]["status"] == "ok", (name, parts[name])
    for name in selfcheck.PARTS:
        assert f"| {name} | {parts[name]['status'].upper()} |" in summary


def test_dry_run_targets_are_not_run_but_measured(dry_run):
    _, out, report, summary = dry_run
    lines = {t["target"]: t for t in report["targets"]}
    assert set(lines) == set(selfcheck.TARGETS)
    assert all(t["verdict"] == "NOT RUN" for t in lines.values())
    for key in ("masked_linear", "grad_dropout", "residual_ce_time", "cayley_rotation"):
        assert lines[key]["value"] > 0 and "dry run" in lines[key]["detail"]  # timed on CPU, the rehearsal
    assert "CUDA only" in lines["residual_ce_memory"]["detail"]
    assert summary.count("- NOT RUN: ") == len(selfcheck.TARGETS)
    assert "PASS" not in summary and "- FAIL" not in summary
    assert (out / "targets.csv").exists()


def test_dry_run_runs_kernels_and_op_tests(dry_run):
    _, out, report, summary = dry_run
    k = report["parts"]["kernels"]
    # fp32, blocks padded to 16 and 32, the default (composition) paths: every such launch is among the
    # compiled variants (the fused masked/orth kernels are driven on a GPU only, under FASTVLM_FUSED)
    assert k["variants_launched"] >= 20 and k["unlisted"] == [] and k["problems"] == []
    rows = (out / "kernels.csv").read_text().splitlines()
    assert len(rows) == k["variants"] + 1
    o = report["parts"]["optests"]
    assert o["counts"] == {"passed": 3}, o
    assert "totals: passed 3" in summary and (out / "optests.csv").exists()


def test_parse_pytest_counts_per_file_and_dtype_even_when_cut_short():
    text = """
tests/test_masked.py::test_a[triton-fp32-True] PASSED                [ 10%]
tests/test_masked.py::test_a[triton-bf16-True] SKIPPED (bf16 ...)     [ 20%]
tests/test_orth.py::test_b[fp16-lead0-40-16-2] FAILED               [ 30%]
tests/test_orth.py::test_c[torch] PASSED                             [ 40%]
tests/test_orth.py::test_c[torch] ERROR                              [ 40%]
tests/test_residual.py::test_d[triton-fp16-1-1-100] PASS"""  # cut short mid-line
    res = selfcheck.parse_pytest(text + "\nFAILED tests/test_orth.py::test_b[fp16-lead0-40-16-2] - AssertionError: x\n")
    assert res["counts"] == {"passed": 1, "skipped": 1, "failed": 1, "error": 1}
    assert res["by_file_dtype"] == {"tests/test_masked.py fp32": {"passed": 1}, "tests/test_masked.py bf16": {"skipped": 1},
                                    "tests/test_orth.py fp16": {"failed": 1}, "tests/test_orth.py other": {"error": 1}}
    assert res["failures"] == ["tests/test_orth.py::test_b[fp16-lead0-40-16-2] - AssertionError: x"]


def test_bench_rates_are_set_against_the_device_peak(tmp_path):
    (tmp_path / "bench").mkdir()
    rows = [dict(op="residual_cross_entropy", shape="B=256", provider="fastvlm", metric="achieved_GB/s", value=1675.0,
                 unit="GB/s"),
            dict(op="residual_cross_entropy", shape="B=256", provider="fastvlm", metric="achieved_GFLOP/s",
                 value=98900.0, unit="GFLOP/s"),
            dict(op="residual_cross_entropy", shape="B=256", provider="naive", metric="peak_mem_fwd+bwd", value=2e9,
                 unit="B"),
            dict(op="residual_cross_entropy", shape="B=256", provider="naive", metric="time_fwd", value=1e-3, unit="s")]
    (tmp_path / "bench" / "bench.json").write_text(json.dumps({"environment": {"device": "NVIDIA H100 80GB HBM3"},
                                                               "rows": rows}))
    res = selfcheck.parse_bench(tmp_path / "bench")
    by = {r["metric"]: r for r in res["rates"]}
    assert set(by) == {"achieved_GB/s", "achieved_GFLOP/s", "peak_mem_fwd+bwd"}  # timings are not rates
    assert by["achieved_GB/s"]["fraction_of_peak"] == pytest.approx(0.5)  # 1675 GB/s of 3.35 TB/s
    assert by["achieved_GFLOP/s"]["fraction_of_peak"] == pytest.approx(0.1)  # 98.9 of 989 TFLOP/s
    assert (tmp_path / "bench_rates.csv").exists()
    (tmp_path / "bench" / "bench.json").write_text(json.dumps({"something": "else"}))
    assert "not in the expected form" in selfcheck.parse_bench(tmp_path / "bench")["note"]


def test_device_peaks_take_the_most_specific_name():
    assert selfcheck.device_peaks("NVIDIA H100 PCIe")["bytes_per_s"] == 2.0e12
    assert selfcheck.device_peaks("NVIDIA H100 80GB HBM3")["bytes_per_s"] == 3.35e12
    assert selfcheck.device_peaks("NVIDIA H200")["bytes_per_s"] == 4.8e12
    assert selfcheck.device_peaks("Tesla V100") is None


def test_target_verdicts_on_a_gpu():
    def row(target, value, device_type="cuda"):
        return {"target": target, "value": value, "device_type": device_type}

    rows = [row("masked_linear", 1.05), row("residual_ce_time", 2.5), row("residual_ce_memory", 0.2),
            row("cayley_rotation", 1.2), {"target": "grad_dropout", "value": None, "error": "RuntimeError: boom"}]
    lines = {t["target"]: t["verdict"] for t in
             selfcheck._target_lines({"dry_run": False, "parts": {"targets": {"rows": rows, "status": "ok"}}})}
    assert lines == {"masked_linear": "PASS", "residual_ce_time": "FAIL", "residual_ce_memory": "PASS",
                     "cayley_rotation": "FAIL", "grad_dropout": "NOT RUN"}
    cpu = [row("masked_linear", 1.0, "cpu")]
    (first, *_) = selfcheck._target_lines({"dry_run": False, "parts": {"targets": {"rows": cpu, "status": "ok"}}})
    assert first["verdict"] == "NOT RUN"  # a CPU figure never passes a GPU target


def test_launches_are_matched_to_variants_with_their_pointer_dtypes():
    from fastvlm import aot

    variants = aot.all_variants()
    _, v = next((f, v) for f, v in variants if v.name == "grad_dropout_kernel" and
                   v.ptrs.get("ga_ptr") == torch.float16)
    kw = {**v.constexprs, **v.options}
    launches = [("grad_dropout_kernel", kw, {"ga_ptr": torch.float16, "gb_ptr": torch.float16,
                                             "out_ptr": torch.float16}, 0.5),
                ("grad_dropout_kernel", kw, {"ga_ptr": torch.float16, "gb_ptr": torch.float32,
                                             "out_ptr": torch.float16}, 0.1),
                ("grad_dropout_kernel", {**kw, "BLOCK": 7}, {}, 0.1)]
    hits, unlisted, ptr_only = selfcheck._match(variants, launches)
    i = next(i for i, (_, w) in enumerate(variants) if w is v)
    assert hits[i] == [0.5] and sum(len(h) for h in hits.values()) == 1
    assert len(ptr_only) == 1 and "gb_ptr:float32" in ptr_only[0]
    assert len(unlisted) == 1 and "BLOCK=7" in unlisted[0]


def test_kernel_reports_of_the_dtype_processes_merge(tmp_path):
    def rows(launched, first):
        return [{"kernel": "k", "config": c, "dtypes": d, "launched": n, "first_launch_s": t}
                for c, d, n, t in zip(("a", "b", "c"), ("float32", "float16", "bfloat16"), launched, first)]

    for name, launched, first in (("float32", (2, 0, 0), (0.5, None, None)), ("float16", (1, 3, 0), (0.2, 0.7, None))):
        (tmp_path / f"kernels-{name}.json").write_text(json.dumps({
            "rows": rows(launched, first), "launches": sum(launched), "dtypes": [name], "unlisted": [f"u {name}"],
            "pointer_dtype_differs": [], "problems": [f"p {name}"], "ops_completed": 4}))
    (tmp_path / "kernels-bfloat16.json").write_text('{"rows": [')  # cut short while writing: ignored
    m = selfcheck._merge_kernels(sorted(tmp_path.glob("kernels-*.json")))
    assert [r["launched"] for r in m["rows"]] == [3, 3, 0]
    assert [r["first_launch_s"] for r in m["rows"]] == [0.2, 0.7, None]
    assert m["variants_launched"] == 2 and m["launches"] == 6 and m["not_launched_by_dtype"] == {"bfloat16": 1}
    assert m["unlisted"] == ["u float16", "u float32"] and len(m["problems"]) == 2
