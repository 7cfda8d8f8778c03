"""`fastvlm bench` family 'masked' as pytest-benchmark suites (same cases, same setup code)."""

import pytest

from .conftest import case_params, run_provider

PARAMS, IDS = case_params("masked")


@pytest.mark.parametrize("case,provider", PARAMS, ids=IDS)
def test_masked(benchmark, case, provider):
    benchmark.group = f"{case.op} {case.shape}"
    benchmark.pedantic(run_provider(case, provider), rounds=3, warmup_rounds=1)
