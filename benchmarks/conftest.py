"""pytest-benchmark suites over the same cases as `fastvlm bench` (fastvlm/bench.py). Run:

    pytest benchmarks/ --benchmark-only

They time forward+backward per provider; ratios and peak memory come from `fastvlm bench`. No test here
asserts a timing."""

import torch


def case_params(family, quick=True):
    from fastvlm.bench import CATALOGUE

    cases = CATALOGUE[family](torch.device("cpu"), quick, False)
    return [(c, p) for c in cases for p in c.providers], [f"{c.op}-{c.shape}-{p.name}".replace(" ", "")
                                                          for c in cases for p in c.providers]


def run_provider(case, provider):
    """The callable one benchmark round runs: a whole step for step cases, else forward + backward."""
    if case.kind == "step":
        return provider.setup()
    fwd, params, grad = provider.setup()

    def step():
        for p in params:
            p.grad = None
        fwd().backward(grad)

    return step
