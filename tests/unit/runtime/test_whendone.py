from __future__ import annotations

import io
import os
import socket
import threading

import pytest

from stiefel_runtime import discovery, messages, server, wayback, whendone
from stiefel_runtime.common import Console

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))


class FakeSock(object):
    def __init__(self):
        self.sent = []

    def sendto(self, data, address):
        self.sent.append((data, address))


def agent_with_way_back(tmp_path, policy="return"):
    out = io.StringIO()
    agent = server.ServerAgent(KEY, Console("stiefel-server", stream=out, timer=False), run_dir=str(tmp_path))
    server.setup_way_back(agent, {"when_done": policy, "return_wait": "60"}, str(tmp_path / "none"))
    agent.sock = FakeSock()
    return agent, out


def challenge(agent, client_nonce):
    agent.handle_datagram(messages.build_discover(KEY, client_nonce), "fe80::2", 40000, 3)
    offer = messages.parse(KEY, agent.sock.sent[-1][0], expect=(messages.OFFER,))
    return offer.server_nonce


def test_when_done_round_trip_and_a_replay_is_dropped(tmp_path):
    agent, out = agent_with_way_back(tmp_path)
    nonce = messages.new_nonce()
    request = messages.build_when_done(KEY, nonce, challenge(agent, nonce), "poweroff")
    agent.handle_datagram(request, "fe80::2", 40000, 3)
    ack = messages.parse(KEY, agent.sock.sent[-1][0], expect=(messages.WHEN_DONE_ACK,))
    assert ack.policy == "poweroff" and ack.client_nonce == nonce
    assert agent.way_back.policy == "poweroff"
    assert "client fe80::2 asks: when done, poweroff (was return)" in out.getvalue()
    sent = len(agent.sock.sent)
    agent.handle_datagram(request, "fe80::2", 40000, 3)  # replayed: the challenge is used up
    assert len(agent.sock.sent) == sent and agent.console.dropped == 1
    assert "already used challenge" in out.getvalue()


@pytest.mark.parametrize("mangle, reason", [
    (lambda good, n, c: messages.build_when_done(OTHER, n, c, "stay"), "WrongKey"),
    (lambda good, n, c: good[:-1], "AuthenticationFailed"),
    (lambda good, n, c: good[:20], "TruncatedMessage"),
    (lambda good, n, c: good + b"x" * 600, "OversizedMessage"),
    (lambda good, n, c: messages.build_when_done(KEY, n, messages.new_nonce(), "stay"), "ReplayedMessage"),
    (lambda good, n, c: messages._seal(KEY, messages.WHEN_DONE, good[14:14 + 32] + b"\x09"), "unknown policy"),
])
def test_hostile_when_done_changes_nothing(tmp_path, mangle, reason):
    agent, out = agent_with_way_back(tmp_path)
    nonce = messages.new_nonce()
    chal = challenge(agent, nonce)
    sent = len(agent.sock.sent)
    agent.handle_datagram(mangle(messages.build_when_done(KEY, nonce, chal, "stay"), nonce, chal), "fe80::bad", 1, 3)
    assert len(agent.sock.sent) == sent and agent.way_back.policy == "return"
    assert reason in out.getvalue()


def test_when_done_flood_is_rate_limited_and_escaped(tmp_path):
    agent, out = agent_with_way_back(tmp_path)
    head = messages.HEADER.pack(messages.MAGIC, messages.VERSION, messages.WHEN_DONE, b"\x1b[2J\x07abc")
    for number in range(3000):
        agent.handle_datagram(head + os.urandom(number % 100), "fe80::bad", 61570, 2)
    assert agent.console.dropped == 3000 and agent.way_back.policy == "return"
    assert out.getvalue().count("\n") <= 20 and "\x1b" not in out.getvalue()


def test_standalone_server_refuses_when_done(tmp_path):
    agent, out = agent_with_way_back(tmp_path)
    agent.way_back = None
    nonce = messages.new_nonce()
    agent.handle_datagram(messages.build_when_done(KEY, nonce, challenge(agent, nonce), "stay"), "fe80::2", 1, 3)
    assert "no way back" in out.getvalue()


def test_stay_cancels_a_running_countdown():
    lines = []
    watcher = wayback.DoneWatcher("return", 60, log=lines.append)
    watcher.observe(0, 1)
    watcher.observe(5, 0)
    watcher.set_policy("stay")
    assert watcher.state == "idle" and not any(watcher.observe(t, 0) for t in range(10, 200, 5))


def test_server_from_cmdline(tmp_path):
    net = tmp_path / "net"
    for name, mac, index in (("lo", "00:00:00:00:00:00", 1), ("enp1s0", "52:54:00:5f:00:02", 7)):
        (net / name).mkdir(parents=True)
        (net / name / "address").write_text(mac + "\n")
        (net / name / "ifindex").write_text("%d\n" % index)
    line = "root=/dev/nbd0p1 stiefel.mac=52:54:00:5F:00:02 stiefel.server=fe80::5054:ff:fe5f:1 stiefel.port=10809"
    assert whendone.server_from_cmdline(line, str(net)) == ("fe80::5054:ff:fe5f:1", 7)
    with pytest.raises(whendone.WhenDoneError, match="not booted by stiefel"):
        whendone.server_from_cmdline("root=/dev/sda1", str(net))
    with pytest.raises(whendone.WhenDoneError, match="no interface"):
        whendone.server_from_cmdline(line.replace("02 ", "03 "), str(net))
    assert whendone.parse_server("fe80::1%4") == ("fe80::1", 4)
    with pytest.raises(whendone.WhenDoneError):
        whendone.parse_server("fe80::1")


def test_ask_over_a_real_socket(tmp_path):
    """whendone.ask against the server agent's datagram handling on ::1 (discovery's real sockets)."""
    agent, out = agent_with_way_back(tmp_path)
    agent.sock = discovery.open_listen_socket(0, bind_address="::1")
    port = agent.sock.getsockname()[1]
    stop = threading.Event()

    def serve():
        import select
        while not stop.is_set():
            if select.select([agent.sock], [], [], 0.1)[0]:
                for data, host, sport, scope in discovery.drain(agent.sock, agent.console.drop):
                    agent.handle_datagram(data, host, sport, scope)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert whendone.ask(KEY, "stay", "::1", socket.if_nametoindex("lo"), port=port) == "stay"
        with pytest.raises(whendone.WhenDoneError, match="no answer"):
            whendone.ask(OTHER, "poweroff", "::1", socket.if_nametoindex("lo"), port=port, attempts=1, timeout=0.5)
    finally:
        stop.set()
        thread.join()
        agent.sock.close()
    assert agent.way_back.policy == "stay"
