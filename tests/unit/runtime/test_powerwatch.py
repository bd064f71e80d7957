"""Issue 16 item 5: the server's POWER note after each OFFER, the stick's console line, and powerwatch's shutdown."""

from __future__ import annotations

import argparse
import io
import os
import select
import socket
import threading

import pytest

from stiefel_runtime import discovery, messages, power, powerwatch, server
from stiefel_runtime.common import Console

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))


def supply_dir(tmp_path, capacity, status="Discharging", online=0):
    """A fake /sys/class/power_supply: one battery and one mains adapter."""
    root = tmp_path / "power_supply"
    for name, fields in (("BAT0", {"type": "Battery", "capacity": capacity, "status": status}),
                         ("AC", {"type": "Mains", "online": online})):
        (root / name).mkdir(parents=True, exist_ok=True)
        for field, value in fields.items():
            (root / name / field).write_text("%s\n" % value)
    return str(root)


class FakeSock(object):
    def __init__(self):
        self.sent = []

    def sendto(self, data, address):
        self.sent.append((data, address))


def agent_on(tmp_path, capacity, **supply):
    out = io.StringIO()
    agent = server.ServerAgent(KEY, Console("stiefel-server", stream=out, timer=False), run_dir=str(tmp_path),
                               power_sysfs=supply_dir(tmp_path, capacity, **supply))
    agent.shutdown_charge = server.shutdown_charge_from({"shutdown_charge": "10"})
    agent.sock = FakeSock()
    agent.check_power()
    return agent, out


@pytest.mark.parametrize("capacity, supply, flags", [
    (80, {}, messages.POWER_ON_BATTERY),
    (15, {}, messages.POWER_ON_BATTERY | messages.POWER_LOW),
    (10, {}, messages.POWER_ON_BATTERY | messages.POWER_LOW | messages.POWER_SHUT_DOWN),
    (5, {"online": 1}, 0),
    (5, {"status": "Charging"}, 0),
])
def test_power_note_from_sysfs(tmp_path, capacity, supply, flags):
    agent, out = agent_on(tmp_path, capacity, **supply)
    nonce = messages.new_nonce()
    agent.handle_datagram(messages.build_discover(KEY, nonce), "fe80::2", 40000, 3)
    offer = messages.parse(KEY, agent.sock.sent[0][0], expect=(messages.OFFER,))
    note = messages.parse(KEY, agent.sock.sent[1][0], expect=(messages.POWER,))
    assert (note.client_nonce, note.server_nonce) == (nonce, offer.server_nonce)
    assert (note.flags, note.charge) == (flags, capacity)
    assert ("asking the desktop to shut down cleanly" in out.getvalue()) == bool(flags & messages.POWER_SHUT_DOWN)


def test_standalone_and_no_battery_send_no_note_or_say_so(tmp_path):
    agent, _out = agent_on(tmp_path, 50)
    agent.shutdown_charge = None
    agent.state.power = None
    agent.check_power()
    agent.handle_datagram(messages.build_discover(KEY, messages.new_nonce()), "fe80::2", 40000, 3)
    assert len(agent.sock.sent) == 1  # the OFFER alone, as before
    assert power.power_note([]) == (0, None)


def test_shutdown_charge_option():
    lines = []
    assert server.shutdown_charge_from({}) == server.DEFAULT_SHUTDOWN_CHARGE
    assert server.shutdown_charge_from({"shutdown_charge": "25"}) == 25
    assert server.shutdown_charge_from({"shutdown_charge": "\x1b[2J"}, log=lines.append) == 10
    assert server.shutdown_charge_from({"shutdown_charge": "101"}) == 10 and lines


@pytest.mark.parametrize("body, reason", [
    (bytes(32) + b"\x80\x05", "unknown flags"),
    (bytes(32) + b"\x01\x65", "not a percentage"),
    (bytes(33), "body must be"),
])
def test_hostile_power_bodies(body, reason):
    with pytest.raises(messages.MalformedMessage, match=reason):
        messages.parse(KEY, messages._seal(KEY, messages.POWER, body))


def test_old_offer_parser_is_untouched_and_the_stick_says_it_once(tmp_path):
    """The OFFER is byte for byte what it was; the client agent's discovery takes the note for its own nonce."""
    from stiefel_runtime import client
    agent, _out = agent_on(tmp_path, 7)
    out = io.StringIO()
    stick = client.ClientAgent(KEY, Console("stiefel-client", stream=out, timer=False), run_dir=str(tmp_path))
    stick.sock = FakeSock()
    discover = stick.disc.discover(3)
    agent.handle_datagram(discover, "fe80::2", 40000, 3)
    offer_bytes, note_bytes = agent.sock.sent[0][0], agent.sock.sent[1][0]
    assert len(offer_bytes) == messages.HEADER.size + 39 + len("stiefel") + messages.MAC_BYTES
    for _round in range(3):
        stick.handle_datagram(note_bytes, "fe80::1", 61570, 3)
    assert out.getvalue().count("asks this desktop to shut down cleanly") == 1
    stranger = messages.build_power(KEY, messages.new_nonce(), messages.new_nonce(), messages.POWER_SHUT_DOWN, 1)
    stick.handle_datagram(stranger, "fe80::bad", 61570, 3)
    assert stick.console.dropped == 1 and "answers no DISCOVER of ours" in out.getvalue()


class Recorder(object):
    def __init__(self, code=0):
        self.calls = []
        self.code = code

    def __call__(self, argv):
        self.calls.append(argv)
        return self.code


def watcher(run, kmsg_lines):
    out = io.StringIO()
    watch = powerwatch.PowerWatch(KEY, "::1", 1, Console("stiefel-powerwatch", stream=out, timer=False), run=run,
                                  kmsg=kmsg_lines.append)
    watch.close()
    return watch, out


def test_shutdown_is_scheduled_once_and_cancelled_when_the_flag_clears():
    run, kmsg = Recorder(), []
    watch, out = watcher(run, kmsg)
    low = messages.POWER_ON_BATTERY | messages.POWER_LOW
    watch.follow(messages.POWER_ON_BATTERY, 40)
    watch.follow(low, 15)
    assert run.calls == [] and "on battery and LOW (15%)" in out.getvalue()
    for _poll in range(3):
        watch.follow(low | messages.POWER_SHUT_DOWN, 9)
    shutdowns = [argv for argv in run.calls if argv[0] == "shutdown"]
    walls = [argv for argv in run.calls if argv[0] == "wall"]
    assert shutdowns == [["shutdown", "-h", "--no-wall", "+1", walls[0][1]]] and len(walls) == 1
    assert "shuts down cleanly in 1 minute" in walls[0][1] and kmsg == [walls[0][1]]
    watch.follow(0, 30)  # the power supply is back
    assert run.calls[-2:] == [["shutdown", "-c", "--no-wall"], ["wall", kmsg[-1]]] and not watch.scheduled
    assert "cancelled" in kmsg[-1]


class Clock(object):
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_without_logind_powerwatch_keeps_the_minute_and_powers_off_itself():
    """``shutdown -h +1`` failed (no D-Bus, logind down, or it hung: 124): systemctl poweroff a minute after
    the wall message, once; a failed poweroff is tried again 10 s later."""
    run, kmsg, clock = Recorder(code=124), [], Clock()
    watch, out = watcher(run, kmsg)
    watch.clock = clock
    shut = messages.POWER_ON_BATTERY | messages.POWER_SHUT_DOWN
    watch.follow(shut, 3)
    watch.follow(shut, 3)
    assert [argv[0] for argv in run.calls].count("shutdown") == 1 and "systemctl poweroff in 60 s" in out.getvalue()
    assert watch.sleep_for(30) == 30
    clock.now += 45
    assert watch.sleep_for(30) == 15
    watch.tick()
    assert ["systemctl", "poweroff"] not in run.calls
    clock.now += 15
    watch.tick()  # fails (the recorder answers 124): again in 10 s
    assert run.calls[-1] == ["systemctl", "poweroff"] and watch.sleep_for(30) == 10
    run.code = 0
    clock.now += 10
    watch.tick()
    watch.tick()
    assert run.calls.count(["systemctl", "poweroff"]) == 2 and watch.due is None


def test_grace_zero_shuts_down_now_and_powers_off_at_once_without_logind():
    """``--grace 0`` (laptop_powerwatch_grace: 0): ``shutdown -h +0``, and without logind no wait at all."""
    run, kmsg, clock = Recorder(code=1), [], Clock()
    watch, out = watcher(run, kmsg)
    watch.clock, watch.grace = clock, 0
    watch.follow(messages.POWER_ON_BATTERY | messages.POWER_SHUT_DOWN, 4)
    assert ["shutdown", "-h", "--no-wall", "+0", kmsg[0]] in run.calls and "shuts down cleanly now" in kmsg[0]
    assert "systemctl poweroff in 0 s" in out.getvalue() and watch.sleep_for(30) == 0
    watch.tick()
    assert run.calls[-1] == ["systemctl", "poweroff"]


@pytest.mark.parametrize("text, minutes", [("0", 0), ("1", 1), ("15", 15), ("60", 60)])
def test_grace_minutes_accepts_whole_minutes(text, minutes):
    assert powerwatch.grace_minutes(text) == minutes


@pytest.mark.parametrize("text", ["-1", "61", "1.5", "", "one", "9" * 400])
def test_grace_minutes_refuses_the_rest(text):
    with pytest.raises(argparse.ArgumentTypeError):
        powerwatch.grace_minutes(text)


def test_without_logind_the_power_supply_coming_back_cancels_the_own_minute():
    run, kmsg, clock = Recorder(code=1), [], Clock()
    watch, _out = watcher(run, kmsg)
    watch.clock = clock
    watch.follow(messages.POWER_ON_BATTERY | messages.POWER_SHUT_DOWN, 3)
    run.code = 0
    watch.follow(0, 30)
    clock.now += 120
    watch.tick()
    assert "cancelled" in kmsg[-1] and not watch.scheduled
    assert ["systemctl", "poweroff"] not in run.calls and ["shutdown", "-c", "--no-wall"] not in run.calls


def test_run_command_survives_a_hanging_or_missing_command(tmp_path):
    assert powerwatch.run_command(["sleep", "5"], timeout=0.2) == 124
    assert powerwatch.run_command([str(tmp_path / "no-such-command")]) == 127
    assert powerwatch.run_command(["true"]) == 0


def test_powerwatch_over_a_real_socket_with_hostile_neighbours(tmp_path):
    """PowerWatch against the server agent's datagram handling on ::1; junk sent to the watcher's own socket."""
    agent, _sout = agent_on(tmp_path, 6)
    agent.sock = discovery.open_listen_socket(0, bind_address="::1")
    port = agent.sock.getsockname()[1]
    lo = socket.if_nametoindex("lo")
    run, kmsg = Recorder(), []
    out = io.StringIO()
    watch = powerwatch.PowerWatch(KEY, "::1", lo, Console("stiefel-powerwatch", stream=out, timer=False), port=port,
                                  run=run, kmsg=kmsg.append, timeout=1.0)
    mine = watch.sock.getsockname()[1]
    stop = threading.Event()
    recorded = []

    def serve():
        while not stop.is_set():
            if select.select([agent.sock], [], [], 0.1)[0]:
                for data, host, sport, scope in discovery.drain(agent.sock, agent.console.drop):
                    hostile = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
                    try:
                        # before the real answer: an old OFFER and note for another nonce, another key's
                        # note, truncated, oversized and random datagrams, and a small flood
                        for junk in recorded + [
                                messages.build_power(OTHER, data[14:30], messages.new_nonce(), 4, 1),
                                b"STFL\x02\x09" + b"\x1b[2J" * 3, os.urandom(600)] + [os.urandom(60)] * 200:
                            hostile.sendto(junk, ("::1", mine, 0, lo))
                    finally:
                        hostile.close()
                    agent.handle_datagram(data, host, sport, scope)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        old = messages.new_nonce()
        agent.state.power = (messages.POWER_ON_BATTERY, 50)
        recorded.extend(agent.state.replies(messages.build_discover(KEY, old)))
        agent.state.power = None
        agent.check_power()  # 6 %: SHUT_DOWN
        watch.poll()
        watch.poll()
    finally:
        stop.set()
        thread.join()
        agent.sock.close()
        watch.close()
    assert watch.scheduled and [argv[0] for argv in run.calls] == ["wall", "shutdown"]
    assert watch.console.dropped >= 200
    text = out.getvalue()
    assert "\x1b" not in text and text.count("\n") <= 40
    assert "ReplayedMessage" in text and "MalformedMessage" in text
