#!/usr/bin/env bash
# Build (once) and cache the Debian bookworm root tarball a laptop scenario
# converges on. Usage: build-root.sh <initramfs-tools|dracut> <output.tar.zst>
# The mirror comes from the host's apt sources (never hard-coded here).
set -euo pipefail
generator=$1
out=$2
if [ -s "$out" ]; then
    echo "build-root: cached $out"
    exit 0
fi
sources=/etc/apt/sources.list.d/debian.sources
[ -r "$sources" ] || sources=/etc/apt/sources.list
case "$generator" in
    initramfs-tools) gen_pkgs=initramfs-tools ;;
    dracut) gen_pkgs=dracut ;;
    *) echo "build-root: unknown generator $generator" >&2; exit 2 ;;
esac
mkdir -p "$(dirname "$out")"
tmp="$out.tmp.$$.tar.zst"
trap 'rm -f "$tmp"' EXIT
start=$(date +%s)
echo "build-root: mmdebstrap bookworm ($generator) from $sources"
mmdebstrap --variant=important --mode=root \
    --include="python3,linux-image-amd64,$gen_pkgs,zstd,ca-certificates" \
    --aptopt='Acquire::Retries "3"' \
    bookworm "$tmp" "$sources"
mv "$tmp" "$out"
trap - EXIT
echo "build-root: $out $(du -h "$out" | cut -f1) in $(( $(date +%s) - start ))s"
