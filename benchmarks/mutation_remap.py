"""Carry a cosmic-ray session's sample over to an edited module (run by benchmarks/mutation.sh on a resume).

cosmic-ray applies a mutant by operator and *occurrence* (the n-th place the operator applies in the
module), not by position: once the module is edited (a bug fixed between the run before and the run after),
an old occurrence number names another place, and the resumed run would test other mutants than the ones
sampled. This maps each sampled mutant to the same mutant of the edited module: its lines are followed
through a line diff of the two sources (difflib), and it is matched to the spec of a fresh ``cosmic-ray init``
of the edited module with the same operator, arguments and (moved) position (and rank among the mutants at
that position, from a fresh init of the old source). A mutant whose lines were
edited has no counterpart: it is dropped from the sample (with its result) and listed on stdout.

    python mutation_remap.py session.sqlite old_source.py old_fresh.sqlite fresh.sqlite module/path.py
"""

import difflib
import sqlite3
import sys
from pathlib import Path


def line_map(old_lines, new_lines):
    """{old line number: new line number} (1-based) for the lines the edit left alone."""
    m = {}
    for tag, i1, i2, j1, _ in difflib.SequenceMatcher(None, old_lines, new_lines, autojunk=False).get_opcodes():
        if tag == "equal":
            for k in range(i2 - i1):
                m[i1 + k + 1] = j1 + k + 1
    return m


def main(session, old_source, old_fresh, fresh, module):
    old = Path(old_source).read_text().splitlines()
    new = Path(module).read_text().splitlines()
    if old == new:
        return
    lm = line_map(old, new)
    c = sqlite3.connect(session)
    f = sqlite3.connect(fresh)
    o = sqlite3.connect(old_fresh)
    cols = "operator_name, operator_args, start_pos_row, start_pos_col, end_pos_row, end_pos_col"
    # one place can hold several mutants of an operator (NumberReplacer's n+1 and n-1): the k-th of them
    # by occurrence in the old module's full numbering (old_fresh: the session itself may hold only its
    # sample) is the k-th in the new one
    def groups(db):
        g, rank = {}, {}
        for op, args, sr, sc, er, ec, occ in db.execute(f"SELECT {cols}, occurrence FROM mutation_specs ORDER BY occurrence"):
            k = (op, args, sr, sc, er, ec)
            rank[(op, occ)] = len(g.setdefault(k, []))
            g[k].append(occ)
        return g, rank

    fresh_specs, _ = groups(f)
    _, rank = groups(o)
    moved = dropped = 0
    rows = c.execute(f"SELECT job_id, {cols}, occurrence FROM mutation_specs").fetchall()
    for job, op, args, sr, sc, er, ec, occ in rows:
        key = (op, args, lm.get(sr), sc, lm.get(er), ec)
        same = fresh_specs.get(key, []) if None not in (key[2], key[4]) else []
        k = rank.get((op, occ), len(same))
        new_occ = same[k] if k < len(same) else None
        if new_occ is None:
            print(f"dropped from the sample, its lines were edited: {module}:{sr} {op} #{occ}")
            for table in ("work_results", "mutation_specs", "work_items"):
                c.execute(f"DELETE FROM {table} WHERE job_id = ?", (job,))
            dropped += 1
            continue
        if (key[2], new_occ) != (sr, occ):
            moved += 1
        c.execute("UPDATE mutation_specs SET occurrence = ?, start_pos_row = ?, end_pos_row = ? WHERE job_id = ?",
                  (new_occ, key[2], key[4], job))
    c.commit()
    print(f"remapped the sample to the edited {module}: {len(rows) - dropped} kept ({moved} at a new line or "
          f"occurrence), {dropped} dropped")


if __name__ == "__main__":
    main(*sys.argv[1:6])
