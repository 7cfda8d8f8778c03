"""The benchmark harness (fastvlm bench): ratios, peaks, every family's cases at tiny shapes, the summary,
the files, the compiled-naive provider, the sweeps' slope fit and the H100 projection. No timing is
asserted: measured figures live in docs/performance.md."""

import csv
import json
import logging
import os
import re
import time

import pytest
import torch

import fastvlm
from fastvlm import bench, cli
from fastvlm.ops import philox
from fastvlm.bench import (cases_load, cases_masked, cases_orth, cases_residual, cases_tuners, harness, projection,
                           report, sweeps)

CPU = torch.device("cpu")
NO_COMPILE = ("fastvlm", "naive")


def _tiny_cases(device, quick, full):
    return [cases_residual.case("residual_cross_entropy", 8, 30, 16, device, providers=NO_COMPILE)]


# ---------------------------------------------------------------------------------------------------------
# harness
# ---------------------------------------------------------------------------------------------------------


def test_ratios_divide_by_each_baseline_of_the_same_metric():
    rows = [dict(provider=p, metric=m, value=v, source="measured")
            for p, m, v in [("fastvlm", "time_fwd", 2.0), ("naive", "time_fwd", 8.0), ("compiled", "time_fwd", 4.0),
                            ("fastvlm", "peak_mem_fwd+bwd", 30.0), ("naive", "peak_mem_fwd+bwd", 120.0),
                            ("compiled", "peak_mem_fwd+bwd", 0.0)]]
    rows.append(dict(provider="fastvlm", metric="time_fwd", value=1.0, source="projection"))
    harness.add_ratios(rows, ("naive", "compiled"))
    fv_t, nv_t, cp_t, fv_m, nv_m, cp_m, proj = rows
    assert fv_t["ratio_to_naive"] == 0.25 and fv_t["ratio_to_compiled"] == 0.5
    assert cp_t["ratio_to_naive"] == 0.5 and nv_t["ratio_to_compiled"] == 2.0
    assert fv_m["ratio_to_naive"] == 0.25
    assert "ratio_to_compiled" not in fv_m  # the baseline's 0 gives no ratio
    assert not any(k.startswith("ratio_to_") for k in proj)  # projections are never divided by measurements
    assert "ratio_to_naive" not in nv_t


def test_allocation_peak_of_hand_made_events():
    # (time, running total after the event, bytes of the event); 100 held before the first event
    events = [(3, 160, -40), (1, 150, 50), (2, 200, 50), (4, 180, 20)]
    assert harness.allocation_peak(events) == 100  # peak 200 above the start 100
    assert harness.allocation_peak([]) == 0
    assert harness.allocation_peak([(1, 50, -50)]) == 0  # a free alone never goes above the start


def test_cpu_peak_is_the_allocator_peak_above_the_start():
    keep = torch.ones(1 << 18)  # held before the call: not counted
    held = []

    def step():
        a = torch.empty(1 << 20)  # 4 MiB, held to the end
        b = torch.ones(2 << 20)  # 8 MiB transient: the peak is 12 MiB
        del b
        c = torch.ones(1 << 20)  # 4 MiB after b is gone: 8 MiB, below the peak
        held.append((a, c))

    assert bench.peak_memory(step, CPU, reset=held.clear) == 12 << 20
    assert keep.numel() and len(held) == 1
    # reset runs before the measured call: what the previous call left is freed outside the measurement
    assert bench.peak_memory(step, CPU, reset=held.clear) == 12 << 20


def test_time_it_runs_prepare_outside_the_clock():
    import time

    calls = []

    def fn():
        calls.append("fn")

    fn.prepare = lambda: (calls.append("prep"), time.sleep(0.05))
    ts = harness.time_it(fn, CPU, reps=2, warmup=1)
    assert calls == ["prep", "fn"] * 3
    assert max(ts) < 0.04  # the 50 ms of prepare is not in any timing


# ---------------------------------------------------------------------------------------------------------
# every family at a tiny size
# ---------------------------------------------------------------------------------------------------------


def _tiny_family_cases():
    return [
        cases_residual.case("residual_cross_entropy", 8, 30, 16, CPU, providers=NO_COMPILE),
        cases_residual.case("residual_logits", 8, 30, 16, CPU, providers=NO_COMPILE),
        cases_masked.linear_case(10, 12, 8, CPU, providers=("fastvlm", "naive", "nn.Linear")),
        cases_masked.gdr_case(10, 12, 8, CPU, providers=NO_COMPILE),
        cases_masked.rmt_step_case("fastvlm-tiny-vit", 2, CPU),
        cases_orth.linear_case(10, 32, 12, 16, CPU, providers=("fastvlm", "naive-dense", "peft-exact")),
        cases_orth.cayley_case(2, 16, CPU, providers=("fastvlm", "naive-solve")),
        cases_tuners.step_case("fastvlm-tiny-vit", 2, CPU),
        cases_tuners.step_case("fastvlm-tiny-vit", 2, CPU, tuners=cases_tuners.RECOMPUTE, op="tuner_step_recompute"),
        cases_tuners.hf_step_case("fastvlm-tiny-vit", 2, CPU),
        cases_load.case(64, 32, 16, settle=0.0, min_reps=1),
    ]


@pytest.fixture(scope="module")
def tiny_rows():
    cases = _tiny_family_cases()
    return cases, {c.op: bench.run_case(c, CPU, reps=1) for c in cases}


def test_every_family_builds_and_runs_at_a_tiny_size(tiny_rows):
    cases, rows = tiny_rows
    families = {cases_residual.FAMILY: cases_residual.OPS, cases_masked.FAMILY: cases_masked.OPS,
                cases_orth.FAMILY: cases_orth.OPS, cases_tuners.FAMILY: cases_tuners.OPS,
                cases_load.FAMILY: cases_load.OPS}
    assert {c.op for c in cases} == {o for ops in families.values() for o in ops} == set(rows)
    assert bench.OPS == families
    for c in cases:
        rs = rows[c.op]
        metrics = ("time_step", "peak_mem_step") if c.kind == "step" else (
            "time_fwd", "time_bwd", "time_fwd+bwd", "peak_mem_fwd+bwd")
        for p in c.providers:
            for m in metrics:
                r = next(r for r in rs if r["provider"] == p.name and r["metric"] == m)
                assert r["value"] > 0 and r["source"] == "measured", (c.op, p.name, m)
                if p.name not in c.baselines:
                    assert all(f"ratio_to_{b}" in r for b in c.baselines), (c.op, p.name, m)
    tuner = rows["tuner_step"]
    counts = {r["provider"]: r["value"] for r in tuner if r["metric"] == "trainable_params"}
    assert set(counts) == set(cases_tuners.TUNERS) and all(v > 0 for v in counts.values())
    # LoRA r=8 on the attention of 2 blocks of width 64: open_clip's packed QKV [192, 64] takes A [8, 64] +
    # B [192, 8], its output [64, 64] 2 x 8 x 64; transformers' separate q, k, v and output 4 x 2 x 8 x 64
    hf = {r["provider"]: r["value"] for r in rows["tuner_step_hf"] if r["metric"] == "trainable_params"}
    assert hf == {"lora": 2 * (8 * 64 + 192 * 8 + 2 * 8 * 64), "hf_lora": 2 * 4 * 2 * 8 * 64}


def test_summary_is_one_line_per_op_and_shape_within_100_columns(tiny_rows):
    cases, rows = tiny_rows
    flat = [r for rs in rows.values() for r in rs]
    lines = report.summary_lines(flat)
    assert all(len(line) <= report.WIDTH for line in lines), max(lines, key=len)
    # per op: a title, a column header, one line per shape (one shape each here)
    assert len(lines) == 3 * len(cases)
    i = lines.index(next(line for line in lines if line.startswith("tuner_step")))
    assert all(t in lines[i + 1] for t in cases_tuners.TUNERS)  # one column per tuner, ratio to frozen
    ce = lines[lines.index(next(line for line in lines if line.startswith("residual_cross_entropy"))) + 2]
    r = {(x["provider"], x["metric"]): x for x in rows["residual_cross_entropy"]}
    want = f"{r[('fastvlm', 'time_fwd+bwd')]['ratio_to_naive']:.2f}/{r[('fastvlm', 'peak_mem_fwd+bwd')]['ratio_to_naive']:.2f}"
    assert ce.split()[-1] == want and ce.lstrip().startswith("B=8 K=30 D=16")


def test_summary_flags_a_noisy_ratio():
    rows = [dict(op="op", shape="s=1", provider=p, metric=m, value=v, spread=sp, source="measured")
            for p, m, v, sp in [("fastvlm", "time_fwd+bwd", 1.0, 0.6), ("naive", "time_fwd+bwd", 2.0, 0.1),
                                ("fastvlm", "peak_mem_fwd+bwd", 1.0, 0.0), ("naive", "peak_mem_fwd+bwd", 4.0, 0.0)]]
    harness.add_ratios(rows, ("naive",))
    lines = report.summary_lines(rows)
    assert lines[2].split()[-1] == "0.50~/0.25" and lines[3].startswith("~: a timing's spread")
    rows[0]["spread"] = 0.4
    assert report.summary_lines(rows)[2].split()[-1] == "0.50/0.25" and len(report.summary_lines(rows)) == 3


def test_each_case_builds_its_own_shape():
    # providers are closures made in a loop: each must bind its own case's inputs, not the last loop's
    for cases_of in (cases_masked.cases, cases_orth.cases):
        cases = [c for c in cases_of(CPU, False, False) if c.kind == "op" and "tokens" in c.shape]
        assert len({(c.shape["N"], c.shape["K"], c.shape["tokens"]) for c in cases}) > 1
        for c in cases:
            for p in c.providers:
                if p.name == bench.COMPILED:
                    continue  # compiles in its setup; it shares the naive provider's inputs
                _, params, grad = p.setup()
                assert params[0].shape == (c.shape["tokens"], c.shape["K"]), (c.op, c.shape, p.name)
                assert grad.shape == (c.shape["tokens"], c.shape["N"]), (c.op, c.shape, p.name)


# ---------------------------------------------------------------------------------------------------------
# the load case: a busy process of its own
# ---------------------------------------------------------------------------------------------------------


def _cpu_ticks(pid):
    """utime + stime of ``pid`` in clock ticks, from /proc/<pid>/stat (fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads the busy process's CPU time from /proc")
def test_busy_process_spins_only_while_loaded_and_is_reaped():
    with pytest.raises(RuntimeError, match="boom"):
        with cases_load.BusyProcess(settle=0.0) as busy:
            pid = busy.proc.pid
            time.sleep(0.2)
            stopped = _cpu_ticks(pid)
            time.sleep(0.3)
            assert _cpu_ticks(pid) == stopped  # stopped: no CPU at all
            busy.load(True)
            deadline = time.monotonic() + 10.0  # a loaded machine gives it less than a core: wait for 50 ms of CPU
            while _cpu_ticks(pid) - stopped < 5 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _cpu_ticks(pid) - stopped >= 5
            busy.load(False)
            raise RuntimeError("boom")  # a failing timing still ends it
    with pytest.raises(ProcessLookupError):  # ended and reaped: the pid is gone
        os.kill(pid, 0)


def test_load_case_derives_each_slowdown_and_the_ratio_to_the_torch_ops(tiny_rows):
    _, rows = tiny_rows
    rs = rows["grad_dropout_load"]
    t = {r["provider"]: r["value"] for r in rs if r["metric"] == "time_step"}
    peak = {r["provider"]: r["value"] for r in rs if r["metric"] == "peak_mem_step"}
    assert set(t) == {f"{p}{s}" for p in ("fastvlm", "torch-ops", "matmul") for s in ("", "@load")}
    slow = {r["provider"]: r for r in rs if r["metric"] == cases_load.SLOWDOWN}
    assert set(slow) == {"fastvlm", "torch-ops", "matmul"}
    for p, r in slow.items():
        assert r["value"] == pytest.approx(t[p + "@load"] / t[p]) and r["source"] == "derived"
    fv = next(r for r in rs if r["provider"] == "fastvlm" and r["metric"] == "time_step")
    assert fv["ratio_to_torch-ops"] == pytest.approx(t["fastvlm"] / t["torch-ops"])
    if philox.stream_implementation() == "c":
        # the C pass allocates its output alone (64 x 32 fp32); the torch ops hold int64 words per chunk
        assert peak["fastvlm"] == 64 * 32 * 4 < peak["torch-ops"]
    lines = report.load_lines([r for op_rows in rows.values() for r in op_rows])
    assert lines[0].startswith("grad_dropout_load N=64 K=32 tokens=16") and len(lines) == 4
    assert all(re.search(r"alone .+ loaded .+ slowdown [\d.]+x$", line) for line in lines[1:]), lines
    before = os.environ.get("FASTVLM_PHILOX")
    with cases_load.philox_implementation("torch"):  # how the torch-ops provider forces the old path
        assert philox.stream_implementation() == "torch"
    assert os.environ.get("FASTVLM_PHILOX") == before


# ---------------------------------------------------------------------------------------------------------
# the compiled naive composition
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: cases_residual.case("residual_cross_entropy", 4, 12, 8, CPU, providers=("naive", bench.COMPILED)),
    lambda: cases_masked.linear_case(6, 10, 8, CPU, providers=("naive", bench.COMPILED)),
], ids=["residual_cross_entropy", "masked_linear"])
def test_compiled_provider_agrees_with_the_naive_one(make):
    case = make()
    naive, comp = case.providers
    results = []
    for prov in (naive, comp):
        fwd, params, grad = prov.setup()
        out = fwd()
        out.backward(grad)
        results.append((out.detach(), [p.grad.clone() for p in params]))
    assert comp.compile_s is not None and comp.compile_s > 0
    (o1, g1), (o2, g2) = results
    torch.testing.assert_close(o2, o1, rtol=1e-4, atol=1e-5)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_no_compile_drops_the_compiled_provider_and_its_baseline():
    cases = bench.select(["residual_logits"], None, CPU, quick=True, full=False, compile=False)
    assert cases and all(c.op == "residual_logits" for c in cases)
    assert all(bench.COMPILED not in [p.name for p in c.providers] and c.baselines == ("naive",) for c in cases)
    with_compile = bench.select(["residual_logits"], None, CPU, quick=True, full=False)
    assert all(c.baselines == ("naive", bench.COMPILED) for c in with_compile)


# ---------------------------------------------------------------------------------------------------------
# sweeps
# ---------------------------------------------------------------------------------------------------------


def test_fit_line_recovers_a_known_line():
    xs = [1, 2, 4, 8]
    slope, icpt = sweeps.fit_line(xs, [3e-6 * x + 0.5 for x in xs])
    assert slope == pytest.approx(3e-6) and icpt == pytest.approx(0.5)
    # symmetric noise around y = 2x + 1 at x = 0, 1, 2 leaves the line: residuals +1, -2, +1
    slope, icpt = sweeps.fit_line([0, 1, 2], [2, 1, 6])
    assert slope == pytest.approx(2.0) and icpt == pytest.approx(1.0)
    with pytest.raises(ValueError, match="two distinct xs"):
        sweeps.fit_line([3, 3], [1, 2])


def test_slope_rows_fit_each_provider_of_a_sweep():
    rows = [dict(op="op", shape="", provider=p, metric="time_fwd+bwd", value=a * x + 1.0, source="measured",
                 sweep="masked_tokens", size=x) for p, a in (("fastvlm", 2.0), ("naive", 5.0)) for x in (1, 2, 3)]
    fits = {r["provider"]: r for r in sweeps.slope_rows(rows)}
    assert fits["fastvlm"]["value"] == pytest.approx(2.0) and fits["naive"]["value"] == pytest.approx(5.0)
    assert fits["naive"]["intercept"] == pytest.approx(1.0) and fits["naive"]["unit"] == "s per token"
    assert all(r["source"] == "fit" for r in fits.values())


def test_residual_sweep_leaves_out_the_naive_shapes_that_do_not_fit(monkeypatch):
    est = cases_residual.naive_peak_estimate(256, 1000, 768)
    monkeypatch.setattr(sweeps, "available_bytes", lambda: 2.5 * est)  # half of it: K=1000 fits, 2000 not
    cases = sweeps.build("residual_classes", CPU, points=[1000, 2000])
    assert [[p.name for p in c.providers] for c in cases] == [["fastvlm", "naive"], ["fastvlm"]]
    assert [c.size for c in cases] == [1000, 2000] and all(c.extra["sweep"] == "residual_classes" for c in cases)


def test_sweep_runs_from_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweeps.SWEEPS["masked_tokens"], "points", [4, 16])
    monkeypatch.setattr(sweeps.SWEEPS["masked_tokens"], "build",
                        lambda device, points: sweeps._masked_tokens(device, points, N=12, K=8))
    assert cli.main(["bench", "--sweep", "masked_tokens", "--reps", "1", "--out", str(tmp_path),
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "sweep masked_tokens: least-squares line" in out and "/token" in out
    rows = json.load(open(tmp_path / "bench.json"))["rows"]
    assert {r["size"] for r in rows if r["source"] == "measured"} == {4, 16}
    fits = [r for r in rows if r["source"] == "fit"]
    assert {r["provider"] for r in fits} == {"fastvlm", "naive", "nn.Linear"}
    assert (tmp_path / "sweep_masked_tokens.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------------------------------
# the projection
# ---------------------------------------------------------------------------------------------------------


def test_roofline_uses_the_peak_of_the_dtype_that_runs():
    # 2 GFLOP and 1 MB: compute-bound at every peak; fp32 IEEE 67 TFLOP/s, tf32 495, bf16 989
    assert projection.roofline(2e9, 1e6, "fp32") == pytest.approx(2e9 / 67e12)
    assert projection.roofline(2e9, 1e6, "tf32") == pytest.approx(2e9 / 495e12)
    assert projection.roofline(2e9, 1e6, "bf16") == pytest.approx(2e9 / 989e12)
    assert projection.roofline(1e6, 1e9, "fp32") == pytest.approx(1e9 / 3.35e12)  # memory-bound
    with pytest.raises(ValueError, match="peak must be one of"):
        projection.roofline(1, 1, "fp64")
    assert projection.fused_peak(torch.float32) == "fp32" and projection.fused_peak(torch.bfloat16) == "bf16"
    assert projection.composition_peak(torch.float32, "highest") == "fp32"
    assert projection.composition_peak(torch.float32, "high") == "tf32"
    assert projection.composition_peak(torch.float16, "highest") == "fp16"


def test_the_projection_of_modelled_ops_is_the_kernel_cost_model(monkeypatch):
    """orthogonal_linear at M = N = K = b = 32 (fp32, IEEE): the GPU path as it dispatches, the rotate kernel
    then a GEMM forward; a GEMM (dxr), the rotate kernel (dx) and the block gram (dR) backward. Each kernel is
    one tile (no re-reads), 2 * 32^3 FLOPs, plus 3 us of launch; bytes by hand."""
    import torch

    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert projection.model_dtype(torch.float32) == "fp32" and projection.model_dtype(torch.bfloat16) == "bf16"
    assert projection.model_dtype(torch.float32, "high") == "tf32"
    rotate, gemm, gram = 2 * 1024 * 4, 3 * 1024 * 4, 3 * 1024 * 4  # x in + out; A, B, C; x, dxr in, dR out
    kernels = [rotate, gemm, gemm, rotate, gram]
    case = cases_orth.linear_case(32, 32, 32, 32, CPU, providers=("fastvlm",))
    rows = {r["provider"]: r for r in harness.projection_rows(case)}
    fv = rows["fastvlm"]
    assert fv["flops"] == 5 * 2 * 32**3 and fv["compulsory_bytes"] == sum(kernels) == 53_248
    assert fv["launches"] == 5 and fv["peak"] == "fp32" and fv["source"] == "projection"
    assert fv["value"] == pytest.approx(sum(max(2 * 32**3 / 67e12, b / 3.35e12) + 3e-6 for b in kernels))
    assert case.flops == fv["flops"] and case.bytes == fv["compulsory_bytes"]  # one count for both
    assert rows["naive"]["launches"] == 6  # the dense R, x R, the linear; dxr, dx, the dense dR
    # the residual cross-entropy's rows are fastvlm.aot's, summed over forward and backward
    from fastvlm import aot

    ce = cases_residual.case("residual_cross_entropy", 8, 30, 16, CPU, providers=("fastvlm",))
    want = (aot.residual_ce_costs(8, 30, 16, "fp32")["fused"]
            + aot.residual_ce_backward_costs(8, 30, 16, "fp32", train_features=False, train_base=False)["fused"])
    got = {r["provider"]: r for r in harness.projection_rows(ce)}["fastvlm"]
    # forward: class tiles + combine; backward, one class chunk: G + the folded norm backward (d residual)
    assert got["value"] == pytest.approx(want.time_s) and got["launches"] == 2 + 2


# ---------------------------------------------------------------------------------------------------------
# the command line and the files
# ---------------------------------------------------------------------------------------------------------


def test_bench_prints_a_summary_and_writes_table_csv_json_and_plots(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bench.CATALOGUE, "tiny", _tiny_cases)
    assert cli.main(["bench", "--ops", "tiny", "--reps", "2", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "device: CPU" in out and "backend: torch" in out
    assert "residual_cross_entropy: fastvlm's time/peak over each baseline's" in out
    summary = [line for line in out.splitlines() if not line.startswith("full table, CSV")]  # names --out
    assert all(len(line) <= report.WIDTH for line in summary), max(summary, key=len)
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    for col in ("op", "shape", "provider", "metric", "value", "unit", "source", "spread", "min", "max",
                "ratio_to_naive", "device", "torch", "backend", "cpu_gemm"):
        assert col in rows[0], col
    metrics = {(r["provider"], r["metric"]) for r in rows}
    for p in ("fastvlm", "naive"):
        for m in ("time_fwd", "time_bwd", "time_fwd+bwd", "peak_mem_fwd+bwd"):
            assert (p, m) in metrics
    proj = [r for r in rows if r["metric"] == "H100_projected_s"]
    assert {r["provider"] for r in proj} == {"fastvlm", "naive"} and all(r["source"] == "projection" for r in proj)
    assert all(r["torch"] == torch.__version__ and r["device"].startswith("CPU") for r in rows)
    fv = {r["metric"]: r for r in rows if r["provider"] == "fastvlm"}
    nv = {r["metric"]: r for r in rows if r["provider"] == "naive"}
    ratio = float(fv["time_fwd+bwd"]["ratio_to_naive"])
    assert abs(ratio - float(fv["time_fwd+bwd"]["value"]) / float(nv["time_fwd+bwd"]["value"])) < 1e-9
    assert float(fv["time_fwd+bwd"]["min"]) <= float(fv["time_fwd+bwd"]["value"]) <= float(fv["time_fwd+bwd"]["max"])
    data = json.load(open(tmp_path / "bench.json"))
    assert data["environment"]["backend"] == "torch" and len(data["rows"]) == len(rows)
    from fastvlm import _backend

    want = _backend.cpu_gemm_choice()
    assert data["environment"]["cpu_gemm"] == want and f"backend: torch ({want} matmuls)" in out
    modes = ["torch"] + (["onednn"] if _backend._onednn_op() is not None else [])
    for mode in modes:
        with fastvlm.cpu_gemm(mode):
            assert report.environment(CPU)["cpu_gemm"] == mode
    assert "H100_projected_s" in (tmp_path / "table.txt").read_text()
    assert (tmp_path / "residual_cross_entropy.png").stat().st_size > 1000


def test_unknown_family_is_refused(capsys):
    assert cli.main(["bench", "--ops", "nope", "--no-progress"]) == 2
    assert "ops must be among" in capsys.readouterr().err


def test_help_lists_the_ops_sweeps_and_output_folder(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    for name in [o for ops in bench.OPS.values() for o in ops] + list(sweeps.SWEEPS) + ["bench-out/"]:
        assert name in out, name


def test_log_axis_where_values_span_ten_times():
    assert report.wants_log([1.0, 10.0]) and not report.wants_log([1.0, 9.9]) and not report.wants_log([5.0])


def test_random_weights_warning_is_printed_once(caplog, monkeypatch):
    """One filter (fastvlm.models') lets open_clip's random-weights warning through once per process,
    however many times the bench installs it; other records pass."""
    from fastvlm import models

    harness.warn_random_weights_once()
    harness.warn_random_weights_once()  # a second install changes nothing
    once = [f for f in logging.getLogger().filters if isinstance(f, models._OnceFilter)]
    assert len(once) == 1
    monkeypatch.setattr(models._OnceFilter, "seen", False)  # as in a fresh process (another test may have built a model)
    msg = f"{models.RANDOM_WEIGHTS} for model 'x'. Model initialized randomly."
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            logging.warning(msg)
        logging.warning("something else")
    texts = [r.getMessage() for r in caplog.records]
    assert texts.count(msg) == 1 and "something else" in texts
    assert models._OnceFilter.seen


def test_cayley_torch_path_peaks_no_higher_than_the_compiled_composition():
    """The peer a user would compile (the solve-based reference under torch.compile) sets the memory bar: the
    exact Cayley transform's forward and backward on the torch path hold no more bytes at their peak (an
    identity tensor built for I - Q and (R + I) / 2 once made it b x b over)."""
    case = cases_orth.cayley_case(6, 32, CPU, providers=("fastvlm", bench.COMPILED))
    peaks = {}
    for prov in case.providers:
        fwd, params, grad = prov.setup()

        def step():
            for p in params:
                p.grad = None
            fwd().backward(grad)

        step()
        # the least of three: the same call's peak can only be raised by something else allocating then
        peaks[prov.name] = min(harness.peak_memory(step, CPU) for _ in range(3))
    assert peaks["fastvlm"] <= peaks[bench.COMPILED], peaks
