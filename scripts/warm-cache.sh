#!/usr/bin/env bash
# Build the roots and images the integration tests and molecule scenarios share,
# side by side, before they run (scripts/test.sh stage "cache"):
#
#   ramdisk                  playbooks/build_image.yml        $CACHE/ramdisk/
#   laptop-root              lab/laptop_disk.py root          $CACHE/laptop-root/
#   bookworm-dracut          molecule laptop build-root.sh    $CACHE/laptop/  (netboot scenario, test_nbd_root_tls)
#   bookworm-initramfs-tools molecule laptop build-root.sh    $CACHE/laptop/  (laptop_initramfs_tools, test_nbd_root_tls)
#
# Each builder keeps its own cache key and returns at once when its output is
# there; the tests would build the same on first use, one after the other.
# Built together, mmdebstrap's downloads of one overlap the other's dpkg runs
# on the second core. CACHE is $STIEFEL_CACHE_DIR, default .cache/ in the
# checkout. Each build logs to $CACHE/logs/warm-<name>.log; a failed one prints
# the end of its log and makes this script fail.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here" || exit 1
cache=${STIEFEL_CACHE_DIR:-$here/.cache}
logs=$cache/logs
mkdir -p "$logs"
py=$here/.venv/bin/python
[ -x "$py" ] || py=python3

declare -A pids started
launch() {
    local name=$1
    shift
    started[$name]=$EPOCHREALTIME
    "$@" > "$logs/warm-$name.log" 2>&1 < /dev/null &
    pids[$name]=$!
    echo "warm-cache: $name started (pid ${pids[$name]}, log $logs/warm-$name.log)"
}

launch ramdisk "$here/.venv/bin/ansible-playbook" playbooks/build_image.yml
launch laptop-root env PYTHONPATH="$here" "$py" -m lab.laptop_disk root --workdir "$cache/laptop-root"
for flavour in dracut initramfs-tools; do
    launch "bookworm-$flavour" bash extensions/molecule/laptop_initramfs_tools/build-root.sh \
        "$flavour" "$cache/laptop/bookworm-$flavour.tar.zst"
done

declare -A names
for name in "${!pids[@]}"; do names[${pids[$name]}]=$name; done
bad=0
while [ "${#names[@]}" -gt 0 ]; do
    # wait -n -p (bash 5.1): the builds report in the order they finish
    wait -n -p done_pid "${!names[@]}"
    rc=$?
    name=${names[$done_pid]}
    unset "names[$done_pid]"
    secs=$(awk -v a="${started[$name]}" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }')
    if [ "$rc" -eq 0 ]; then
        echo "warm-cache: $name ready after ${secs}s"
    else
        echo "warm-cache: $name FAILED (rc $rc) after ${secs}s; the end of $logs/warm-$name.log:"
        tail -25 "$logs/warm-$name.log"
        bad=$((bad + 1))
    fi
done
[ "$bad" -eq 0 ]
