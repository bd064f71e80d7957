#!/usr/bin/env bash
# THE test command of stiefel.system (README: `bash scripts/test.sh`).
#
#   bash scripts/test.sh                  # everything, in this order:
#   bash scripts/test.sh unit lint        # a subset (always in this order)
#   bash scripts/test.sh --keep-going ... # do not stop at the first failure
#
# Stages (scripts/bootstrap.sh always runs first; it is quick when nothing is
# missing):
#   unit         pytest tests/unit (xdist -n 2); "no tests collected" fails
#   doc          ansible-doc renders every module in plugins/modules/
#   lint         scripts/lint.sh: ansible-lint, production profile
#   sanity       scripts/sanity.sh: ansible-test sanity --python 3.11, offline
#   cache        scripts/warm-cache.sh: the ramdisk and the three laptop roots the
#                later stages share, built side by side (quick when cached)
#   integration  pytest -m integration tests/integration (root; builds images,
#                boots QEMU: minutes; two xdist workers, a file each, unless
#                STIEFEL_INTEGRATION_SERIAL=1); "no tests collected" fails once
#                any integration test file exists
#   molecule     `molecule test -s <name>` for every extensions/molecule/<name>/molecule.yml
#
# Runs as root on a clean Debian 12 machine (CI: CI=true, no stdin). Stops at
# the first failing stage (non-zero exit, one line naming the stage), then
# prints a table of stage times and, last, "N passed, M failed" summed over
# the pytest stages.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here" || exit 1

ALL_STAGES=(unit doc lint sanity cache integration molecule)

usage() {
    echo "usage: bash scripts/test.sh [--keep-going] [stage...]   stages: ${ALL_STAGES[*]} (default: all)" >&2
    exit 2
}

keep_going=0
if [ "${1:-}" = "--keep-going" ]; then
    # developer aid: run every selected stage even after a failure
    keep_going=1
    shift
fi
selected=()
if [ "$#" -eq 0 ]; then
    selected=("${ALL_STAGES[@]}")
else
    for want in "$@"; do
        case " ${ALL_STAGES[*]} " in
            *" $want "*) ;;
            *) echo "test.sh: unknown stage '$want'" >&2; usage ;;
        esac
    done
    for s in "${ALL_STAGES[@]}"; do
        for want in "$@"; do
            if [ "$s" = "$want" ]; then selected+=("$s"); break; fi
        done
    done
fi

results_dir=$(mktemp -d /tmp/stf-test.XXXXXX)
trap 'rm -rf "$results_dir"' EXIT

export PATH="$here/.venv/bin:$PATH"
export PYTHONDONTWRITEBYTECODE=1
# Plain text in logs (CI, redirected output): no ANSI colours from molecule,
# ansible, rich.
if [ ! -t 1 ]; then
    export NO_COLOR=1 PY_COLORS=0 ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0
fi

total_passed=0
total_failed=0
summary_rows=()
stage_note=""

header() {
    printf '\n========================================================================\n'
    printf '== %s  (%s)\n' "$1" "$(date +%H:%M:%S)"
    printf '========================================================================\n'
}

# Add the counts from a pytest junit XML file to the totals; sets stage_note.
count_junit() {
    local xml=$1 counts
    [ -s "$xml" ] || return 0
    counts=$("$here/.venv/bin/python" - "$xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
t = f = e = s = 0
for suite in suites:
    t += int(suite.get("tests", 0)); f += int(suite.get("failures", 0))
    e += int(suite.get("errors", 0)); s += int(suite.get("skipped", 0))
print(t - f - e - s, f + e, s)
EOF
    ) || return 0
    local p m k
    read -r p m k <<<"$counts"
    total_passed=$((total_passed + p))
    total_failed=$((total_failed + m))
    stage_note="$p passed, $m failed, $k skipped"
}

# ---- stages: each returns 0 (pass), 1 (fail) or 3 (nothing to do) ------------

stage_bootstrap() {
    bash scripts/bootstrap.sh
}

stage_unit() {
    local xml="$results_dir/unit.xml" rc xdist=()
    if [ ! -d tests/unit ]; then
        echo "unit: tests/unit does not exist"
        return 1
    fi
    if "$here/.venv/bin/python" -c 'import xdist' 2>/dev/null; then
        xdist=(-n 2)
    fi
    "$here/.venv/bin/python" -m pytest "${xdist[@]}" --junitxml="$xml" tests/unit
    rc=$?
    count_junit "$xml"
    if [ "$rc" -eq 5 ]; then
        echo "unit: pytest collected no tests: that is a failure"
        return 1
    fi
    [ "$rc" -eq 0 ] || return 1
}

stage_doc() {
    local mods=() m name out bad=0
    for m in plugins/modules/*.py; do
        [ -e "$m" ] || continue
        name=$(basename "$m" .py)
        [ "$name" = "__init__" ] && continue
        mods+=("$name")
    done
    if [ "${#mods[@]}" -eq 0 ]; then
        echo "doc: no modules in plugins/modules/ yet"
        stage_note="no modules"
        return 3
    fi
    for name in "${mods[@]}"; do
        # ansible-doc exits 0 even for an unknown module, so check the JSON
        # has a doc block, then that the text rendering works and is clean.
        if ! out=$(ansible-doc --json "stiefel.system.$name" 2>&1) ||
            ! printf '%s' "$out" | "$here/.venv/bin/python" -c '
import json, sys
data = json.load(sys.stdin)
entry = data.get(sys.argv[1]) or {}
sys.exit(0 if entry.get("doc") and "examples" in entry and "return" in entry else 1)
' "stiefel.system.$name" 2>/dev/null; then
            echo "doc: FAIL stiefel.system.$name (no DOCUMENTATION/EXAMPLES/RETURN found by ansible-doc --json)"
            printf '%s\n' "$out" | tail -20
            bad=$((bad + 1))
            continue
        fi
        if ! out=$(ansible-doc "stiefel.system.$name" 2>&1) ||
            printf '%s' "$out" | grep -qE '^\[WARNING\]|^ERROR|^\[ERROR\]'; then
            echo "doc: FAIL stiefel.system.$name (text rendering)"
            printf '%s\n' "$out" | tail -20
            bad=$((bad + 1))
            continue
        fi
        echo "doc: ok   stiefel.system.$name ($(printf '%s\n' "$out" | wc -l) lines)"
    done
    stage_note="${#mods[@]} modules, $bad failed"
    [ "$bad" -eq 0 ] || return 1
}

stage_lint() {
    bash scripts/lint.sh
}

stage_sanity() {
    bash scripts/sanity.sh
}

stage_cache() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "cache: not root; the tests build what they need (or skip) on their own"
        stage_note="not root"
        return 3
    fi
    bash scripts/warm-cache.sh
}

stage_integration() {
    local files xml="$results_dir/integration.xml" rc
    files=$(find tests/integration -type f \( -name 'test_*.py' -o -name '*_test.py' \) 2>/dev/null | wc -l)
    if [ "$files" -eq 0 ]; then
        echo "integration: no integration test files under tests/integration yet"
        stage_note="no test files"
        return 3
    fi
    # A test under tests/integration without the marker would never run here
    # (and not in the unit stage either): refuse that instead of hiding it.
    local unmarked
    unmarked=$("$here/.venv/bin/python" -m pytest --collect-only -q -p no:cacheprovider \
        -m "not integration" tests/integration 2>/dev/null | grep '::' || true)
    if [ -n "$unmarked" ]; then
        echo "integration: these tests lack @pytest.mark.integration (they would never run):"
        printf '%s\n' "$unmarked"
        return 1
    fi
    if [ "$(id -u)" -ne 0 ]; then
        echo "integration: WARNING: not root; tests that need root will be skipped"
    fi
    # Two workers, a whole test file each: most files keep one core busy (one
    # TCG VM, or mmdebstrap) and left the other idle. -rA prints what each test
    # printed (its stages and timings) in the summary, since xdist workers have
    # no terminal; STIEFEL_INTEGRATION_SERIAL=1 runs one file after the other
    # with the output as it happens (-s).
    local par=(-s)
    if [ "${STIEFEL_INTEGRATION_SERIAL:-0}" != 1 ] && "$here/.venv/bin/python" -c 'import xdist' 2>/dev/null; then
        par=(-n 2 --dist loadfile -rA)
    fi
    # --durations: the slowest tests, for keeping the whole run under an hour
    "$here/.venv/bin/python" -m pytest -m integration "${par[@]}" -v --durations=40 --junitxml="$xml" tests/integration
    rc=$?
    count_junit "$xml"
    if [ "$rc" -eq 5 ]; then
        echo "integration: $files test file(s) but pytest collected no integration tests: that is a failure"
        return 1
    fi
    [ "$rc" -eq 0 ] || return 1
}

stage_molecule() {
    local scenarios=() d name bad=0
    for d in extensions/molecule/*/; do
        [ -f "${d}molecule.yml" ] || continue
        name=$(basename "$d")
        scenarios+=("$name")
    done
    if [ "${#scenarios[@]}" -eq 0 ]; then
        echo "molecule: no scenarios (extensions/molecule/<name>/molecule.yml) yet"
        stage_note="no scenarios"
        return 3
    fi
    for name in "${scenarios[@]}"; do
        printf -- '--- molecule test -s %s\n' "$name"
        if ! molecule test -s "$name"; then
            echo "molecule: scenario $name FAILED"
            bad=$((bad + 1))
            break
        fi
    done
    stage_note="${#scenarios[@]} scenario(s): ${scenarios[*]}"
    [ "$bad" -eq 0 ] || return 1
}

# ---- driver -----------------------------------------------------------------

print_summary() {
    printf '\n%-12s %-6s %9s  %s\n' STAGE RESULT SECONDS NOTES
    printf '%s\n' "${summary_rows[@]}"
    printf '%-12s %-6s %9s\n' total "" "$(awk -v a="$start_all" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')"
}

start_all=$EPOCHREALTIME
failed_stage=""
for stage in bootstrap "${selected[@]}"; do
    header "stage: $stage"
    stage_note=""
    t0=$EPOCHREALTIME
    "stage_$stage" </dev/null
    rc=$?
    secs=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    case "$rc" in
        0) result=PASS ;;
        3) result=NONE ;;
        *) result=FAIL ;;
    esac
    summary_rows+=("$(printf '%-12s %-6s %9s  %s' "$stage" "$result" "$secs" "$stage_note")")
    printf '== %s: %s in %ss %s\n' "$stage" "$result" "$secs" "${stage_note:+($stage_note)}"
    if [ "$result" = FAIL ]; then
        failed_stage="${failed_stage:+$failed_stage, }$stage"
        [ "$keep_going" -eq 1 ] || break
    fi
done

print_summary
if [ -n "$failed_stage" ]; then
    if [ "$keep_going" -eq 1 ]; then
        echo "test.sh: FAILED stage(s): $failed_stage"
    else
        echo "test.sh: FAILED at stage '$failed_stage' (later stages not run)"
    fi
    echo "$total_passed passed, $total_failed failed"
    exit 1
fi
echo "test.sh: all selected stages passed (${selected[*]})"
echo "$total_passed passed, $total_failed failed"
