"""pairing: SPAKE2 with key confirmation both ways, the lockout, and hostile datagrams."""

from __future__ import annotations

import os
import secrets

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import keyschedule
from ansible_collections.stiefel.system.plugins.module_utils.errors import ProtocolError, StiefelError
from stiefel_runtime import messages, pairing

KEY = bytes(range(32))
CODE = keyschedule.pairing_code(KEY)


class Clock(object):
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def _exchange(responder, code, peer="fe80::2"):
    client = pairing.PairingClient(code)
    challenge = responder.handle(client.hello, peer)
    proof = client.handle(challenge, peer)
    answer = responder.handle(proof, peer)
    return client, answer


def test_code_is_derived_from_the_key_and_renewed_with_it():
    assert len(CODE) == 9 and CODE[4] == "-" and CODE.replace("-", "").isdigit()
    assert keyschedule.pairing_code(KEY) == CODE
    assert keyschedule.pairing_code(os.urandom(32)) != CODE
    assert keyschedule.normalize_pairing_code(" %s \n" % CODE.replace("-", " ")) == CODE.replace("-", "").encode()
    with pytest.raises(StiefelError):
        keyschedule.normalize_pairing_code("1234")


def test_right_code_delivers_the_key_with_mutual_confirmation(tmp_path):
    lines = []
    responder = pairing.PairingResponder(KEY, state_dir=str(tmp_path), log=lines.append)
    client, welcome = _exchange(responder, CODE)
    assert client.handle(welcome, "fe80::2") == KEY
    assert responder.paired == 1 and not responder.lockout.failures
    assert not any(CODE in line or CODE.replace("-", "") in line for line in lines)
    # the code is in no datagram
    assert CODE.replace("-", "").encode() not in client.hello + welcome


def test_wrong_code_is_refused_and_counted_then_locked_across_a_restart(tmp_path):
    wall = Clock()
    lines = []
    responder = pairing.PairingResponder(KEY, state_dir=str(tmp_path), log=lines.append, wall_clock=wall)
    for attempt in range(1, 6):
        client, refused = _exchange(responder, "0000-000%d" % attempt)
        with pytest.raises(pairing.PairingRefused) as got:
            client.handle(refused, "fe80::2")
        assert got.value.reason == (messages.REFUSED_LOCKED if attempt == 5 else messages.REFUSED_WRONG_CODE)
    assert got.value.retry_after == 30
    assert (tmp_path / pairing.STATE_FILE).stat().st_mode & 0o777 == 0o600
    # a restarted agent reads the lockout: even the right code waits
    again = pairing.PairingResponder(KEY, state_dir=str(tmp_path), log=lines.append, wall_clock=wall)
    client = pairing.PairingClient(CODE)
    with pytest.raises(pairing.PairingRefused) as got:
        client.handle(again.handle(client.hello, "fe80::2"), "fe80::2")
    assert got.value.reason == messages.REFUSED_LOCKED
    assert any("locked" in line for line in lines) and not any(CODE in line for line in lines)
    wall.now += 31
    client, welcome = _exchange(again, CODE)
    assert client.handle(welcome, "fe80::2") == KEY


def test_lockout_doubles_and_is_capped(tmp_path):
    wall = Clock()
    lockout = pairing.Lockout(str(tmp_path / "s.json"), clock=wall)
    seen = []
    for _round in range(60):
        locked = lockout.failed()
        if locked:
            seen.append(locked)
            wall.now += locked
    assert seen[:4] == [30, 60, 120, 240] and max(seen) == pairing.LOCK_MAX


def test_replayed_proof_and_welcome_are_dropped(tmp_path):
    responder = pairing.PairingResponder(KEY, state_dir=str(tmp_path))
    client = pairing.PairingClient(CODE)
    challenge = responder.handle(client.hello, "fe80::2")
    proof = client.handle(challenge, "fe80::2")
    welcome = responder.handle(proof, "fe80::2")
    with pytest.raises(ProtocolError):
        responder.handle(proof, "fe80::2")  # the exchange is used up
    restarted = pairing.PairingResponder(KEY, state_dir=str(tmp_path))
    with pytest.raises(ProtocolError):
        restarted.handle(proof, "fe80::2")
    assert client.handle(welcome, "fe80::2") == KEY
    other = pairing.PairingClient(CODE)
    with pytest.raises(ProtocolError):
        other.handle(welcome, "fe80::2")  # another client's nonce


def test_proof_from_another_peer_is_dropped(tmp_path):
    responder = pairing.PairingResponder(KEY, state_dir=str(tmp_path))
    client = pairing.PairingClient(CODE)
    proof = client.handle(responder.handle(client.hello, "fe80::2"), "fe80::2")
    with pytest.raises(ProtocolError):
        responder.handle(proof, "fe80::66")


def test_a_laptop_without_the_code_cannot_pass_as_the_laptop():
    impostor = pairing.PairingResponder(os.urandom(32))
    client = pairing.PairingClient(CODE)
    proof = client.handle(impostor.handle(client.hello, "p"), "p")
    refused = impostor.handle(proof, "p")  # it cannot even check the desktop's proof
    with pytest.raises(pairing.PairingRefused):
        client.handle(refused, "p")
    # and a forged WELCOME (any confirm) is refused by the desktop
    forged = messages._pair(messages.PAIR_WELCOME, client.client_nonce, client.server_nonce, bytes(32), bytes(60))
    with pytest.raises(ProtocolError):
        client.handle(forged, "p")


@pytest.mark.parametrize("mangle", [
    lambda d: d[:-1], lambda d: d + b"\0", lambda d: d[:10], lambda d: d + bytes(600), lambda d: b"",
    lambda d: d[:4] + b"\x01" + d[5:], lambda d: d[:8] + b"\x01" + d[9:],
    lambda d: d[:-33] + b"B" + d[-32:], lambda d: d[:-33] + b"A" + bytes(32), lambda d: d[:-33] + b"A" + b"\xff" * 32,
])
def test_hostile_hello_is_dropped_with_a_reason(tmp_path, mangle):
    responder = pairing.PairingResponder(KEY, state_dir=str(tmp_path))
    hello = pairing.PairingClient(CODE).hello
    with pytest.raises(ProtocolError):
        responder.handle(mangle(hello), "p")
    assert responder.lockout.failures == 0


def test_random_bytes_and_floods_never_raise_anything_else(tmp_path):
    clock = Clock()
    responder = pairing.PairingResponder(KEY, state_dir=str(tmp_path), clock=clock)
    for _junk in range(500):
        data = secrets.token_bytes(secrets.randbelow(200))
        if secrets.randbelow(2):
            data = b"STFL\x02" + bytes((secrets.randbelow(6) + 15,)) + bytes(8) + data
        try:
            responder.handle(data, "p")
        except ProtocolError:
            pass
    hello = pairing.PairingClient(CODE).hello
    answered = 0
    for _hello in range(50):
        try:
            responder.handle(hello, "p")
            answered += 1
        except ProtocolError:
            pass
    assert answered <= pairing.HELLO_BURST + 1
    assert len(responder._pending) <= pairing.PENDING_CAPACITY
    clock.now += 10
    client, welcome = _exchange(responder, CODE)
    assert client.handle(welcome, "fe80::2") == KEY


def test_unreadable_lockout_state_starts_afresh(tmp_path):
    (tmp_path / pairing.STATE_FILE).write_text("{not json")
    assert pairing.Lockout(str(tmp_path / pairing.STATE_FILE)).failures == 0


def test_the_lock_can_only_be_lengthened():
    assert pairing.first_lock_seconds({}) == pairing.LOCK_FIRST
    assert pairing.first_lock_seconds({pairing.LOCK_ENV: "600"}) == 600
    for weaker in ("0", "1", "-5", "nan", "junk", "1e9"):
        assert pairing.first_lock_seconds({pairing.LOCK_ENV: weaker}) == pairing.LOCK_FIRST


def test_stiefelctl_pairing_code_prints_the_code_of_the_key(tmp_path):
    import subprocess  # pylint: disable=import-outside-toplevel
    import sys  # pylint: disable=import-outside-toplevel

    from ansible_collections.stiefel.system.plugins.module_utils import keyfile  # pylint: disable=import-outside-toplevel

    path = str(tmp_path / "key")
    keyfile.write_key_atomic(path, KEY)
    stiefelctl = os.path.join(os.path.dirname(__file__), "..", "..", "..", "bin", "stiefelctl")
    done = subprocess.run([sys.executable, stiefelctl, "pairing-code", "--key", path], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0 and done.stdout.strip() == CODE
    done = subprocess.run([sys.executable, stiefelctl, "pairing-code", "--key", str(tmp_path / "none")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 1 and "does not exist" in done.stderr


def test_a_flood_while_locked_is_not_logged_line_by_line(tmp_path):
    wall = Clock()
    clock = Clock()
    lines = []
    responder = pairing.PairingResponder(KEY, state_dir=str(tmp_path), log=lines.append, clock=clock,
                                         wall_clock=wall)
    for attempt in range(5):
        _exchange(responder, "0000-000%d" % attempt)
        clock.now += 1
    before = len(lines)
    refused = 0
    for _tick in range(40):
        clock.now += 0.05  # 20 a second, over the bucket
        try:
            responder.handle(pairing.PairingClient(CODE).hello, "p")
            refused += 1
        except ProtocolError:
            pass
    assert 0 < refused < 40
    assert len(lines) - before <= 2, lines[before:]


class _NoLinks(object):
    """The LinkManager seam: no link is ready (no HELLO goes out), nothing to process."""

    def __init__(self):
        self._r, self._w = os.pipe()

    def fileno(self):
        return self._r

    def ready_links(self):
        return []

    def process(self):
        pass

    def close(self):
        os.close(self._r)
        os.close(self._w)


def test_pair_once_summarises_a_flood_of_junk_replies_on_the_console(tmp_path):
    import io
    import socket

    from stiefel_runtime.common import Console

    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    links = _NoLinks()
    try:
        sock.bind(("::1", 0))
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        client = pairing.PairingClient("1234-5678")
        junk = [os.urandom(n) for n in (1, 40, 500)] + [client.hello[:-3], b"STFL\x02\x13" + b"\x1b[2J" * 30]
        for i in range(300):
            sender.sendto(junk[i % len(junk)], sock.getsockname()[:2])
        out = io.StringIO()
        now = [100.0]
        console = Console("stiefel-client", stream=out, timer=False, clock=lambda: now[0])
        with pytest.raises(pairing.PairingError, match="no laptop answered"):
            pairing.pair_once("1234-5678", links, sock, log=console, timeout=1.0)
        now[0] += 11  # the summary interval is over
        console.tick()
        lines = out.getvalue().splitlines()
        print("\n".join(lines[:3] + lines[-2:]))
        assert console.dropped == 300
        assert len(lines) <= 12, "ten drops shown, the rest in one summary"
        assert "dropped 290 more inputs" in lines[-1]
        assert "\x1b" not in out.getvalue()
    finally:
        sock.close()
        sender.close()
        links.close()
