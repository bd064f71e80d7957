#!/usr/bin/env bash
# Smoke run of the NBD-root hook inside a built initramfs: unpack the image
# (dracut's lsinitrd or initramfs-tools' unmkinitramfs, whichever this root
# has), chroot into it and start every tool the hook runs at boot, so that a
# library missing from the image fails here, not at the laptop's next boot.
# Usage: initramfs-smoke.sh <initramfs image>. Shared by the laptop molecule
# scenarios' verify and tests/integration/test_nbd_root_tls.py.
set -euo pipefail
image=$1
top=$(mktemp -d)
d=$top
cleanup() {
    umount "$d/proc" "$d/dev" 2> /dev/null || true
    rm -rf "$top"
}
trap cleanup EXIT
if command -v lsinitrd > /dev/null; then
    (cd "$d" && lsinitrd --unpack "$image")
else
    unmkinitramfs "$image" "$d"
    # an early (microcode) archive puts the main one below main/
    if [ -d "$d/main" ]; then d=$d/main; fi
fi
# what the image has at boot: the PATH both generators' init set (iproute2's
# /sbin/ip before busybox's applet), devtmpfs (/dev/null) and /proc
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
mkdir -p "$d/dev" "$d/proc"
mount --bind /dev "$d/dev"
mount -t proc proc "$d/proc"
# the attach script's own check: nbd-client, nbdkit with its nbd plugin (the
# TLS proxy; it loads libnbd and GnuTLS), bash for the proxy's TCP socket
chroot "$d" /sbin/stiefel-nbd-attach --preflight
chroot "$d" /sbin/stiefel-nbd-attach --help
chroot "$d" nbdkit --dump-plugin nbd | grep -E '^(name|version|thread_model)='
# iproute2's ip (dracut) or busybox's applet (initramfs-tools): the hook uses both alike
chroot "$d" sh -c 'ip -V 2> /dev/null || ip 2>&1 | head -n 1'
chroot "$d" bash --version | head -n 1
echo "initramfs-smoke: $image ok ($(find "$d" -xdev -type f | wc -l) files)"
