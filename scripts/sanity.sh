#!/usr/bin/env bash
# Run `ansible-test sanity` on the collection, offline-safe.
#
#   bash scripts/sanity.sh [extra ansible-test sanity options...]
#   e.g. bash scripts/sanity.sh --test pep8 -v
#
# Two facts of this workplace shape this script (design brief, section 6):
#
# 1. ansible-test bootstraps pip in the virtual environments it creates by
#    downloading get-pip-<version>.py from ci-files.testing.ansible.com, which
#    cannot be reached here. It first looks in its cache
#    (~/.ansible/test/cache/get_pip_<version>.py, see
#    ansible_test/_util/target/setup/requirements.py: bootstrap()), so we put
#    a stand-in there that bootstraps pip with `ensurepip` and then installs
#    the pinned pip with the environment's own pip configuration (pip.conf,
#    PIP_* variables: nothing is overridden). The packages themselves come
#    from PyPI, which is reachable.
# 2. ansible-test refuses to run through a symlinked collection path, so we
#    run it on a temporary copy laid out as ansible_collections/stiefel/system
#    (git-tracked files plus untracked, non-ignored ones; never .cache, .venv,
#    collections/), made a git repository so ansible-test sees exactly those
#    files. The copy is removed afterwards, even on failure.
#
# `--venv`: ansible-test makes one virtualenv per sanity test under
# ~/.ansible/test/venv (reused on later runs; the first run needs PyPI and
# takes a few minutes). Always `--python 3.11` (the controller's Python).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

PY_VERSION=3.11
ANSIBLE_TEST="$here/.venv/bin/ansible-test"

log() { printf '[sanity %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

if [ ! -x "$ANSIBLE_TEST" ]; then
    echo "sanity: $ANSIBLE_TEST missing; run: bash scripts/bootstrap.sh" >&2
    exit 1
fi

# Which sanity tests run (ansible-test 2.19 offers 23 for a collection): all
# but pslint (PowerShell lint; the collection has no PowerShell and pwsh is
# not installed, ansible-test would only skip it with a warning), on every
# file of the collection. pylint included: the modules and module_utils, and
# the code that never runs as a module too (stiefel_runtime/, agents/, lab/,
# bin/stiefelctl, bench/, tests/), under ansible-core's collection
# configuration (no `_` as a name, check= on every subprocess.run, ...):
# one style for all the Python here.
#
# tests/sanity/ignore-2.19.txt holds the justified exceptions, each with its
# reason after '#'. ansible-lint's production profile (rule `sanity`) allows
# only a few kinds of entries for plugins/ and roles/ (whole-test `shebang`
# and `shellcheck`, ...): code-specific ignores there (pylint:..., shellcheck:SC...)
# must be fixed in the code or disabled inline instead.
#
# With extra arguments (e.g. --test pep8), one ansible-test run with exactly
# those arguments replaces the default run.
SKIP_TESTS=(pslint)

# ---- 1. the get-pip stand-in in ansible-test's cache -------------------------
pip_version=$("$here/.venv/bin/python" - <<'EOF'
from ansible_test._internal.python_requirements import get_venv_packages
class P:  # get_venv_packages only reads .version
    version = "3.11"
print(get_venv_packages(P())["pip"])
EOF
)
cache_dir="$HOME/.ansible/test/cache"
stand_in="$cache_dir/get_pip_${pip_version//./_}.py"
mkdir -p "$cache_dir"
cat > "$stand_in.tmp" <<'EOF'
"""Offline stand-in for get-pip.py, written by stiefel.system's scripts/sanity.sh.

ansible-test runs this as `python get_pip_X.py [pip options] pip==X
[--no-setuptools] [--no-wheel]` in a fresh virtualenv. Bootstrap pip from the
interpreter's bundled wheel (ensurepip, no network), then let that pip install
the requested packages with the environment's own configuration.
"""
import subprocess
import sys

args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
subprocess.run([sys.executable, "-m", "ensurepip", "--default-pip"], check=True,
               stdout=subprocess.DEVNULL)
subprocess.run([sys.executable, "-m", "pip", "install", *args], check=True)
EOF
mv -f "$stand_in.tmp" "$stand_in"
log "pip bootstrap stand-in: $stand_in (ensurepip + pip $pip_version)"

# ---- 2. the temporary collection copy -----------------------------------------
work=$(mktemp -d /tmp/stf-sanity.XXXXXX)
trap 'rm -rf "$work"' EXIT
dest="$work/ansible_collections/stiefel/system"
mkdir -p "$dest"

# Files: tracked + untracked-but-not-ignored, minus the excluded trees and
# files deleted from the work tree but not yet from the index.
git ls-files -z --cached --others --exclude-standard |
    grep -zvE '^(\.cache|\.venv|collections)(/|$)' |
    while IFS= read -r -d '' f; do
        if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
    done |
    tar -C "$here" --null -T - -cf - | tar -C "$dest" -xf -
nfiles=$(find "$dest" -type f | wc -l)
log "collection copy: $dest ($nfiles files)"

(
    cd "$dest"
    git init -q
    git add -A
    git -c user.name=sanity -c user.email=sanity@localhost commit -q -m snapshot
)

cd "$dest"
run_ansible_test() {
    log "running: ansible-test sanity --python $PY_VERSION --venv $*"
    "$ANSIBLE_TEST" sanity --python "$PY_VERSION" --venv --color no "$@"
}

rc=0
if [ "$#" -gt 0 ]; then
    run_ansible_test "$@" || rc=$?
else
    skip_args=()
    for t in "${SKIP_TESTS[@]}"; do skip_args+=(--skip-test "$t"); done
    log "every test but ${SKIP_TESTS[*]}, on the whole collection"
    run_ansible_test "${skip_args[@]}" || rc=$?
fi
if [ "$rc" -eq 0 ]; then
    log "PASSED"
else
    log "FAILED (ansible-test exit $rc)"
fi
exit "$rc"
