"""The laptop's NBD-root hook over TLS-PSK, booted for real, in both initramfs flavours.

For each flavour (initramfs-tools, dracut) a Debian bookworm chroot (the laptop
molecule scenario's cached tarball of that flavour) gets nbdkit and the stiefel
hook; the flavour's own tool builds the initramfs. Every image built is smoke
run first: unpacked and chrooted into, it must start the hook's tools (the
attach script's --preflight: nbd-client, nbdkit with its nbd plugin). The
chroot itself, packed into an ext4 disk image, is the laptop's OS root. Its
kernel + initrd (+ the session PSK cpio, built like the client agent does)
boot in QEMU (TCG) on a tap of a bridge we create; the server is nbdkit with
the project's export settings (TLS-PSK, AES-GCM only) in a network namespace
on that bridge, reached by its IPv6 link-local address.

One good boot per flavour proves the attach, root=UUID=... mounted from
nbd0p1 through the local @nbdkit TLS proxy, an AES-GCM session at the server
and the OS reaching multi-user.target, then a poweroff (initramfs-tools: by
the laptop role's stiefel-powerwatch, asked for by the server's POWER note of
a battery at 5 %, answered by the server agent's own discovery code) or its
own reboot (dracut), timed, with the laptop role's shutdown hook disconnecting
the NBD root cleanly at the end; a wrong PSK fails clearly at the first
attempt (for dracut in a generic image with the classic, non-systemd initrd,
so both dracut init flavours boot). initramfs-tools also meets a plaintext
server and cable cuts: one boot rides out a 60 s cut, several 5 s cuts and the
server's nbdkit killed and restarted while it writes and fsyncs; another fails
clearly after a cut longer than stiefel.timeout. Power cuts (QEMU SIGKILLed
while fsynced records are written, at the end of the ride-out boot and in boots
of their own) leave a file system that replays clean and every acknowledged
record intact. Boot files are cached by their inputs' hash.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import keyfile, keyschedule, nbd_export, runtime_manifest
from stiefel_runtime import client

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.environ.get("STIEFEL_CACHE_DIR", os.path.join(REPO, ".cache"))
WORK = os.path.join(CACHE, "laptop-tls")
SCENARIO = os.path.join(REPO, "extensions", "molecule", "laptop_initramfs_tools")
# unpacks an image and starts the hook's tools inside it (the molecule verify runs it too)
SMOKE = os.path.join(SCENARIO, "initramfs-smoke.sh")
PACKAGES = ["nbdkit", "bash", "socat", "nbd-client", "iproute2", "busybox", "util-linux"]
# dracut-install resolves only what it installs as executables: "|| die" in a
# shell job, nbdkit's 0644 plugin... The dracut images are built in the
# configurations laptops have. In a chroot, hostonly would describe this
# build host: its root= (so no hostonly cmdline) and its root file system
# driver (so ext4 is added, as the laptop's own root would bring it).
DRACUT_HOSTONLY = ["--hostonly", "--no-hostonly-cmdline", "--add-drivers", "ext4"]
FLAVOURS = {
    "initramfs-tools": {
        "hook": {
            "stiefel-nbd-attach": "usr/lib/stiefel/initramfs/stiefel-nbd-attach",
            "initramfs-tools/hooks/stiefel": "etc/initramfs-tools/hooks/stiefel",
            "initramfs-tools/scripts/local-top/stiefel": "etc/initramfs-tools/scripts/local-top/stiefel",
        },
        "packages": PACKAGES,
        # name -> generator argv (the initrd path is appended by build_image)
        "images": {"boot": None},
        "boot": "boot", "wrong_psk": "boot",
        "nic": "virtio-net-pci",
    },
    "dracut": {
        "hook": {
            "dracut/95stiefel/module-setup.sh": "usr/lib/dracut/modules.d/95stiefel/module-setup.sh",
            "dracut/95stiefel/stiefel-cmdline.sh": "usr/lib/dracut/modules.d/95stiefel/stiefel-cmdline.sh",
            "dracut/95stiefel/stiefel-nbd-job.sh": "usr/lib/dracut/modules.d/95stiefel/stiefel-nbd-job.sh",
            "stiefel-nbd-attach": "usr/lib/dracut/modules.d/95stiefel/stiefel-nbd-attach",
        },
        # the test's images stay uncompressed: compression is no part of the hook, and it took
        # longer than the rest of the build (gzip -9 or zstd -15 of ~100 MB, several minutes each)
        "nocompress": ("etc/dracut.conf.d/10-stiefel-test-nocompress.conf", 'compress="cat"\n'),
        # the role's /etc/dracut.conf.d/90-stiefel.conf
        "conf": ("etc/dracut.conf.d/90-stiefel.conf", 'add_dracutmodules+=" stiefel "\n'),
        # cryptsetup + dmsetup: the crypt module's own requirements (image smoke only)
        "packages": PACKAGES + ["cryptsetup-bin", "dmsetup"],
        "images": {
            # hostonly with dracut's systemd-based initrd (systemd is in the root)
            "boot": DRACUT_HOSTONLY,
            # generic (Debian's default) with the classic shell initrd
            "classic": ["--no-hostonly", "--omit", "systemd systemd-initrd dracut-systemd"],
            # hostonly with LUKS support, as on a laptop with an encrypted root
            "crypt": DRACUT_HOSTONLY + ["--add", "crypt"],
        },
        "boot": "boot", "wrong_psk": "classic",
        # a PCI NIC this build host need not have: the image must carry all NIC drivers
        "nic": "e1000e",
    },
}
MAC = "52:54:00:5e:1f:01"
PART_OFFSET = 1048576  # make_disk's partition
SHUTDOWN_HOOK = "/usr/lib/systemd/system-shutdown/stiefel-nbd"  # where the laptop role installs it
# what the server's nbdkit (--verbose, as the server agent runs it) logs for each connection the
# desktop closes cleanly; a dropped one shows nothing (a power cut) or a read error
CLEAN_DISCONNECT = "client sent NBD_CMD_DISC, closing connection"
SERVER_LL = "fe80::5:1"
BOOT_TIMEOUT = 600  # an upper bound: TCG on a loaded CI host took up to 5 min to the login prompt
TARGET_RE = r"Reached target.*(Multi-User System|Login Prompts)"


def log(msg):
    print("[nbd-root-tls %s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


def run(argv, **kw):
    return subprocess.run(argv, check=True, **kw)


def tarball(flavour):
    return os.path.join(CACHE, "laptop", "bookworm-%s.tar.zst" % flavour)


def inputs_hash(flavour):
    """Cache key of a flavour's boot files: hook files, packages, generator arguments, this builder."""
    spec = FLAVOURS[flavour]
    digest = hashlib.sha256(repr((flavour, spec)).encode())
    for src in sorted(spec["hook"]):
        with open(os.path.join(REPO, "roles", "laptop", "files", src), "rb") as handle:
            digest.update(src.encode() + b"\0" + handle.read())
    with open(SMOKE, "rb") as handle:
        digest.update(handle.read())
    for func in (build_boot_files, build_image, smoke_image, make_disk):
        digest.update(inspect.getsource(func).encode())
    return digest.hexdigest()[:16]


def build_image(root, flavour, name, version):
    """Build one initramfs of the flavour in the chroot; return its path inside the chroot."""
    argv = FLAVOURS[flavour]["images"][name]
    if argv is None:
        run(["chroot", root, "update-initramfs", "-u", "-k", version], stdout=subprocess.DEVNULL)
        return "/boot/initrd.img-" + version
    path = "/boot/initrd-%s.img-%s" % (name, version)
    run(["chroot", root, "dracut", "--force", "--quiet"] + argv + [path, version])
    return path


def smoke_image(root, image):
    """Run the shared initramfs smoke script on `image` inside the chroot."""
    shutil.copy(SMOKE, os.path.join(root, "tmp/initramfs-smoke.sh"))
    proc = subprocess.run(["chroot", root, "bash", "/tmp/initramfs-smoke.sh", image], capture_output=True, text=True,
                          check=False)
    out = proc.stdout + proc.stderr
    log("smoke of %s:\n    %s" % (image, out.strip().replace("\n", "\n    ")))
    assert proc.returncode == 0 and "initramfs-smoke: %s ok" % image in out, out
    return out


def build_boot_files(flavour):
    """Kernel, the flavour's initrds and the OS root disk of the chroot (cached by inputs_hash)."""
    spec = FLAVOURS[flavour]
    # The same builder and cache as the laptop molecule scenarios; it keys the tarball by its package
    # list and returns at once when that is cached.
    log("the laptop chroot tarball %s (mmdebstrap, a few minutes when not cached)" % tarball(flavour))
    run(["bash", os.path.join(SCENARIO, "build-root.sh"), flavour, tarball(flavour)])
    out = os.path.join(WORK, "%s-%s" % (flavour, inputs_hash(flavour)))
    if os.path.exists(os.path.join(out, "root.uuid")):
        log("boot files cached in %s" % out)
        return out
    os.makedirs(WORK, exist_ok=True)
    root = tempfile.mkdtemp(prefix="root-", dir=WORK)
    mounted = []
    try:
        log("unpacking %s" % tarball(flavour))
        run(["tar", "--zstd", "-xpf", tarball(flavour), "-C", root, "--numeric-owner"])
        for fs in ("proc", "sys", "dev"):
            run(["mount", "--rbind", "/" + fs, os.path.join(root, fs)])
            mounted.append(os.path.join(root, fs))
        # dracut drops hostonly without a mounted /run
        run(["mount", "-t", "tmpfs", "tmpfs", os.path.join(root, "run")])
        mounted.append(os.path.join(root, "run"))
        shutil.copy("/etc/resolv.conf", os.path.join(root, "etc/resolv.conf"))
        if "nocompress" in spec:
            # before apt: its kernel trigger rebuilds the image too (gzip -9: minutes on a loaded host)
            with open(os.path.join(root, spec["nocompress"][0]), "w") as handle:
                handle.write(spec["nocompress"][1])
        log("apt-get install %s in the chroot" % " ".join(spec["packages"]))
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["chroot", root, "apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
        run(["chroot", root, "apt-get", "install", "-y", "-q", "--no-install-recommends"] + spec["packages"],
            env=env, stdout=subprocess.DEVNULL)
        for src, dest in spec["hook"].items():
            target = os.path.join(root, dest)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy(os.path.join(REPO, "roles", "laptop", "files", src), target)
            os.chmod(target, 0o755)
        if "conf" in spec:
            with open(os.path.join(root, spec["conf"][0]), "w") as handle:
                handle.write(spec["conf"][1])
        boot = os.path.join(root, "boot")
        version = sorted(n[len("vmlinuz-"):] for n in os.listdir(boot) if n.startswith("vmlinuz-"))[-1]
        tmp_out = out + ".part"
        shutil.rmtree(tmp_out, ignore_errors=True)
        os.makedirs(tmp_out)
        for name in spec["images"]:
            started = time.monotonic()
            image = build_image(root, flavour, name, version)
            took, size = time.monotonic() - started, os.path.getsize(root + image)
            log("%s image %r built in %.1f s, %d bytes" % (flavour, name, took, size))
            smoke_image(root, image)
            shutil.copy(root + image, os.path.join(tmp_out, "initrd-%s.img" % name))
        shutil.copy(os.path.join(boot, "vmlinuz-" + version), os.path.join(tmp_out, "vmlinuz"))
        for path in reversed(mounted):
            run(["umount", "-R", path])
        mounted = []
        os.remove(os.path.join(root, "etc/resolv.conf"))
        root_uuid = str(uuidlib.uuid4())
        started = time.monotonic()
        make_disk(os.path.join(tmp_out, "root.img"), root_uuid, root)
        log("OS root disk made in %.1f s" % (time.monotonic() - started))
        with open(os.path.join(tmp_out, "root.uuid"), "w") as handle:
            handle.write(root_uuid)
        os.rename(tmp_out, out)
        return out
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", "-R", "-l", path], check=False)
        if not any(os.path.ismount(p) for p in mounted):
            shutil.rmtree(root, ignore_errors=True)


def make_disk(path, root_uuid, content=None):
    """GPT disk, one ext4 partition at 1 MiB (filled from `content`), sized to fit it."""
    mib = 62
    if content:
        used = int(subprocess.run(["du", "-smx", content], check=True, capture_output=True,
                                  text=True).stdout.split()[0])
        mib = max(mib, used * 5 // 4 + 64)
    run(["truncate", "-s", "%dM" % (mib + 2), path])
    table = "label: gpt\nstart=2048, size=%d, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n" % (mib * 2048)
    run(["sfdisk", "-q", path], input=table.encode())
    populate = ["-d", content] if content else []
    run(["mkfs.ext4", "-q", "-F", "-U", root_uuid, "-E", "offset=1048576"] + populate + [path, "%dM" % mib])


# PID 1 of the link-cut tests' root. It first copies busybox and its libraries
# to a tmpfs of its own (/run is noexec) and runs from there, so that a
# dead disk cannot take the reader's own code pages with it; then, every
# second, it reads a new stretch of /dev/nbd0 (page cache dropped, 256 KiB
# apart so readahead never serves it) and appends a 4 KiB record to /records
# on the root file system (remounted read-write) with fsync, and says, with its
# uptime before and after, whether each came back.
READER_INIT = """#!/bin/busybox sh
/bin/busybox mount -t tmpfs -o size=16m tmpfs /mnt
/bin/busybox cp /bin/busybox /lib/x86_64-linux-gnu/* /lib64/* /mnt/
exec /mnt/ld-linux-x86-64.so.2 --library-path /mnt /mnt/busybox sh -c '
bb="/mnt/ld-linux-x86-64.so.2 --library-path /mnt /mnt/busybox"
$bb mount -t proc proc /proc
$bb mount -o remount,rw / || echo "LINKCUT-REMOUNT failed"
echo LINKCUT-READY
# an I/O that stays pending across two samples prints the proxy side of the
# story: its processes, the logs of the TLS proxy and the TCP relay, sockets
(last=; while :; do
    $bb sleep 20
    now=$($bb cat /mnt/busy 2>/dev/null)
    if [ -n "$now" ] && [ "$now" = "$last" ]; then
        echo "LINKCUT-DIAG $now pending"
        $bb ps -o pid,args | $bb grep -E "socat|nbdkit|nbd-client" | $bb grep -v grep
        $bb tail -n 8 /run/stiefel-nbdkit.log /run/stiefel-socat.log
        $bb netstat -tn
    fi
    last=$now
done) &
i=0
while :; do
    i=$((i + 1))
    echo $i > /mnt/busy
    echo 3 > /proc/sys/vm/drop_caches
    read -r up _ < /proc/uptime
    if $bb dd if=/dev/nbd0 of=/dev/null bs=4096 count=1 skip=$((i * 64 % 16000)) 2>/dev/null; then
        read -r done _ < /proc/uptime
        echo "LINKCUT-READ ok $i (asked at $up, done at $done)"
    else
        echo "LINKCUT-READ failed $i (asked at $up)"
    fi
    read -r up _ < /proc/uptime
    if $bb printf "record %08d%4080s\\n" $i "" | $bb dd of=/records bs=4096 seek=$((i % 4096)) conv=notrunc,fsync 2>/dev/null; then
        read -r done _ < /proc/uptime
        echo "LINKCUT-WRITE ok $i (asked at $up, done at $done)"
    else
        echo "LINKCUT-WRITE failed $i (asked at $up)"
    fi
    $bb rm -f /mnt/busy
    $bb sleep 1
done'
"""


def reader_root(path, init_text=READER_INIT):
    """A root holding busybox, its libraries and `init_text` (READER_INIT) as /sbin/init."""
    for sub in ("bin", "sbin", "proc", "sys", "dev", "run", "mnt", "lib64", "lib/x86_64-linux-gnu"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    shutil.copy("/bin/busybox", os.path.join(path, "bin/busybox"))
    ldd = subprocess.run(["ldd", "/bin/busybox"], check=True, capture_output=True, text=True).stdout
    for lib in (word for word in ldd.split() if word.startswith("/")):
        os.makedirs(os.path.join(path, os.path.dirname(lib).lstrip("/")), exist_ok=True)
        shutil.copy(os.path.realpath(lib), os.path.join(path, lib.lstrip("/")))
    init = os.path.join(path, "sbin/init")
    with open(init, "w") as handle:
        handle.write(init_text)
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

    def spawn(self, argv, logpath):
        """``argv`` in the server's namespace with the agents' PYTHONPATH, its output in ``logpath``."""
        env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "collections"), PYTHONUNBUFFERED="1")
        with open(logpath, "w") as handle:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns] + argv, env=env, stdout=handle,
                                    stderr=subprocess.STDOUT)
        self.procs.append(proc)
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


def start_vm(lab, files, image, psk_cpio, workdir, tag, root_uuid, port, extra=""):
    """Start the kernel + initrd `image` + PSK cpio in QEMU; return (process, console path)."""
    combined = os.path.join(workdir, "initrd-%s.img" % tag)
    with open(combined, "wb") as out, open(os.path.join(files["dir"], "initrd-%s.img" % image), "rb") as base:
        shutil.copyfileobj(base, out)
        out.write(b"\0" * (-out.tell() % 4))  # as kexec.py does: each archive starts 4-aligned
        out.write(psk_cpio)
    console = os.path.join(workdir, "console-%s.log" % tag)
    append = ("console=ttyS0 root=UUID=%s ro stiefel.mac=%s stiefel.server=%s stiefel.port=%d "
              "stiefel.export=stiefel stiefel.tls=psk stiefel.debug panic=-1 %s"
              % (root_uuid, MAC, SERVER_LL, port, extra))
    argv = ["qemu-system-x86_64", "-M", "q35", "-m", "1024", "-smp", "1", "-nographic", "-no-reboot",
            "-kernel", os.path.join(files["dir"], "vmlinuz"), "-initrd", combined, "-append", append.strip(),
            "-netdev", "tap,id=n0,ifname=%s,script=no,downscript=no" % lab.tap,
            "-device", "%s,netdev=n0,mac=%s" % (FLAVOURS[files["flavour"]]["nic"], MAC)]
    with open(console, "wb") as handle:
        proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return proc, console


SHUTDOWN_TIMEOUT = 300  # an upper bound; the goal is 60 s under TCG
SHUTDOWN_LINES = ("stiefel-nbd", "systemd-shutdown", "Unmounting", "remount", "Remount", "read-only",
                  "reboot: ", "Power down", "Stopping", "Failed", "nbd0", "nbdkit", "socat")


def shutdown_cmdline(verb):
    """Kernel command line that has systemd run `systemctl <verb>` once multi-user.target is reached."""
    if verb == POWERWATCH:
        return ""  # stiefel-powerwatch.service shuts down by itself when the POWER note asks
    # systemd.run boots into its own kernel-command-line.target (the default.target alias), so
    # systemd.wants= adds multi-user.target to it; the command itself runs before multi-user.target
    # is reached, so it only queues a transient service ordered after it; run_success_action=none:
    # its default is exit, a poweroff at once
    return ('systemd.run="/usr/bin/systemd-run --no-block --description=STIEFEL-%s -p After=multi-user.target '
            '/usr/bin/systemctl %s" systemd.run_success_action=none systemd.run_failure_action=none '
            'systemd.wants=multi-user.target' % (verb.upper(), verb))


def command_re(verb):
    """The console's first status line of the command's transient unit: 'Started' while the boot's
    status output is on, else 'Stopped' as the shutdown it began stops it (not the command line)."""
    if verb == POWERWATCH:
        return r"stiefel-powerwatch: stiefel: .* This system shuts down cleanly now"
    return r"(Start|Stopp)\w* .*STIEFEL-%s" % verb.upper()


def wait_shutdown(proc, console, verb):
    """Seconds from the command's line on the console (command_re) to QEMU's exit (None: no exit)."""
    seen = wait_console(console, command_re(verb), 120, proc=proc)
    started = time.monotonic()
    if verb == POWERWATCH and seen is not None:
        # its shutdown -h +0 (the unit's --grace 0 here: the minute users get is a unit test's), then the
        # shutdown itself, timed like a command's
        delay = wait_console(console, r"Stopp(ing|ed) ", 90, after=os.path.getsize(console), proc=proc)
        log("powerwatch: the shutdown began %s s after its announcement" % (
            "%.1f" % delay if delay is not None else "(never)"))
        started = time.monotonic()
    try:
        proc.wait(SHUTDOWN_TIMEOUT)
    except subprocess.TimeoutExpired:
        return None
    took = time.monotonic() - started
    log("%s: %s; QEMU exited %.1f s after it" % (verb, "command seen" if seen is not None else "NO command seen",
                                                 took))
    return took if seen is not None else None


def boot(lab, files, image, psk_cpio, workdir, tag, root_uuid, port, until, shutdown=None):
    """Boot until the console matches `until` (then 3 s more), QEMU exits or BOOT_TIMEOUT; return the console.

    With `shutdown` ("poweroff" or "reboot"; QEMU runs with -no-reboot) the OS then does that itself
    and the console is returned once QEMU has exited; `boot.shutdown_took` holds the seconds.
    """
    started = time.monotonic()
    proc, console = start_vm(lab, files, image, psk_cpio, workdir, tag, root_uuid, port,
                             extra=shutdown_cmdline(shutdown) if shutdown else "")
    boot.shutdown_took = None
    try:
        seen = wait_console(console, until, BOOT_TIMEOUT, proc=proc)
        if seen is not None and shutdown:
            boot.shutdown_took = wait_shutdown(proc, console, shutdown)
        elif seen is not None:
            time.sleep(3)  # what follows the marker: a second attempt would show here
    finally:
        proc.kill()
        proc.wait()
    text = open(console, "rb").read().decode("utf-8", "replace")
    log("boot %s %s (image %r): %s after %.1f s, console %s" % (
        files["flavour"], tag, image, "%r seen %.1f s" % (until, seen) if seen is not None else "no %r" % until,
        time.monotonic() - started, console))
    found = re.search(command_re(shutdown), text) if shutdown else None
    marker = found.start() if found else -1
    for line in text[:marker].splitlines() if marker >= 0 else text.splitlines():
        if "stiefel-nbd" in line or "EXT4-fs (nbd" in line or "@nbdkit" in line or re.search(TARGET_RE, line) \
                or "FATAL" in line:
            print("    " + line.strip())
    for line in text[marker:].splitlines() if marker >= 0 else ():
        if any(word in line for word in SHUTDOWN_LINES):
            print("    " + line.strip())
    return text


def flavour_files(flavour):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    started = time.monotonic()
    out = build_boot_files(flavour)
    log("%s boot files ready in %.1f s" % (flavour, time.monotonic() - started))
    with open(os.path.join(out, "root.uuid")) as handle:
        return {"flavour": flavour, "dir": out, "root_uuid": handle.read().strip()}


@pytest.fixture(scope="module", params=sorted(FLAVOURS))
def boot_files(request):
    """The boot files of each initramfs flavour: the tests taking it run once per flavour."""
    return flavour_files(request.param)


@pytest.fixture(scope="module")
def itools_files():
    return flavour_files("initramfs-tools")


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


# each flavour's good boot ends with one of them; initramfs-tools's poweroff is stiefel-powerwatch's, asked
# for by a POWER note (the serving laptop's battery at CHARGE %)
POWERWATCH = "powerwatch"
SHUTDOWN_VERB = {"initramfs-tools": POWERWATCH, "dracut": "reboot"}
CHARGE = 5
# python -c, in the server's namespace: the server's discovery answers (stiefel_runtime.server's
# ServerState: OFFER, then the POWER note of a laptop on battery at CHARGE %) to the booted OS's powerwatch.
# argv: key file, run dir, charge.
POWER_RESPONDER = r"""
import select, sys
from ansible_collections.stiefel.system.plugins.module_utils import keyfile
from stiefel_runtime import discovery, power, server
state = server.ServerState(keyfile.read_key(sys.argv[1]), sys.argv[2], 1, 1, "stiefel")
state.power = power.power_note([{"name": "BAT0", "type": "Battery", "status": "Discharging",
                                 "capacity": int(sys.argv[3])}], shutdown_charge=server.DEFAULT_SHUTDOWN_CHARGE)
sock = discovery.open_listen_socket(discovery.PORT)
print("answering with POWER %r" % (state.power,), flush=True)
while True:
    select.select([sock], [], [])
    for data, host, port, scope in discovery.drain(sock):
        try:
            replies = state.replies(data, host)
        except Exception as exc:  # a test harness: say it, keep answering
            print("dropped %s%%%s: %s" % (host, scope, exc), flush=True)
            continue
        for reply in replies:
            sock.sendto(reply, (host, port, 0, scope))
        print("answered %s%%%s" % (host, scope), flush=True)
"""


def install_powerwatch(disk, mnt, key, remove=False):
    """What the laptop role installs for stiefel-powerwatch (its runtime files, key and enabled unit) into
    the OS root disk, or (``remove``) takes it out again: the cached root boots in the other tests too."""
    unit = "etc/systemd/system/stiefel-powerwatch.service"
    wants = "etc/systemd/system/multi-user.target.wants/stiefel-powerwatch.service"
    os.makedirs(mnt, exist_ok=True)
    run(["mount", "-o", "loop,offset=%d" % PART_OFFSET, disk, mnt])
    try:
        if remove:
            for path in (wants, unit, "etc/stiefel", "usr/lib/stiefel/python", "usr/lib/stiefel/agents"):
                subprocess.run(["rm", "-rf", os.path.join(mnt, path)], check=True)
            return
        for entry in runtime_manifest.entries("laptop", REPO):
            target = os.path.join(mnt, "usr/lib/stiefel", entry.dest)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy(entry.src, target)
        os.makedirs(os.path.join(mnt, "etc/stiefel"), mode=0o700, exist_ok=True)
        keyfile.write_key_atomic(os.path.join(mnt, "etc/stiefel/key"), key)
        with open(os.path.join(REPO, "roles", "laptop", "templates", "stiefel-powerwatch.service.j2")) as handle:
            text = handle.read()
        for name, value in (("ansible_managed", "test_nbd_root_tls"), ("laptop_key_path", "/etc/stiefel/key"),
                            ("laptop_lib_dir", "/usr/lib/stiefel"), ("laptop_powerwatch_grace", "0")):
            text = text.replace("{{ %s }}" % name, value)
        with open(os.path.join(mnt, unit), "w") as handle:
            handle.write(text)
        os.makedirs(os.path.dirname(os.path.join(mnt, wants)), exist_ok=True)
        os.symlink("/" + unit, os.path.join(mnt, wants))
    finally:
        run(["umount", mnt])


def install_shutdown_hook(disk, mnt):
    """The laptop role's systemd-shutdown hook, installed into the OS root disk where the role puts it.

    Here rather than in build_boot_files: the boot files' cache (a dracut build takes many minutes)
    stays keyed by the initramfs hook alone. Mounted, so the kernel replays a killed boot's journal.
    """
    os.makedirs(mnt, exist_ok=True)
    run(["mount", "-o", "loop,offset=%d" % PART_OFFSET, disk, mnt])
    try:
        run(["install", "-D", "-m", "0755", os.path.join(REPO, "roles", "laptop", "files", "stiefel-nbd-shutdown"),
             os.path.join(mnt, SHUTDOWN_HOOK.lstrip("/"))])
    finally:
        run(["umount", mnt])


def test_root_over_tls_psk(boot_files, lab, tmp_path):
    """One boot: attach over TLS-PSK, root mounted from nbd0p1, AES-GCM at the server, the OS's target.

    The OS then powers off (initramfs-tools: stiefel-powerwatch, on the server's low-battery request, walls and
    shuts down a minute later) or reboots (dracut) by itself: it must not hang on its NBD root, and the role's
    shutdown hook disconnects it cleanly at the very end.
    """
    archive, line = session_psk()
    psk_file, prio, _unused, _unused = server_files(tmp_path, line)
    port = 20000 + os.getpid() % 10000
    server_log = str(tmp_path / "nbdkit.log")
    root_img = os.path.join(boot_files["dir"], "root.img")
    install_shutdown_hook(root_img, str(tmp_path / "root-mnt"))
    lab.serve(root_img, port, psk_file, server_log, prio)
    image = FLAVOURS[boot_files["flavour"]]["boot"]
    verb = SHUTDOWN_VERB[boot_files["flavour"]]
    responder = None
    if verb == POWERWATCH:
        key = keyfile.generate_key()
        install_powerwatch(root_img, str(tmp_path / "root-mnt"), key)
        key_path = str(tmp_path / "stiefel.key")
        keyfile.write_key_atomic(key_path, key)
        responder = lab.spawn([sys.executable, "-c", POWER_RESPONDER, key_path, str(tmp_path), str(CHARGE)],
                              str(tmp_path / "responder.log"))
    try:
        text = boot(lab, boot_files, image, archive, str(tmp_path), "good", boot_files["root_uuid"], port,
                    until=TARGET_RE + "|FATAL|Kernel panic", shutdown=verb)
    finally:
        if responder is not None:
            lab.stop(responder)
            install_powerwatch(root_img, str(tmp_path / "root-mnt"), None, remove=True)
    assert "stiefel-nbd: attached /dev/nbd0" in text, text[-3000:]
    assert "EXT4-fs (nbd0p1): mounted filesystem" in text, text[-3000:]
    assert "TLS proxy pid" in text and ("--log=stderr -P /run/stiefel-nbdkit.pid -U /run/stiefel-nbd.sock --filter=retry "
                                        "nbd hostname=127.0.0.1 port=10819 ") in text, text[-3000:]
    assert re.search(TARGET_RE, text), text[-3000:]
    ciphers = nbd_export.parse_tls_session_cipher(open(server_log).read())
    log("server TLS sessions: %s" % ciphers)
    assert ciphers and set(ciphers) <= nbd_export.AES_GCM_CIPHERS
    server_text = open(server_log).read()
    log("%s took %s s from the command to QEMU's exit; the server logged %d clean disconnects (%r)" % (
        verb, "%.1f" % boot.shutdown_took if boot.shutdown_took is not None else "(no exit)",
        server_text.count(CLEAN_DISCONNECT), CLEAN_DISCONNECT))
    for line in server_text.splitlines():
        if "NBD_CMD_DISC" in line or "error" in line:
            print("    server: " + line)
    assert boot.shutdown_took is not None, text[-3000:]
    assert "stiefel-nbd: /dev/nbd0 flushed and disconnected (%s)" % (
        "poweroff" if verb == POWERWATCH else verb) in text, text[-3000:]
    if verb == POWERWATCH:
        log("responder: %s" % open(str(tmp_path / "responder.log")).read().strip().replace("\n", "; "))
        note = "the laptop serving this disk is on battery at %d%%: it asks this desktop to shut down cleanly" % CHARGE
        assert "stiefel-powerwatch: power: %s" % note in text, text[-3000:]
        assert re.search(r"stiefel-powerwatch: stiefel: %s\. This system shuts down cleanly now" % note,
                         text), text[-3000:]
    # one for the attach's TLS probe, then one per kernel connection (nbd-client -C 4)
    assert server_text.count(CLEAN_DISCONNECT) >= 5, server_text[-3000:]


def test_wrong_psk_fails_clearly(boot_files, lab, tmp_path):
    """A wrong PSK is refused at the first attempt, with the reason, and the boot stops there."""
    _unused, line = session_psk()
    wrong_archive, _unused = session_psk()
    psk_file, prio, disk, root_uuid = server_files(tmp_path, line)
    port = 20000 + os.getpid() % 10000
    lab.serve(disk, port, psk_file, str(tmp_path / "nbdkit.log"), prio)
    image = FLAVOURS[boot_files["flavour"]]["wrong_psk"]
    text = boot(lab, boot_files, image, wrong_archive, str(tmp_path), "wrongpsk", root_uuid, port,
                until=r"the laptop disk is not attached")
    assert "TLS-PSK handshake with [%s]:%d failed" % (SERVER_LL, port) in text, text[-3000:]
    assert "not falling back to plaintext" in text
    assert "(attempt 1/" in text and "(attempt 2/" not in text, text[-3000:]
    assert "EXT4-fs (nbd0" not in text


def test_plaintext_server_refused(itools_files, lab, tmp_path):
    archive, line = session_psk()
    _unused, prio, disk, root_uuid = server_files(tmp_path, line)
    port = 20000 + os.getpid() % 10000
    lab.serve(disk, port, None, str(tmp_path / "nbdkit.log"), prio)
    text = boot(lab, itools_files, "boot", archive, str(tmp_path), "plaintext", root_uuid, port,
                until=r"the laptop disk is not attached")
    assert "does not speak TLS; refusing plaintext" in text, text[-3000:]
    assert "EXT4-fs (nbd0" not in text


def wait_console(console, pattern, timeout, after=0, count=1, proc=None):
    """Seconds until `pattern` appears `count` times in the console past offset `after`.

    None on timeout, on a kernel panic or when `proc` (QEMU) has exited.
    """
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        exited = proc is not None and proc.poll() is not None
        text = open(console, "rb").read()[after:].decode("utf-8", "replace")
        if len(re.findall(pattern, text)) >= count:
            return time.monotonic() - started
        if "Kernel panic" in text or exited:
            return None
        time.sleep(0.5)
    return None


# short, so that the four per-connection timeouts of the long cut stay within a minute of CI
LINKCUT_TIMEOUT = 10
# the ride-out boot's stiefel.timeout: longer than its longest cut plus the TCP user timeout
# (10 s) and a reopen (2 s apart), the hook's default
RIDE_TIMEOUT = 120
LONG_RIDE_CUT = 60
SHORT_CUT = 5
SHORT_CUTS = int(os.environ.get("STIEFEL_SHORT_CUTS", "3"))  # 20 by hand


def start_reader(files, lab, tmp_path, tag, timeout=LINKCUT_TIMEOUT):
    """Boot the laptop kernel on a root whose init reads /dev/nbd0 and writes records every second.

    Returns (QEMU process, console path, the server's lab.serve arguments).
    """
    archive, line = session_psk()
    psk_file, prio, _unused, _unused = server_files(tmp_path, line)
    root_uuid = str(uuidlib.uuid4())
    disk = str(tmp_path / "reader.img")
    make_disk(disk, root_uuid, reader_root(str(tmp_path / "reader-root")))
    port = 20000 + os.getpid() % 10000
    serve_args = (disk, port, psk_file, str(tmp_path / "nbdkit.log"), prio)
    lab.serve(*serve_args)
    proc, console = start_vm(lab, files, "boot", archive, str(tmp_path), tag, root_uuid, port,
                             extra="stiefel.timeout=%d" % timeout)
    if wait_console(console, r"LINKCUT-WRITE ok 3 ", BOOT_TIMEOUT) is None:
        proc.kill()
        proc.wait()
        pytest.fail(open(console, "rb").read()[-3000:].decode("utf-8", "replace"))
    return proc, console, serve_args


def console_since(console, mark):
    text = open(console, "rb").read()[mark:].decode("utf-8", "replace")
    for row in text.splitlines():
        if ("nbd" in row and "I/O error" not in row) or "LINKCUT" in row:
            print("    " + row.strip())
    return text


def test_link_cut_fails_clearly(itools_files, lab, tmp_path):
    """A cable cut longer than stiefel.timeout fails the disk with the kernel's clear message.

    Debian 12's nbd-client does not reconnect in netlink mode (design brief section 4), so the
    hook sets a dead-connection timeout (nbd-client -t) instead of hanging for ever.
    """
    proc, console, _unused = start_reader(itools_files, lab, tmp_path, "longcut")
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


def io_stalls(text):
    """The longest read and write of a console stretch, in seconds (asked at .. done at)."""
    worst = {"READ": 0.0, "WRITE": 0.0}
    for kind, asked, done in re.findall(r"LINKCUT-(READ|WRITE) ok \d+ \(asked at ([\d.]+), done at ([\d.]+)\)", text):
        worst[kind] = max(worst[kind], float(done) - float(asked))
    return worst


def ride_out(console, mark, what, proc, settle=3):
    """After a mend: `settle` more writes and reads come back, and nothing failed since `mark`."""
    after = os.path.getsize(console)
    seen = wait_console(console, r"LINKCUT-WRITE ok \d+ ", RIDE_TIMEOUT + 60, after=after, count=settle, proc=proc)
    text = console_since(console, mark)
    stalls = io_stalls(text)
    log("%s: %s; longest read %.1f s, longest write+fsync %.1f s" % (
        what, "I/O went on %.1f s after the mend" % seen if seen is not None else "I/O did NOT go on",
        stalls["READ"], stalls["WRITE"]))
    assert seen is not None, text[-3000:]
    # The kernel's "block nbd0: Connection timed out", not socat's "read(...): Connection timed out": the
    # relay's log (dumped by the guest's watcher when an I/O waits over 20 s) says that for every
    # connection a cut silences, which is how the ride-out starts.
    for bad in ("LINKCUT-READ failed", "LINKCUT-WRITE failed", "I/O error", "EXT4-fs error",
                "nbd0: Connection timed out", "Dead connection", "blocked for more than"):
        assert bad not in text, (bad, text[-3000:])
    return stalls


def test_cuts_and_server_restart_ridden_out(itools_files, lab, tmp_path):
    """One boot rides out a 60 s cut, SHORT_CUTS 5 s cuts and the server's nbdkit killed and restarted.

    The reader writes and fsyncs a record every second throughout. The server is restarted by this
    test with the same arguments (port, PSK, disk), as the server agent's supervision does.
    """
    proc, console, serve_args = start_reader(itools_files, lab, tmp_path, "rideout", timeout=RIDE_TIMEOUT)
    figures = []
    try:
        mark = os.path.getsize(console)
        lab.cut()
        time.sleep(LONG_RIDE_CUT)
        lab.mend()
        figures.append(("%d s cut" % LONG_RIDE_CUT, ride_out(console, mark, "%d s cut" % LONG_RIDE_CUT, proc)))
        for run_no in range(1, SHORT_CUTS + 1):
            mark = os.path.getsize(console)
            lab.cut()
            time.sleep(SHORT_CUT)
            lab.mend()
            what = "%d s cut %d/%d" % (SHORT_CUT, run_no, SHORT_CUTS)
            figures.append((what, ride_out(console, mark, what, proc)))
        mark = os.path.getsize(console)
        server = lab.procs[-1]
        wait_console(console, r"LINKCUT-WRITE ok \d+ ", 60, after=mark, proc=proc)
        server.kill()  # SIGKILL, by PID, while the reader writes
        server.wait()
        time.sleep(3)
        lab.serve(*serve_args)
        figures.append(("server nbdkit killed, restarted 3 s later",
                        ride_out(console, mark, "server nbdkit SIGKILLed and restarted", proc)))
        log("ride-out figures: %s" % "; ".join("%s: read %.1f s, write %.1f s" % (what, st["READ"], st["WRITE"])
                                               for what, st in figures))
        guest = open(console, "rb").read().decode("utf-8", "replace")
        assert "LINKCUT-REMOUNT failed" not in guest
        # and then the power is cut (SIGKILL) while it writes on: a power-cut run after all that
        wait_console(console, r"LINKCUT-WRITE ok \d+ ", 60, after=os.path.getsize(console), proc=proc)
        proc.kill()
        proc.wait()
        lab.stop(lab.procs[-1])
        guest = open(console, "rb").read().decode("utf-8", "replace")
        acked = max(int(n) for n in re.findall(r"LINKCUT-WRITE ok (\d+) ", guest))
        fsck, records = fsck_and_read(serve_args[0], tmp_path, "/records")
        intact, missing = records_intact(records, acked, reader_record_ok, first_block=1)
        log("power cut after the ride-out: %d acknowledged, %d found intact, missing %s; fsck: %s"
            % (acked, intact, missing or "none", " / ".join(fsck)))
        assert not missing, missing
    finally:
        proc.kill()
        proc.wait()


# PID 1 of the power-cut test's root: right after the root is mounted it
# appends 4 KiB records to /log, each numbered and carrying the MD5 of its
# random payload, with fsync; only once dd (and so its fsync) has returned it
# prints PERSIST-ACK with the number and the nbd0 flush requests completed so
# far (field 16 of the block stat). PERSIST-QUEUE says whether the kernel
# treats nbd0 as a write-back cache (it then sends FLUSH) and uses FUA.
WRITER_INIT = """#!/bin/busybox sh
bb=/bin/busybox
$bb mount -t proc proc /proc 2>/dev/null
$bb mount -t sysfs sysfs /sys 2>/dev/null
$bb mount -o remount,rw / || echo "PERSIST-REMOUNT failed"
echo "PERSIST-QUEUE write_cache=$($bb cat /sys/block/nbd0/queue/write_cache | $bb tr ' ' _)\
 fua=$($bb cat /sys/block/nbd0/queue/fua)"
i=0
while :; do
    i=$((i + 1))
    payload=$($bb head -c 1024 /dev/urandom | $bb od -An -vtx1 | $bb tr -d ' \\n')
    sum=$($bb printf %s "$payload" | $bb md5sum)
    if $bb printf "REC %08d %s %-4049s\\n" $i "${sum%% *}" "$payload" \\
            | $bb dd of=/log bs=4096 seek=$((i - 1)) conv=notrunc,fsync 2>/dev/null; then
        set -- $($bb cat /sys/block/nbd0/stat)
        echo "PERSIST-ACK $i flushes=${16}"
    else
        echo "PERSIST-WRITE failed $i"
    fi
done
"""
# CI: these 2 and the one that ends the ride-out boot; 10 by hand
POWER_CUTS = int(os.environ.get("STIEFEL_POWER_CUTS", "2"))


def writer_record_ok(number, block):
    """A WRITER_INIT record: its number, and the MD5 of its payload matching."""
    fields = block.decode("ascii", "replace").split()
    return (len(block) == 4096 and len(fields) == 4 and fields[0] == "REC" and fields[1] == "%08d" % number
            and hashlib.md5(fields[3].encode()).hexdigest() == fields[2])


def reader_record_ok(number, block):
    """A READER_INIT record: its exact bytes."""
    return block == ("record %08d%4080s\n" % (number, "")).encode()


def records_intact(log_bytes, acked, record_ok, first_block=0):
    """(records found intact, the numbers of acknowledged records missing or corrupt) in a dump.

    Record n is block n - 1 + first_block of 4 KiB.
    """
    intact, bad = 0, []
    for number in range(1, max(acked, len(log_bytes) // 4096 - first_block) + 1):
        start = (number - 1 + first_block) * 4096
        good = record_ok(number, log_bytes[start:start + 4096])
        intact += good
        if not good and number <= acked:
            bad.append(number)
    return intact, bad


def fsck_and_read(disk, tmp_path, path="/log"):
    """Replay the journal (e2fsck -y), check it clean (e2fsck -fn); return (their summaries, /log's bytes).

    On a copy of the partition: e2fsck re-opens the image after a journal replay without the
    "?offset=" of its name.
    """
    image = str(tmp_path / "part.img")
    run(["dd", "if=" + disk, "of=" + image, "bs=1M", "skip=%d" % (PART_OFFSET // 1048576), "status=none"])
    replay = subprocess.run(["e2fsck", "-y", image], capture_output=True, text=True, check=False)
    assert replay.returncode in (0, 1), replay.stdout + replay.stderr  # 1: fixed (the journal replayed)
    check = subprocess.run(["e2fsck", "-fn", image], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    dump = str(tmp_path / "log.dump")
    run(["debugfs", "-R", "dump %s %s" % (path, dump), image], capture_output=True)
    with open(dump, "rb") as handle:
        return replay.stdout.strip().splitlines()[1:2] + check.stdout.strip().splitlines()[-1:], handle.read()


def test_acknowledged_writes_survive_power_cut(itools_files, lab, tmp_path):
    """QEMU SIGKILLed while its init appends fsynced records to the NBD root: every acknowledged one is there.

    POWER_CUTS runs, each on a fresh disk and killed at a different moment; afterwards, on the host,
    the file system replays its journal clean and every record acknowledged on the console before the
    kill is found intact. The guest's kernel treats nbd0 as a write-back cache, so the export (through
    the local proxy, whose nbd plugin passes on what the server advertises) offers FLUSH, and it sends
    at least one FLUSH per fsync.
    """
    root = reader_root(str(tmp_path / "writer-root"), WRITER_INIT)
    figures = []
    for run_no in range(1, POWER_CUTS + 1):
        archive, line = session_psk()
        psk_file, prio, _unused, _unused = server_files(tmp_path, line)
        root_uuid = str(uuidlib.uuid4())
        disk = str(tmp_path / "writer.img")
        make_disk(disk, root_uuid, root)
        port = 20000 + os.getpid() % 10000
        server = lab.serve(disk, port, psk_file, str(tmp_path / ("nbdkit-%d.log" % run_no)), prio)
        # kill after 2..14 acknowledgements and 0..0.9 s more: inside a write as often as between two
        kill_after, delay = 2 + (run_no * 5) % 13, (run_no % 4) * 0.3
        started = time.monotonic()
        proc, console = start_vm(lab, itools_files, "boot", archive, str(tmp_path), "power%d" % run_no, root_uuid,
                                 port)
        try:
            seen = wait_console(console, r"PERSIST-ACK %d " % kill_after, BOOT_TIMEOUT, proc=proc)
            time.sleep(delay)
        finally:
            proc.kill()  # SIGKILL: the power cut
            proc.wait()
        lab.stop(server)
        text = open(console, "rb").read().decode("utf-8", "replace")
        assert seen is not None, text[-3000:]
        acks = [int(n) for n in re.findall(r"PERSIST-ACK (\d+) ", text)]
        flushes = re.findall(r"PERSIST-ACK \d+ flushes=(\d+)", text)
        queue = re.search(r"PERSIST-QUEUE (.*)", text)
        for bad in ("PERSIST-REMOUNT failed", "PERSIST-WRITE failed", "I/O error", "EXT4-fs error"):
            assert bad not in text, (bad, text[-3000:])
        fsck, log_bytes = fsck_and_read(disk, tmp_path)
        intact, missing = records_intact(log_bytes, max(acks), writer_record_ok)
        log("power cut %d/%d after %.1f s: %d acknowledged, %d found intact, missing %s; nbd0 %s, %s flushes "
            "completed; fsck: %s" % (run_no, POWER_CUTS, time.monotonic() - started, max(acks), intact,
                                     missing or "none", queue.group(1).strip() if queue else "?",
                                     flushes[-1] if flushes else "?", " / ".join(fsck)))
        figures.append("%d/%d" % (max(acks), intact))
        assert queue and "write_cache=write_back" in queue.group(1), text[-3000:]
        assert int(flushes[-1]) >= max(acks), text[-3000:]  # each fsync sent at least one FLUSH
        assert not missing, (missing, text[-3000:])
        lab.procs.remove(server)
    log("power cuts (acknowledged/found): %s" % ", ".join(figures))
