"""pytest-benchmark over the same cases as ``fastvlm bench --quick`` (fastvlm/bench/), one test per case
and provider. Run:

    pytest benchmarks/ --benchmark-only

Each round times forward+backward (or the whole step) through the bench's own harness; ratios, peak memory
and the H100 projection come from ``fastvlm bench``. No test here asserts a timing."""

import contextlib

import pytest
import torch

from fastvlm.bench import CATALOGUE, harness

CASES = [c for family in CATALOGUE.values() for c in family(torch.device("cpu"), True, False)]
PARAMS = [(c, p) for c in CASES for p in c.providers]
IDS = [f"{c.op}-{harness.shape_text(c.shape)}-{p.name}".replace(" ", ",") for c, p in PARAMS]


@pytest.mark.parametrize("case,provider", PARAMS, ids=IDS)
def test_case(benchmark, case, provider):
    with (case.around or contextlib.nullcontext)():  # the load case's busy process
        calls = harness.callables(case, provider)
        benchmark.group = f"{case.op} {harness.shape_text(case.shape)}"
        fn = calls["step" if case.kind == "step" else "fwd+bwd"]
        benchmark.pedantic(fn, setup=getattr(fn, "prepare", None), rounds=3, warmup_rounds=1)
