"""The benchmark harness (fastvlm bench) on a tiny injected case: outputs, ratios and labels. No timing is
asserted: the figures themselves live in the README and the issue notes."""

import csv
import json

import torch

import fastvlm
from fastvlm import bench, cli


def _tiny_cases(device, quick, full):
    from fastvlm.functional import residual_cross_entropy
    from fastvlm.ops.residual import residual_cross_entropy_reference

    def mk(op):
        def setup():
            g = torch.Generator().manual_seed(0)
            f, t = torch.randn(8, 16, generator=g), torch.randn(30, 16, generator=g)
            x = torch.zeros(30, 16).requires_grad_()
            y = torch.randint(0, 30, (8,), generator=g)
            return (lambda: op(f, t, x, y)), [x], None
        return setup

    return [bench.Case("residual_cross_entropy", dict(B=8, K=30, D=16),
                       [bench.Provider("fastvlm", mk(residual_cross_entropy)),
                        bench.Provider("naive", mk(residual_cross_entropy_reference))],
                       baseline="naive", flops=1e6, bytes=1e5, naive_bytes=3e5, size=1)]


def test_bench_writes_table_csv_json_and_plots(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bench.CATALOGUE, "tiny", _tiny_cases)
    assert cli.main(["bench", "--ops", "tiny", "--reps", "2", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "device: CPU" in out and "backend: torch" in out and "naive:" in out
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    metrics = {(r["provider"], r["metric"]) for r in rows}
    for p in ("fastvlm", "naive"):
        for m in ("time_fwd", "time_bwd", "time_fwd+bwd", "peak_mem_fwd+bwd"):
            assert (p, m) in metrics
    assert ("fastvlm", "H100_roofline_bound") in metrics and ("naive", "H100_roofline_bound") in metrics
    assert all(r["torch"] == torch.__version__ and r["device"].startswith("CPU") for r in rows)
    fv = {r["metric"]: r for r in rows if r["provider"] == "fastvlm"}
    nv = {r["metric"]: r for r in rows if r["provider"] == "naive"}
    ratio = float(fv["time_fwd+bwd"]["ratio_to_naive"])
    assert abs(ratio - float(fv["time_fwd+bwd"]["value"]) / float(nv["time_fwd+bwd"]["value"])) < 1e-9
    # roofline: max(bytes / 3.35 TB/s, flops / 989 TFLOP/s)
    assert abs(float(fv["H100_roofline_bound"]["value"]) - max(1e5 / 3.35e12, 1e6 / 989e12)) < 1e-15
    data = json.load(open(tmp_path / "bench.json"))
    assert data["environment"]["backend"] == "torch" and len(data["rows"]) == len(rows)
    # the run says which matmul the torch path used
    from fastvlm import _backend

    want = _backend.cpu_gemm_choice()
    assert data["environment"]["cpu_gemm"] == want and f"backend: torch ({want} matmuls)" in out
    modes = ["torch"] + (["onednn"] if _backend._onednn_op() is not None else [])
    for mode in modes:
        with fastvlm.cpu_gemm(mode):
            assert bench.environment(torch.device("cpu"))["cpu_gemm"] == mode
    assert (tmp_path / "residual_cross_entropy.png").stat().st_size > 1000


def test_unknown_family_is_refused(capsys):
    assert cli.main(["bench", "--ops", "nope", "--no-progress"]) == 2
    assert "ops must be among" in capsys.readouterr().err


def test_cpu_peak_is_the_allocator_peak_above_the_start():
    keep = torch.ones(1 << 18)  # held before the call: not counted
    held = []

    def step():
        a = torch.empty(1 << 20)  # 4 MiB, held to the end
        b = torch.ones(2 << 20)  # 8 MiB transient: the peak is 12 MiB
        del b
        c = torch.ones(1 << 20)  # 4 MiB after b is gone: 8 MiB, below the peak
        held.append((a, c))

    assert bench.peak_memory(step, torch.device("cpu"), reset=held.clear) == 12 << 20
    assert keep.numel() and len(held) == 1
    # reset runs before the measured call: what the previous call left is freed outside the measurement
    assert bench.peak_memory(step, torch.device("cpu"), reset=held.clear) == 12 << 20


def test_each_case_builds_its_own_shape():
    # providers are closures made in a loop: each must bind its own case's inputs, not the last loop's
    for cases_of in (bench.masked_cases, bench.orth_cases):
        cases = [c for c in cases_of(torch.device("cpu"), False, False) if c.kind == "op" and "tokens" in c.shape]
        assert len({(c.shape["N"], c.shape["K"], c.shape["tokens"]) for c in cases}) > 1
        for c in cases:
            for p in c.providers:
                _, params, grad = p.setup()
                assert params[0].shape == (c.shape["tokens"], c.shape["K"]), (c.op, c.shape, p.name)
                assert grad.shape == (c.shape["tokens"], c.shape["N"]), (c.op, c.shape, p.name)
