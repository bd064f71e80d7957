"""Integration test of the stiefel ramdisk build (role ramdisk, playbooks/build_image.yml).

Runs the real playbook (mmdebstrap, cpio, zstd; the cached output in
$STIEFEL_CACHE_DIR/ramdisk is reused when its inputs did not change), checks
the manifest and the initrd's contents, boots it in QEMU (TCG) and checks that
a second run changes nothing and that a change in the project's Python files
only repacks the overlay.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import cpio, ramdisk_build as rb, runtime_manifest
from lab.ansible_output import changed_tasks
from lab.qemu import build_image as run_playbook
from lab.qemu import cache_dir

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 240  # seconds; TCG boots the ramdisk to the agent in well under a minute
OUT = Path(cache_dir()) / "ramdisk"


@pytest.fixture(scope="module")
def members(built):
    start = time.monotonic()
    # The file ends in zero padding that the kernel skips and zstd does not.
    with open(OUT / "initrd.img", "rb") as handle:
        archives = handle.read(built["initrd_archives_bytes"])
    assert (OUT / "initrd.img").stat().st_size % 4 == 0
    zstd = subprocess.Popen(["zstd", "-dc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    feeder = threading.Thread(target=lambda: (zstd.stdin.write(archives), zstd.stdin.close()))
    feeder.start()
    try:
        listing = {name: (mode, size) for name, mode, size in cpio.iter_newc_stream(zstd.stdout)}
    finally:
        zstd.stdout.close()
        feeder.join()
        assert zstd.wait() == 0
    print("initrd: %d members, listed in %.1f s" % (len(listing), time.monotonic() - start))
    return listing


def test_manifest_matches_outputs(built):
    m = built
    for name in ("vmlinuz", "initrd.img"):
        path = OUT / name
        assert path.stat().st_size == m["files"][name]["size"]
        assert rb.sha256_file(str(path)) == m["files"][name]["sha256"]
    assert m["suite"] and m["sources"] and m["kernel_version"]
    assert m["versions"]["python3-cryptography"] and m["versions"]["python3-pyroute2"]
    assert any(p.startswith("linux-image-") for p in m["versions"])
    assert m["modules_kept"] < m["modules_total"]
    assert sorted(m["agents"]) == sorted(p.name for p in (REPO / "agents").iterdir() if p.is_file())
    assert len(m["input_hash"]) == 64
    with open(OUT / "initrd.img", "rb") as f:
        assert f.read(4) == b"\x28\xb5\x2f\xfd"  # zstd frame magic
    print("kernel %s: vmlinuz %.1f MB, initrd %.1f MB (%.1f MB uncompressed), %d/%d modules"
          % (m["kernel_version"], m["files"]["vmlinuz"]["size"] / 1e6, m["files"]["initrd.img"]["size"] / 1e6,
             m["initrd_uncompressed_bytes"] / 1e6, m["modules_kept"], m["modules_total"]))


def _has(members, suffix):
    return [n for n in members if n == suffix or n.endswith("/" + suffix)]


def test_initrd_contents(built, members):
    names = set(members)
    kver = built["kernel_version"]
    assert "init" in names and members["init"][0] & 0o111
    assert "usr/bin/python3" in names
    assert _has(members, "dist-packages/cryptography/__init__.py")
    assert _has(members, "dist-packages/pyroute2/__init__.py")
    for tool in ("usr/sbin/kexec", "usr/sbin/nbd-client", "usr/bin/nbdkit", "usr/bin/mount", "usr/bin/setsid", "usr/bin/udevadm",
                 "usr/lib/systemd/systemd-udevd", "usr/sbin/modprobe", "usr/sbin/cryptsetup"):
        assert tool in names, tool
    assert _has(members, "nbdkit/plugins/nbdkit-nbd-plugin.so")
    # the library and the agents
    # the runtime manifest's ramdisk target: the agents and what they import, nothing controller-only
    for entry in runtime_manifest.entries("ramdisk", str(REPO)):
        assert rb.LIB_DEST + "/" + entry.dest in names, entry.dest
    for agent in (REPO / "agents").iterdir():
        if agent.is_file():
            assert rb.AGENTS_DEST + "/" + agent.name in names
            assert "usr/local/bin/" + agent.name in names
    for controller_only in ("ramdisk_build.py", "usb_image.py"):
        assert rb.LIBRARY_DEST + "/" + controller_only not in names
    # network, block and file system drivers
    moddir = "usr/lib/modules/%s/kernel/" % kver
    modules = {n.rsplit("/", 1)[-1].split(".ko")[0] for n in names if n.startswith(moddir) and ".ko" in n}
    wanted = {"r8152", "ax88179_178a", "cdc_ncm", "cdc_ether", "e1000e", "e1000", "igb", "igc", "r8169", "tg3",
              "virtio_net", "ixgbe", "atlantic", "nvme", "ahci", "usb-storage", "uas", "virtio_blk", "virtio_scsi",
              "xhci-pci", "ext4", "vfat", "dm-crypt", "nbd", "btrfs", "usbhid", "tls"}
    assert not wanted - modules, sorted(wanted - modules)
    assert not {"iwlwifi", "ath9k", "amdgpu", "i915", "snd-hda-intel"} & modules
    assert "usr/lib/modules/%s/modules.dep" % kver in names
    # stripped
    assert not [n for n in names if n.startswith("usr/share/doc/") or n.startswith("usr/share/man/")]
    # ICU's data is the empty stub (libxml2 still links libicuuc), hwdb.bin has no vendor name databases
    icu_data = [n for n in names if n.startswith("usr/lib/x86_64-linux-gnu/libicudata.so.") and members[n][1]]
    assert icu_data and all(members[n][1] < 65536 for n in icu_data), [(n, members[n]) for n in icu_data]
    assert 0 < members["usr/lib/udev/hwdb.bin"][1] < 2_000_000
    assert "usr/bin/perl" not in names
    assert "var/lib/dpkg/status" not in names
    assert not [n for n in names if n.startswith("boot/")]


class Qemu:
    """QEMU (TCG) on the ramdisk with the serial console on stdio."""

    def __init__(self, append, log_path, extra=()):
        self.log_path = log_path
        self.buf = ""
        self.lock = threading.Lock()
        argv = ["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-m", "1024", "-smp", "2",
                "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
                "-kernel", str(OUT / "vmlinuz"), "-initrd", str(OUT / "initrd.img"),
                "-append", append, *extra]
        self.start = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        with open(self.log_path, "wb") as log:
            while True:
                chunk = self.proc.stdout.read1(4096)
                if not chunk:
                    return
                log.write(chunk)
                log.flush()
                with self.lock:
                    self.buf += chunk.decode("utf-8", "replace")

    def wait_for(self, text, timeout=BOOT_TIMEOUT, since=0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                idx = self.buf.find(text, since)
            if idx >= 0:
                return idx, time.monotonic() - self.start
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError("no %r on the console within %d s; log %s:\n%s"
                             % (text, timeout, self.log_path, self.buf[-3000:]))

    def send(self, line):
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()  # by PID (Popen), nothing else
        self.proc.wait(timeout=30)


def test_boot_client_role_in_qemu(built, tmp_path):
    vm = Qemu("console=ttyS0 stiefel.role=client panic=-1", tmp_path / "console.log")
    try:
        _idx, took = vm.wait_for("stiefel-ramdisk: starting role=client")
        print("QEMU TCG: 'starting role=client' after %.1f s" % took)
    finally:
        vm.close()


def test_shell_role_hardware_and_tools(built, tmp_path):
    """Boot with stiefel.role=shell and two NICs without a peer: udev must load
    their drivers; python3 imports the library and its dependencies; kexec and
    nbdkit's nbd plugin (libnbd) run; /run is a tmpfs."""
    vm = Qemu("console=ttyS0 stiefel.role=shell panic=-1", tmp_path / "console.log",
              extra=("-device", "virtio-net-pci", "-device", "e1000e"))
    try:
        vm.wait_for("role shell - starting a shell")
        time.sleep(1)
        # markers are split with "" so the console's echo of the command does not match
        vm.send("echo MO\"\"DS $(cut -d' ' -f1 /proc/modules | tr '\\n' ,) EN\"\"D")
        idx, _took = vm.wait_for("MODS ", timeout=60)
        end, _took = vm.wait_for(" END", timeout=60, since=idx)
        mods = vm.buf[idx + 5:end].split(",")
        assert "virtio_net" in mods and "e1000e" in mods, mods
        vm.send("python3 -c 'import cryptography, pyroute2, sys; "
                "from ansible_collections.stiefel.system.plugins.module_utils import keyfile; "
                "print(\"PY\" + \"-OK\", cryptography.__version__, sys.version_info[:2])'")
        vm.wait_for("PY-OK", timeout=120)
        vm.send("echo KX\"\"1 $(kexec --version 2>&1 | head -n1) $(nbdkit nbd --version 2>&1 | head -n1) KX\"\"2")
        idx, _took = vm.wait_for("KX1 ", timeout=60)
        end, _took = vm.wait_for("KX2", timeout=60, since=idx)
        line = vm.buf[idx:end]
        assert "kexec-tools" in line and "nbdkit" in line, line
        vm.send("mountpoint -q /run && test -d /run/stiefel && echo RUN-TMPFS-\"\"OK")
        vm.wait_for("RUN-TMPFS-OK", timeout=30)
        print("shell role: modules %d loaded, python/kexec/nbdkit ok after %.1f s" % (len(mods), time.monotonic() - vm.start))
    finally:
        vm.close()


def test_second_run_changes_nothing(built):
    changed, stdout, took = run_playbook()
    print("unchanged rebuild: %.1f s" % took)
    assert changed == 0, changed_tasks(stdout)
    changed, stdout, took = run_playbook("--check")
    print("check mode on an up-to-date ramdisk: %.1f s" % took)
    assert changed == 0, changed_tasks(stdout)


def test_agent_change_repacks_only_the_overlay(built, tmp_path):
    root = runtime_manifest.copy_sources(str(tmp_path / "tree"))
    with open(os.path.join(root, "agents", "stiefel-client"), "a", encoding="utf-8") as handle:
        handle.write("# changed by the overlay test\n")
    shim = rb.AGENTS_DEST + "/stiefel-client"
    hash_before = json.loads((OUT / "manifest.json").read_text())["overlay_files"][shim]
    before = (OUT / "work" / "base.cpio.zst").stat().st_mtime_ns
    try:
        changed, stdout, took = run_playbook("-e", "ramdisk_runtime_root=%s" % root)
        print("overlay-only rebuild: %.1f s" % took)
        names = changed_tasks(stdout)
        assert len(names) == 2, names
        assert names[0].startswith("Pack /init, the library and the agents") and names[1].startswith("Write vmlinuz")
        assert json.loads((OUT / "manifest.json").read_text())["overlay_files"][shim] != hash_before
        assert (OUT / "work" / "base.cpio.zst").stat().st_mtime_ns == before
    finally:
        changed, stdout, took = run_playbook()  # back to the repository's agents
    assert changed == 2
    assert json.loads((OUT / "manifest.json").read_text())["overlay_files"][shim] == hash_before
