#!/usr/bin/env bash
# The README's main command: set up, then run the QEMU demo (a virtual laptop
# boots a virtual desktop) with visible progress. The steps are the same as
# the molecule scenario extensions/molecule/e2e (lab/e2e.py). Serial logs and the
# timeline go to ${STIEFEL_CACHE_DIR:-.cache}/e2e/.
# --netboot: the no-stick flow instead (molecule scenario netboot): a dracut
# laptop, the desktop boots from its NIC and the pairing code is typed on its
# console by the demo; logs in ${STIEFEL_CACHE_DIR:-.cache}/netboot/.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
flow=() dir=e2e
case "${1:-}" in
    "") ;;
    --netboot) flow=(--laptop-generator dracut --desktop netboot) dir=netboot ;;
    *) echo "usage: $0 [--netboot]" >&2; exit 2 ;;
esac
if [ "$(id -u)" -ne 0 ]; then
    echo "demo: run as root (it builds disk images and starts QEMU on a virtual link)" >&2
    exit 1
fi
bash scripts/bootstrap.sh
export PATH="$here/.venv/bin:$PATH"
step() { echo; echo "=== demo: $1 ($(date +%H:%M:%S))"; .venv/bin/python -m lab.e2e "$1" "${flow[@]}"; }
trap '.venv/bin/python -m lab.e2e destroy "${flow[@]}" >/dev/null 2>&1 || true' EXIT
step destroy
if [ "$dir" = netboot ]; then
    echo "demo: building the virtual dracut laptop (setup_server.yml with laptop_netboot=true); several minutes"
else
    echo "demo: building the virtual laptop (real Debian + setup_server.yml) and the stick (flash_usb.yml); several minutes"
fi
step create
step converge
step verify
echo "demo: done; serial logs and timeline.json in ${STIEFEL_CACHE_DIR:-$here/.cache}/$dir/"
