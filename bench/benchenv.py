# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What every benchmark script shares: where results go, the load average, and SIGTERM."""

from __future__ import annotations

import os
import signal
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """``$STIEFEL_CACHE_DIR`` or ``<repo>/.cache``; results go to its ``bench/``."""
    return Path(os.environ.get("STIEFEL_CACHE_DIR") or REPO / ".cache")


def loadavg() -> list:
    """The 1/5/15-minute load average, printed with every figure (the machine is shared)."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return [float("nan")] * 3


def sigterm_as_interrupt() -> int:
    """Make SIGTERM clean up like Ctrl-C; returns this (the main) process's PID.

    pyroute2's forked netns helpers inherit the handler: they exit at once instead of
    running the main process's cleanup, and the caller's ``finally`` compares PIDs too.
    """
    main_pid = os.getpid()

    def on_term(signum, frame):
        if os.getpid() != main_pid:
            os._exit(1)
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    return main_pid
