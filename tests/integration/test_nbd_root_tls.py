"""The laptop's NBD-root hook over TLS-PSK, booted for real.

A Debian bookworm chroot (the laptop molecule scenario's cached tarball) gets
nbdkit and the stiefel initramfs-tools hook; its own kernel + initrd (+ the
session PSK cpio, built like the client agent does) boot in QEMU (TCG) on a tap
of a bridge we create; the server is nbdkit with the project's export settings
(TLS-PSK, AES-GCM only) in a network namespace on that bridge, reached by its
IPv6 link-local address. Asserted: root=UUID=... is mounted from nbd0p1 through
the local @nbdkit TLS proxy and the server saw an AES-GCM TLS session; a wrong
PSK and a plaintext server both fail with a clear message in bounded time.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid as uuidlib

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import keyschedule, nbd_export
from stiefel_runtime import client

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.environ.get("STIEFEL_CACHE_DIR", os.path.join(REPO, ".cache"))
TARBALL = os.path.join(CACHE, "laptop", "bookworm-initramfs-tools.tar.zst")
WORK = os.path.join(CACHE, "laptop-tls")
HOOK_FILES = {
    "stiefel-nbd-attach": "usr/lib/stiefel/initramfs/stiefel-nbd-attach",
    "initramfs-tools/hooks/stiefel": "etc/initramfs-tools/hooks/stiefel",
    "initramfs-tools/scripts/local-top/stiefel": "etc/initramfs-tools/scripts/local-top/stiefel",
}
MAC = "52:54:00:5e:1f:01"
SERVER_LL = "fe80::5:1"
BOOT_TIMEOUT = 240


def log(msg):
    print("[nbd-root-tls %s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


def run(argv, **kw):
    return subprocess.run(argv, check=True, **kw)


def hook_hash():
    digest = hashlib.sha256()
    for src in sorted(HOOK_FILES):
        with open(os.path.join(REPO, "roles", "laptop", "files", src), "rb") as handle:
            digest.update(src.encode() + b"\0" + handle.read())
    return digest.hexdigest()[:16]


def build_boot_files():
    """Kernel + initrd of the chroot with the hook (cached by the hook files' hash)."""
    if not os.path.exists(TARBALL):
        # The same builder and cache as the laptop_initramfs_tools molecule scenario.
        log("building the laptop chroot tarball %s (mmdebstrap, a few minutes)" % TARBALL)
        run(["bash", os.path.join(REPO, "extensions", "molecule", "laptop_initramfs_tools", "build-root.sh"),
             "initramfs-tools", TARBALL])
    out = os.path.join(WORK, hook_hash())
    kernel, initrd = os.path.join(out, "vmlinuz"), os.path.join(out, "initrd.img")
    if os.path.exists(initrd):
        log("kernel + initrd cached in %s" % out)
        return kernel, initrd
    os.makedirs(WORK, exist_ok=True)
    root = tempfile.mkdtemp(prefix="root-", dir=WORK)
    mounted = []
    try:
        log("unpacking %s" % TARBALL)
        run(["tar", "--zstd", "-xpf", TARBALL, "-C", root, "--numeric-owner"])
        for fs in ("proc", "sys", "dev"):
            run(["mount", "--rbind", "/" + fs, os.path.join(root, fs)])
            mounted.append(os.path.join(root, fs))
        shutil.copy("/etc/resolv.conf", os.path.join(root, "etc/resolv.conf"))
        log("apt-get install nbdkit bash nbd-client iproute2 in the chroot")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["chroot", root, "apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
        run(["chroot", root, "apt-get", "install", "-y", "-q", "--no-install-recommends",
             "nbdkit", "bash", "nbd-client", "iproute2", "busybox", "util-linux"], env=env,
            stdout=subprocess.DEVNULL)
        for src, dest in HOOK_FILES.items():
            target = os.path.join(root, dest)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy(os.path.join(REPO, "roles", "laptop", "files", src), target)
            os.chmod(target, 0o755)
        log("update-initramfs in the chroot")
        run(["chroot", root, "update-initramfs", "-u", "-k", "all"], stdout=subprocess.DEVNULL)
        boot = os.path.join(root, "boot")
        version = sorted(n[len("vmlinuz-"):] for n in os.listdir(boot) if n.startswith("vmlinuz-"))[-1]
        listing = run(["chroot", root, "lsinitramfs", "/boot/initrd.img-" + version],
                      capture_output=True, text=True).stdout
        for needed in ("bin/nbdkit", "nbdkit-nbd-plugin.so", "libnbd.so", "libgnutls.so", "bin/bash",
                       "sbin/stiefel-nbd-attach"):
            assert needed in listing, "%s missing from the initramfs" % needed
        tmp_out = out + ".part"
        shutil.rmtree(tmp_out, ignore_errors=True)
        os.makedirs(tmp_out)
        shutil.copy(os.path.join(boot, "vmlinuz-" + version), os.path.join(tmp_out, "vmlinuz"))
        shutil.copy(os.path.join(boot, "initrd.img-" + version), os.path.join(tmp_out, "initrd.img"))
        os.rename(tmp_out, out)
        log("initrd %d bytes" % os.path.getsize(initrd))
        return kernel, initrd
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", "-R", "-l", path], check=False)
        if not any(os.path.ismount(p) for p in mounted):
            shutil.rmtree(root, ignore_errors=True)


def make_disk(path, root_uuid, content=None):
    run(["truncate", "-s", "64M", path])
    run(["sfdisk", "-q", path], input=b"label: gpt\nstart=2048, size=120000, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n")
    populate = ["-d", content] if content else []
    run(["mkfs.ext4", "-q", "-F", "-U", root_uuid, "-E", "offset=1048576"] + populate + [path, "60000k"])


# PID 1 of the link-cut test's root. It first copies busybox and its libraries
# to a tmpfs of its own (/run is noexec) and runs from there, so that a
# dead disk cannot take the reader's own code pages with it; then it reads a
# new stretch of /dev/nbd0 every second (page cache dropped, 256 KiB apart so
# readahead never serves it) and says, with its uptime, whether the read came back.
READER_INIT = """#!/bin/busybox sh
/bin/busybox mount -t tmpfs -o size=16m tmpfs /mnt
/bin/busybox cp /bin/busybox /lib/x86_64-linux-gnu/* /lib64/* /mnt/
exec /mnt/ld-linux-x86-64.so.2 --library-path /mnt /mnt/busybox sh -c '
bb="/mnt/ld-linux-x86-64.so.2 --library-path /mnt /mnt/busybox"
$bb mount -t proc proc /proc
echo LINKCUT-READY
i=0
while :; do
    i=$((i + 1))
    echo 3 > /proc/sys/vm/drop_caches
    read -r up _ < /proc/uptime
    if $bb dd if=/dev/nbd0 of=/dev/null bs=4096 count=1 skip=$((i * 64 % 16000)) 2>/dev/null; then
        echo "LINKCUT-READ ok $i (asked at $up)"
    else
        echo "LINKCUT-READ failed $i (asked at $up)"
    fi
    $bb sleep 1
done'
"""


def reader_root(path):
    """A root holding busybox, its libraries and READER_INIT as /sbin/init."""
    for sub in ("bin", "sbin", "proc", "sys", "dev", "run", "mnt", "lib64", "lib/x86_64-linux-gnu"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    shutil.copy("/bin/busybox", os.path.join(path, "bin/busybox"))
    ldd = subprocess.run(["ldd", "/bin/busybox"], check=True, capture_output=True, text=True).stdout
    for lib in (word for word in ldd.split() if word.startswith("/")):
        os.makedirs(os.path.join(path, os.path.dirname(lib).lstrip("/")), exist_ok=True)
        shutil.copy(os.path.realpath(lib), os.path.join(path, lib.lstrip("/")))
    init = os.path.join(path, "sbin/init")
    with open(init, "w") as handle:
        handle.write(READER_INIT)
    os.chmod(init, 0o755)
    return path


class Lab:
    """Bridge + tap (QEMU) + veth into a namespace (server). Removed in close()."""

    def __init__(self):
        sfx = "%d" % (os.getpid() % 100000)
        self.ns, self.br, self.tap = "stfns" + sfx, "stfbr" + sfx, "stft" + sfx
        self.va, self.vb = "stfva" + sfx, "stfvb" + sfx
        self.procs = []

    def up(self):
        run(["ip", "netns", "add", self.ns])
        run(["ip", "link", "add", self.br, "type", "bridge"])
        run(["ip", "tuntap", "add", "dev", self.tap, "mode", "tap"])
        run(["ip", "link", "add", self.va, "type", "veth", "peer", "name", self.vb, "netns", self.ns])
        for dev in (self.tap, self.va):
            run(["ip", "link", "set", dev, "master", self.br, "up"])
        run(["ip", "link", "set", self.br, "up"])
        self.nsrun(["ip", "link", "set", "lo", "up"])
        self.nsrun(["ip", "addr", "add", SERVER_LL + "/64", "dev", self.vb, "nodad"])
        self.nsrun(["ip", "link", "set", self.vb, "up"])

    def cut(self):
        """Pull the virtual cable: the tap leaves the bridge (it and QEMU stay up)."""
        run(["ip", "link", "set", self.tap, "nomaster"])

    def mend(self):
        run(["ip", "link", "set", self.tap, "master", self.br])

    def nsrun(self, argv):
        run(["ip", "netns", "exec", self.ns] + argv)

    def serve(self, disk, port, psk_file, logpath, prio):
        settings = nbd_export.ExportSettings(path=disk, name="stiefel", address="%s%%%s" % (SERVER_LL, self.vb),
                                             port=port, tls_psk_file=psk_file)
        argv = nbd_export.server_argv(settings, debug_tls=bool(psk_file))
        env = nbd_export.server_env(settings, prio)
        handle = open(logpath, "w")
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns] + argv, env=env, stdout=handle,
                                stderr=subprocess.STDOUT)
        self.procs.append(proc)
        time.sleep(1)
        assert proc.poll() is None, open(logpath).read()
        return proc

    def stop(self, proc):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self):
        for proc in self.procs:
            self.stop(proc)
        for argv in (["ip", "link", "del", self.tap], ["ip", "link", "del", self.va],
                     ["ip", "link", "del", self.br], ["ip", "netns", "del", self.ns]):
            subprocess.run(argv, check=False, stderr=subprocess.DEVNULL)


def start_vm(lab, kernel, initrd, psk_cpio, workdir, tag, root_uuid, port, extra=""):
    """Start kernel + initrd + PSK cpio in QEMU; return (process, console path)."""
    combined = os.path.join(workdir, "initrd-%s.img" % tag)
    with open(combined, "wb") as out, open(initrd, "rb") as base:
        shutil.copyfileobj(base, out)
        out.write(b"\0" * (-out.tell() % 4))  # as kexec.py does: each archive starts 4-aligned
        out.write(psk_cpio)
    console = os.path.join(workdir, "console-%s.log" % tag)
    append = ("console=ttyS0 root=UUID=%s ro stiefel.mac=%s stiefel.server=%s stiefel.port=%d "
              "stiefel.export=stiefel stiefel.tls=psk stiefel.debug panic=-1 %s"
              % (root_uuid, MAC, SERVER_LL, port, extra))
    argv = ["qemu-system-x86_64", "-M", "q35", "-m", "1024", "-smp", "1", "-nographic", "-no-reboot",
            "-kernel", kernel, "-initrd", combined, "-append", append.strip(),
            "-netdev", "tap,id=n0,ifname=%s,script=no,downscript=no" % lab.tap,
            "-device", "virtio-net-pci,netdev=n0,mac=%s" % MAC]
    with open(console, "wb") as handle:
        proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return proc, console


def boot(lab, kernel, initrd, psk_cpio, workdir, tag, root_uuid, port):
    """Boot kernel + initrd + PSK cpio until QEMU exits; return the console text."""
    started = time.monotonic()
    proc, console = start_vm(lab, kernel, initrd, psk_cpio, workdir, tag, root_uuid, port)
    try:
        proc.wait(BOOT_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    text = open(console, "rb").read().decode("utf-8", "replace")
    log("boot %s: %.1f s, console %s" % (tag, time.monotonic() - started, console))
    for line in text.splitlines():
        if "stiefel-nbd" in line or "EXT4-fs (nbd" in line or "@nbdkit" in line:
            print("    " + line.strip())
    return text


@pytest.fixture(scope="module")
def boot_files():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    started = time.monotonic()
    files = build_boot_files()
    log("boot files ready in %.1f s" % (time.monotonic() - started))
    return files


@pytest.fixture
def lab():
    started = time.monotonic()
    lab = Lab()
    try:
        lab.up()
        yield lab
    finally:
        lab.close()
        log("lab closed; test took %.1f s" % (time.monotonic() - started))


def session_psk():
    key, cn, sn = os.urandom(32), os.urandom(16), os.urandom(16)
    return client.psk_archive(key, cn, sn), keyschedule.nbd_psk_line(key, cn, sn) + "\n"


def server_files(tmp_path, psk_line):
    psk_file = str(tmp_path / "nbd.psk")
    with open(psk_file, "w") as handle:
        handle.write(psk_line)
    os.chmod(psk_file, 0o600)
    prio = nbd_export.write_gnutls_priority_file(str(tmp_path / "gnutls.conf"))
    root_uuid = str(uuidlib.uuid4())
    disk = str(tmp_path / "disk.img")
    make_disk(disk, root_uuid)
    return psk_file, prio, disk, root_uuid


def test_root_over_tls_psk(boot_files, lab, tmp_path):
    kernel, initrd = boot_files
    archive, line = session_psk()
    psk_file, prio, disk, root_uuid = server_files(tmp_path, line)
    port = 20000 + os.getpid() % 10000
    server_log = str(tmp_path / "nbdkit.log")
    lab.serve(disk, port, psk_file, server_log, prio)
    text = boot(lab, kernel, initrd, archive, str(tmp_path), "good", root_uuid, port)
    assert "stiefel-nbd: attached /dev/nbd0" in text, text[-3000:]
    assert "EXT4-fs (nbd0p1): mounted filesystem" in text, text[-3000:]
    assert "TLS proxy pid" in text and "@nbdkit --log=stderr -P /run/stiefel-nbdkit.pid -U /run/stiefel-nbd.sock nbd socket-fd=3" in text
    ciphers = nbd_export.parse_tls_session_cipher(open(server_log).read())
    log("server TLS sessions: %s" % ciphers)
    assert ciphers and set(ciphers) <= nbd_export.AES_GCM_CIPHERS


def test_wrong_psk_fails_clearly(boot_files, lab, tmp_path):
    kernel, initrd = boot_files
    _, line = session_psk()
    wrong_archive, _ = session_psk()
    psk_file, prio, disk, root_uuid = server_files(tmp_path, line)
    port = 20000 + os.getpid() % 10000
    lab.serve(disk, port, psk_file, str(tmp_path / "nbdkit.log"), prio)
    text = boot(lab, kernel, initrd, wrong_archive, str(tmp_path), "wrongpsk", root_uuid, port)
    assert "TLS-PSK handshake with [%s]:%d failed" % (SERVER_LL, port) in text, text[-3000:]
    assert "not falling back to plaintext" in text
    assert "EXT4-fs (nbd0" not in text


def test_plaintext_server_refused(boot_files, lab, tmp_path):
    kernel, initrd = boot_files
    archive, line = session_psk()
    _, prio, disk, root_uuid = server_files(tmp_path, line)
    port = 20000 + os.getpid() % 10000
    lab.serve(disk, port, None, str(tmp_path / "nbdkit.log"), prio)
    text = boot(lab, kernel, initrd, archive, str(tmp_path), "plaintext", root_uuid, port)
    assert "does not speak TLS; refusing plaintext" in text, text[-3000:]
    assert "EXT4-fs (nbd0" not in text


def wait_console(console, pattern, timeout, after=0, count=1):
    """Seconds until `pattern` appears `count` times in the console past offset `after`.

    None on timeout or on a kernel panic.
    """
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        text = open(console, "rb").read()[after:].decode("utf-8", "replace")
        if len(re.findall(pattern, text)) >= count:
            return time.monotonic() - started
        if "Kernel panic" in text:
            return None
        time.sleep(0.5)
    return None


# short, so that the four per-connection timeouts of the long cut stay within a minute of CI
LINKCUT_TIMEOUT = 10


def start_reader(boot_files, lab, tmp_path, tag):
    """Boot the laptop kernel on a root whose init reads /dev/nbd0 every second."""
    kernel, initrd = boot_files
    archive, line = session_psk()
    psk_file, prio, _, _ = server_files(tmp_path, line)
    root_uuid = str(uuidlib.uuid4())
    disk = str(tmp_path / "reader.img")
    make_disk(disk, root_uuid, reader_root(str(tmp_path / "reader-root")))
    port = 20000 + os.getpid() % 10000
    lab.serve(disk, port, psk_file, str(tmp_path / "nbdkit.log"), prio)
    proc, console = start_vm(lab, kernel, initrd, archive, str(tmp_path), tag, root_uuid, port,
                             extra="stiefel.timeout=%d" % LINKCUT_TIMEOUT)
    if wait_console(console, r"LINKCUT-READ ok 3", BOOT_TIMEOUT) is None:
        proc.kill()
        proc.wait()
        pytest.fail(open(console, "rb").read()[-3000:].decode("utf-8", "replace"))
    return proc, console


def console_since(console, mark):
    text = open(console, "rb").read()[mark:].decode("utf-8", "replace")
    for row in text.splitlines():
        if ("nbd" in row and "I/O error" not in row) or "LINKCUT" in row:
            print("    " + row.strip())
    return text


def test_link_cut_fails_clearly(boot_files, lab, tmp_path):
    """A cable cut longer than stiefel.timeout fails the disk with the kernel's clear message.

    Debian 12's nbd-client does not reconnect in netlink mode (design brief section 4), so the
    hook sets a dead-connection timeout (nbd-client -t) instead of hanging for ever.
    """
    proc, console = start_reader(boot_files, lab, tmp_path, "longcut")
    try:
        mark = os.path.getsize(console)
        lab.cut()
        # the kernel retries on each of the -C 4 connections before it gives up
        failed = wait_console(console, r"LINKCUT-READ failed", 6 * LINKCUT_TIMEOUT + 30, after=mark)
        text = console_since(console, mark)
        log("long cut: a read failed %.1f s after the cable was cut (stiefel.timeout=%d)"
            % (failed or -1, LINKCUT_TIMEOUT))
        assert failed is not None, text[-3000:]
        assert "block nbd0: Connection timed out" in text, text[-3000:]
        assert "Dead connection" in text, text[-3000:]
    finally:
        proc.kill()
        proc.wait()


# Not strict: seen both ways here. Twice in six runs, after a 5 s cut with a 20 s timeout (tap down, tap off
# the bridge), two or three reads came back and then the connection through the TLS proxy stalled for good,
# so stiefel.timeout failed the disk; four times the reads went on. Cause not pinned down.
@pytest.mark.xfail(strict=False, reason=(
    "a short cut is not reliably ridden out: seen here to stall the TLS proxy's connection for good "
    "after a few reads (2 of 6 runs); nbd-client cannot reconnect in netlink mode (issue 4)"))
def test_short_link_cut_ridden_out(boot_files, lab, tmp_path):
    """A cut shorter than stiefel.timeout should leave the OS running: reads go on for 2 timeouts."""
    proc, console = start_reader(boot_files, lab, tmp_path, "shortcut")
    try:
        mark = os.path.getsize(console)
        lab.cut()
        time.sleep(LINKCUT_TIMEOUT / 2)
        lab.mend()
        failed = wait_console(console, r"LINKCUT-READ failed|Connection timed out", 2 * LINKCUT_TIMEOUT + 10,
                              after=mark)
        text = console_since(console, mark)
        log("short cut (%d s): %s" % (LINKCUT_TIMEOUT / 2, "the disk failed %.1f s later" % failed if failed else "reads went on"))
        assert failed is None, text[-3000:]
        assert len(re.findall(r"LINKCUT-READ ok", text)) >= LINKCUT_TIMEOUT, text[-3000:]
    finally:
        proc.kill()
        proc.wait()
