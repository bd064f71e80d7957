"""Run a QEMU virtual machine under TCG, with a timestamped serial log.

The serial console is QEMU's stdio; a reader thread stamps every line with the
host's monotonic clock (seconds since the VM was started) and appends it to a
log file, so tests can wait for markers and build a timeline. VMs are stopped
by their PID, never by name.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time

OVMF_CODE_CANDIDATES = ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS_CANDIDATES = ("/usr/share/OVMF/OVMF_VARS_4M.fd", "/usr/share/OVMF/OVMF_VARS.fd")


class MarkerTimeout(AssertionError):
    pass


def ovmf_paths():
    for code, variables in zip(OVMF_CODE_CANDIDATES, OVMF_VARS_CANDIDATES):
        if os.path.exists(code) and os.path.exists(variables):
            return code, variables
    raise FileNotFoundError("OVMF firmware not found (Debian package ovmf)")


class VM(object):
    """One QEMU process. ``netns`` runs it inside a network namespace (for its taps)."""

    def __init__(self, name, workdir, memory=1024, netns=None, uefi=False, smp=1):
        self.name = name
        self.workdir = workdir
        self.memory = memory
        self.netns = netns
        self.uefi = uefi
        self.smp = smp
        self.log_path = os.path.join(workdir, "%s.serial.log" % name)
        self.lines = []  # (seconds since start, text)
        self.proc = None
        self.started_at = None
        self._cond = threading.Condition()
        self._reader = None
        self._extra = []

    def base_args(self):
        args = [
            "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max", "-smp", str(self.smp),
            "-m", str(self.memory), "-display", "none", "-monitor", "none", "-serial", "stdio",
            "-no-reboot", "-name", self.name,
        ]
        if self.uefi:
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

    def nic(self, tap, mac, model="virtio-net-pci"):
        ident = "n%d" % len(self._extra)
        self._extra += ["-netdev", "tap,id=%s,ifname=%s,script=no,downscript=no" % (ident, tap),
                        "-device", "%s,netdev=%s,mac=%s" % (model, ident, mac)]
        return self

    def kernel(self, kernel, initrd, append):
        self._extra += ["-kernel", kernel, "-initrd", initrd, "-append", append]
        return self

    def start(self):
        argv = self.base_args() + self._extra
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns] + argv
        with open(os.path.join(self.workdir, "%s.argv" % self.name), "w") as handle:
            handle.write(" ".join(argv) + "\n")
        open(self.log_path, "w").close()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
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
            if buf:
                self._line(log, buf)
        with self._cond:
            self._cond.notify_all()

    def _line(self, log, raw):
        text = raw.decode("utf-8", "replace").replace("\r", "").replace("\x1b", "")
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

    def wait_for(self, pattern, timeout, fail_patterns=()):
        """Wait until a serial line matches ``pattern``; return (seconds since start, match)."""
        regex = re.compile(pattern)
        fails = [re.compile(p) for p in fail_patterns]
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for stamp, text in self.lines[seen:]:
                    for fail in fails:
                        if fail.search(text):
                            raise MarkerTimeout("%s: failure marker %r seen: %s (log %s)" % (self.name, fail.pattern, text, self.log_path))
                    match = regex.search(text)
                    if match:
                        return stamp, match
                seen = len(self.lines)
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
