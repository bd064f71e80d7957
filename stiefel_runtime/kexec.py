# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Loading and executing a kernel with kexec-tools.

``kexec -s -l`` (kexec_file_load: the kernel verifies the image itself and it
works under lockdown) is tried first; when the running kernel refuses it
(e.g. no KEXEC_FILE support) we fall back to ``kexec -c -l`` (the classic
kexec_load syscall) -- never under lockdown, where kexec_load is refused
anyway and the file-load error is the one that explains. ``kexec -e`` then
jumps into the loaded kernel; it only returns on failure.

The subprocess seam is ``run`` (default :func:`subprocess.run`) so unit
tests can record argv; ``dry_run`` prints what would run and never touches
the kernel (the agents' ``--dry-run``, for tests on a host that must not
reboot).
"""

from __future__ import annotations

import os
import shlex
import subprocess

from ansible_collections.stiefel.system.plugins.module_utils.errors import StiefelError
from stiefel_runtime import lockdown
from stiefel_runtime.common import quiet_log

KEXEC = "kexec"
MAX_CMDLINE = 4096


class KexecError(StiefelError):
    """kexec could not load or execute the kernel."""


def load_argvs(kernel: str, initrd: str | None, cmdline: str, kexec: str = KEXEC, classic: bool = True) -> list:
    """The load commands to try, in order (kexec_file_load, then kexec_load unless ``classic`` is False)."""
    if not kernel or "\0" in kernel:
        raise KexecError("kernel path is empty or invalid")
    if "\0" in cmdline or "\n" in cmdline:
        raise KexecError("kernel command line must be one line without NUL")
    if len(cmdline.encode("utf-8")) >= MAX_CMDLINE:
        raise KexecError("kernel command line is %d bytes, limit %d" % (len(cmdline.encode("utf-8")), MAX_CMDLINE))
    file_load = lockdown.trial_argv(kernel, initrd, cmdline, kexec)
    return [file_load] + ([[kexec, "-c"] + file_load[2:]] if classic else [])


def exec_argv(kexec: str = KEXEC) -> list:
    return [kexec, "-e"]


def format_argv(argv) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def load(kernel: str, initrd: str | None, cmdline: str, run=subprocess.run, log=quiet_log,
         kexec: str = KEXEC, dry_run: bool = False, lockdown_path: str | None = None) -> list:
    """Load ``kernel`` for kexec; return the argv that succeeded.

    Raises KexecError with every attempt's message when none works.
    """
    for path in (kernel, initrd):
        if path and not dry_run and not os.path.isfile(path):
            raise KexecError("%s does not exist" % path)
    locked = lockdown.lockdown_state(lockdown_path or lockdown.LOCKDOWN_PATH) not in (None, "none")
    argvs = load_argvs(kernel, initrd, cmdline, kexec, classic=not locked)
    if dry_run:
        log("dry-run: would run: %s" % format_argv(argvs[0]))
        return argvs[0]
    errors = []
    for argv in argvs:
        try:
            proc = run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
        except FileNotFoundError:
            raise KexecError("%s not found (Debian package kexec-tools)" % kexec) from None
        if proc.returncode == 0:
            log("kexec: loaded with %s" % format_argv(argv[:3]))
            return argv
        output = proc.stdout.decode("utf-8", "replace").strip() if isinstance(proc.stdout, bytes) else str(proc.stdout or "")
        errors.append("%s: rc=%d %s" % (" ".join(argv[:3]), proc.returncode, output[-500:]))
        next_step = "trying kexec_load" if argv is not argvs[-1] else (
            "giving up (the kernel is locked down: no kexec_load)" if locked else "giving up")
        log("kexec: %s failed (rc=%d), %s" % (" ".join(argv[:3]), proc.returncode, next_step))
    raise KexecError("kexec could not load %s: %s" % (kernel, "; ".join(errors)))


def execute(run=subprocess.run, log=quiet_log, kexec: str = KEXEC, dry_run: bool = False) -> None:
    """Jump into the loaded kernel. Returns only in dry-run mode; raises when kexec -e fails."""
    argv = exec_argv(kexec)
    if dry_run:
        log("dry-run: would run: %s" % format_argv(argv))
        return
    proc = run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
    output = proc.stdout.decode("utf-8", "replace").strip() if isinstance(proc.stdout, bytes) else str(proc.stdout or "")
    raise KexecError("kexec -e returned (rc=%d): %s" % (proc.returncode, output[-500:]))


def load_and_execute(kernel: str, initrd: str | None, cmdline: str, run=subprocess.run, log=quiet_log,
                     kexec: str = KEXEC, dry_run: bool = False) -> None:
    load(kernel, initrd, cmdline, run=run, log=log, kexec=kexec, dry_run=dry_run)
    if not dry_run:
        os.sync()
    execute(run=run, log=log, kexec=kexec, dry_run=dry_run)


def concat_files(out_path: str, parts, extra: bytes = b"", mode: int = 0o600) -> int:
    """Write ``parts`` (paths) then ``extra`` bytes to ``out_path`` (0600), each on a 4-byte boundary; return its size.

    Used to append a small cpio (key, NBD PSK) to an initrd: the kernel
    unpacks concatenated (compressed or not) cpio archives in order.
    """
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), mode)
    size = 0
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), mode)
        for part in list(parts) + ([None] if extra else []):
            # A compressed initrd may end unaligned, but the kernel only takes an uncompressed cpio that
            # starts on a 4-byte boundary; it skips zero bytes between archives.
            pad = (4 - size % 4) % 4
            out.write(b"\0" * pad)
            size += pad
            if part is None:
                out.write(extra)
                size += len(extra)
                continue
            with open(part, "rb") as src:
                while True:
                    block = src.read(1 << 20)
                    if not block:
                        break
                    out.write(block)
                    size += len(block)
    return size
