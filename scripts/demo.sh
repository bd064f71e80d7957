#!/usr/bin/env bash
# The README's main command: set up, then run the QEMU demo (a virtual laptop
# boots a virtual desktop) with visible progress. The steps are the same as
# the molecule scenario extensions/molecule/e2e (lab/e2e.py). Serial logs and the
# timeline go to ${STIEFEL_CACHE_DIR:-.cache}/e2e/.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
if [ "$(id -u)" -ne 0 ]; then
    echo "demo: run as root (it builds disk images and starts QEMU on a virtual link)" >&2
    exit 1
fi
bash scripts/bootstrap.sh
export PATH="$here/.venv/bin:$PATH"
step() { echo; echo "=== demo: $1 ($(date +%H:%M:%S))"; .venv/bin/python -m lab.e2e "$@"; }
trap '.venv/bin/python -m lab.e2e destroy >/dev/null 2>&1 || true' EXIT
step destroy
echo "demo: building the virtual laptop (real Debian + setup_server.yml) and the stick (flash_usb.yml); several minutes"
step create
step converge
step verify
echo "demo: done; serial logs and timeline.json in ${STIEFEL_CACHE_DIR:-$here/.cache}/e2e/"
