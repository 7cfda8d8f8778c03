#!/usr/bin/env bash
# Mutation testing of one source module with cosmic-ray (pip install -e '.[mutation]'); see docs/testing.md.
#
#   benchmarks/mutation.sh <module.py> [pytest args...]
#
# e.g. benchmarks/mutation.sh fastvlm/ops/philox.py
#
# cosmic-ray applies one mutant at a time to the module (in place) and runs a test command; a mutant is
# killed when that command fails. So that the working tree is never left mutated (and other work can go on
# in it meanwhile), the run happens in a scratch copy of the tree. Each module maps to the fast subset of
# tests that covers it (default below, or the pytest arguments given): the family's op-template tests and
# the family's test file on the torch path (Triton's interpreter takes minutes per run: the kernels are
# measured separately), plus tests/test_mutants_<module>.py. kernels/<family>.py maps to a small subset of
# the Triton tests, interpreted on CPU (its session and report are named kernels_<family>).
#
# Writes benchmarks/results/mutation/<module>.txt (<module>.after.txt with MUTATION_RESUME=1): the score (killed / total mutants cosmic-ray generated
# and ran, the tool's denominator), then every surviving mutant as a diff. Environment:
#   MUTATION_TIMEOUT  seconds per mutant before it counts as killed by a timeout (default 120)
#   MUTATION_BUDGET   seconds for the whole module; cosmic-ray runs the mutants in random order, so the
#                     mutants run by then are a random sample and the report gives that partial score
#                     (default 1200)
#   MUTATION_RESUME=1 reuse the session kept in .benchmarks/mutation/<module>.sqlite: run the survivors of
#                     that sample again (after new tests: the score after); if the module was edited since
#                     (<module>.sqlite.src), the sample is first carried over to the edited module's same
#                     mutants (benchmarks/mutation_remap.py)
set -euo pipefail
# The whole script is one { ... } block, parsed before any of it runs: bash otherwise reads a script as it
# goes, so an edit of this file during a run (hours) broke the run at its end and lost its session.
{

module=${1:?usage: benchmarks/mutation.sh <module.py> [pytest args...]}
shift
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
[ -x "$py" ] || py=python
name=$(basename "$module" .py)
name=${name#_}
fam=$(basename "$module" .py)
# fastvlm/tuners/ and fastvlm/train/ share basenames with each other and with fastvlm/ops/ (orth.py,
# common.py, taskres.py): their modules are named <package>_<basename> (tuners_orth, train_orth,
# tuners_common, ...), and kernels/<family>.py kernels_<family>, for the case below, the exact-test file
# tests/test_mutants_<name>.py, the report and the session; the other modules keep their basename
# (philox, checks, masked, residual, orth).
case "$module" in
    kernels/*)
        name="kernels_$name"; fam="kernels_$fam" ;;
    fastvlm/tuners/*|fastvlm/train/*)
        name="$(basename "$(dirname "$module")")_$(basename "$module" .py)"; fam=$name ;;
esac

# the fast subset of tests covering each module (pytest arguments, relative to the repository root)
P="-x -q -p no:randomly -p no:cacheprovider"
if [ $# -gt 0 ]; then
    tests="$*"
else
    mine=""
    [ -f "$root/tests/test_mutants_$name.py" ] && mine="tests/test_mutants_$name.py"
    case "$fam" in
        residual)
            tests="$P $mine tests/test_op_template.py tests/test_residual.py -k 'residual and not triton and not compile and not 1001 and not never_holds and not fp16'" ;;
        masked)
            tests="$P $mine tests/test_op_template.py tests/test_masked.py -k '(masked or dropout) and not triton and not compile'" ;;
        orth)
            tests="$P $mine tests/test_op_template.py tests/test_orth.py -k '(cayley or rotat or orth) and not triton and not compile and not peft'" ;;
        philox)  # torch path only: the module has no Triton branch
            tests="$P $mine tests/test_masked.py -k 'philox or (fused_dropout and torch)'" ;;
        kernels_orth)  # Triton's interpreter (conftest sets TRITON_INTERPRET=1 on CPU): tiny shapes only, about
            # 40 s a run on a quiet 2-core machine; the fused and unfused paths with x and params training,
            # the Cayley kernels at b = 2, 3, 16, the rotate kernels both ways at 70 rows
            tests="$P tests/test_kernels_dispatch.py tests/test_orth.py tests/test_mutants_orth.py -k '(dispatch and orth) or (triton and (cayley_matches_reference or block_rotate_matches_dense) and not 64 and not 32 and not 300 and not -2-) or blocks_up_to_64'" ;;
        _checks)  # the argument checks, through the public ops
            tests="$P $mine tests/test_masked.py tests/test_orth.py tests/test_residual.py tests/test_agreement.py -k 'bad_input or refused or non_finite or overflows or is_checked'" ;;
        tuners_common)  # the contract: registry, merge stack, bypass, save/load, names
            tests="$P $mine tests/test_tuner_contract.py -k 'not triton'" ;;
        tuners_mask)  # the mask layers, bypass, the two-pass hand-off, the bit-packed file (torch path)
            tests="$P $mine tests/test_mask_tuner.py tests/test_tuner_contract.py -k '(mask or gradient_dropout) and not triton and not training_lowers and not cli'" ;;
        tuners_lora)
            tests="$P $mine tests/test_pvp.py tests/test_tuner_contract.py -k 'lora and not stage1 and not triton'" ;;
        tuners_taskres)
            tests="$P $mine tests/test_tuner_contract.py tests/test_taskres_pipeline.py -k 'taskres and not cli and not eval_rebuilds and not end_to_end'" ;;
        train_common)  # the loop, checkpointer, schedule, step-time summary
            tests="$P $mine tests/test_tuner_loop.py tests/test_tuner_contract.py -k '(train_common or taskres or rmt or step_time or progress or loop_state) and not orth and not pvp'" ;;  # -k also filters tests/test_mutants_train_common.py: its module name is in the expression
        train_rmt)
            tests="$P $mine tests/test_mask_tuner.py tests/test_tuner_loop.py -k '(two_pass or pass_two or rmt) and not triton and not hf_ and not timm'" ;;  # the open_clip ViT (fused) and ResNet (unfused) cover both step paths
        train_taskres)
            tests="$P $mine tests/test_tuner_loop.py tests/test_taskres_pipeline.py -k '(taskres or recipe_defaults or checkpoint_errors) and not cli and not eval_rebuilds and not end_to_end'" ;;
        *)
            echo "no test subset mapped for $module: pass pytest arguments" >&2; exit 2 ;;
    esac
fi

out_dir="$root/benchmarks/results/mutation"
mkdir -p "$out_dir"
work=$(mktemp -d "${TMPDIR:-/tmp}/fastvlm-mutation.XXXXXX")
trap 'rm -rf "$work"' EXIT
# the tracked files plus the untracked, not ignored ones (new tests), never the venv or build outputs
(cd "$root" && git ls-files -co --exclude-standard -z) | (cd "$root" && xargs -0 cp --parents -t "$work" 2>/dev/null || true)
cd "$work"
# kernels/ is imported as fastvlm.kernels through the editable install's mapping, which points at the
# working tree's kernels/, never the scratch copy's: a link inside the copy's fastvlm/ is found first
# (the editable finder comes after the path finder), so the mutated kernels are the ones imported
case "$module" in kernels/*) ln -s ../kernels fastvlm/kernels ;; esac
git init -q . && git add -A >/dev/null && git -c user.email=m@m -c user.name=m commit -qm base  # cosmic-ray's baseline

cat > cr.toml <<EOF
[cosmic-ray]
module-path = "$module"
timeout = ${MUTATION_TIMEOUT:-120}
excluded-modules = []
test-command = "env OMP_NUM_THREADS=1 PYTHONPATH=$work $py -m pytest $tests"

[cosmic-ray.distributor]
name = "local"
EOF

crbin=$(dirname "$py")
echo "module $module; tests: $tests"
# the unmutated module must pass its subset, or every mutant would count as killed
eval "env OMP_NUM_THREADS=1 PYTHONPATH=$work $py -m pytest $tests" > baseline.log 2>&1 || {
    tail -20 baseline.log; echo "baseline failed: fix the tests first" >&2; exit 1; }
session_dir="$root/.benchmarks/mutation"
mkdir -p "$session_dir"
session="$session_dir/$name.sqlite"
suffix=""
if [ "${MUTATION_RESUME:-0}" = 1 ] && [ -f "$session" ]; then
    cp "$session" session.sqlite
    suffix=.after
    # the module edited since the sample was drawn (a fix): carry the sample over to the same mutants of
    # the edited module (cosmic-ray names a mutant by occurrence, which an edit shifts)
    if [ -f "$session.src" ] && ! cmp -s "$session.src" "$module"; then
        "$crbin/cosmic-ray" init cr.toml fresh.sqlite
        mkdir -p "old/$(dirname "$module")" && cp "$session.src" "old/$module"
        (cd old && "$crbin/cosmic-ray" init ../cr.toml ../old.sqlite)
        "$py" "$root/benchmarks/mutation_remap.py" session.sqlite "$session.src" old.sqlite fresh.sqlite "$module"
    fi
    # the same sample as the first run: its survivors run again, the mutants it never reached stay out
    "$py" -c "
import sqlite3; c = sqlite3.connect('session.sqlite')
import os
if not os.path.exists('$session.total'):
    open('$session.total', 'w').write(str(c.execute('SELECT COUNT(*) FROM work_items').fetchone()[0]))
ran = 'SELECT job_id FROM work_results'
c.execute(f'DELETE FROM mutation_specs WHERE job_id NOT IN ({ran})')
c.execute(f'DELETE FROM work_items WHERE job_id NOT IN ({ran})')
c.execute(\"DELETE FROM work_results WHERE test_outcome = 'SURVIVED'\")
c.commit()"
else
    "$crbin/cosmic-ray" init cr.toml session.sqlite
    rm -f "$session.total"
fi
cp "$module" "$session_dir/$name.src.tmp"  # the source the session's mutants are numbered against
start=$(date +%s)
timeout "${MUTATION_BUDGET:-1200}" "$crbin/cosmic-ray" exec cr.toml session.sqlite || true
secs=$(( $(date +%s) - start ))
git checkout -q -- "$module"  # a budget stop may leave the last mutant applied
cp session.sqlite "$session"
mv "$session_dir/$name.src.tmp" "$session.src"
"$py" "$root/benchmarks/mutation_report.py" session.sqlite "$module" "$tests" "$secs" "$session.total" > "$out_dir/$name$suffix.txt"
head -5 "$out_dir/$name$suffix.txt"
exit
}
