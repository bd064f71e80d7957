# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Pairing a network-booted desktop by code (issue 17, item 2): SPAKE2 and key confirmation both ways.

A desktop booted over the network has no key. The laptop shows a pairing code
(:func:`keyschedule.pairing_code`, derived from its key); the person types it on
the desktop's console. SPAKE2 turns the code into a strong shared key; the desktop
confirms first (so a guess is only tested by sending a PAIR_PROOF, which the laptop
counts), then the laptop confirms and sends its stiefel key sealed under the
exchange's wrapping key. From there the desktop goes on exactly as with a stick,
holding the key in memory only. An eavesdropper sees two SPAKE2 messages and two
MACs: nothing to test a guess against offline. The code itself never leaves either
machine and is never logged.

Online guessing is bounded by :class:`Lockout`: after 5 wrong codes no pairing for
30 s, doubling with every further 5, at most an hour; the state is a small file in
the run directory, so restarting the agent does not reset it. Wire format in
docs/protocol.md (Pairing) and :mod:`stiefel_runtime.messages`.
"""

from __future__ import annotations

import collections
import json
import math
import os
import select
import sys
import time

from ansible_collections.stiefel.system.plugins.module_utils import keyfile, keyschedule, nbd_export
from ansible_collections.stiefel.system.plugins.module_utils.errors import (
    AuthenticationFailed,
    MalformedMessage,
    ProtocolError,
    ReplayedMessage,
    StiefelError,
)
from stiefel_runtime import discovery, messages
from stiefel_runtime.common import escape, quiet_log

try:
    from spake2 import SPAKE2_A, SPAKE2_B
    from spake2.spake2 import SPAKEError

    HAS_SPAKE2 = True
except ImportError:  # pragma: no cover - the ramdisk and the laptop carry python3-spake2
    HAS_SPAKE2 = False

WRONG_CODES_BEFORE_LOCK = 5
LOCK_FIRST = 30.0
LOCK_MAX = 3600.0
PENDING_CAPACITY = 16
PENDING_TTL = 60.0
# SPAKE2 costs the laptop a few milliseconds of Python per HELLO: a flood must not buy more than this.
HELLO_BURST = 10
HELLO_PER_SECOND = 5.0
STATE_FILE = "pairing.json"
HELLO_INTERVAL = 1.0
LOCKED_LOG_INTERVAL = 10.0


LOCK_ENV = "STIEFEL_PAIRING_LOCK"


class PairingError(StiefelError):
    pass


def first_lock_seconds(environ=None):
    """The first lockout: LOCK_FIRST, or a LONGER one from $STIEFEL_PAIRING_LOCK (stricter only, never weaker)."""
    try:
        value = float((os.environ if environ is None else environ).get(LOCK_ENV, ""))
    except ValueError:
        return LOCK_FIRST
    return value if LOCK_FIRST <= value <= LOCK_MAX else LOCK_FIRST


def _need_spake2():
    if not HAS_SPAKE2:
        raise PairingError("pairing needs the spake2 Python package (Debian python3-spake2)")


class Lockout(object):
    """Wrong codes in a row, and until when pairing is refused; kept in ``path`` (wall clock)."""

    def __init__(self, path=None, clock=time.time, first=None):
        self.path = path
        self._clock = clock
        self.first = first_lock_seconds() if first is None else first
        self.failures = 0
        self.until = 0.0
        if path is not None:
            try:
                with open(path, "r", encoding="ascii") as handle:
                    state = json.loads(handle.read(4096))
                self.failures = max(0, int(state.get("failures", 0)))
                self.until = float(state.get("until", 0.0))
            except (OSError, ValueError, TypeError, AttributeError):
                pass  # no or unreadable state: start counting afresh (the file is ours, 0600)

    def _save(self):
        if self.path is not None:
            nbd_export.atomic_write(self.path, json.dumps({"failures": self.failures, "until": self.until}) + "\n",
                                    0o600)

    def remaining(self) -> int:
        """Whole seconds pairing stays locked (rounded up: 0 only once it is over)."""
        return max(0, math.ceil(self.until - self._clock()))

    def failed(self) -> float:
        """Count a wrong code; returns the seconds pairing is now locked (0 if not)."""
        self.failures += 1
        locked = 0.0
        if self.failures % WRONG_CODES_BEFORE_LOCK == 0:
            rounds = self.failures // WRONG_CODES_BEFORE_LOCK
            locked = min(LOCK_MAX, self.first * 2 ** min(rounds - 1, 16))
            self.until = self._clock() + locked
        self._save()
        return locked

    def succeeded(self):
        self.failures, self.until = 0, 0.0
        self._save()


class _Bucket(object):
    def __init__(self, burst, rate, clock):
        self.burst, self.rate, self._clock = burst, rate, clock
        self.tokens, self.at = float(burst), clock()

    def take(self):
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class PairingResponder(object):
    """The laptop's side: answers pairing datagrams; ``handle`` returns the reply or raises ProtocolError."""

    def __init__(self, key, state_dir=None, log=quiet_log, clock=time.monotonic, wall_clock=time.time):
        _need_spake2()
        self.key = key
        self._code = keyschedule.normalize_pairing_code(keyschedule.pairing_code(key))
        self.log = log
        self._clock = clock
        self.lockout = Lockout(os.path.join(state_dir, STATE_FILE) if state_dir else None, clock=wall_clock)
        self._hellos = _Bucket(HELLO_BURST, HELLO_PER_SECOND, clock)
        self._pending = collections.OrderedDict()  # server nonce -> (client nonce, transcript, keys, peer, time)
        self.paired = 0
        self._next_locked_log = 0.0

    def _expire(self):
        now = self._clock()
        while self._pending:
            nonce, entry = next(iter(self._pending.items()))
            if now - entry[4] <= PENDING_TTL and len(self._pending) <= PENDING_CAPACITY:
                break
            self._pending.popitem(last=False)

    def handle(self, data, peer=None):
        msg = messages.parse_pairing(data, expect=(messages.PAIR_HELLO, messages.PAIR_PROOF))
        if msg.type == messages.PAIR_HELLO:
            return self._hello(msg, bytes(data), peer)
        return self._proof(msg, peer)

    def _hello(self, msg, data, peer):
        # the bucket first: a flood while locked is dropped (summarised), not answered and logged one by one
        if not self._hellos.take():
            raise ReplayedMessage("PAIR_HELLO flood: over %d a second" % HELLO_PER_SECOND)
        locked = self.lockout.remaining()
        if locked:
            now = self._clock()
            if now >= self._next_locked_log:
                self.log("pairing from %s refused: locked for %d s more after %d wrong codes" % (
                    peer or "?", locked, self.lockout.failures))
                self._next_locked_log = now + LOCKED_LOG_INTERVAL
            return messages.build_pair_refused(msg.client_nonce, None, messages.REFUSED_LOCKED, locked)
        server_nonce = messages.new_nonce()
        laptop = SPAKE2_B(self._code, idA=messages.PAIR_DESKTOP_ID, idB=messages.PAIR_LAPTOP_ID)
        challenge = messages.build_pair_challenge(msg.client_nonce, server_nonce, laptop.start())
        try:
            spake_key = laptop.finish(msg.spake)
        except (SPAKEError, ValueError, AssertionError) as exc:
            raise MalformedMessage("PAIR_HELLO SPAKE2 message is not a point of the group (%s)" %
                                   type(exc).__name__) from None
        transcript, keys = messages.pairing_keys(spake_key, data, challenge)
        self._pending[server_nonce] = (msg.client_nonce, transcript, keys, peer, self._clock())
        self._expire()
        return challenge

    def _proof(self, msg, peer):
        entry = self._pending.pop(msg.server_nonce, None)
        if entry is None:
            raise ReplayedMessage("PAIR_PROOF for an unknown, used or expired pairing")
        client_nonce, transcript, keys, issued_to, issued_at = entry
        if self._clock() - issued_at > PENDING_TTL or msg.client_nonce != client_nonce or (
                peer is not None and issued_to is not None and peer != issued_to):
            raise ReplayedMessage("PAIR_PROOF does not answer this peer's open pairing")
        locked = self.lockout.remaining()
        if locked:
            return messages.build_pair_refused(msg.client_nonce, msg.server_nonce, messages.REFUSED_LOCKED, locked)
        try:
            messages.check_pair_proof(msg, keys, transcript)
        except AuthenticationFailed:
            locked = self.lockout.failed()
            self.log("pairing from %s: wrong code (%d in a row)%s" % (
                peer or "?", self.lockout.failures, "; pairing locked for %d s" % locked if locked else ""))
            reason = messages.REFUSED_LOCKED if locked else messages.REFUSED_WRONG_CODE
            return messages.build_pair_refused(msg.client_nonce, msg.server_nonce, reason, locked)
        self.lockout.succeeded()
        self.paired += 1
        self.log("pairing from %s: code confirmed, the desktop has the key for this boot" % (peer or "?"))
        return messages.build_pair_welcome(msg.client_nonce, msg.server_nonce, keys, transcript, self.key)


def answer_datagram(responder, sock, data, host, port, scope, console):
    """The agents' hook: answer one pairing datagram on the discovery socket, drops logged (escaped, rate-limited)."""
    source = "%s%%%s" % (host, scope)
    try:
        reply = responder.handle(data, host)
    except ProtocolError as exc:
        console.drop(source, discovery.describe(exc))
        return
    try:
        sock.sendto(reply, (host, port, 0, scope))
    except OSError as exc:
        console("cannot answer pairing from %s: %s" % (source, exc))


# ------------------------------------------------------------------ the desktop's side
class PairingRefused(PairingError):
    def __init__(self, reason, retry_after=0):
        super().__init__("%s%s" % (messages.REFUSED_REASONS.get(reason, "refused"),
                                   " (try again in %d s)" % retry_after if retry_after else ""))
        self.reason = reason
        self.retry_after = retry_after


class PairingClient(object):
    """One attempt with one typed code: HELLO on every link, the first CHALLENGE answered, the key returned."""

    def __init__(self, code, log=quiet_log, port=discovery.PORT):
        _need_spake2()
        self.password = keyschedule.normalize_pairing_code(code)
        self.log = log
        self.port = port
        self.client_nonce = messages.new_nonce()
        self.desktop = SPAKE2_A(self.password, idA=messages.PAIR_DESKTOP_ID, idB=messages.PAIR_LAPTOP_ID)
        self.hello = messages.build_pair_hello(self.client_nonce, self.desktop.start())
        self.server_nonce = None
        self.peer = None
        self._keys = None
        self._transcript = None

    def handle(self, data, peer):
        """A reply -> ``None`` (send nothing), ``bytes`` (send to ``peer``) or the stiefel key (done).

        Raises PairingRefused (the laptop said no), ProtocolError (dropped).
        """
        msg = messages.parse_pairing(data, expect=(messages.PAIR_CHALLENGE, messages.PAIR_WELCOME,
                                                   messages.PAIR_REFUSED))
        if msg.client_nonce != self.client_nonce:
            raise ReplayedMessage("%s for another pairing" % msg.type_name)
        if msg.type == messages.PAIR_REFUSED:
            if self.server_nonce is not None and msg.server_nonce not in (self.server_nonce, bytes(16)):
                raise ReplayedMessage("PAIR_REFUSED for another exchange")
            raise PairingRefused(msg.reason, msg.retry_after)
        if msg.type == messages.PAIR_CHALLENGE:
            if self.server_nonce is not None:
                raise ReplayedMessage("a second PAIR_CHALLENGE (answering %s already)" % self.peer)
            try:
                spake_key = self.desktop.finish(msg.spake)
            except (SPAKEError, ValueError, AssertionError) as exc:
                raise MalformedMessage("PAIR_CHALLENGE SPAKE2 message unusable (%s)" % type(exc).__name__) from None
            self._transcript, self._keys = messages.pairing_keys(spake_key, self.hello, bytes(data))
            self.server_nonce, self.peer = msg.server_nonce, peer
            return messages.build_pair_proof(self.client_nonce, msg.server_nonce, self._keys, self._transcript)
        if self.server_nonce is None or msg.server_nonce != self.server_nonce or peer != self.peer:
            raise ReplayedMessage("PAIR_WELCOME for another exchange")
        return PairedKey(messages.open_pair_welcome(msg, self._keys, self._transcript))


class PairedKey(bytes):
    """The stiefel key a pairing delivered (kept in memory only)."""


def pair_once(code, links, sock, log=quiet_log, timeout=10.0, port=discovery.PORT, clock=time.monotonic):
    """Run one pairing over ``sock`` on every ready link of ``links``; the stiefel key, or raise."""
    attempt = PairingClient(code, log=log, port=port)
    drop = getattr(log, "drop", None) or (lambda source, reason: log("dropped input from %s: %s" % (
        source, escape(reason, 200))))
    deadline = clock() + timeout
    next_hello = clock()
    while True:
        now = clock()
        wait = deadline - now
        if wait <= 0:
            raise PairingError("no laptop answered the pairing within %.0f s" % timeout)
        if attempt.server_nonce is None and now >= next_hello:
            # again every second until a laptop answers: links come up while the person types
            for link in links.ready_links():
                try:
                    discovery.send_discover(sock, attempt.hello, link.index, port)
                except OSError as exc:
                    getattr(log, "debug", log)("cannot send PAIR_HELLO on %s: %s" % (link.ifname, exc))
            next_hello = now + HELLO_INTERVAL
        readable, _w, _x = select.select([sock, links.fileno()], [], [], max(0.0, min(wait, next_hello - now)))
        if links.fileno() in readable:
            links.process()
        if sock not in readable:
            continue
        for data, host, rport, scope in discovery.drain(sock):
            try:
                got = attempt.handle(data, (host, scope))
            except PairingRefused:
                raise
            except ProtocolError as exc:
                # a Console's drop: escaped and summarised, so junk on the link cannot fill the desktop's console
                drop("%s%%%s" % (host, scope), "pairing reply: %s" % discovery.describe(exc))
                continue
            if isinstance(got, PairedKey):
                return bytes(got)
            if got is not None:
                sock.sendto(got, (host, rport, 0, scope))


def read_code_line(stream, prompt, out):
    """One line from ``stream`` (the console's stdin), prompt on ``out``; b"" at end of input."""
    out.write(prompt)
    out.flush()
    line = stream.readline(256)
    if isinstance(line, str):
        line = line.encode("utf-8", "replace")
    return line.strip()


def pair_on_console(links, sock, console, ask, attempts=None, timeout=10.0, port=discovery.PORT):
    """Ask for the laptop's pairing code until a pairing succeeds; the stiefel key.

    ``ask(prompt)`` returns the typed line (b"" at end of input: give up). A wrong code or a lockout is said on
    the console; the code itself never is.
    """
    tried = 0
    while attempts is None or tried < attempts:
        tried += 1
        line = ask("Pairing code shown on the laptop (stiefelctl pairing-code): ")
        if not line:
            raise PairingError("no pairing code typed")
        try:
            key = pair_once(line, links, sock, log=console, timeout=timeout, port=port)
        except PairingRefused as exc:
            console("pairing refused: %s" % exc)
            if exc.retry_after:
                time.sleep(min(exc.retry_after, LOCK_MAX))
            continue
        except StiefelError as exc:
            console("pairing failed: %s" % exc)
            continue
        console.marker("paired")
        console("paired: code confirmed by the laptop, key id %s (kept in memory only)" % keyschedule.key_id_hex(key))
        return key
    raise PairingError("no pairing after %d attempts" % tried)


def responder_for(agent):
    """The agent's PairingResponder (made on first use: state beside the agent's run files)."""
    responder = getattr(agent, "_pairing_responder", None)
    if responder is None:
        responder = PairingResponder(agent.key, state_dir=agent.run_dir, log=agent.console)
        agent._pairing_responder = responder  # pylint: disable=protected-access
    return responder


def answer_on(agent, data, host, port, scope):
    """The server agents' hook for a pairing datagram on their discovery socket."""
    try:
        responder = responder_for(agent)
    except PairingError as exc:
        agent.console.drop("%s%%%s" % (host, scope), str(exc))
        return
    answer_datagram(responder, agent.sock, data, host, port, scope, agent.console)


def client_key(path, options, console, mtu=None, stdin=None, stdout=None, port=discovery.PORT):
    """The client's stiefel key: the stick's key file, or with ``stiefel.pair`` on the command line (what the
    network boot's grub.cfg passes: that ramdisk has no key) one obtained by pairing with the code typed on the
    console's stdin."""
    if not options.get("pair"):
        return keyfile.read_key(path)
    from stiefel_runtime.netlink import LinkManager  # pylint: disable=import-outside-toplevel  # pyroute2: agents only

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    console("no key on this boot medium: pairing with the laptop by its code")
    links = LinkManager(mtu=mtu, log=console)
    links.open()
    sock = discovery.open_client_socket()
    try:
        return pair_on_console(links, sock, console, lambda prompt: read_code_line(stdin, prompt, stdout), port=port)
    finally:
        sock.close()
        links.close()


def main(argv=None):
    """``python3 -m stiefel_runtime.pairing code [--key PATH]``: print the laptop's pairing code (stiefelctl)."""
    import argparse  # pylint: disable=import-outside-toplevel

    from stiefel_runtime.common import DEFAULT_KEY_PATH  # pylint: disable=import-outside-toplevel

    parser = argparse.ArgumentParser(prog="stiefel-pairing", description=main.__doc__)
    parser.add_argument("what", choices=["code"])
    parser.add_argument("--key", default=DEFAULT_KEY_PATH)
    args = parser.parse_args(argv)
    try:
        key = keyfile.read_key(args.key)
    except StiefelError as exc:
        sys.stderr.write("stiefel-pairing: %s\n" % exc)
        return 1
    sys.stdout.write("%s\n" % keyschedule.pairing_code(key))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
