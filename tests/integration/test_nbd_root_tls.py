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
import shutil
import subprocess
import tempfile
import time
import uuid as uuidlib

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import client, keyschedule, nbd_export

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
        run(["bash", os.path.join(REPO, "molecule", "laptop_initramfs_tools", "build-root.sh"),
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


def make_disk(path, root_uuid):
    run(["truncate", "-s", "64M", path])
    run(["sfdisk", "-q", path], input=b"label: gpt\nstart=2048, size=120000, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n")
    run(["mkfs.ext4", "-q", "-F", "-U", root_uuid, "-E", "offset=1048576", path, "60000k"])


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


def boot(lab, kernel, initrd, psk_cpio, workdir, tag, root_uuid, port):
    """Boot kernel + initrd + PSK cpio; return the console text."""
    combined = os.path.join(workdir, "initrd-%s.img" % tag)
    with open(combined, "wb") as out, open(initrd, "rb") as base:
        shutil.copyfileobj(base, out)
        out.write(b"\0" * (-out.tell() % 4))  # as kexec.py does: each archive starts 4-aligned
        out.write(psk_cpio)
    console = os.path.join(workdir, "console-%s.log" % tag)
    append = ("console=ttyS0 root=UUID=%s ro stiefel.mac=%s stiefel.server=%s stiefel.port=%d "
              "stiefel.export=stiefel stiefel.tls=psk stiefel.debug panic=-1" % (root_uuid, MAC, SERVER_LL, port))
    argv = ["qemu-system-x86_64", "-M", "q35", "-m", "1024", "-smp", "1", "-nographic", "-no-reboot",
            "-kernel", kernel, "-initrd", combined, "-append", append,
            "-netdev", "tap,id=n0,ifname=%s,script=no,downscript=no" % lab.tap,
            "-device", "virtio-net-pci,netdev=n0,mac=%s" % MAC]
    started = time.monotonic()
    with open(console, "wb") as handle:
        proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
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
