# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Small pieces shared by the runtime agents: kernel command line options,
timestamped console logging, and the hostile-input log."""

from __future__ import annotations

import os
import re
import shlex
import sys
import threading
import time

from ansible_collections.stiefel.system.plugins.module_utils.errors import StiefelError

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


def strip_stiefel_options(cmdline: str, names=None) -> str:
    """``cmdline`` without the ``stiefel.<name>`` options in ``names`` (so ours are never doubled), or
    without every ``stiefel.*`` option when ``names`` is None."""
    keep = []
    for word in cmdline.split():
        if word.startswith(CMDLINE_PREFIX) and (
                names is None or word[len(CMDLINE_PREFIX):].partition("=")[0] in names):
            continue
        keep.append(word)
    return " ".join(keep)


def escape(text, limit: int = 0) -> str:
    """``text`` safe for a console line: backslash and unsafe characters as ``\\xNN``/``\\uNNNN`` escapes.

    Network input (HTTP paths, reasons quoting datagrams) reaches the console
    through here, so it can neither move the cursor, clear the screen, end the
    line and forge the next one, nor hide behind bidi controls. ``limit`` > 0
    cuts the result to about that many characters, marking the cut.
    """
    if not isinstance(text, str):
        text = str(text)
    out = []
    size = 0
    for ch in text:
        if ch == "\\":
            piece = "\\\\"
        elif ch == " " or ch.isprintable():
            # not printable: what a terminal acts on or that hides or forges text (C0/C1 controls such as
            # ESC, CR, BEL; DEL; bidi overrides; line separators; odd spaces; lone surrogates from bad bytes)
            piece = ch
        elif ord(ch) < 0x100:
            piece = "\\x%02x" % ord(ch)
        else:
            piece = "\\u%04x" % ord(ch) if ord(ch) < 0x10000 else "\\U%08x" % ord(ch)
        if limit and size + len(piece) > limit:
            out.append("...")
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)


# Numbers, hex runs and quoted snippets vary from one datagram to the next; the reason's shape does not.
_REASON_VARYING = re.compile(r"'[^']*'|\"[^\"]*\"|[0-9a-fA-F]{6,}|\d+")


_KINDS = {}  # reason -> kind: a flood repeats a few reasons, and the regex is most of a drop's cost


def reason_kind(reason: str) -> str:
    """The part of a drop reason that stays the same across a flood (for counting reasons, not logging them)."""
    kind = _KINDS.get(reason)
    if kind is None:
        if len(_KINDS) >= 1024:
            _KINDS.clear()
        kind = _KINDS[reason] = _REASON_VARYING.sub("#", str(reason)[:200])[:60]
    return kind


class DropSummary(object):
    """Rate limit for the hostile-input log: the first ``burst`` drops of an interval get their own line,
    the rest are counted per source and reason kind and reported in one summary line per interval.

    A flood of junk on the link would otherwise write a line per datagram (15 MB a minute): on a
    115200-baud serial console the agent then waits on the console instead of answering the real client.
    Memory is bounded too: at most ``max_sources`` sources are tracked, the rest are counted together.
    """

    def __init__(self, interval: float = 10.0, burst: int = 10, max_sources: int = 64, top: int = 4):
        self.interval = interval
        self.burst = burst
        self.max_sources = max_sources
        self.top = top
        self.window_start = None
        self.shown = 0
        self.suppressed = 0
        self.by_source = {}  # source -> [count, {reason kind: count}]
        self.other_sources = 0

    def offer(self, now, source, reason):
        """``(lines_to_write, show_this_one)``: a due summary of the last interval first, then the verdict."""
        lines = []
        if self.window_start is None or now - self.window_start >= self.interval:
            lines = self.flush(now)
            self.window_start = now
            self.shown = 0
        if self.shown < self.burst:
            self.shown += 1
            return lines, True
        self.suppressed += 1
        entry = self.by_source.get(source)
        if entry is None:
            if len(self.by_source) >= self.max_sources:
                self.other_sources += 1
                return lines, False
            entry = self.by_source[source] = [0, {}]
        entry[0] += 1
        kind = reason_kind(reason)
        kinds = entry[1]
        if kind in kinds or len(kinds) < 8:
            kinds[kind] = kinds.get(kind, 0) + 1
        return lines, False

    def due(self, now):
        return bool(self.suppressed) and self.window_start is not None and now - self.window_start >= self.interval

    def flush(self, now):
        """The summary line(s) for what was suppressed since the window started (none if nothing was)."""
        if not self.suppressed:
            self.by_source = {}
            self.other_sources = 0
            return []
        span = now - self.window_start if self.window_start is not None else 0.0
        ranked = sorted(self.by_source.items(), key=lambda item: (-item[1][0], item[0]))
        parts = []
        for source, (count, kinds) in ranked[:self.top]:
            reasons = ", ".join("%s %d" % (kind, n) for kind, n in
                                sorted(kinds.items(), key=lambda item: (-item[1], item[0]))[:3])
            parts.append("%s: %d (%s)" % (source, count, reasons))
        rest = sum(entry[0] for _source, entry in ranked[self.top:]) + self.other_sources
        if rest:
            parts.append("%d from %d other sources" % (
                rest, max(0, len(ranked) - self.top) + (1 if self.other_sources else 0)))
        line = "dropped %d more inputs in %.1f s (not logged one by one): %s" % (
            self.suppressed, span, "; ".join(parts))
        self.suppressed = 0
        self.by_source = {}
        self.other_sources = 0
        return [line]


class Console(object):
    """Timestamped lines on stdout (the serial console in the ramdisk).

    Every line is escaped (:func:`escape`): whatever a caller quotes from the
    network cannot act on the terminal. Drops are rate-limited
    (:class:`DropSummary`); a summary that comes due with no later drop is
    written by a short-lived timer thread, or by :meth:`tick`.
    """

    def __init__(self, name: str, debug: bool = False, stream=None, clock=time.monotonic, drop_interval: float = 10.0,
                 drop_burst: int = 10, timer: bool = True):
        self.name = name
        self.debug_enabled = debug
        self.stream = stream or sys.stdout
        self._clock = clock
        self._start = clock()
        self.dropped = 0
        self._lock = threading.RLock()
        self._drops = DropSummary(interval=drop_interval, burst=drop_burst)
        self._timer_enabled = timer
        self._timer = None

    def _write(self, text):
        line = "[%8.3f] %s: %s\n" % (self._clock() - self._start, self.name, escape(text))
        with self._lock:
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
        with self._lock:
            try:
                self.stream.write("%s: %s\n" % (self.name, escape(text)))
                self.stream.flush()
            except (OSError, ValueError):
                pass

    def debug(self, text):
        if self.debug_enabled:
            self._write("debug: " + text)

    def drop(self, source, reason):
        """Every hostile or unusable input is counted; the first of each interval are logged with their
        reason, the rest summarised (count, source, reasons) once per interval."""
        with self._lock:
            self.dropped += 1
            lines, show = self._drops.offer(self._clock(), str(source), str(reason))
            for line in lines:
                self._write(line)
            if show:
                self._write("dropped input from %s: %s" % (source, reason))
            elif self._timer_enabled and self._timer is None:
                self._arm_timer()

    def tick(self):
        """Write a drop summary that has come due (the agents' loops may call this; the timer does too)."""
        with self._lock:
            now = self._clock()
            if self._drops.due(now):
                for line in self._drops.flush(now):
                    self._write(line)
                self._drops.window_start = now
                self._drops.shown = 0

    def _arm_timer(self):
        left = max(0.05, self._drops.interval - (self._clock() - (self._drops.window_start or self._clock())))

        def fire():
            with self._lock:
                self._timer = None
            self.tick()

        self._timer = threading.Timer(left + 0.01, fire)
        self._timer.daemon = True
        self._timer.start()


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


def run_agent(console, start):
    """An agent's exit code from running ``start()``: its own, 130 after Ctrl-C, EXIT_FAILED (logged) on a StiefelError."""
    try:
        return start()
    except KeyboardInterrupt:
        return 130
    except StiefelError as exc:
        console("fatal: %s" % exc)
        return EXIT_FAILED
