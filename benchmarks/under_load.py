"""Gradient dropout's CPU stream under load, on its own: the ``load`` case of ``fastvlm bench`` (the case and
what it measures: ``fastvlm/bench/cases_load.py``), printed as the bench prints it.

    python benchmarks/under_load.py [--reps 11] [--tokens 1576]

The same rows come with ``fastvlm bench --ops load`` (table, CSV, JSON, plots).
"""

from __future__ import annotations


def main(argv=None) -> list[dict]:
    import argparse

    import torch

    from fastvlm.bench import cases_load, report, run_case

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=11, help="timed repetitions of each provider")
    p.add_argument("--tokens", type=int, default=cases_load.TOKENS, help="rows of the matmul's inner dimension")
    args = p.parse_args(argv)
    rows = run_case(cases_load.case(tokens=args.tokens), torch.device("cpu"), args.reps)
    print(f"{torch.get_num_threads()} torch threads")
    print("\n".join(report.summary_lines(rows) + report.load_lines(rows)))
    return rows


if __name__ == "__main__":
    main()
