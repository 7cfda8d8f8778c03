"""The report of one cosmic-ray session (run by benchmarks/mutation.sh): the score and the surviving mutants.

Score = killed / (mutants run), the denominator being every mutant cosmic-ray generated for the module and
ran (a timeout or a crash counts as killed, as cosmic-ray counts it); mutants listed as equivalent in
benchmarks/mutation_equivalent.txt are left out of both and listed apart. Mutants still pending (a run
stopped by its time budget) are counted and the score is then partial.
"""

import sys
from fnmatch import fnmatchcase
from pathlib import Path

from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import TestOutcome

EQUIVALENT = Path(__file__).with_name("mutation_equivalent.txt")


def equivalent_keys(module):
    """[((line, operator pattern, occurrence pattern), reason)] for ``module`` from the equivalent-mutant list,
    whose lines read ``module:line:operator:occurrence  reason``; operator and occurrence may be fnmatch
    patterns (``core/ReplaceBinaryOperator_BitOr_*``, ``*``)."""
    keys = []
    if EQUIVALENT.exists():
        for raw in EQUIVALENT.read_text().splitlines():
            if not raw.strip() or raw.startswith("#"):
                continue
            spec, _, reason = raw.partition(" ")
            mod, line, op, occ = spec.split(":")
            if mod == module:
                keys.append(((int(line), op, occ), reason.strip()))
    return keys


def equivalent(eq, line, op, occ):
    for (l, o, c), why in eq:
        if l == line and fnmatchcase(op, o) and fnmatchcase(str(occ), c):
            return why
    return None


def main(db_path, module, tests, seconds, total_file=None):
    eq = equivalent_keys(module)
    with use_db(db_path, WorkDB.Mode.open) as db:
        done = db.completed_work_items
        pending = len(db.pending_work_items)
    killed, survived, excluded = [], [], []
    for item, result in done:
        m = item.mutations[0]
        why = equivalent(eq, m.start_pos[0], m.operator_name, m.occurrence)
        if why is not None:
            excluded.append((m, result, why))
        elif result.test_outcome == TestOutcome.SURVIVED:
            survived.append((m, result))
        else:
            killed.append((m, result))
    total = len(killed) + len(survived)
    if total_file and Path(total_file).exists():  # a rerun of a sample: the mutants the sample left out
        pending = int(Path(total_file).read_text()) - len(done)
    pct = 100.0 * len(killed) / total if total else float("nan")
    partial = f", PARTIAL: {pending} mutants not run within the budget" if pending else ""
    print(f"module: {module}")
    print(f"score: {len(killed)} killed / {total} mutants run = {pct:.1f}%{partial}")
    print(f"denominator: every mutant cosmic-ray generated and ran ({len(done)} run, {len(excluded)} of them "
          f"excluded as equivalent; a timeout counts as killed)")
    print(f"tests: {tests}")
    print(f"wall time: {seconds} s")
    print(f"\n# surviving mutants ({len(survived)})")
    for m, r in sorted(survived, key=lambda mr: (mr[0].start_pos, mr[0].operator_name, mr[0].occurrence)):
        print(f"\n## {m.module_path}:{m.start_pos[0]} {m.operator_name} #{m.occurrence}")
        print(r.diff or "")
    print(f"\n# excluded as equivalent ({len(excluded)})")
    for m, r, why in excluded:
        print(f"- {m.module_path}:{m.start_pos[0]} {m.operator_name} #{m.occurrence}: {why}")


if __name__ == "__main__":
    main(*sys.argv[1:6])
