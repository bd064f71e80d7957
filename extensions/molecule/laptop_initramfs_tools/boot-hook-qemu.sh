#!/usr/bin/env bash
# Boot a converged scenario's kernel + initramfs in QEMU (TCG) with the stiefel
# options and check that the NBD-root hook attaches a disk served by nbdkit and
# that root=UUID=... gets mounted from /dev/nbd0p1.
# Usage: boot-hook-qemu.sh <chroot root> <root uuid> [workdir]
# Network: QEMU user networking (no host interfaces): the guest's link-local
# prefix is fe80::/64 and the slirp host fe80::2 forwards to the host's [::1].
set -euo pipefail
root=$1
uuid=$2
work=${3:-$(mktemp -d)}
mac=52:54:00:12:34:56
port=$((20000 + $$ % 10000))
kernel=$(find "$root/boot" -maxdepth 1 -name 'vmlinuz-*' | sort -V | tail -n1)
[ -n "$kernel" ] || { echo "boot-hook-qemu: no $root/boot/vmlinuz-*" >&2; exit 1; }
initrd="$root/boot/initrd.img-${kernel##*/vmlinuz-}"
start=$(date +%s)
echo "boot-hook-qemu: disk image (GPT, ext4 UUID=$uuid)"
truncate -s 64M "$work/disk.img"
printf 'label: gpt\nstart=2048, size=120000, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n' | sfdisk -q "$work/disk.img"
mkfs.ext4 -q -F -U "$uuid" -E offset=1048576 "$work/disk.img" 60000k
nbdkit -P "$work/nbdkit.pid" -i ::1 -p "$port" file "$work/disk.img"
trap 'kill "$(cat "$work/nbdkit.pid")" 2>/dev/null || true' EXIT
echo "boot-hook-qemu: booting ${kernel##*/} under TCG"
timeout 180 qemu-system-x86_64 -M q35 -m 1024 -smp 1 -nographic -no-reboot \
    -kernel "$kernel" -initrd "$initrd" \
    -append "console=ttyS0 root=UUID=$uuid ro stiefel.mac=$mac stiefel.server=fe80::2 stiefel.port=$port stiefel.debug panic=-1" \
    -netdev user,id=n0,ipv4=off,ipv6=on,ipv6-prefix=fe80::,ipv6-prefixlen=64,ipv6-host=fe80::2 \
    -device virtio-net-pci,netdev=n0,mac=$mac > "$work/console.log" 2>&1 || true
grep -aE 'stiefel-nbd:|EXT4-fs \(nbd' "$work/console.log" || true
if grep -aq 'EXT4-fs (nbd0p1): mounted filesystem' "$work/console.log"; then
    echo "boot-hook-qemu: OK, root mounted from nbd0p1 in $(( $(date +%s) - start ))s"
else
    echo "boot-hook-qemu: FAILED, see $work/console.log" >&2
    exit 1
fi
