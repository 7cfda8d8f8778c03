"""``fastvlm bench``: every op and tuner step against its baselines; a short summary on stdout, the full
table, CSV, JSON and plots in a folder (docs/benchmarks.md says what every column means).

- ``harness``: round-robin timing, the allocator's peak memory, ratios to baselines, the compiled-naive
  provider (``torch.compile`` of the naive composition).
- ``cases_residual``, ``cases_masked``, ``cases_orth``, ``cases_tuners``: one module per op family, each
  with its cases and their byte/FLOP models; ``CATALOGUE`` maps the family names to them.
- ``cases_load``: gradient dropout's CPU stream and a matmul, alone and beside a busy process it starts.
- ``sweeps``: how time and peak memory grow with classes, tokens, width and batch, with fitted slopes.
- ``projection``: the H100 roofline projection (a model, never a measurement).
- ``report``: summary, table, files, plots.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Callable

import torch

from . import cases_load, cases_masked, cases_orth, cases_residual, cases_tuners, report, sweeps
from .harness import COMPILED, Case, Provider, add_ratios, peak_memory, run_case, settle_malloc
from .sweeps import SWEEPS

_FAMILIES = (cases_residual, cases_masked, cases_orth, cases_tuners, cases_load)
#: op family name -> function(device, quick, full) -> cases
CATALOGUE: dict[str, Callable] = {m.FAMILY: m.cases for m in _FAMILIES}
#: op family name -> the ops its cases time
OPS: dict[str, tuple] = {m.FAMILY: m.OPS for m in _FAMILIES}
OUT = "bench-out"

__all__ = ["CATALOGUE", "OPS", "SWEEPS", "COMPILED", "Case", "Provider", "add_ratios", "peak_memory", "run_case",
           "select", "run", "add_arguments", "main"]


def select(ops: list[str] | None, sweep_names: list[str] | None, device, quick: bool, full: bool,
           compile: bool = True) -> list[Case]:
    """The cases to run. ``ops``: family names or op names (default: all). ``sweep_names``: run only these
    sweeps; otherwise ``full`` adds every sweep of the selected families. ``compile=False`` drops the
    compiled-naive providers (nothing is compiled then)."""
    ops = list(ops or [])
    known = set(CATALOGUE) | {o for f in OPS.values() for o in f}
    unknown = [o for o in ops if o not in known]
    if unknown:
        raise ValueError(f"ops must be among the families {sorted(CATALOGUE)} or the ops "
                         f"{sorted(known - set(CATALOGUE))}, got {unknown}")
    bad = [s for s in sweep_names or [] if s not in SWEEPS]
    if bad:
        raise ValueError(f"sweep must be among {sorted(SWEEPS)}, got {bad}")
    families = [f for f in CATALOGUE if not ops or f in ops or any(o in OPS.get(f, ()) for o in ops)]
    only_ops = {o for o in ops if o not in CATALOGUE}
    whole = {f for f in ops if f in CATALOGUE}

    def wanted(c: Case, family: str) -> bool:
        return not ops or family in whole or c.op in only_ops

    cases = []
    if sweep_names:
        for s in sweep_names:
            cases += sweeps.build(s, device)
    else:
        for f in families:
            cases += [c for c in CATALOGUE[f](device, quick, full) if wanted(c, f)]
        if full:
            for s in SWEEPS.values():
                if s.family in families:
                    cases += [c for c in sweeps.build(s.name, device) if wanted(c, s.family)]
    if not compile:
        for c in cases:
            c.providers = [p for p in c.providers if p.name != COMPILED]
            c.baseline = tuple(b for b in c.baselines if b != COMPILED)
    return cases


def run(ops: list[str] | None = None, quick: bool = True, full: bool = False, out: str = OUT,
        device: str | None = None, reps: int | None = None, progress: bool = True, sweep: list[str] | None = None,
        compile: bool = True, file=None) -> list[dict]:
    """Run the selected cases, print the summary (and the sweeps' slopes), write the files; the rows."""
    from tqdm.auto import tqdm

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if reps is not None and reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    reps = reps or (3 if quick and not full else 7)
    settle_malloc()
    cases = select(ops, sweep, dev, quick, full, compile)
    env = report.environment(dev)
    rows = []
    for case in tqdm(cases, desc="fastvlm bench", disable=not progress):
        rows += run_case(case, dev, reps)
    rows += sweeps.slope_rows(rows)
    lines = (report.header_lines(env) + report.summary_lines(rows) + report.load_lines(rows)
             + report.slope_lines(rows))
    paths = report.write_outputs(rows, env, out)
    lines.append(f"full table, CSV, JSON and plots: {out}/ ({', '.join(p.rsplit('/', 1)[-1] for p in paths[:3])}"
                 f" and {len(paths) - 3} plots)")
    print("\n".join(lines), file=file)
    return rows


def _epilog() -> str:
    fams = "\n".join(f"  {f:9} {', '.join(o)}" for f, o in OPS.items())
    sw = "\n".join(f"  {s.name:17} ({s.family})" for s in SWEEPS.values())
    files = textwrap.fill(f"writes to --out (default {OUT}/): bench.csv, bench.json, table.txt (the full table) and "
                          f"one plot per op and sweep. docs/benchmarks.md explains every column.", 78)
    return (f"op families and their ops (--ops takes either):\n{fams}\n\nsweeps (--sweep; all of them with --full):\n"
            f"{sw}\n\n{files}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``fastvlm bench`` options on ``p`` (the CLI's subparser)."""
    p.description = textwrap.fill("Time every op against the naive composition, its torch.compile'd form and the "
                                  "peers a user would pick; print one line per op and shape, write the full table "
                                  "and plots.", 78)
    p.epilog = _epilog()
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="a few real CLIP shapes, minutes on a 2-core CPU (default)")
    g.add_argument("--full", action="store_true", help="every shape, then every sweep of the chosen families")
    p.add_argument("--ops", nargs="+", default=None, metavar="NAME",
                   help="families or ops to run (default all; listed below)")
    p.add_argument("--sweep", nargs="+", default=None, metavar="NAME",
                   help="run only these scaling sweeps (listed below)")
    p.add_argument("--out", default=OUT, help=f"folder for the table, CSV, JSON and plots (default {OUT}/)")
    p.add_argument("--no-compile", action="store_true",
                   help="leave out the torch.compile'd naive composition (saves its compile time)")
    p.add_argument("--device", default=None, help="cpu or cuda (default cuda when available)")
    p.add_argument("--reps", type=int, default=None, help="timed runs per metric (default 3 quick, 7 full)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    """``fastvlm bench``: run what ``args`` selects; 0 on success."""
    run(args.ops, quick=not args.full, full=args.full, out=args.out, device=args.device, reps=args.reps,
        progress=not args.no_progress, sweep=args.sweep, compile=not args.no_compile)
    return 0
