# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The way back: what the server ramdisk does once the desktop is done with the laptop's disk.

The policy comes from the server command line (the laptop role's
``laptop_when_done`` and ``laptop_return_wait``)::

    stiefel.when_done=return|poweroff|stay   (default return)
    stiefel.return_wait=SECONDS              (default 120)

``return`` kexecs (kexec_file_load, so it works under lockdown: the laptop's
kernel is signed by its distribution) into the laptop's own kernel and
initrd, the ones the server serves, with the command line the laptop booted
with: autokexec puts it in the key cpio at ``/etc/stiefel/return-cmdline``
(stiefel.* words removed, so the laptop's OS never serves again by itself).

Never while a client may still write. :class:`DoneWatcher` is the decision
(pure, fed every few seconds): it arms once an NBD client has been attached;
when the last one is gone it counts down -- ``CLEAN_WAIT`` seconds after a
clean disconnect (nbdkit saw NBD_CMD_DISC), ``return_wait`` after a dropped
connection -- and any NBD connection or discovery session in between
cancels it (a desktop that reboots comes back through discovery). Only then
:func:`finish` stops nbdkit (waits for it), flushes the disk (fsync and
BLKFLSBUF) and follows the policy.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import stat
import subprocess

from ansible_collections.stiefel.system.plugins.module_utils.errors import StiefelError
from stiefel_runtime import kexec
from stiefel_runtime.common import quiet_log, strip_stiefel_options

RETURN = "return"
POWEROFF = "poweroff"
STAY = "stay"
POLICIES = (RETURN, POWEROFF, STAY)
DEFAULT_POLICY = RETURN
DEFAULT_WAIT = 120
MAX_WAIT = 24 * 3600
# A clean disconnect is a client that is done, but a reboot disconnects cleanly too and comes
# back through discovery within seconds: give it that long.
CLEAN_WAIT = 30
# Countdown lines on the console: at most one per step.
COUNTDOWN_STEP = 10
RETURN_CMDLINE_PATH = "/etc/stiefel/return-cmdline"
# nbdkit --verbose, when a client ends its connection the NBD way (libnbd's nbd_shutdown, nbd-client -d).
CLEAN_DISCONNECT = "client sent NBD_CMD_DISC"
BLKFLSBUF = 0x1261
_RB_POWER_OFF = 0x4321FEDC
MAX_CMDLINE = 4096


class WayBackError(StiefelError):
    """The policy could not be followed (the message says what happened)."""


def laptop_cmdline(text):
    """The laptop's own command line from ``text``: one line, without any ``stiefel.*`` word."""
    line = strip_stiefel_options((text or "").replace("\0", " "))
    return line if len(line.encode("utf-8")) < MAX_CMDLINE else ""


def read_return_cmdline(path=RETURN_CMDLINE_PATH):
    """The command line autokexec saved for the way back, or None when there is none."""
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as handle:
            return laptop_cmdline(handle.read(MAX_CMDLINE + 1)) or None
    except OSError:
        return None


def policy_from(options, log=quiet_log):
    """``(policy, wait seconds)`` from parsed stiefel.* options; unknown values fall back, said on ``log``."""
    policy = options.get("when_done") or DEFAULT_POLICY
    if policy not in POLICIES:
        log("stiefel.when_done=%r is not one of %s: using %s" % (
            str(policy)[:32], ", ".join(POLICIES), DEFAULT_POLICY))
        policy = DEFAULT_POLICY
    wait = options.get("return_wait")
    try:
        wait = int(wait) if wait not in (None, True) else DEFAULT_WAIT
        if wait < 0:
            raise ValueError(wait)
    except ValueError:
        log("stiefel.return_wait=%r is not a number of seconds: using %d" % (str(wait)[:32], DEFAULT_WAIT))
        wait = DEFAULT_WAIT
    return policy, max(0, min(wait, MAX_WAIT))


class DoneWatcher(object):
    """Decides when the desktop is done: ``observe(...)`` returns True once the policy is due.

    States: ``idle`` (no NBD client yet), ``serving``, ``waiting`` (countdown), ``done``.
    """

    def __init__(self, policy=DEFAULT_POLICY, wait=DEFAULT_WAIT, log=quiet_log):
        self.policy = policy
        self.wait = wait
        self.log = log
        self.state = "idle"
        self.deadline = None
        self._next_line = None
        self._clean = False  # a clean disconnect since the last attach (its log line may come a poll early)
        self._waiting_clean = False  # the countdown running is the short one

    def set_policy(self, policy, who="the desktop"):
        """A WHEN_DONE from the desktop (stiefel_runtime.whendone) changes the policy for this run."""
        if policy not in POLICIES:
            raise ValueError(policy)
        self.log("way back: %s asks: when done, %s (was %s)" % (who, policy, self.policy))
        self.policy = policy
        if self.state == "waiting" and policy == STAY:
            self.state, self.deadline = "idle", None
            self.log("way back: countdown cancelled: staying in the server ramdisk, serving")

    def _what(self):
        return {RETURN: "return to the laptop's OS", POWEROFF: "power the laptop off"}.get(self.policy)

    def observe(self, now, peers, activity=False, clean=False):
        """``peers``: NBD clients attached now; ``activity``: a discovery session or payload since the last call;
        ``clean``: nbdkit saw a clean disconnect since the last call."""
        if self.state == "done":
            return False
        if peers:
            if self.state == "waiting":
                self.log("way back: an NBD client is attached again: countdown cancelled")
            # Only a clean disconnect logged in this poll counts for the last client leaving by the next one
            # (its log line may come a poll before the socket is gone): the attach's own TLS check
            # disconnects cleanly at boot, and that must not make a later power cut look like a clean end.
            self._clean = clean
            self.state, self.deadline = "serving", None
            return False
        clean = self._clean or clean
        if self.state == "waiting" and activity:
            self.log("way back: a client is booting again (discovery session): countdown cancelled")
            self.state, self.deadline = "idle", None
            return False
        if self.state == "serving":
            if self.policy == STAY:
                self.log("way back: all NBD clients gone; policy stay: the laptop stays in the server ramdisk, "
                         "serving")
                self.state = "idle"
                return False
            wait = min(CLEAN_WAIT, self.wait) if clean else self.wait
            self._clean, self._waiting_clean = False, clean
            self.state, self.deadline = "waiting", now + wait
            self.log("way back: all NBD clients gone (%s): %s in %d s unless a client comes back" % (
                "clean disconnect" if clean else "connection dropped or closed without NBD_CMD_DISC",
                self._what(), wait))
            self._next_line = now + COUNTDOWN_STEP
            return wait <= 0 and self._due(now)
        if self.state == "waiting":
            if clean and not self._waiting_clean and self.deadline - now > min(CLEAN_WAIT, self.wait):
                # nbdkit's log line came a poll after the socket was gone: it was a clean end after all
                self._waiting_clean = True
                self.deadline = now + min(CLEAN_WAIT, self.wait)
                self.log("way back: that was a clean disconnect: %s in %d s" % (
                    self._what(), round(self.deadline - now)))
            return self._due(now)
        return False

    def _due(self, now):
        if now >= self.deadline:
            self.state = "done"
            self.log("way back: no client came back: stopping the export, then %s" % self._what())
            return True
        if now >= self._next_line:
            self.log("way back: %s in %d s" % (self._what(), round(self.deadline - now)))
            self._next_line = now + COUNTDOWN_STEP
        return False


def flush_disk(path, log=quiet_log):
    """fsync the exported disk and drop its buffers (BLKFLSBUF on a block device): nothing cached stays unwritten."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
        if stat.S_ISBLK(os.fstat(fd).st_mode):
            fcntl.ioctl(fd, BLKFLSBUF, 0)
    finally:
        os.close(fd)
    os.sync()
    log("way back: %s flushed (fsync%s)" % (path, ", BLKFLSBUF" if stat.S_ISBLK(os.stat(path).st_mode) else ""))


def power_off():
    """reboot(2) with RB_POWER_OFF: the ramdisk's PID 1 is a shell script, there is no init to ask."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.reboot(_RB_POWER_OFF) != 0:
        errno = ctypes.get_errno()
        raise WayBackError("reboot(RB_POWER_OFF) failed: %s" % os.strerror(errno))


def finish(policy, stop_export, disk, kernel, initrd, cmdline, log=quiet_log, run=subprocess.run,
           poweroff=power_off, flush=flush_disk, dry_run=False):
    """Stop the export, flush the disk, then kexec into the laptop's OS or power off.

    ``stop_export()`` must return only once nbdkit has exited. Raises WayBackError (or KexecError)
    when the kexec cannot be loaded: the caller serves again. Returns only in ``dry_run`` or on error.
    """
    stop_export()
    log("way back: export stopped (nbdkit exited)")
    if disk:
        flush(disk, log=log)
    if policy == POWEROFF:
        log("way back: powering the laptop off")
        if not dry_run:
            poweroff()
        return
    if not kernel:
        raise WayBackError("the laptop's kernel was never read (/boot locked or unreadable): cannot return")
    log("way back: kexec into the laptop's kernel %s with %r" % (kernel, cmdline))
    kexec.load(kernel, initrd, cmdline, run=run, log=log, dry_run=dry_run)
    if not dry_run:
        os.sync()
    log("way back: kexec now")
    kexec.execute(run=run, log=log, dry_run=dry_run)
