#!/usr/bin/env bash
# Build (once) and cache the Debian bookworm root tarball a laptop scenario
# converges on. Usage: build-root.sh <initramfs-tools|dracut> <output.tar.zst>
# The mirror comes from the host's apt sources (never hard-coded here).
# The package list is the cache key: it is kept in <output>.inputs, and a
# tarball built from another list is built again.
set -euo pipefail
generator=$1
out=$2
sources=/etc/apt/sources.list.d/debian.sources
[ -r "$sources" ] || sources=/etc/apt/sources.list
case "$generator" in
    initramfs-tools) gen_pkgs=initramfs-tools ;;
    # Not the role's packages too: the scenario's check-mode step asserts that a dry run creates
    # none of the files the role would install (nbd-client among them), which needs them absent.
    dracut) gen_pkgs=dracut ;;
    *) echo "build-root: unknown generator $generator" >&2; exit 2 ;;
esac
include="python3,linux-image-amd64,$gen_pkgs,zstd,ca-certificates"
if [ -s "$out" ] && [ "$(cat "$out.inputs" 2>/dev/null)" = "$include" ]; then
    echo "build-root: cached $out"
    exit 0
fi
mkdir -p "$(dirname "$out")"
tmp="$out.tmp.$$.tar.zst"
trap 'rm -f "$tmp"' EXIT
start=$(date +%s)
echo "build-root: mmdebstrap bookworm ($generator) from $sources"
mmdebstrap --variant=important --mode=root \
    --include="$include" \
    --aptopt='Acquire::Retries "3"' \
    bookworm "$tmp" "$sources"
mv "$tmp" "$out"
printf '%s\n' "$include" > "$out.inputs"
trap - EXIT
echo "build-root: $out $(du -h "$out" | cut -f1) in $(( $(date +%s) - start ))s"
