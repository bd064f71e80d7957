# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Shut the laptop's OS booted on a desktop down cleanly when the laptop serving its disk runs out of battery.

Run by ``stiefel-powerwatch.service`` (the laptop role's unit, which starts only
when the kernel command line has ``stiefel.server=``, i.e. when the client
booted this OS over NBD) as ``python3 -m stiefel_runtime.powerwatch``. Every
``--interval`` seconds it sends the server a DISCOVER and reads the POWER note
that follows the OFFER (docs/protocol.md): both bound to its fresh nonce and
the key, so a recorded note is worth nothing. On battery it logs; when the
server sets SHUT_DOWN (the charge at or below ``laptop_shutdown_charge``) it
says so with ``wall`` and on the console and schedules ``shutdown -h +GRACE``
(``--grace`` minutes, default 1: the laptop role's ``laptop_powerwatch_grace``),
once; a note without SHUT_DOWN (the power supply came back) cancels it with
``shutdown -c``. When logind cannot take the scheduled shutdown (``shutdown``
fails or hangs: no D-Bus, logind not running) it keeps that time itself and
then runs ``systemctl poweroff`` (PID 1's own socket, no D-Bus), so the
desktop still shuts down cleanly before the laptop dies. No answer changes
nothing: a lost datagram is no reason to stop or start a shutdown.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from ansible_collections.stiefel.system.plugins.module_utils import keyfile
from ansible_collections.stiefel.system.plugins.module_utils.errors import StiefelError
from stiefel_runtime import discovery, messages, whendone
from stiefel_runtime.common import Console, DEFAULT_KEY_PATH, escape, read_cmdline
from stiefel_runtime.power import describe_note

INTERVAL = 30.0
GRACE_MINUTES = 1  # between the wall message and the shutdown: time to save work, or to plug the laptop in
GRACE_MAX = 60
# A command that hangs (systemctl waiting on a D-Bus that never answers) must not stop the watch.
COMMAND_TIMEOUT = 30
KMSG_PATH = "/dev/kmsg"


def run_command(argv, timeout=COMMAND_TIMEOUT):
    """The subprocess seam: ``wall``, ``shutdown`` and ``systemctl`` (unit tests replace it).

    Returns the exit code; 124 when it did not end within ``timeout``, 127 when it could not be started.
    """
    try:
        return subprocess.run(argv, check=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return 124
    except OSError:
        return 127


def to_kmsg(text, path=KMSG_PATH):
    """Say ``text`` on the console through the kernel log (level 2: shown even under ``quiet``)."""
    try:
        with open(path, "w", encoding="utf-8", errors="replace") as handle:
            handle.write("<2>stiefel-powerwatch: %s\n" % escape(text))
    except OSError:
        pass


class PowerWatch(object):
    """What the last POWER note asks for, and the one shutdown it scheduled."""

    def __init__(self, key, address, ifindex, console, port=discovery.PORT, run=run_command, kmsg=to_kmsg,
                 timeout=whendone.ANSWER_TIMEOUT, clock=time.monotonic, grace=GRACE_MINUTES):
        self.key = key
        self.grace = grace
        self.address = address
        self.ifindex = ifindex
        self.port = port
        self.console = console
        self.run = run
        self.kmsg = kmsg
        self.timeout = timeout
        self.clock = clock
        self.scheduled = False
        self.due = None  # when powerwatch keeps the minute itself: the clock() of its systemctl poweroff
        self._last = None  # (flags, charge) last logged
        self.sock = discovery.open_client_socket()

    def close(self):
        self.sock.close()

    def ask(self):
        """One DISCOVER -> OFFER -> POWER; the note's ``(flags, charge)``, or None without one."""
        offer = whendone.offer_from(self.sock, self.key, self.address, self.ifindex, self.port, self.timeout,
                                    self.console.drop)
        if offer is None:
            return None
        deadline = time.monotonic() + self.timeout
        while True:
            note = whendone.receive(self.sock, self.key, (messages.POWER,), offer.client_nonce, deadline,
                                    self.console.drop)
            if note is None:
                return None
            if note.server_nonce == offer.server_nonce:
                return note.flags, note.charge
            self.console.drop(self.address, "POWER bound to another OFFER")

    def poll(self):
        try:
            note = self.ask()
        except (StiefelError, OSError) as exc:
            self.console("cannot ask the server at %s: %s" % (self.address, exc))
            return
        if note is None:
            self.console.debug("no POWER note from %s this time" % self.address)
            return
        self.follow(*note)

    def follow(self, flags, charge):
        """Act on a note: log a change, schedule the shutdown once, cancel it when the flag clears."""
        if (flags, charge) != self._last and (flags or self._last is not None):
            self.console("power: %s" % describe_note(flags, charge))
        self._last = (flags, charge)
        if flags & messages.POWER_SHUT_DOWN and not self.scheduled:
            delay = "+%d" % self.grace
            when = "now" if not self.grace else "in %d minute%s" % (self.grace, "" if self.grace == 1 else "s")
            text = ("stiefel: %s. This system shuts down cleanly %s (shutdown -h %s); connecting the "
                    "laptop's power supply cancels it." % (describe_note(flags, charge), when, delay))
            announced = self.clock()
            self.announce(text)
            code = self.run(["shutdown", "-h", "--no-wall", delay, text])
            self.scheduled = True
            if code != 0:
                self.due = announced + 60 * self.grace  # the time the wall message gave
                self.console("shutdown -h %s failed (exit %s): powering off with systemctl poweroff in %d s instead"
                             % (delay, code, 60 * self.grace))
        elif not flags & messages.POWER_SHUT_DOWN and self.scheduled:
            text = "stiefel: %s: the shutdown is cancelled." % describe_note(flags, charge)
            if self.due is not None:
                self.due, self.scheduled = None, False
                self.announce(text)
            elif self.run(["shutdown", "-c", "--no-wall"]) == 0:
                self.scheduled = False
                self.announce(text)
            else:
                self.console("shutdown -c failed: the shutdown stands")

    def tick(self):
        """The minute powerwatch keeps itself is over: ``systemctl poweroff`` (again 10 s later if it fails)."""
        if self.due is None or self.clock() < self.due:
            return
        self.console("powering off now (systemctl poweroff)")
        code = self.run(["systemctl", "poweroff"])
        if code == 0:
            self.due = None
        else:
            self.console("systemctl poweroff failed (exit %s): trying again in 10 s" % code)
            self.due = self.clock() + 10

    def sleep_for(self, interval):
        """Seconds until the next poll: ``interval``, or less when the minute powerwatch keeps ends sooner."""
        if self.due is None:
            return interval
        return max(0.0, min(interval, self.due - self.clock()))

    def announce(self, text):
        self.console(text)
        self.kmsg(text)
        self.run(["wall", text])


def grace_minutes(text):
    """argparse type of ``--grace``: whole minutes, 0 (at once) to GRACE_MAX."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a whole number of minutes: %r" % text) from None
    if not 0 <= value <= GRACE_MAX:
        raise argparse.ArgumentTypeError("%d minutes is not within 0-%d" % (value, GRACE_MAX))
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(prog="stiefel-powerwatch", description=__doc__.splitlines()[0])
    parser.add_argument("--key", default=DEFAULT_KEY_PATH)
    parser.add_argument("--server", help="ADDRESS%%INTERFACE (default: from the kernel command line)")
    parser.add_argument("--port", type=int, default=discovery.PORT)
    parser.add_argument("--interval", type=float, default=INTERVAL)
    parser.add_argument("--grace", type=grace_minutes, default=GRACE_MINUTES,
                        help="minutes between the wall message and the shutdown (0-%d, default %d)" % (
                            GRACE_MAX, GRACE_MINUTES))
    parser.add_argument("--cmdline-file", default="/proc/cmdline")
    parser.add_argument("--sysfs-net", default="/sys/class/net")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    console = Console("stiefel-powerwatch", debug=args.debug)
    try:
        key = keyfile.read_key(args.key)
        if args.server:
            address, ifindex = whendone.parse_server(args.server)
        else:
            address, ifindex = whendone.server_from_cmdline(read_cmdline(args.cmdline_file), args.sysfs_net)
        watch = PowerWatch(key, address, ifindex, console, port=args.port, grace=args.grace)
    except (StiefelError, OSError) as exc:
        console("fatal: %s" % exc)
        return 1
    console("watching the power of the laptop at %s%%%d every %d s" % (address, ifindex, args.interval))
    try:
        while True:
            watch.poll()
            watch.tick()
            time.sleep(watch.sleep_for(args.interval))
    except KeyboardInterrupt:
        return 130
    finally:
        watch.close()


if __name__ == "__main__":
    sys.exit(main())
