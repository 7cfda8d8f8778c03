"""TaskRes ops: fused residual logits / cross-entropy against the naive torch composition."""

import pytest

from .conftest import case_params, run_provider

PARAMS, IDS = case_params("residual")


@pytest.mark.parametrize("case,provider", PARAMS, ids=IDS)
def test_residual(benchmark, case, provider):
    benchmark.group = f"{case.op} {case.shape}"
    benchmark.pedantic(run_provider(case, provider), rounds=3, warmup_rounds=1)
