# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Running an external tool (mkfs, mount, mmdebstrap, ...) to completion, with one error for every way it fails.

Standard library only: the modules, the ramdisk build and the runtime on the targets use it.
"""

from __future__ import annotations

import subprocess
import time

from ansible_collections.stiefel.system.plugins.module_utils.errors import StiefelError


class ToolError(StiefelError):
    """An external tool could not be started or exited non-zero; the message names it and says why."""


def _name(argv):
    """The tool and its first operand (``mount /dev/sda1``, ``cryptsetup open``), options left out."""
    if len(argv) > 1 and not argv[1].startswith("-"):
        return "%s %s" % (argv[0], argv[1])
    return argv[0]


def run_tool(argv, log_path=None, *, stdin=None, env=None, cwd=None):
    """Run ``argv`` and return its stdout (bytes); raise :class:`ToolError` when it cannot start or fails.

    ``stdin`` is bytes fed to the tool (else it reads nothing). With
    ``log_path``, stdout and stderr are appended to that log with the command
    line, exit code and duration (long build steps), and the error points
    there; otherwise the error carries the tool's stderr.
    """
    argv = list(argv)
    if log_path is None:
        try:
            proc = subprocess.run(argv, input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd, check=False)
        except OSError as exc:
            raise ToolError("cannot run %s: %s" % (argv[0], exc)) from None
        if proc.returncode != 0:
            stderr = proc.stderr.decode("utf-8", "replace").strip()
            raise ToolError("%s failed (exit %d): %s" % (_name(argv), proc.returncode, stderr[-2000:]))
        return proc.stdout
    with open(log_path, "ab") as log:
        log.write(("\n$ %s\n" % " ".join(argv)).encode())
        log.flush()
        start = time.monotonic()
        try:
            proc = subprocess.run(argv, input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                                  stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, check=False)
        except OSError as exc:
            log.write(("# cannot run: %s\n" % exc).encode())
            raise ToolError("cannot run %s: %s; see %s" % (argv[0], exc, log_path)) from None
        log.write(("# rc=%d after %.1f s\n" % (proc.returncode, time.monotonic() - start)).encode())
    if proc.returncode != 0:
        raise ToolError("%s failed (exit %d); see %s" % (_name(argv), proc.returncode, log_path))
    return b""
