from __future__ import annotations

import http.client
import io
import json
import os
import threading

import pytest
from hypothesis import given, settings, strategies as st

from ansible_collections.stiefel.system.plugins.module_utils import keyschedule
from ansible_collections.stiefel.system.plugins.module_utils.errors import ServerError, StiefelError
from stiefel_runtime import bootfiles, discovery, payload, power, procfs, server, storage
from stiefel_runtime.common import Console

KEY = bytes(range(32))


def make_boot(tmp_path, config=True, kernel=b"K" * 5000, initrd=b"I" * 3000):
    boot = tmp_path / "boot"
    (boot / "stiefel").mkdir(parents=True)
    (boot / "vmlinuz-6.1.0-9-amd64").write_bytes(kernel)
    (boot / "initrd.img-6.1.0-9-amd64").write_bytes(initrd)
    if config:
        (boot / "stiefel" / "boot.json").write_text(json.dumps({
            "format": "stiefel-boot-config", "version": 1, "kernel": "vmlinuz-6.1.0-9-amd64",
            "initrd": ["initrd.img-6.1.0-9-amd64"], "cmdline": "root=UUID=r ro quiet", "root": "UUID=r"}))
    return boot


def test_boot_config_first(tmp_path):
    boot = make_boot(tmp_path)
    kernel, initrds, cmdline, source = bootfiles.find_boot_files(str(boot))
    assert kernel.endswith("vmlinuz-6.1.0-9-amd64") and len(initrds) == 1
    assert cmdline == "root=UUID=r ro quiet" and source.startswith("boot config")


def test_bls_fallback(tmp_path):
    boot = make_boot(tmp_path, config=False)
    (boot / "loader" / "entries").mkdir(parents=True)
    (boot / "loader" / "entries" / "a.conf").write_text(
        "title Debian\nlinux /vmlinuz-6.1.0-9-amd64\ninitrd /initrd.img-6.1.0-9-amd64\noptions root=UUID=x ro BOOT_IMAGE=/v\n")
    kernel, initrds, cmdline, source = bootfiles.find_boot_files(str(boot))
    assert source.startswith("BLS") and cmdline == "root=UUID=x ro"


def test_grub_fallback_with_boot_prefix(tmp_path):
    boot = make_boot(tmp_path, config=False)
    (boot / "grub").mkdir()
    (boot / "grub" / "grub.cfg").write_text(
        "menuentry 'Debian' {\n  linux /boot/vmlinuz-6.1.0-9-amd64 root=UUID=y ro\n"
        "  initrd /boot/initrd.img-6.1.0-9-amd64\n}\n")
    kernel, initrds, cmdline, source = bootfiles.find_boot_files(str(boot))
    assert source.startswith("grub") and cmdline.startswith("root=UUID=y")


def test_invalid_config_falls_back_and_escape_refused(tmp_path):
    boot = make_boot(tmp_path, config=False)
    (boot / "stiefel" / "boot.json").write_text('{"format": "stiefel-boot-config", "version": 1, "kernel": '
                                                '"../../etc/passwd", "initrd": ["x"], "cmdline": "a", "root": "b"}')
    with pytest.raises(ServerError, match="no boot config"):
        bootfiles.find_boot_files(str(boot), log=lambda s: None)


def test_boot_source_concatenates_initrds(tmp_path):
    boot = make_boot(tmp_path)
    (boot / "ucode.img").write_bytes(b"U" * 10)
    cfg = json.loads((boot / "stiefel" / "boot.json").read_text())
    cfg["initrd"] = ["ucode.img", "initrd.img-6.1.0-9-amd64"]
    (boot / "stiefel" / "boot.json").write_text(json.dumps(cfg))
    run = tmp_path / "run"
    run.mkdir()
    source = bootfiles.BootSource(str(boot), str(run), log=lambda s: None)
    manifest = source.prepare(copy=True)
    assert manifest.files["initrd"][0] == 3010
    assert open(source.paths["initrd"], "rb").read().startswith(b"U" * 10)
    assert source.paths["kernel"].startswith(str(run))


def test_hook_options_reach_the_manifest_cmdline(tmp_path):
    boot = make_boot(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    source = bootfiles.BootSource(str(boot), str(run), log=lambda s: None)
    manifest = source.prepare(extra_cmdline="stiefel.blocksize=512")
    assert manifest.cmdline.endswith(" stiefel.blocksize=512")


def test_logical_block_size(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * 4096)
    assert storage.logical_block_size(str(image)) == 512
    assert storage.logical_block_size(str(tmp_path / "missing")) == 512
    disks = [d for d in os.listdir("/sys/block") if os.path.exists("/dev/" + d)] if os.path.isdir("/sys/block") else []
    for name in disks[:3]:
        with open("/sys/block/%s/queue/logical_block_size" % name) as handle:
            assert storage.logical_block_size("/dev/" + name) == int(handle.read())


@pytest.mark.parametrize("supplies, level", [
    ([], 0),
    ([{"type": "Battery", "capacity": 80, "status": "Discharging"}, {"type": "Mains", "online": 1}], 0),
    ([{"type": "Battery", "capacity": 80, "status": "Discharging"}, {"type": "Mains", "online": 0}], 1),
    ([{"type": "Battery", "capacity": 10, "status": "Discharging"}], 2),
    ([{"type": "Battery", "capacity": None, "status": "Discharging"}], 1),
    ([{"type": "Battery", "capacity": 5, "status": "Charging"}], 0),
])
def test_power_warning(supplies, level):
    assert power.power_warning(supplies)[0] == level


def test_read_power_supplies(tmp_path):
    bat = tmp_path / "BAT0"
    bat.mkdir()
    (bat / "type").write_text("Battery\n")
    (bat / "capacity").write_text("15\n")
    (bat / "status").write_text("Discharging\n")
    ac = tmp_path / "AC"
    ac.mkdir()
    (ac / "type").write_text("Mains\n")
    (ac / "online").write_text("garbage\n")
    supplies = power.read_power_supplies(str(tmp_path))
    level, message = power.power_warning(supplies)
    assert level == 2 and "15%" in message


def test_tcp_peers(tmp_path):
    table = tmp_path / "tcp6"
    # fe80::1 as /proc/net/tcp6 prints it (little-endian 32-bit words), state 01, local port 0x2A39 (10809)
    table.write_text("  sl  local_address remote_address st\n"
                     "   0: 00000000000000000000000000000000:2A39 000080FE000000000000000001000000:C350 01 x\n"
                     "   1: 00000000000000000000000000000000:2A39 00000000000000000000000000000000:0000 0A x\n")
    assert procfs.tcp_peers(10809, str(table)) == ["fe80::1"]


def state_with_source(tmp_path, locked=False):
    boot = make_boot(tmp_path)
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    state = server.ServerState(KEY, str(run), 61571, 10809, "stiefel", needs_unlock=locked, log=lambda s: None)
    source = bootfiles.BootSource(str(boot), str(run), log=lambda s: None)
    source.prepare()
    state.source = source
    return state


def open_session(state):
    """DISCOVER -> OFFER -> SESSION_REQUEST -> SESSION_ACCEPT: the accepted offer, its session nonce set."""
    client = discovery.ClientDiscovery(KEY)
    offer = client.handle(state.answer(client.discover(1)), "fe80::1", 1)
    return client.handle(state.answer(client.session_request(offer)), "fe80::1", 1)


def test_route_decisions(tmp_path):
    state = state_with_source(tmp_path)
    offer = open_session(state)
    assert not offer.message.needs_passphrase
    path = "/payload/%s/%s" % (offer.client_nonce.hex(), offer.session_nonce.hex())
    assert state.route("GET", path)[0] == 200
    assert state.route("GET", "/payload/%s/%s" % ("00" * 16, offer.session_nonce.hex()))[0] == 403
    assert state.route("GET", path.upper())[0] == 404
    assert state.route("DELETE", path)[0] == 405
    assert state.route("POST", "/unlock/%s/%s" % (offer.client_nonce.hex(), offer.session_nonce.hex()))[0] == 409


def test_locked_boot_flags_offer_and_refuses_payload(tmp_path):
    state = state_with_source(tmp_path, locked=True)
    offer = open_session(state)
    assert offer.message.needs_passphrase
    path = "/payload/%s/%s" % (offer.client_nonce.hex(), offer.session_nonce.hex())
    assert state.route("GET", path)[0] == 409


@given(st.sampled_from(["GET", "POST", "HEAD", "PUT"]), st.text(max_size=120))
@settings(max_examples=200)
def test_random_paths_never_served(method, path):
    state = server.ServerState(KEY, "/nonexistent", 1, 2, "stiefel", log=lambda s: None)
    status = state.route(method, path)[0]
    assert status in (403, 404, 405, 409, 503)


def test_proven_session_writes_psk_and_nothing_else_does(tmp_path):
    state = state_with_source(tmp_path)
    client = discovery.ClientDiscovery(KEY)
    challenge = client.handle(state.answer(client.discover(1)), "fe80::1", 1)
    assert not os.path.exists(state.psk_path)  # an OFFER (what a replayed DISCOVER gets) changes nothing
    offer = client.handle(state.answer(client.session_request(challenge)), "fe80::1", 1)
    state.session_started("fe80::1", offer.client_nonce, offer.session_nonce)
    text = open(state.psk_path).read()
    assert text == keyschedule.nbd_psk_line(KEY, offer.client_nonce, offer.session_nonce) + "\n"
    assert os.stat(state.psk_path).st_mode & 0o777 == 0o600


# ------------------------------------------------------------------ the HTTP handler on loopback

@pytest.fixture
def http_server(tmp_path):
    state = state_with_source(tmp_path, locked=True)
    unlocked = []

    def unlock(passphrase):
        if passphrase != b"correct horse":
            raise StiefelError("cryptsetup refused the passphrase")
        unlocked.append(passphrase)

    state.unlock = unlock
    console = Console("test", stream=io.StringIO())
    httpd = server.DualStackServer(("::1", 0), server.make_handler(state, console))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state, httpd.server_address[1], console, unlocked
    httpd.shutdown()
    httpd.server_close()


def request(port, method, path, body=None):
    conn = http.client.HTTPConnection("::1", port, timeout=10)
    conn.request(method, path, body=body)
    resp = conn.getresponse()
    return resp.status, resp.read()


def test_unlock_then_payload(http_server, tmp_path):
    state, port, console, unlocked = http_server
    offer = open_session(state)
    cn, sn = offer.client_nonce, offer.session_nonce
    unlock_path = "/unlock/%s/%s" % (cn.hex(), sn.hex())
    # hostile bodies: dropped, server still usable
    assert request(port, "POST", unlock_path, b"x" * 10)[0] == 403
    assert request(port, "POST", unlock_path, payload.seal_passphrase(bytes(32), cn, sn, b"correct horse"))[0] == 403
    assert request(port, "POST", unlock_path, payload.seal_passphrase(KEY, cn, sn, b"wrong"))[0] == 403
    # one fetch use is left of the 4: the right passphrase
    assert request(port, "POST", unlock_path, payload.seal_passphrase(KEY, cn, sn, b"correct horse"))[0] == 200
    assert unlocked == [b"correct horse"] and not state.locked
    offer = open_session(state)
    status, body = request(port, "GET", "/payload/%s/%s" % (offer.client_nonce.hex(), offer.session_nonce.hex()))
    assert status == 200
    out = tmp_path / "recv"
    out.mkdir()
    stream = io.BytesIO(body)
    manifest = payload.receive_payload(stream.read, KEY, offer.client_nonce, str(out))
    assert manifest.cmdline == "root=UUID=r ro quiet"
    assert (out / "kernel").read_bytes() == b"K" * 5000
    assert state.payload_count == 1
    assert "dropped input" in console.stream.getvalue()


def test_unlock_that_cannot_run_is_refused_clearly(http_server):
    """cryptsetup missing from an old image, or /run full: an answer and a console line, no traceback."""
    state, port, console, _unlocked = http_server

    def unlock(_passphrase):
        raise FileNotFoundError(2, "No such file or directory", "cryptsetup")

    state.unlock = unlock
    offer = open_session(state)
    path = "/unlock/%s/%s" % (offer.client_nonce.hex(), offer.session_nonce.hex())
    status, body = request(port, "POST", path, payload.seal_passphrase(KEY, offer.client_nonce, offer.session_nonce,
                                                                       b"correct horse"))
    assert status == 500 and b"cryptsetup" in body
    assert state.locked
    assert "unlock failed on the server" in console.stream.getvalue()
    # still serving: the next attempt gets an answer too
    assert request(port, "POST", path, payload.seal_passphrase(KEY, offer.client_nonce, offer.session_nonce,
                                                               b"correct horse"))[0] == 500


def test_payload_replay_limit(http_server):
    state, port, _console, _unlocked = http_server
    state.locked = False
    offer = open_session(state)
    path = "/payload/%s/%s" % (offer.client_nonce.hex(), offer.session_nonce.hex())
    assert request(port, "GET", path)[0] == 200
    # one payload per session: the URL, readable off the link, is spent (issue 13)
    assert request(port, "GET", path)[0] == 403


def test_malformed_http_is_logged_and_server_keeps_serving(http_server):
    import socket

    state, port, console, _unlocked = http_server
    for junk in (b"\x00\xff garbage\r\n\r\n", b"GET " + b"A" * 70000 + b" HTTP/1.0\r\n\r\n"):
        sock = socket.create_connection(("::1", port))
        sock.sendall(junk)
        sock.recv(4096)
        sock.close()
    assert console.stream.getvalue().count("dropped input from http") >= 2
    state.locked = False
    offer = open_session(state)
    assert request(port, "GET", "/payload/%s/%s" % (offer.client_nonce.hex(), offer.session_nonce.hex()))[0] == 200


def test_control_characters_in_a_path_reach_the_console_escaped(http_server):
    import socket

    _state, port, console, _unlocked = http_server
    sock = socket.create_connection(("::1", port))
    sock.sendall(b"GET /\x1b[2J\x1b]0;owned\x07/\x1b[31m\xc2\x9b HTTP/1.0\r\n\r\n")
    assert sock.recv(100).startswith(b"HTTP/1.0 404")
    sock.close()
    text = console.stream.getvalue()
    assert "\x1b" not in text and "\x07" not in text
    assert "GET /\\x1b[2J\\x1b]0;owned\\x07/\\x1b[31m" in text


def test_junk_datagram_flood_is_summarised_not_logged_one_by_one(tmp_path):
    out = io.StringIO()
    agent = server.ServerAgent(KEY, Console("stiefel-server", stream=out, timer=False), run_dir=str(tmp_path))
    for number in range(5000):
        agent.handle_datagram(os.urandom(1 + number % 200), "fe80::bad", 61570, 2)
    assert agent.console.dropped == 5000
    assert out.getvalue().count("\n") <= 20


@pytest.mark.parametrize("line, expected", [
    ("nbdkit: file[3]: debug: replying to NBD_OPT_GO with NBD_REP_ERR_TLS_REQD",
     (3, "plaintext NBD refused (NBD_OPT_GO without TLS; TLS-PSK is required)")),
    ("nbdkit: file[4]: error: gnutls_handshake: An illegal parameter has been received. (1/-1)",
     (4, "TLS handshake failed: An illegal parameter has been received. (wrong or stale PSK)")),
    ("nbdkit: exportname[7]: error: gnutls_handshake: A disallowed SNI server name has been received. (1/-1)",
     (7, "TLS handshake failed: A disallowed SNI server name has been received. (a libnbd client given an IPv6 "
         "address sends it as the TLS server name: use qemu-img, see the README)")),
    ("nbdkit: file[9]: error: read: Connection reset by peer", (9, "connection failed: read: Connection reset by peer")),
    ("nbdkit: debug: accepted connection", None),
    ("nbdkit: file[3]: debug: starting TLS handshake", None),
    ("nbdkit: file[3]: debug: TLS handshake completed", None),
])
def test_refused_nbd_attempts_from_nbdkits_log(line, expected):
    from ansible_collections.stiefel.system.plugins.module_utils import nbd_export

    assert nbd_export.refused_attempt(line) == expected


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_nbdkit_log_parser_takes_any_line(line):
    from ansible_collections.stiefel.system.plugins.module_utils import nbd_export

    found = nbd_export.refused_attempt(line)
    assert found is None or (isinstance(found[0], int) and len(found[1]) < 400)


def test_nbdkit_socket_activation_argv():
    from ansible_collections.stiefel.system.plugins.module_utils import nbd_export

    settings_ = nbd_export.ExportSettings(path="/srv/d.img", tls_psk_file="/run/stiefel/nbd.psk")
    argv = nbd_export.server_argv(settings_, socket_activation=True, log_attempts=True)
    assert "--ipaddr" not in argv and "--port" not in argv
    assert "--verbose" in argv and "nbdkit.backend.datapath=0" in argv
    assert "--ipaddr" in nbd_export.server_argv(settings_)


class _DeadNbdkit:
    """What _check_nbd sees of an nbdkit that has exited."""
    returncode = -9
    pid = 4242

    def poll(self):
        return self.returncode


def test_dead_nbdkit_restarted_rate_limited(tmp_path, monkeypatch):
    """A dead nbdkit is restarted and said so; a crash loop waits out the window, said once."""
    out = io.StringIO()
    agent = server.ServerAgent(KEY, Console("stiefel-server", stream=out, timer=False), run_dir=str(tmp_path))
    spawned = []

    def fake_sync(wanted):
        spawned.append(wanted)
        agent.nbd = _DeadNbdkit()  # dies again at once
    monkeypatch.setattr(agent, "_sync_nbd", fake_sync)
    agent.nbd = _DeadNbdkit()
    for second in range(server.NBD_RESTART_BURST + 3):
        agent._check_nbd(now=1000.0 + second)
    assert len(spawned) == server.NBD_RESTART_BURST
    text = out.getvalue()
    assert text.count("nbdkit exited (rc=-9): restarting it") == server.NBD_RESTART_BURST
    assert text.count("times in 60 s: next restart in") == 1
    # once the window has passed the oldest restart, supervision goes on
    agent._check_nbd(now=1000.0 + server.NBD_RESTART_WINDOW + 0.5)
    assert len(spawned) == server.NBD_RESTART_BURST + 1


def test_live_nbdkit_left_alone(tmp_path, monkeypatch):
    agent = server.ServerAgent(KEY, Console("stiefel-server", stream=io.StringIO(), timer=False), run_dir=str(tmp_path))
    monkeypatch.setattr(agent, "_sync_nbd", lambda wanted: pytest.fail("restarted a live nbdkit"))
    live = _DeadNbdkit()
    live.poll = lambda: None
    agent.nbd = live
    agent._check_nbd()
    agent.nbd = None
    agent._check_nbd()
