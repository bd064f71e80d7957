# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Small pieces shared by the runtime agents: kernel command line options,
timestamped console logging, and the hostile-input log."""

from __future__ import annotations

import os
import shlex
import sys
import time

CMDLINE_PREFIX = "stiefel."
DEFAULT_KEY_PATH = "/etc/stiefel/key"
RUN_DIR = "/run/stiefel"
# Every agent: 1 failed, 2 refused (bad config, the disk is in use) or usage error;
# 130 after Ctrl-C, 143 after SIGTERM.
EXIT_FAILED, EXIT_REFUSED = 1, 2


def quiet_log(text: str) -> None:
    """The default ``log`` of the library's agent code: drops the line.

    A library must not write to stdout on its own (an Ansible module's stdout
    is its JSON result); the agents pass their ``Console`` (or ``stdout_log``)
    explicitly.
    """


def stdout_log(text: str) -> None:
    """One line on stdout (the console in the ramdisk), for agents that want a plain print."""
    try:
        sys.stdout.write("%s\n" % text)
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


def parse_cmdline(text: str) -> dict:
    """``stiefel.*`` options of a kernel command line: ``{"role": "server", "debug": True, ...}``.

    Options without ``=`` are True; a later option wins. Quoted values
    (``stiefel.x="a b"``) are unquoted the way the kernel does it.
    """
    options = {}
    try:
        words = shlex.split(text or "")
    except ValueError:
        words = (text or "").split()
    for word in words:
        if not word.startswith(CMDLINE_PREFIX):
            continue
        name, sep, value = word[len(CMDLINE_PREFIX):].partition("=")
        if not name:
            continue
        options[name] = value if sep else True
    return options


def read_cmdline(path: str = "/proc/cmdline") -> str:
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as handle:
            return handle.read(65536).strip()
    except OSError:
        return ""


def strip_stiefel_options(cmdline: str, names) -> str:
    """``cmdline`` without the ``stiefel.<name>`` options in ``names`` (so ours are never doubled)."""
    keep = []
    for word in cmdline.split():
        if word.startswith(CMDLINE_PREFIX) and word[len(CMDLINE_PREFIX):].partition("=")[0] in names:
            continue
        keep.append(word)
    return " ".join(keep)


class Console(object):
    """Timestamped lines on stdout (the serial console in the ramdisk)."""

    def __init__(self, name: str, debug: bool = False, stream=None, clock=time.monotonic):
        self.name = name
        self.debug_enabled = debug
        self.stream = stream or sys.stdout
        self._clock = clock
        self._start = clock()
        self.dropped = 0

    def _write(self, text):
        line = "[%8.3f] %s: %s\n" % (self._clock() - self._start, self.name, text)
        try:
            self.stream.write(line)
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def __call__(self, text):
        self._write(text)

    info = __call__

    def marker(self, text):
        """A contract marker line (``stiefel-server: ready``): printed bare so tests can match it."""
        try:
            self.stream.write("%s: %s\n" % (self.name, text))
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def debug(self, text):
        if self.debug_enabled:
            self._write("debug: " + text)

    def drop(self, source, reason):
        """Every hostile or unusable input is logged with its reason, then dropped."""
        self.dropped += 1
        self._write("dropped input from %s: %s" % (source, reason))


def beep(message: str, loud: bool = False, console_path: str = "/dev/console", log=None) -> None:
    """Write ``message`` with a bell (three for ``loud``) to the system console."""
    bells = "\a\a\a" if loud else "\a"
    try:
        fd = os.open(console_path, os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        fd = None
    if fd is not None:
        try:
            os.write(fd, ("%s%s\r\n" % (bells, message)).encode("utf-8", "replace"))
        except OSError:
            pass
        finally:
            os.close(fd)
    if log is not None:
        log(message)
