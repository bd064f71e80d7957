from __future__ import annotations

import contextlib
import io
import os
import pty
import select
import termios
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

from ansible_collections.stiefel.system.plugins.module_utils import cpio, keyschedule
from stiefel_runtime import client, discovery, messages
from stiefel_runtime.common import Console, parse_cmdline

KEY = bytes(range(32))


def test_hook_cmdline():
    line = client.hook_cmdline("root=UUID=r ro quiet stiefel.mac=11:22:33:44:55:66 stiefel.tls=off",
                               "52:54:00:AA:BB:CC", "fe80::1%eth0", 10809, "stiefel")
    assert line == ("root=UUID=r ro quiet stiefel.mac=52:54:00:aa:bb:cc stiefel.server=fe80::1 "
                    "stiefel.port=10809 stiefel.export=stiefel stiefel.tls=psk")
    options = parse_cmdline(line)
    assert options["mac"] == "52:54:00:aa:bb:cc" and options["server"] == "fe80::1"


def test_psk_archive():
    cn, sn = messages.new_nonce(), messages.new_nonce()
    entries = cpio.read_newc(client.psk_archive(KEY, cn, sn))
    psk = [e for e in entries if e.is_file]
    assert [(e.name, e.perm, e.uid) for e in psk] == [("etc/stiefel/nbd.psk", 0o600, 0)]
    assert psk[0].data.decode() == keyschedule.nbd_psk_line(KEY, cn, sn) + "\n"


class FakeSock(object):
    def __init__(self):
        self.sent = []

    def sendto(self, data, addr):
        self.sent.append((data, addr))


class FakeLinks(object):
    def __init__(self):
        self.links = {}


def agent():
    console = Console("stiefel-client", stream=io.StringIO())
    a = client.ClientAgent(KEY, console)
    a.sock = FakeSock()
    a.links = FakeLinks()
    return a


def test_autokexec_offer_gets_a_kexec_request():
    a = agent()
    responder = discovery.Responder(KEY, lambda: {"role": messages.ROLE_AUTOKEXEC},
                                    challenges=messages.ChallengeBook(), accept_kexec=True)
    offer, _unused = responder.handle(a.disc.discover(5))
    assert a.handle_datagram(offer, "fe80::2", 61570, 5) is None
    (request, addr), = a.sock.sent
    assert addr == ("fe80::2", 61570, 0, 5)
    ack, msg = responder.handle(request)
    assert msg.type == messages.KEXEC_REQUEST
    assert a.handle_datagram(ack, "fe80::2", 61570, 5) is None
    assert "rebooting into server mode" in a.console.stream.getvalue()


def server_responder():
    return discovery.Responder(KEY, lambda: {"role": messages.ROLE_SERVER, "http_port": 1},
                               sessions=discovery.SessionBook())


def test_server_offer_gets_one_session_request_at_a_time():
    a = agent()
    responder = server_responder()
    first, _unused = responder.handle(a.disc.discover(5))
    second, _unused = responder.handle(a.disc.discover(5))
    assert a.handle_datagram(first, "fe80::2", 61570, 5) is None
    (request, addr), = a.sock.sent
    assert addr == ("fe80::2", 61570, 0, 5)
    assert messages.parse(KEY, request).type == messages.SESSION_REQUEST
    # a second OFFER (a re-sent DISCOVER's) is not answered: each session replaces the server's NBD PSK
    assert a.handle_datagram(second, "fe80::2", 61570, 5) is None
    assert len(a.sock.sent) == 1
    accept, msg = responder.handle(request)
    assert msg.session_nonce is not None and len(responder.sessions) == 1


def test_server_offer_on_vanished_link_keeps_discovering():
    a = agent()
    responder = server_responder()
    offer, _unused = responder.handle(a.disc.discover(5))
    assert a.handle_datagram(offer, "fe80::2", 61570, 5) is None
    (request, _addr), = a.sock.sent
    accept, _unused = responder.handle(request)
    assert a.handle_datagram(accept, "fe80::2", 61570, 5) is None
    assert "failed" in a.console.stream.getvalue()


@given(st.binary(max_size=600))
@settings(max_examples=200)
def test_hostile_datagrams_logged_and_dropped(data):
    a = agent()
    assert a.handle_datagram(data, "fe80::66", 61570, 3) is None
    assert a.sock.sent == []
    assert a.console.dropped == 1


def test_stop_before_kexec_needs_no_kexec(tmp_path, monkeypatch):
    """boot_from with a fetched payload prints the manifest and writes the PSK cpio."""
    from stiefel_runtime import payload

    kernel = tmp_path / "k"
    initrd = tmp_path / "i"
    kernel.write_bytes(b"k" * 100)
    initrd.write_bytes(b"i" * 100)
    manifest = payload.build_manifest(str(kernel), str(initrd), "root=/dev/x")
    monkeypatch.setattr(client, "fetch_payload", lambda *a, **k: manifest)
    a = agent()
    a.run_dir = str(tmp_path / "run")
    a.stop_before_kexec = True

    class L(object):
        ifname, mac = "eth0", "52:54:00:00:00:01"

    a.links.links[5] = L()
    msg = messages.Message(messages.OFFER, messages.new_nonce(), messages.new_nonce(), messages.ROLE_SERVER,
                           0, 61571, 10809, "stiefel")
    assert a.boot_from(discovery.Offer(msg, "fe80::9", 5, 61570, session_nonce=messages.new_nonce())) == 0
    assert (tmp_path / "run" / "nbd-psk.cpio").stat().st_mode & 0o777 == 0o600


# ------------------------------------------------------------------ hostile payload streams over real HTTP

class _Stream(object):
    body = b""


@pytest.fixture(scope="module")
def stream_server():
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self.wfile.write(_Stream.body)

    class Server(http.server.ThreadingHTTPServer):
        address_family = __import__("socket").AF_INET6
        daemon_threads = True

    httpd = Server(("::1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def _offer(port, cn, sn):
    msg = messages.Message(messages.OFFER, cn, sn, messages.ROLE_SERVER, 0, port, 10809, "stiefel")
    return discovery.Offer(msg, "::1", 0, 61570, session_nonce=sn)


def _genuine(tmp_path, cn, sn, key=KEY, kernel_bytes=b"k" * 10000):
    from stiefel_runtime import payload

    kernel, initrd = tmp_path / "k", tmp_path / "i"
    kernel.write_bytes(kernel_bytes)
    initrd.write_bytes(b"i" * 7000)
    manifest = payload.build_manifest(str(kernel), str(initrd), "root=x")
    return b"".join(payload.iter_payload(key, cn, sn, manifest, {"kernel": str(kernel), "initrd": str(initrd)},
                                         chunk_size=4096))


def test_fetch_genuine_stream(stream_server, tmp_path):
    cn, sn = messages.new_nonce(), messages.new_nonce()
    _Stream.body = _genuine(tmp_path, cn, sn)
    dest = tmp_path / "dest"
    dest.mkdir()
    manifest = client.fetch_payload(KEY, _offer(stream_server, cn, sn), None, str(dest), log=lambda s: None)
    assert manifest.cmdline == "root=x" and (dest / "initrd").read_bytes() == b"i" * 7000


@given(st.data())
@settings(max_examples=60, deadline=None)
def test_fetch_hostile_streams(stream_server, tmp_path_factory, data):
    from ansible_collections.stiefel.system.plugins.module_utils.errors import ProtocolError

    tmp_path = tmp_path_factory.mktemp("s")
    cn, sn = messages.new_nonce(), messages.new_nonce()
    kind = data.draw(st.sampled_from(["random", "truncated", "flipped", "other challenge", "wrong key", "extended"]))
    genuine = _genuine(tmp_path, cn, sn)
    if kind == "random":
        body = data.draw(st.binary(max_size=3000))
    elif kind == "truncated":
        body = genuine[:data.draw(st.integers(min_value=0, max_value=len(genuine) - 1))]
    elif kind == "flipped":
        pos = data.draw(st.integers(min_value=0, max_value=len(genuine) - 1))
        body = genuine[:pos] + bytes((genuine[pos] ^ 0x01,)) + genuine[pos + 1:]
    elif kind == "other challenge":
        body = _genuine(tmp_path, messages.new_nonce(), sn)
    elif kind == "wrong key":
        body = _genuine(tmp_path, cn, sn, key=bytes(32))
    else:
        body = genuine + data.draw(st.binary(min_size=1, max_size=100))
    _Stream.body = body
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ProtocolError):
        client.fetch_payload(KEY, _offer(stream_server, cn, sn), None, str(dest), log=lambda s: None)
    assert sorted(p.name for p in dest.iterdir()) == []  # nothing half-written is left behind


# ------------------------------------------------------------------ a refused kernel is remembered per server

class _Clock(object):
    now = 1000.0

    def __call__(self):
        return self.now


def test_refusal_memory_backs_off_per_server_and_kernel():
    clock = _Clock()
    memory = client.RefusalMemory(clock=clock, first=60, cap=200)
    assert memory.held("fe80::9", "a" * 64) == 0
    assert memory.refused("fe80::9", "a" * 64) == (False, 60)
    assert memory.held("fe80::9", "a" * 64) == 60
    assert memory.held("fe80::9", "b" * 64) == 0  # a changed kernel is fetched at once
    assert memory.held("fe80::7", "a" * 64) == 0  # another server's is its own
    assert memory.first_mention("fe80::9") and not memory.first_mention("fe80::9")
    clock.now += 61
    assert memory.held("fe80::9", "a" * 64) == 0
    assert memory.refused("fe80::9", "a" * 64) == (True, 120)
    assert not memory.first_mention("fe80::9")  # the repeated refusal itself said so
    assert memory.refused("fe80::9", "a" * 64) == (True, 200)  # capped
    assert memory.refused("fe80::9", "b" * 64) == (False, 60)


def test_a_refused_kernel_is_not_fetched_again_until_it_changes(stream_server, tmp_path, monkeypatch):
    """Over real HTTP: after a lockdown refusal the same kernel from the same server stops at the manifest
    (nothing written, not checked again, said once), a changed kernel is fetched and judged at once, and the
    same kernel is fetched again once its hold is over."""
    from stiefel_runtime import lockdown

    checked = []

    def refuse(kernel, **_kwargs):
        with open(kernel, "rb") as handle:
            checked.append(handle.read(1))
        raise lockdown.LockdownRefusal("the laptop's kernel is not signed by a key this desktop trusts")

    monkeypatch.setattr(client.lockdown, "check_kernel", refuse)
    clock = _Clock()
    a = agent()
    a.refusals = client.RefusalMemory(clock=clock)
    a.run_dir = str(tmp_path / "run")

    class L(object):
        ifname, mac = None, "52:54:00:00:00:01"  # no name: the stream server listens on ::1

    a.links.links[0] = L()
    dest = tmp_path / "run" / "payload"

    def boot(kernel_bytes=b"k" * 10000):
        for name in ("kernel", "initrd"):
            if (dest / name).exists():
                (dest / name).unlink()
        cn, sn = messages.new_nonce(), messages.new_nonce()
        _Stream.body = _genuine(tmp_path, cn, sn, kernel_bytes=kernel_bytes)
        return a.boot_from(_offer(stream_server, cn, sn))

    with pytest.raises(lockdown.LockdownRefusal):
        boot()
    assert checked == [b"k"]
    for _attempt in range(3):
        with pytest.raises(client.SameRefusedPayload):
            boot()
        assert sorted(p.name for p in dest.iterdir()) == []  # stopped at the manifest
    assert checked == [b"k"]
    said = a.console.stream.getvalue()
    assert said.count("still refusing the laptop's kernel (same as before); retrying in 60 s") == 1, said
    with pytest.raises(lockdown.LockdownRefusal):  # a changed kernel: fetched and judged at once
        boot(b"K" * 10000)
    assert checked == [b"k", b"K"]
    with pytest.raises(client.SameRefusedPayload):
        boot(b"K" * 10000)  # now that one is held
    clock.now += 61
    with pytest.raises(client.SameRefusedPayload):
        boot(b"K" * 10000)  # hold over: fetched, refused again, said once more with the doubled hold
    assert checked == [b"k", b"K", b"K"]
    assert "retrying in 120 s" in a.console.stream.getvalue()
    with pytest.raises(client.SameRefusedPayload):
        boot(b"K" * 10000)
    assert checked == [b"k", b"K", b"K"]
    assert a.console.stream.getvalue().count("retrying in 120 s") == 1


def test_an_offer_of_the_refused_kernel_is_quiet_on_the_console(monkeypatch):
    a = agent()

    def boot_from(unused_offer):
        raise client.SameRefusedPayload("offers the refused kernel again")

    monkeypatch.setattr(a, "boot_from", boot_from)
    offer = discovery.Offer(messages.Message(messages.OFFER, messages.new_nonce(), messages.new_nonce(),
                                             messages.ROLE_SERVER, 0, 61571, 10809, "stiefel"),
                            "fe80::9", 5, 61570, session_nonce=messages.new_nonce())
    monkeypatch.setattr(a.disc, "handle", lambda *args: offer)
    assert a.handle_datagram(b"accept", "fe80::9", 61570, 5) is None
    assert "failed" not in a.console.stream.getvalue()


# ------------------------------------------------------------------ the passphrase prompt on a real terminal

@contextlib.contextmanager
def _terminal():
    """A pseudo terminal: (master fd, slave path). The slave is what the client opens as its console; the
    test holds it open too, so the master reads nothing instead of EIO before the client opens it."""
    master, slave = pty.openpty()
    try:
        yield master, os.ttyname(slave)
    finally:
        os.close(slave)
        os.close(master)


def _drain(fd, wait=0.2):
    out = b""
    while select.select([fd], [], [], wait)[0]:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return out


def _ask_with(master, path, typed, prompt="Passphrase: "):
    """Run the console prompt in a thread and type ``typed`` once the prompt shows (None: end of input)."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(answer=client.ask_passphrase_on_console(
        prompt, paths=(path,))))
    thread.start()
    shown = b""
    deadline = time.monotonic() + 10
    while prompt.encode() not in shown and time.monotonic() < deadline:
        shown += _drain(master)
    assert prompt.encode() in shown
    if typed is None:
        os.write(master, b"\x04")  # Ctrl-D on an empty line: end of input, nobody answers
    else:
        os.write(master, typed)
    thread.join(10)
    assert not thread.is_alive(), "the prompt did not return"
    return result["answer"], shown


def test_console_prompt_reads_the_typed_line_without_echo():
    with _terminal() as (master, path):
        answer, shown = _ask_with(master, path, b"correct horse\r")
        after = _drain(master)
        assert answer == b"correct horse"
        assert shown.startswith(b"Passphrase: ")
        assert b"correct" not in shown + after  # not echoed
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        try:
            assert termios.tcgetattr(fd)[3] & termios.ECHO  # echo is back on
        finally:
            os.close(fd)


@settings(max_examples=25)
@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=200))
def test_console_prompt_returns_what_was_typed(text):
    with _terminal() as (master, path):
        answer, _shown = _ask_with(master, path, text.encode() + b"\n")
        assert answer == text.encode()


def test_console_prompt_oversized_line_is_cut_not_hung():
    with _terminal() as (master, path):
        answer, _shown = _ask_with(master, path, b"x" * 3000 + b"\n")
        assert 0 < len(answer) <= client.MAX_TYPED_PASSPHRASE


def test_console_prompt_end_of_input_is_no_answer():
    with _terminal() as (master, path):
        answer, _shown = _ask_with(master, path, None)
        assert answer == b""
    assert client.ask_passphrase_on_console("x", paths=("/nonexistent/tty", "/dev/null")) == b""
