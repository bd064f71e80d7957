"""Two QEMU VMs (TCG) boot the stiefel ramdisk on a virtual cable: the client kexecs into the served kernel.

VM "server" boots the ramdisk with ``stiefel.role=server`` and a small disk
whose ext4 file system is a laptop /boot: the ramdisk's own vmlinuz, a tiny
busybox initrd whose /init prints ``STIEFEL-KEXEC-MARKER`` (plus the command
line it got and whether the NBD PSK arrived) and ``stiefel/boot.json``.
VM "client" boots the same ramdisk with ``stiefel.role=client``; it must find
the server, verify the payload and kexec into the served kernel, whose
marker appears on the client's serial console. Both VMs are on taps in a
network namespace of their own; QEMU is stopped by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import cpio, keyfile, kexec

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from lab.netns import VirtualLink  # noqa: E402
from lab.qemu import VM  # noqa: E402

MARKER = "STIEFEL-KEXEC-MARKER"
MARKER_INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /dev /proc
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox mount -t proc proc /proc
out=/dev/ttyS0
echo "%s" > $out
echo "marker-cmdline: $(/bin/busybox cat /proc/cmdline)" > $out
if [ -s /etc/stiefel/nbd.psk ]; then
    echo "marker-psk: present $(/bin/busybox stat -c %%a /etc/stiefel/nbd.psk)" > $out
else
    echo "marker-psk: missing" > $out
fi
/bin/busybox poweroff -f
""" % MARKER


def cache_dir():
    return os.environ.get("STIEFEL_CACHE_DIR") or os.path.join(REPO, ".cache")


def ramdisk_files():
    out = os.path.join(cache_dir(), "ramdisk")
    kernel, initrd = os.path.join(out, "vmlinuz"), os.path.join(out, "initrd.img")
    if not (os.path.exists(kernel) and os.path.exists(initrd)):
        print("[qemu] ramdisk image missing: building it with playbooks/build-image.yml", flush=True)
        proc = subprocess.run([os.path.join(REPO, ".venv", "bin", "ansible-playbook"), "playbooks/build-image.yml"],
                              cwd=REPO, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0 or not os.path.exists(initrd):
            pytest.skip("cannot build the ramdisk image: %s" % (proc.stdout[-2000:] + proc.stderr[-2000:]))
    return kernel, initrd


MERGED_USR = (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64"))
# Programs the agents and the ramdisk's /init run that come from packages the image may not have yet.
HOST_TOOLS = ("usr/bin/mount", "usr/bin/umount")


def ramdisk_fixups(ramdisk, workdir):
    """Extra archives for gaps in a ramdisk image that is still being built out (printed as NOTEs).

    Merged-/usr symlinks (without ``/bin -> usr/bin`` the ``#!/bin/sh`` /init fails with error -2) and
    mount/umount (package ``mount``; without them /init cannot mount /proc and finds no role) are copied
    from this Debian 12 host. The library's newc writer has no symlinks, so GNU cpio makes the archive.
    Nothing is added to a complete image.
    """
    listing = set(subprocess.run("zstd -dc %s 2>/dev/null | cpio -t --quiet 2>/dev/null" % ramdisk, shell=True,
                                 capture_output=True, text=True).stdout.split())
    root = os.path.join(workdir, "fixups")
    names = []
    for name, target in MERGED_USR:
        if name not in listing:
            os.makedirs(root, exist_ok=True)
            os.symlink(target, os.path.join(root, name))
            names.append(name)
    for tool in HOST_TOOLS:
        if tool not in listing:
            os.makedirs(os.path.join(root, os.path.dirname(tool)), exist_ok=True)
            shutil.copy2("/" + tool, os.path.join(root, tool))
            names += [d for d in ("usr", "usr/bin") if d not in names] + [tool]
    if not names:
        return []
    print("[qemu] NOTE: the ramdisk image lacks %s: adding them from the host for this test"
          % ", ".join(n for n in names if n not in ("usr", "usr/bin")), flush=True)
    out = os.path.join(workdir, "fixups.cpio")
    with open(out, "wb") as handle:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"], cwd=root, check=True, stdout=handle,
                       input="\n".join(names).encode())
    return [out]


def checkout_overlay(workdir):
    """The agents and library of this checkout, as they sit in the ramdisk (a later archive wins), so the VMs
    run the code under test even when the cached image was built from an older checkout."""
    entries = []
    dirs = ["usr", "usr/lib", "usr/lib/stiefel", "usr/lib/stiefel/agents"]
    lib = "usr/lib/stiefel/python/ansible_collections/stiefel/system/plugins/module_utils"
    parts = lib.split("/")
    dirs += ["/".join(parts[:i]) for i in range(4, len(parts) + 1)]
    entries += [cpio.CpioEntry.directory(d) for d in dirs]
    for name in sorted(os.listdir(os.path.join(REPO, "agents"))):
        with open(os.path.join(REPO, "agents", name), "rb") as handle:
            entries.append(cpio.CpioEntry.file("usr/lib/stiefel/agents/" + name, handle.read(), 0o755))
    source = os.path.join(REPO, "plugins", "module_utils")
    for name in sorted(os.listdir(source)):
        if name.endswith(".py"):
            with open(os.path.join(source, name), "rb") as handle:
                entries.append(cpio.CpioEntry.file(lib + "/" + name, handle.read(), 0o644))
    path = os.path.join(workdir, "checkout.cpio")
    with open(path, "wb") as handle:
        handle.write(cpio.write_newc(entries))
    return path


def marker_initrd(path):
    """A busybox initramfs (dynamic busybox plus its libraries) whose /init prints MARKER."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    dirs = ("bin", "dev", "proc", "etc", "lib", "lib64", "lib/x86_64-linux-gnu")
    entries = [cpio.CpioEntry.directory(d) for d in dirs]
    libs = subprocess.run(["ldd", busybox], capture_output=True, text=True, check=True).stdout
    for line in libs.splitlines():
        parts = line.split()
        lib = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if not lib.startswith("/"):
            continue
        real = os.path.realpath(lib)
        name = lib.lstrip("/")
        if name.startswith("usr/"):
            name = name[4:]
        with open(real, "rb") as handle:
            entries.append(cpio.CpioEntry.file(name, handle.read(), 0o755))
    with open(busybox, "rb") as handle:
        entries.append(cpio.CpioEntry.file("bin/busybox", handle.read(), 0o755))
    entries.append(cpio.CpioEntry.file("init", MARKER_INIT.encode(), 0o755))
    with open(path, "wb") as handle:
        handle.write(cpio.write_newc(entries))


def laptop_disk(workdir, kernel):
    """An ext4 image holding a laptop /boot (kernel, marker initrd, boot config)."""
    boot = os.path.join(workdir, "bootfs")
    os.makedirs(os.path.join(boot, "stiefel"))
    shutil.copyfile(kernel, os.path.join(boot, "vmlinuz-stiefel-test"))
    marker_initrd(os.path.join(boot, "initrd.img-stiefel-test"))
    with open(os.path.join(boot, "stiefel", "boot.json"), "w") as handle:
        json.dump({"format": "stiefel-boot-config", "version": 1, "kernel": "vmlinuz-stiefel-test",
                   "initrd": ["initrd.img-stiefel-test"], "cmdline": "console=ttyS0 panic=-1 laptop.own=1",
                   "root": "UUID=00000000-0000-0000-0000-000000000000"}, handle)
    image = os.path.join(workdir, "laptop.img")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "stiefel-test", "-d", boot, image, "96M"], check=True)
    return image


@pytest.fixture
def lab():
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, taps)")
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("needs qemu-system-x86_64")
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="stf-agents-qemu-", dir=os.path.join(cache_dir()) if os.path.isdir(cache_dir()) else None)
    link = VirtualLink(suffix="ag%x" % (os.getpid() & 0xFFFF)).create()
    vms = []
    try:
        yield workdir, link, vms
    finally:
        for vm in vms:
            vm.stop()
        link.destroy()
        for vm in vms:
            if os.path.exists(vm.log_path):
                with open(vm.log_path) as handle:
                    tail = handle.read()[-6000:]
                print("\n----- %s serial (tail) -----\n%s" % (vm.name, tail))
        shutil.rmtree(workdir, ignore_errors=True)
        print("[test_agents_qemu] took %.1f s" % (time.monotonic() - started))


def test_client_kexecs_into_served_kernel(lab):
    workdir, link, vms = lab
    kernel, ramdisk = ramdisk_files()
    key = keyfile.generate_key()
    initrd = os.path.join(workdir, "ramdisk-with-key.img")
    parts = [ramdisk] + ramdisk_fixups(ramdisk, workdir) + [checkout_overlay(workdir)]
    kexec.concat_files(initrd, parts, cpio.key_archive(keyfile.encode_key(key)))
    disk = laptop_disk(workdir, kernel)
    t0 = time.monotonic()
    server = VM("server", workdir, memory=1024, netns=link.netns)
    server.disk(disk).nic(link.taps[0], "52:54:00:57:ef:01")
    server.kernel(kernel, initrd, "console=ttyS0 stiefel.role=server stiefel.disk=/dev/vda stiefel.boot=/dev/vda")
    vms.append(server.start())
    client = VM("client", workdir, memory=1024, netns=link.netns)
    client.nic(link.taps[1], "52:54:00:57:ef:02")
    client.kernel(kernel, initrd, "console=ttyS0 stiefel.role=client")
    vms.append(client.start())

    fail = (r"Traceback", r"Kernel panic")
    timeline = []

    def mark(vm, pattern, timeout):
        stamp, match = vm.wait_for(pattern, timeout, fail_patterns=fail)
        at = stamp + (vm.started_at - t0)  # when the line appeared on that VM's serial console
        timeline.append((at, vm.name, pattern))
        print("[%7.1f s] %s: %s" % (at, vm.name, match.group(0)), flush=True)
        return match

    mark(server, r"stiefel-server: ready", 240)
    mark(client, r"stiefel-client: discovery started", 240)
    mark(client, r"stiefel-client: payload verified", 120)
    mark(client, r"stiefel-client: kexec", 60)
    mark(client, MARKER, 120)
    cmdline = mark(client, r"marker-cmdline: .*", 30).group(0)
    psk = mark(client, r"marker-psk: .*", 30).group(0)
    print("\ntimeline (s since the VMs were started):")
    for at, name, pattern in sorted(timeline):
        print("  %7.1f  %-6s %s" % (at, name, pattern))
    assert "laptop.own=1" in cmdline
    assert "stiefel.mac=52:54:00:57:ef:02" in cmdline
    assert "stiefel.server=fe80::" in cmdline and "stiefel.tls=psk" in cmdline
    assert psk == "marker-psk: present 600"
    # the server is still up and serving
    assert server.proc.poll() is None
