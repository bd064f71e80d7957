"""Run a QEMU virtual machine under TCG, with a timestamped serial log.

The serial console is QEMU's stdio; a reader thread stamps every line with the
host's monotonic clock (seconds since the VM was started) and appends it to a
log file, so tests can wait for markers and build a timeline. With
``serial_input=True`` a test types on that console with ``send()``; a prompt
has no newline yet, so ``wait_for(..., partial=True)`` also looks at the
unfinished line. VMs are stopped by their PID, never by name. ``vm.monitor()``
gives a QMP socket (:class:`Monitor`) for hot-plugging a NIC into a free
``pcie_port()`` while the guest runs.

The second half holds what the ramdisk tests share: the cached ramdisk image,
this checkout's agents and library laid over it, and a laptop /boot whose
"kernel" boots into a busybox marker initrd.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from lab import ansible_output

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_IMAGE = os.path.join(REPO, "playbooks", "build_image.yml")

OVMF_CODE_CANDIDATES = ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS_CANDIDATES = ("/usr/share/OVMF/OVMF_VARS_4M.fd", "/usr/share/OVMF/OVMF_VARS.fd")
# Debian's ovmf: the Secure Boot build (needs SMM, so q35 with smm=on) and variables with
# Microsoft's keys enrolled and Secure Boot on -- what a PC's firmware ships with.
SECBOOT_CODE = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"
SECBOOT_VARS = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"


class MarkerTimeout(AssertionError):
    pass


def ovmf_paths():
    for code, variables in zip(OVMF_CODE_CANDIDATES, OVMF_VARS_CANDIDATES):
        if os.path.exists(code) and os.path.exists(variables):
            return code, variables
    raise FileNotFoundError("OVMF firmware not found (Debian package ovmf)")


def secure_boot_missing():
    """Why a Secure Boot VM cannot run here (a reason to skip), or None."""
    missing = [path for path in (SECBOOT_CODE, SECBOOT_VARS) if not os.path.exists(path)]
    return "%s missing (Debian package ovmf)" % ", ".join(missing) if missing else None


class VM(object):
    """One QEMU process. ``netns`` runs it inside a network namespace (for its taps).

    ``uefi`` boots OVMF; ``secure_boot`` (implies UEFI) boots OVMF's Secure Boot build with
    Microsoft's keys, on q35 with SMM (slow under TCG). Each VM gets its own copy of the variables.
    """

    def __init__(self, name, workdir, memory=1024, netns=None, uefi=False, smp=1, serial_input=False,
                 secure_boot=False):
        self.name = name
        self.workdir = workdir
        self.memory = memory
        self.netns = netns
        self.uefi = uefi or secure_boot
        self.secure_boot = secure_boot
        self.smp = smp
        self.log_path = os.path.join(workdir, "%s.serial.log" % name)
        self.lines = []  # (seconds since start, text)
        self.partial = ""  # the serial line being written (a prompt waits here for its answer)
        self.serial_input = serial_input
        self.proc = None
        self.started_at = None
        self._cond = threading.Condition()
        self._reader = None
        self._extra = []
        self.qmp_path = None  # set by monitor()
        self._qmp = None

    def base_args(self):
        args = [
            "qemu-system-x86_64", "-machine", "q35,accel=tcg" + (",smm=on" if self.secure_boot else ""), "-cpu", "max", "-smp", str(self.smp),
            "-m", str(self.memory), "-display", "none", "-monitor", "none", "-serial", "stdio",
            "-no-reboot", "-name", self.name,
        ]
        if self.secure_boot:
            # A fresh copy each start: the firmware's variables are part of what the test boots.
            vars_copy = os.path.join(self.workdir, "%s.OVMF_VARS_4M.ms.fd" % self.name)
            shutil.copyfile(SECBOOT_VARS, vars_copy)
            args += [
                "-global", "driver=cfi.pflash01,property=secure,value=on",
                "-drive", "if=pflash,format=raw,unit=0,readonly=on,file=%s" % SECBOOT_CODE,
                "-drive", "if=pflash,format=raw,unit=1,file=%s" % vars_copy,
            ]
        elif self.uefi:
            code, variables = ovmf_paths()
            vars_copy = os.path.join(self.workdir, "%s.OVMF_VARS.fd" % self.name)
            if not os.path.exists(vars_copy):
                shutil.copyfile(variables, vars_copy)
            args += [
                "-drive", "if=pflash,format=raw,unit=0,readonly=on,file=%s" % code,
                "-drive", "if=pflash,format=raw,unit=1,file=%s" % vars_copy,
            ]
        return args

    def add(self, *args):
        self._extra.extend(args)
        return self

    def disk(self, path, fmt="raw", interface="virtio", usb=False):
        if usb:
            ident = "usbdisk%d" % len(self._extra)
            if "qemu-xhci,id=xhci" not in self._extra:
                self._extra += ["-device", "qemu-xhci,id=xhci"]
            self._extra += ["-drive", "if=none,id=%s,format=%s,file=%s" % (ident, fmt, path),
                            "-device", "usb-storage,drive=%s,bus=xhci.0,bootindex=0" % ident]
        else:
            self._extra += ["-drive", "file=%s,format=%s,if=%s,cache=writeback" % (path, fmt, interface)]
        return self

    def nic(self, tap, mac, model="virtio-net-pci", bootindex=None, romfile=None):
        """A NIC on ``tap``. ``bootindex`` makes the firmware boot from it (network boot); ``romfile=""``
        leaves out QEMU's iPXE option ROM, so OVMF's own PXE / HTTP boot answers (the real firmware path)."""
        ident = "n%d" % len(self._extra)
        device = "%s,netdev=%s,mac=%s" % (model, ident, mac)
        if bootindex is not None:
            device += ",bootindex=%d" % bootindex
        if romfile is not None:
            device += ",romfile=%s" % romfile
        self._extra += ["-netdev", "tap,id=%s,ifname=%s,script=no,downscript=no" % (ident, tap),
                        "-device", device]
        return self

    def kernel(self, kernel, initrd, append):
        self._extra += ["-kernel", kernel, "-initrd", initrd, "-append", append]
        return self

    def monitor(self):
        """A QMP unix socket for this VM (call before ``start()``); ``self.qmp`` talks to it once it runs.

        ``-monitor none`` stays: QMP is a separate option, and a machine-readable one (each reply says
        whether the command worked, which HMP only prints as text).
        """
        self.qmp_path = os.path.join(self.workdir, "%s.qmp" % self.name)
        self._extra += ["-qmp", "unix:%s,server=on,wait=off" % self.qmp_path]
        return self

    def pcie_port(self, port_id, chassis):
        """An empty PCIe root port on q35: the slot a NIC is hot-added to later (q35's root bus takes no
        hot-plug itself). ``chassis`` must be unique among the VM's ports."""
        self._extra += ["-device", "pcie-root-port,id=%s,bus=pcie.0,chassis=%d,slot=%d" % (port_id, chassis, chassis)]
        return self

    @property
    def qmp(self):
        if self._qmp is None:
            if not self.qmp_path:
                raise RuntimeError("%s was not given a monitor (call vm.monitor() before start())" % self.name)
            self._qmp = Monitor(self.qmp_path)
        return self._qmp

    def hotplug_nic(self, port_id, tap, mac, ident, model="virtio-net-pci"):
        """Plug a NIC on ``tap`` into the root port ``port_id`` of the running VM (a cable and card at once)."""
        self.qmp.execute("netdev_add", type="tap", id="%s-net" % ident, ifname=tap, script="no", downscript="no")
        self.qmp.execute("device_add", driver=model, id=ident, bus=port_id, netdev="%s-net" % ident, mac=mac)

    def unplug(self, ident, timeout=60):
        """Ask the guest to release device ``ident`` and wait until QEMU reports it gone (DEVICE_DELETED).

        Unplugging needs the guest's cooperation (PCIe attention button or ACPI eject), so it can take
        seconds; a guest that never lets go raises MarkerTimeout.
        """
        self.qmp.execute("device_del", id=ident)
        self.qmp.wait_event("DEVICE_DELETED", timeout, device=ident)

    def start(self):
        argv = self.base_args() + self._extra
        if "-netdev" not in argv and "-nic" not in argv:
            # without any network option QEMU adds a NIC with user-mode
            # networking, a way out of this machine that no test wants
            argv += ["-nic", "none"]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns] + argv
        with open(os.path.join(self.workdir, "%s.argv" % self.name), "w") as handle:
            handle.write(" ".join(argv) + "\n")
        open(self.log_path, "w").close()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE if self.serial_input else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self):
        with open(self.log_path, "a", encoding="utf-8", errors="replace") as log:
            buf = b""
            while True:
                chunk = self.proc.stdout.read1(65536) if hasattr(self.proc.stdout, "read1") else self.proc.stdout.read(1)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    raw, buf = buf.split(b"\n", 1)
                    self._line(log, raw)
                with self._cond:
                    self.partial = self._clean(buf)
                    self._cond.notify_all()
            if buf:
                self._line(log, buf)
        with self._cond:
            self._cond.notify_all()

    @staticmethod
    def _clean(raw):
        return raw.decode("utf-8", "replace").replace("\r", "").replace("\x1b", "")

    def _line(self, log, raw):
        text = self._clean(raw)
        stamp = time.monotonic() - self.started_at
        log.write("[%8.3f] %s\n" % (stamp, text))
        log.flush()
        with self._cond:
            self.lines.append((stamp, text))
            self._cond.notify_all()

    def find(self, pattern, start=0):
        regex = re.compile(pattern)
        with self._cond:
            for stamp, text in self.lines[start:]:
                match = regex.search(text)
                if match:
                    return stamp, match
        return None

    def position(self):
        """How many whole serial lines there are now: ``wait_for(start=...)`` then sees only later ones."""
        with self._cond:
            return len(self.lines)

    def send(self, text):
        """Type ``text`` on the serial console (needs ``serial_input=True``)."""
        if self.proc is None or self.proc.stdin is None:
            raise RuntimeError("%s was not started with serial_input=True" % self.name)
        self.proc.stdin.write(text.encode("utf-8"))
        self.proc.stdin.flush()

    def wait_for(self, pattern, timeout, fail_patterns=(), start=0, partial=False):
        """Wait until a serial line matches ``pattern``; return (seconds since start, match).

        ``start``: ignore the lines before this ``position()``. ``partial``: the line still being
        written counts too (a prompt), stamped with the time it was seen.
        """
        regex = re.compile(pattern)
        fails = [re.compile(p) for p in fail_patterns]
        deadline = time.monotonic() + timeout
        seen = start
        with self._cond:
            while True:
                for stamp, text in self.lines[seen:]:
                    for fail in fails:
                        if fail.search(text):
                            raise MarkerTimeout("%s: failure marker %r seen: %s (log %s)" % (self.name, fail.pattern, text, self.log_path))
                    match = regex.search(text)
                    if match:
                        return stamp, match
                seen = max(seen, len(self.lines))
                if partial and self.partial:
                    match = regex.search(self.partial)
                    if match:
                        return time.monotonic() - self.started_at, match
                remaining = deadline - time.monotonic()
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise MarkerTimeout("%s exited (rc %s) before %r (log %s)" % (self.name, self.proc.returncode, pattern, self.log_path))
                if remaining <= 0:
                    raise MarkerTimeout("%s: %r not seen within %ss (log %s)" % (self.name, pattern, timeout, self.log_path))
                self._cond.wait(min(remaining, 1.0))

    def wait_exit(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self):
        """Kill the VM by its PID (its own process group: ip netns exec + qemu)."""
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class MonitorError(RuntimeError):
    """QEMU refused a monitor command (its error class and description)."""


class Monitor(object):
    """A minimal QMP client on a unix socket: one command at a time, events kept for ``wait_event``.

    QMP is line-delimited JSON: a greeting, then ``qmp_capabilities`` leaves negotiation mode; every
    command gets one ``return`` or ``error`` reply, and asynchronous events may arrive in between.
    """

    def __init__(self, path, timeout=30):
        self.path = path
        self.events = []
        deadline = time.monotonic() + timeout
        while True:  # QEMU creates the socket a moment after it was started
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)
        self.sock.settimeout(timeout)
        self._buf = b""
        greeting = self._read()
        if "QMP" not in greeting:
            raise MonitorError("not a QMP greeting: %r" % greeting)
        self.execute("qmp_capabilities")

    def _read(self, timeout=None):
        """The next JSON object from the socket."""
        if timeout is not None:
            self.sock.settimeout(max(timeout, 0.01))
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise MonitorError("QMP socket %s closed" % self.path)
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line.decode("utf-8"))

    def execute(self, command, **arguments):
        """Run ``command``; return its ``return`` value or raise MonitorError."""
        request = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode("utf-8") + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise MonitorError("%s: %s: %s" % (command, reply["error"].get("class"), reply["error"].get("desc")))
            return reply.get("return")

    def wait_event(self, name, timeout, **data):
        """Wait for event ``name`` whose data has the given values (events seen earlier count); return it."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event.get("event") == name and all(event.get("data", {}).get(k) == v for k, v in data.items()):
                    self.events.remove(event)
                    return event
            left = deadline - time.monotonic()
            if left <= 0:
                raise MarkerTimeout("QMP event %s %r not seen within %ss" % (name, data, timeout))
            try:
                reply = self._read(timeout=left)
            except socket.timeout:
                continue
            finally:
                self.sock.settimeout(30)
            if "event" in reply:
                self.events.append(reply)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ------------------------------------------------------------------ the ramdisk under test

MARKER = "STIEFEL-KEXEC-MARKER"
# /init of the marker initrd: what the served "laptop kernel" boots into. It says it ran, with which command
# line, and whether the client's NBD PSK archive arrived appended to it (and with which mode).
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

MERGED_USR = (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64"))
# Programs the agents and the ramdisk's /init run that come from packages the image may not have yet.
HOST_TOOLS = ("usr/bin/mount", "usr/bin/umount")


class RamdiskUnavailable(RuntimeError):
    """The ramdisk image is missing and could not be built (tests skip with this reason)."""


def _library():
    """The collection's module_utils, imported from this checkout (lab/e2e.py never needs them)."""
    collections = os.path.join(REPO, "collections")
    if collections not in sys.path:
        sys.path.insert(0, collections)
    from ansible_collections.stiefel.system.plugins.module_utils import cpio, keyfile  # pylint: disable=import-outside-toplevel
    from stiefel_runtime import kexec  # pylint: disable=import-outside-toplevel
    return cpio, keyfile, kexec


def cache_dir():
    return os.environ.get("STIEFEL_CACHE_DIR") or os.path.join(REPO, ".cache")


def ramdisk_listing(initrd):
    """The names in a zstd-compressed newc initrd (no leading ``./``); empty when it cannot be read."""
    cpio, _keyfile, _kexec = _library()
    names = set()
    with subprocess.Popen(["zstd", "-dcq", initrd], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as zstd:
        try:
            names.update(name for name, _mode, _size in cpio.iter_newc_stream(zstd.stdout))
        except cpio.CpioError:
            pass  # the zero padding after the archives (kept for the key's alignment) is no zstd frame
        zstd.stdout.close()
    return set(name[2:] if name.startswith("./") else name for name in names)


def _build_ramdisk(why):
    print("[qemu] ramdisk image %s: building it with playbooks/build_image.yml" % why, flush=True)
    run = ansible_output.run_playbook(BUILD_IMAGE)
    if run.returncode != 0:
        raise RamdiskUnavailable("cannot build the ramdisk image: %s" % (run.stdout[-2000:] + run.stderr[-2000:]))


def build_image(*args, timeout=1800):
    """Run playbooks/build_image.yml with ``args`` (a build, or the check that the cached one is up to date);
    ``(changed, stdout, seconds)``. A failed run raises AssertionError with the end of its output."""
    run = ansible_output.run_playbook(BUILD_IMAGE, *args, timeout=timeout)
    print("ansible-playbook %s: rc=%d in %.1f s" % (" ".join(args), run.returncode, run.seconds))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    return run.changed("localhost"), run.stdout, run.seconds


def ramdisk_files(require=()):
    """``(vmlinuz, initrd.img)`` of the cached ramdisk, built when missing or when it lacks a ``require``d path.

    An image built before the role gained a package lacks its files; the role's input hash changed with the
    package list, so the build rebuilds it.
    """
    out = os.path.join(cache_dir(), "ramdisk")
    kernel, initrd = os.path.join(out, "vmlinuz"), os.path.join(out, "initrd.img")
    if not (os.path.exists(kernel) and os.path.exists(initrd)):
        _build_ramdisk("missing")
    elif require:
        absent = [path for path in require if path not in ramdisk_listing(initrd)]
        if absent:
            _build_ramdisk("lacks %s" % ", ".join(absent))
    if not os.path.exists(initrd):
        raise RamdiskUnavailable("no ramdisk image at %s" % initrd)
    absent = [path for path in require if path not in ramdisk_listing(initrd)]
    if absent:
        raise RamdiskUnavailable("the ramdisk image still lacks %s after a build" % ", ".join(absent))
    return kernel, initrd


def ramdisk_fixups(ramdisk, workdir):
    """Extra archives for gaps in a ramdisk image that is still being built out (printed as NOTEs).

    Merged-/usr symlinks (without ``/bin -> usr/bin`` the ``#!/bin/sh`` /init fails with error -2) and
    mount/umount (package ``mount``; without them /init cannot mount /proc and finds no role) are copied
    from this Debian 12 host. The library's newc writer has no symlinks, so GNU cpio makes the archive.
    Nothing is added to a complete image.
    """
    listing = ramdisk_listing(ramdisk)
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
    """The ramdisk's runtime files from this checkout (the runtime manifest's ``ramdisk`` target), as they sit in
    the ramdisk (a later archive wins), so the VMs run the code under test even when the cached image was built
    from an older checkout."""
    cpio, _keyfile, _kexec = _library()
    from ansible_collections.stiefel.system.plugins.module_utils import runtime_manifest  # pylint: disable=import-outside-toplevel
    files = runtime_manifest.entries("ramdisk", REPO)
    dirs = ["usr", "usr/lib", "usr/lib/stiefel"] + ["usr/lib/stiefel/" + d for d in runtime_manifest.directories(files)]
    entries = [cpio.CpioEntry.directory(d) for d in dirs]
    for entry in files:
        with open(entry.src, "rb") as handle:
            entries.append(cpio.CpioEntry.file("usr/lib/stiefel/" + entry.dest, handle.read(), entry.mode))
    path = os.path.join(workdir, "checkout.cpio")
    with open(path, "wb") as handle:
        handle.write(cpio.write_newc(entries))
    return path


def ramdisk_with_key(workdir, ramdisk, key):
    """The initrd both VMs boot: the cached image, its fixups, this checkout, and the stick's key archive."""
    cpio, keyfile, kexec = _library()
    initrd = os.path.join(workdir, "ramdisk-with-key.img")
    parts = [ramdisk] + ramdisk_fixups(ramdisk, workdir) + [checkout_overlay(workdir)]
    kexec.concat_files(initrd, parts, cpio.key_archive(keyfile.encode_key(key)))
    return initrd


def marker_initrd(path):
    """A busybox initramfs (dynamic busybox plus its libraries) whose /init prints MARKER."""
    cpio, _keyfile, _kexec = _library()
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


def laptop_boot_tree(workdir, kernel, cmdline="console=ttyS0 panic=-1 laptop.own=1"):
    """A directory with a laptop /boot: ``kernel`` as the laptop kernel, the marker initrd, the boot config."""
    boot = os.path.join(workdir, "bootfs")
    os.makedirs(os.path.join(boot, "stiefel"))
    shutil.copyfile(kernel, os.path.join(boot, "vmlinuz-stiefel-test"))
    marker_initrd(os.path.join(boot, "initrd.img-stiefel-test"))
    with open(os.path.join(boot, "stiefel", "boot.json"), "w") as handle:
        json.dump({"format": "stiefel-boot-config", "version": 1, "kernel": "vmlinuz-stiefel-test",
                   "initrd": ["initrd.img-stiefel-test"], "cmdline": cmdline,
                   "root": "UUID=00000000-0000-0000-0000-000000000000"}, handle)
    return boot


def laptop_boot_image(workdir, kernel, size="96M"):
    """An ext4 image of :func:`laptop_boot_tree` (the server VM's disk when /boot is not encrypted)."""
    image = os.path.join(workdir, "laptop.img")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "stiefel-test", "-d", laptop_boot_tree(workdir, kernel), image, size],
                   check=True)
    return image


@contextlib.contextmanager
def vm_lab(name):
    """``(workdir, link, vms)`` for a test: a scratch directory under the cache, a two-tap virtual cable in a
    namespace of its own and a list the test appends its VMs to. Afterwards the VMs are stopped by PID, the
    namespace removed, each serial log's tail printed and the time taken said."""
    # pylint: disable-next=import-outside-toplevel
    from lab.netns import VirtualLink

    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="stf-%s-" % name, dir=cache_dir() if os.path.isdir(cache_dir()) else None)
    link = VirtualLink(suffix="%s%x" % (name[:2], os.getpid() & 0xFFFF)).create()
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
        print("[%s] took %.1f s" % (name, time.monotonic() - started))


class Timeline(object):
    """Console markers of several VMs on one clock (seconds since ``t0``, when the first VM was started)."""

    FAIL_PATTERNS = (r"Traceback", r"Kernel panic")

    def __init__(self, t0, fail_patterns=FAIL_PATTERNS):
        self.t0 = t0
        self.fail_patterns = fail_patterns
        self.marks = []

    def mark(self, vm, pattern, timeout, start=0, partial=False):
        """``vm.wait_for`` that prints the line and notes when it appeared on that VM's serial console."""
        stamp, match = vm.wait_for(pattern, timeout, fail_patterns=self.fail_patterns, start=start, partial=partial)
        at = stamp + (vm.started_at - self.t0)
        self.marks.append((at, vm.name, pattern))
        print("[%7.1f s] %s: %s" % (at, vm.name, match.group(0)), flush=True)
        return match

    def served_kernel_booted(self, client, mac, server="fe80::"):
        """Wait for the marker kernel on ``client`` and check what the client handed it: the laptop's own
        command line plus the NBD root for ``mac`` at ``server`` (a prefix of its address) over TLS-PSK, and
        the session PSK file (mode 0600). Returns the ``marker-cmdline:`` line."""
        self.mark(client, MARKER, 120)
        cmdline = self.mark(client, r"marker-cmdline: .*", 30).group(0)
        psk = self.mark(client, r"marker-psk: .*", 30).group(0)
        assert "laptop.own=1" in cmdline
        assert "stiefel.mac=%s" % mac in cmdline
        assert "stiefel.server=%s" % server in cmdline and "stiefel.tls=psk" in cmdline
        assert psk == "marker-psk: present 600"
        return cmdline

    def show(self):
        print("\ntimeline (s since the VMs were started):")
        for at, name, pattern in sorted(self.marks):
            print("  %7.1f  %-6s %s" % (at, name, pattern))
