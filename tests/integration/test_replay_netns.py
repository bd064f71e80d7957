"""Issue 13, item 1: a passive listener's recording replayed at the real agents, in two network namespaces.

A sniffer (AF_PACKET on the client's end of the veth pair) records everything a real client sends while it
boots: its DISCOVERs, its answers to the server's challenges, its HTTP request lines. An attacker without the
key then sends all of it again, takes the nonces of any OFFER it gets back and asks for the payload with them:

* after the server restarted (a fresh server, a real client booted from it since), and
* after the replay window (shortened for the test with ``STIEFEL_REPLAY_WINDOW``).

It must obtain no session (no 200 for a payload), the NBD PSK must stay the one the real client holds (nbdkit
accepts it over TLS-PSK), and the server must log the drops. Autokexec gets the same: a recorded KEXEC_REQUEST
replayed after the service restarted never kexecs (``--dry-run`` prints the kexec commands), and a flood of
junk and replayed datagrams does not stop a real request (its delay is printed, not asserted).

The figures are printed as ``[replay] ...`` lines; the test runs unchanged against the version-1 agents
(commit 19b4312, with this repository's lab/ and tests/integration/conftest.py, and its replay window read
from STIEFEL_REPLAY_WINDOW) to give the "before" figures. ``world`` is tests/integration/conftest.py's.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import cpio, keyfile
from lab.agents import AGENTS, Agent, ENV, PYTHON, fake_boot, run_client, write_key
from lab.netns import run

pytestmark = pytest.mark.integration

# Records what the client sends on its link (one JSON object a line, written as it arrives).
SNIFFER = r"""
import json, socket, struct, sys
# ETH_P_ALL: the kernel hands outgoing frames only to sockets of every protocol
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.bind((sys.argv[1], 0))
out = open(sys.argv[2], "w")
print("sniffing", flush=True)
while True:
    try:
        frame, addr = s.recvfrom(65535)
    except OSError:
        continue  # ENETDOWN once while the client agent brings its link up
    if addr[2] != socket.PACKET_OUTGOING or frame[12:14] != b"\x86\xdd" or len(frame) < 14 + 40 + 8:
        continue
    ip = frame[14:]
    proto, payload = ip[6], ip[40:]
    if proto not in (6, 17):
        continue
    sport, dport = struct.unpack(">HH", payload[:4])
    data = payload[8:] if proto == 17 else payload[(payload[12] >> 4) * 4:]
    if not data:
        continue
    out.write(json.dumps({"proto": "udp" if proto == 17 else "tcp", "dst": socket.inet_ntop(socket.AF_INET6, ip[24:40]),
                          "dport": dport, "data": data.hex()}) + "\n")
    out.flush()
"""

# The attacker: no key, only the recording. Version-agnostic: an OFFER's two nonces are read at their
# offsets (v1 and v2 put them in the same place), whatever the server meant by the second one.
ATTACKER = r"""
import collections, json, socket, sys, time
recording, ifname = sys.argv[1], sys.argv[2]
ifindex = socket.if_nametoindex(ifname)
records = [json.loads(line) for line in open(recording) if line.strip()]
names = {1: "DISCOVER", 2: "OFFER", 3: "KEXEC_REQUEST", 4: "KEXEC_ACK", 5: "SESSION_REQUEST", 6: "SESSION_ACCEPT"}
sent, replies, offers = collections.Counter(), collections.Counter(), []
udp = [r for r in records if r["proto"] == "udp" and r["dport"] == 61570]
http_lines = [bytes.fromhex(r["data"]) for r in records if r["proto"] == "tcp" and r["dport"] == 61571]
http_lines = [d for d in http_lines if d.startswith((b"GET ", b"POST "))]
server = next((r["dst"] for r in records if r["dport"] in (61570, 61571) and not r["dst"].startswith("ff02")), None)
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.settimeout(0.4)
for r in udp:
    data = bytes.fromhex(r["data"])
    sent[names.get(data[5], "?") if data[:4] == b"STFL" else "?"] += 1
    s.sendto(data, (r["dst"], 61570, 0, ifindex))
    while True:
        try:
            reply, addr = s.recvfrom(2048)
        except socket.timeout:
            break
        kind = names.get(reply[5], "?") if reply[:4] == b"STFL" else "?"
        replies[kind] += 1
        server = server or addr[0].split("%")[0]
        if kind == "OFFER":
            offers.append((reply[14:30].hex(), reply[30:46].hex()))

def http(request):
    try:
        c = socket.create_connection((server + "%" + ifname, 61571), timeout=30)
    except OSError:
        return 0  # nothing listens (autokexec)
    c.sendall(request)
    head = b""
    while b"\r\n" not in head:
        chunk = c.recv(4096)
        if not chunk:
            break
        head += chunk
    while c.recv(1 << 20):
        pass  # the whole body, as a client would take it
    c.close()
    return int(head.split()[1]) if head.startswith(b"HTTP/") else 0

offer_gets = [http(("GET /payload/%s/%s HTTP/1.0\r\nHost: stiefel\r\n\r\n" % o).encode()) for o in offers]
replayed_http = [http(line) for line in http_lines]
print(json.dumps({"sent": dict(sent), "replies": dict(replies), "offers": len(offers), "offer_gets": offer_gets,
                  "replayed_http": replayed_http}))
"""

# nbdkit with the real client's session PSK: the export opens (TLS-PSK, as the laptop's NBD hook does).
NBD_ATTACH = """
import json, socket, sys, nbd
sock = socket.create_connection((sys.argv[1], 10809), timeout=20)
h = nbd.NBD()
h.set_export_name("stiefel")
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_username("stiefel")
h.set_tls_psk_file(sys.argv[2])
try:
    h.connect_socket(sock.detach())
    print(json.dumps({"attached": True, "size": h.get_size()}))
    h.shutdown()
except Exception as exc:
    print(json.dumps({"attached": False, "error": str(exc)}))
"""


class Sniffer(object):
    """Records what the client namespace sends on its veth until stopped."""

    def __init__(self, ns, path):
        self.path = path
        self.agent = Agent(ns, ["/usr/bin/python3", "-c", SNIFFER, ns.veth_c, path], path + ".log", netns=ns.client)
        self.agent.wait_for("sniffing", 10)

    def stop(self):
        time.sleep(0.3)
        self.agent.stop()
        with open(self.path) as handle:
            return [json.loads(line) for line in handle if line.strip()]


def start_server(ns, tmp, agents, key_path, name, disk, boot, env=()):
    cmdline = os.path.join(tmp, "cmdline")
    with open(cmdline, "w") as handle:
        handle.write("console=ttyS0 stiefel.role=server\n")
    argv = ["env"] + ["%s=%s" % item for item in env] + [
        PYTHON, os.path.join(AGENTS, "stiefel-server"), "--key", key_path, "--cmdline-file", cmdline,
        "--boot-dir", boot, "--disk", disk, "--run-dir", os.path.join(tmp, name),
        "--power-sysfs", os.path.join(tmp, "no-power")]
    server = Agent(ns, argv, os.path.join(tmp, name + ".log"))
    agents.append(server)
    server.wait_for("stiefel-server: ready", 60)
    return server


def client_psk(tmp, run_dir, name):
    """The session PSK the client would append to the laptop initrd, as a psk file for libnbd."""
    entries = cpio.read_newc(open(os.path.join(run_dir, "nbd-psk.cpio"), "rb").read())
    path = os.path.join(tmp, name + ".psk")
    with open(path, "wb") as handle:
        handle.write([e for e in entries if e.name == "etc/stiefel/nbd.psk"][0].data)
    os.chmod(path, 0o600)
    return path


def booted_client(ns, tmp, key_path, name):
    proc, run_dir = run_client(ns, tmp, key_path, name, 60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("stiefel-client: manifest ")][0]
    manifest = json.loads(line[len("stiefel-client: manifest "):])
    return "%s%%%s" % (manifest["server"], manifest["interface"]), client_psk(tmp, run_dir, name)


def attack(ns, tmp, recording):
    path = os.path.join(tmp, "recording.jsonl")
    with open(path, "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in recording)
    out = subprocess.run(ns.exec_argv(ns.client, "/usr/bin/python3", "-c", ATTACKER, path, ns.veth_c),
                         capture_output=True, text=True, timeout=180, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def attach(ns, address, psk_path):
    out = subprocess.run(ns.exec_argv(ns.client, "/usr/bin/python3", "-c", NBD_ATTACH, address, psk_path),
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def read(path):
    with open(path) as handle:
        return handle.read()


def wait_for_any(agent, markers, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = agent.text()
        if any(m in text for m in markers):
            return text
        time.sleep(0.2)
    return agent.text()


def setup(tmp):
    key_path = write_key(os.path.join(tmp, "key"), keyfile.generate_key())
    boot = fake_boot(tmp)
    disk = os.path.join(tmp, "disk.img")
    with open(disk, "wb") as handle:
        handle.truncate(16 * 1024 * 1024)
    return key_path, boot, disk


def report(scenario, result, psk_rotated, attached, log_text):
    print("[replay] %s: replayed %s; server answered %s; payload GETs with the OFFERs' nonces -> %s; "
          "recorded HTTP requests -> %s; NBD PSK replaced: %s; real client attaches: %s; drops logged: %d" % (
              scenario, result["sent"], result["replies"], result["offer_gets"], result["replayed_http"],
              psk_rotated, attached, log_text.count("dropped input")))


def check(result, psk_rotated, attached, text):
    assert 200 not in result["offer_gets"], result
    assert 200 not in result["replayed_http"], result
    assert "SESSION_ACCEPT" not in result["replies"], result
    assert not psk_rotated
    assert attached["attached"], attached
    assert "ReplayedMessage" in text and "dropped input" in text


def test_replay_after_server_restart(world):
    ns, tmp, agents = world
    key_path, boot, disk = setup(tmp)
    first = start_server(ns, tmp, agents, key_path, "srv1", disk, boot)
    sniffer = Sniffer(ns, os.path.join(tmp, "sniff1.jsonl"))
    booted_client(ns, tmp, key_path, "recorded-client")
    recording = sniffer.stop()
    assert any(r["proto"] == "tcp" for r in recording) and any(r["proto"] == "udp" for r in recording)
    first.stop()
    agents.remove(first)
    # The server ramdisk rebooted; the desktop booted from it again; now the recording is replayed.
    server = start_server(ns, tmp, agents, key_path, "srv2", disk, boot)
    address, psk = booted_client(ns, tmp, key_path, "real-client")
    psk_before = read(os.path.join(tmp, "srv2", "nbd.psk"))
    result = attack(ns, tmp, recording)
    psk_rotated = read(os.path.join(tmp, "srv2", "nbd.psk")) != psk_before
    attached = attach(ns, address, psk)
    text = wait_for_any(server, ["ReplayedMessage"], 15)
    report("after a server restart", result, psk_rotated, attached, text)
    check(result, psk_rotated, attached, text)
    assert server.proc.poll() is None


def test_replay_after_the_replay_window(world):
    ns, tmp, agents = world
    key_path, boot, disk = setup(tmp)
    window = 30  # long enough for the replay within it and the real client's boot
    server = start_server(ns, tmp, agents, key_path, "srv", disk, boot, env=(("STIEFEL_REPLAY_WINDOW", window),))
    sniffer = Sniffer(ns, os.path.join(tmp, "sniff.jsonl"))
    booted_client(ns, tmp, key_path, "recorded-client")
    recording = sniffer.stop()
    recorded_at = time.monotonic()  # the last recorded datagram was sent before this
    # within the window: the recorded DISCOVERs are dropped as replays
    within = attack(ns, tmp, [r for r in recording if r["proto"] == "udp"])
    address, psk = booted_client(ns, tmp, key_path, "real-client")
    psk_before = read(os.path.join(tmp, "srv", "nbd.psk"))
    time.sleep(max(0.0, recorded_at + window + 1 - time.monotonic()))
    result = attack(ns, tmp, recording)
    psk_rotated = read(os.path.join(tmp, "srv", "nbd.psk")) != psk_before
    attached = attach(ns, address, psk)
    text = wait_for_any(server, ["ReplayedMessage"], 15)
    print("[replay] within the %d s window: replayed %s; server answered %s" % (window, within["sent"],
                                                                                within["replies"]))
    report("after the %d s replay window" % window, result, psk_rotated, attached, text)
    check(result, psk_rotated, attached, text)
    assert "OFFER" not in within["replies"], within
    assert result["replies"].get("OFFER"), result  # the window did pass: the DISCOVERs were answered
    assert server.proc.poll() is None


# ------------------------------------------------------------------ autokexec

# A keyed client measuring one real request: DISCOVER until an OFFER, KEXEC_REQUEST until the ACK.
REQUEST = r"""
import json, socket, sys, time
from ansible_collections.stiefel.system.plugins.module_utils import keyfile
from stiefel_runtime import discovery, messages
key = keyfile.read_key(sys.argv[1])
ifindex = socket.if_nametoindex(sys.argv[2])
client = discovery.ClientDiscovery(key)
sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
sock.settimeout(0.25)
started = time.monotonic()
offer = None
while time.monotonic() - started < 60:
    if offer is None:
        sock.sendto(client.discover(ifindex), ("ff02::1", 61570, 0, ifindex))
    else:
        sock.sendto(client.kexec_request(offer), (offer.address, 61570, 0, ifindex))
    try:
        data, addr = sock.recvfrom(2048)
    except socket.timeout:
        continue
    try:
        got = client.handle(data, addr[0].split("%")[0], ifindex)
    except Exception:
        continue
    if isinstance(got, discovery.Offer):
        offer = offer or got
    elif got.type == messages.KEXEC_ACK:
        print(json.dumps({"acked": True, "seconds": time.monotonic() - started}))
        sys.exit(0)
print(json.dumps({"acked": False, "seconds": time.monotonic() - started}))
"""

# Junk and the recording, as fast as one process sends, for a while.
FLOOD = r"""
import json, os, socket, sys, time
recording, ifname, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
ifindex = socket.if_nametoindex(ifname)
replays = [(bytes.fromhex(r["data"]), r["dst"]) for r in map(json.loads, open(recording)) if r["proto"] == "udp"]
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setblocking(False)
sent, end, i = 0, time.monotonic() + seconds, 0
print("flooding", flush=True)
while time.monotonic() < end:
    i += 1
    if i % 4 == 0 and replays:
        data, dst = replays[i % len(replays)]
    else:
        data, dst = os.urandom(i % 600), "ff02::1"
    try:
        s.sendto(data, (dst, 61570, 0, ifindex))
        sent += 1
    except BlockingIOError:
        time.sleep(0.0005)
print(json.dumps({"sent": sent, "seconds": seconds}), flush=True)
"""


def start_autokexec(ns, tmp, agents, name, key_path):
    config = {"format": "stiefel-autokexec-config", "version": 1, "key_path": key_path,
              "ramdisk_kernel": os.path.join(tmp, "vmlinuz"), "ramdisk_initrd": os.path.join(tmp, "initrd.img"),
              "server_cmdline": "stiefel.role=server stiefel.disk=UUID=aaaa console=ttyS0", "server": {},
              "trigger_macs": []}
    path = os.path.join(tmp, "autokexec.json")
    with open(path, "w") as handle:
        json.dump(config, handle)
    with open(os.path.join(tmp, "laptop-cmdline"), "w") as handle:
        handle.write("root=/dev/sda1 ro quiet\n")
    agent = Agent(ns, [PYTHON, os.path.join(AGENTS, "stiefel-autokexec"), "--config", path, "--run-dir",
                       os.path.join(tmp, name), "--proc-cmdline", os.path.join(tmp, "laptop-cmdline"), "--dry-run"],
                  os.path.join(tmp, name + ".log"))
    agents.append(agent)
    agent.wait_for("listening for stiefel clients", 30)
    return agent


def real_request(ns, key_path):
    out = subprocess.run(ns.exec_argv(ns.client, PYTHON, "-c", REQUEST, key_path, ns.veth_c), capture_output=True,
                         text=True, env=ENV, timeout=90, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


KEXEC_LINE = "dry-run: would run: kexec -s -l"


def test_autokexec_replay_after_restart_and_flood(world):
    ns, tmp, agents = world
    key_path = write_key(os.path.join(tmp, "key"), keyfile.generate_key())
    for name in ("vmlinuz", "initrd.img"):
        with open(os.path.join(tmp, name), "wb") as handle:
            handle.write(os.urandom(4096))
    # autokexec leaves links it has no MAC for to the laptop's network setup
    run("ip", "-n", ns.server, "link", "set", ns.veth_s, "up")
    run("ip", "-n", ns.client, "link", "set", ns.veth_c, "up")
    first = start_autokexec(ns, tmp, agents, "ak1", key_path)
    time.sleep(2.5)  # IPv6 DAD on the fresh veth
    sniffer = Sniffer(ns, os.path.join(tmp, "sniff-ak.jsonl"))
    recorded = real_request(ns, key_path)
    recording = sniffer.stop()
    first.wait_for(KEXEC_LINE, 10)
    kexecs_recorded = first.text().count(KEXEC_LINE)
    first.stop()
    agents.remove(first)

    # the laptop's service restarted (e.g. the laptop rebooted): the recording is replayed at it
    agent = start_autokexec(ns, tmp, agents, "ak2", key_path)
    result = attack(ns, tmp, recording)
    text = wait_for_any(agent, ["ReplayedMessage"], 15)
    replay_kexecs = text.count(KEXEC_LINE)
    print("[replay] autokexec after a restart: replayed %s; autokexec answered %s; kexecs: %d (the recorded "
          "request's own run: %d in %.2f s)"
          % (result["sent"], result["replies"], replay_kexecs, kexecs_recorded, recorded["seconds"]))

    # a flood of junk and of the recording does not stop a real request; how much it delays it is printed
    quiet = real_request(ns, key_path)
    flood_log = os.path.join(tmp, "flood.log")
    path = os.path.join(tmp, "recording.jsonl")
    with open(path, "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in recording)
    flood = Agent(ns, ["/usr/bin/python3", "-c", FLOOD, path, ns.veth_c, "12"], flood_log, netns=ns.client)
    agents.append(flood)
    flood.wait_for("flooding", 10)
    time.sleep(2)
    flooded = real_request(ns, key_path)
    flood.proc.wait(30)
    flood_stats = json.loads(flood.text().strip().splitlines()[-1])
    after = agent.text()
    print("[replay] autokexec real request: %.3f s quiet, %.3f s under a flood of %d datagrams in %.0f s "
          "(junk and the recording); drop lines logged: %d; kexecs since the restart: %d" % (
              quiet["seconds"], flooded["seconds"], flood_stats["sent"], flood_stats["seconds"],
              after.count("dropped input"), after.count(KEXEC_LINE)))
    assert recorded["acked"] and kexecs_recorded >= 1
    assert result["replies"].get("KEXEC_ACK", 0) == 0 and replay_kexecs == 0
    assert "ReplayedMessage" in text
    assert quiet["acked"] and flooded["acked"]
    assert after.count(KEXEC_LINE) == 2  # the two real requests, nothing else
    assert agent.proc.poll() is None
