#!/usr/bin/env python3
"""Benchmark the stiefel ramdisk build and boot (measurements, not tests).

Measures, in one run:
- cold build: playbooks/build_image.yml into an empty output directory
  ($STIEFEL_CACHE_DIR/bench/ramdisk-cold, deleted first; skip with --skip-cold),
- unchanged rebuild: the same playbook again on that output,
- overlay-only rebuild: with one extra agent file (then restored),
- sizes: vmlinuz, initrd.img compressed and uncompressed (from manifest.json),
- boot under QEMU TCG (-m 1024): seconds from QEMU start to the kernel running
  /init and to "stiefel-ramdisk: starting role=client" on the serial console.

Usage (as root, from the repository): .venv/bin/python bench/image.py [--skip-cold] [--output PATH]
Prints a table and writes $STIEFEL_CACHE_DIR/bench/image.json (or --output). Exits 0.
With --skip-cold the cold build time of the previous run's JSON is carried over
(``cold_build_carried_over`` says so) so the summary still has a number.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "collections"))

from ansible_collections.stiefel.system.plugins.module_utils import runtime_manifest  # noqa: E402
CACHE = Path(os.environ.get("STIEFEL_CACHE_DIR") or REPO / ".cache")
PLAYBOOK = REPO / "playbooks" / "build_image.yml"


def playbook(out_dir, *extra):
    exe = REPO / ".venv" / "bin" / "ansible-playbook"
    argv = [str(exe if exe.exists() else "ansible-playbook"), str(PLAYBOOK), "-e", "ramdisk_output_dir=%s" % out_dir,
            *extra]
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
    took = time.monotonic() - start
    m = re.search(r"changed=(\d+)", proc.stdout)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-2000:], file=sys.stderr)
    return took, (int(m.group(1)) if m else -1), proc.returncode


def boot(out_dir, timeout=300):
    argv = ["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-m", "1024", "-smp", "2", "-display", "none",
            "-monitor", "none", "-serial", "stdio", "-no-reboot", "-kernel", str(out_dir / "vmlinuz"),
            "-initrd", str(out_dir / "initrd.img"), "-append", "console=ttyS0 stiefel.role=client panic=-1"]
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    times = {}
    os.set_blocking(proc.stdout.fileno(), False)
    buf = b""
    try:
        while time.monotonic() - start < timeout and proc.poll() is None:
            chunk = proc.stdout.read(65536)
            if chunk:
                buf += chunk
                if "init" not in times and b"Run /init as init process" in buf:
                    times["init"] = time.monotonic() - start
                if b"stiefel-ramdisk: starting role=client" in buf:
                    times["agent"] = time.monotonic() - start
                    break
            else:
                time.sleep(0.1)
    finally:
        proc.kill()  # by PID
        proc.wait()
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-cold", action="store_true",
                    help="reuse the existing bench output dir instead of building from scratch")
    ap.add_argument("--output", default=None, help="JSON path (default $STIEFEL_CACHE_DIR/bench/image.json)")
    args = ap.parse_args()
    out = CACHE / "bench" / "ramdisk-cold"
    json_path = Path(args.output) if args.output else CACHE / "bench" / "image.json"
    rows = []
    results = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "skip_cold": args.skip_cold}
    if args.skip_cold:
        for previous in (json_path, REPO / "bench" / "results" / "image.json"):  # the latter: old location
            try:
                cold = json.loads(previous.read_text()).get("cold_build_s")
            except (OSError, ValueError):
                continue
            if cold is not None:
                results.update(cold_build_s=cold, cold_build_carried_over=str(previous))
                rows.append(("cold build (carried over from %s)" % previous.name, "%.1f s" % cold, "not re-measured"))
                break
    if not args.skip_cold:
        shutil.rmtree(out, ignore_errors=True)
        print("cold build into %s ..." % out, flush=True)
        took, changed, rc = playbook(out)
        results["cold_build_s"] = round(took, 1)
        rows.append(("cold build (empty output dir)", "%.1f s" % took, "changed=%d rc=%d" % (changed, rc)))
    elif not (out / "manifest.json").exists():
        # a fresh checkout: say so in the JSON, so run.py reports a skip, not a failure
        results["skipped"] = "--skip-cold and no earlier bench build in %s (run without --skip-cold once)" % out
        print("skipped: %s" % results["skipped"], flush=True)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n")
        return 0
    print("unchanged rebuild ...", flush=True)
    took, changed, rc = playbook(out)
    results["unchanged_rebuild_s"] = round(took, 1)
    rows.append(("unchanged rebuild", "%.1f s" % took, "changed=%d rc=%d" % (changed, rc)))
    with tempfile.TemporaryDirectory() as tmp:
        tree = runtime_manifest.copy_sources(os.path.join(tmp, "tree"), str(REPO))
        with open(os.path.join(tree, "agents", "stiefel-client"), "a", encoding="utf-8") as handle:
            handle.write("# bench\n")
        print("overlay-only rebuild ...", flush=True)
        took, changed, rc = playbook(out, "-e", "ramdisk_runtime_root=%s" % tree)
        results["overlay_rebuild_s"] = round(took, 1)
        rows.append(("overlay-only rebuild (one agent file changed)", "%.1f s" % took, "changed=%d rc=%d" % (changed, rc)))
    took, changed, rc = playbook(out)  # restore
    rows.append(("overlay-only rebuild (restore)", "%.1f s" % took, "changed=%d rc=%d" % (changed, rc)))
    manifest = json.loads((out / "manifest.json").read_text())
    files = manifest["files"]
    results.update(kernel_bytes=files["vmlinuz"]["size"], initrd_bytes=files["initrd.img"]["size"],
                   initrd_uncompressed_bytes=manifest["initrd_uncompressed_bytes"],
                   modules_kept=manifest["modules_kept"], modules_total=manifest["modules_total"],
                   compression=manifest["compression"], kernel_version=manifest["kernel_version"])
    rows.append(("kernel (vmlinuz %s)" % manifest["kernel_version"], "%.1f MB" % (files["vmlinuz"]["size"] / 1e6), ""))
    rows.append(("initrd compressed (%s)" % manifest["compression"], "%.1f MB" % (files["initrd.img"]["size"] / 1e6),
                 "target <= 60 MB"))
    rows.append(("initrd uncompressed", "%.1f MB" % (manifest["initrd_uncompressed_bytes"] / 1e6),
                 "%d of %d modules" % (manifest["modules_kept"], manifest["modules_total"])))
    print("booting in QEMU TCG ...", flush=True)
    times = boot(out)
    results["boot"] = {k: round(v, 1) for k, v in times.items()}
    rows.append(("TCG boot: QEMU start -> kernel runs /init", "%.1f s" % times["init"] if "init" in times else "n/a", ""))
    rows.append(("TCG boot: QEMU start -> 'starting role=client'",
                 "%.1f s" % times["agent"] if "agent" in times else "n/a", "small /init + udev coldplug"))
    width = max(len(r[0]) for r in rows)
    print("\n%-*s  %10s  %s" % (width, "measurement", "value", "note"))
    for name, value, note in rows:
        print("%-*s  %10s  %s" % (width, name, value, note))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    print("saved %s" % json_path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
