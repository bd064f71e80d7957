"""An attacker on the link, against the real server and client agents in network namespaces (issue 13).

The attacker has no key. It shares the client's namespace (its own link-local addresses on the same
veth) or, for the listening test, sits in a third namespace behind a second interface of the server
that the standalone config does not name. Each test prints the figure the issue asks for:

* 2,000 idle or slow TCP connections to the payload port while the real client boots: time to served;
* a junk datagram flood onto a console read at 11,520 B/s (115200 baud): the real client's delay;
* control characters in an HTTP path: the console shows them escaped;
* HTTP and NBD unreachable from the unlisted interface; refused NBD attempts (plaintext, wrong PSK)
  on the console; a fresh PSK at every start; ``qemu-img info`` on the export as the README shows it.

``STIEFEL_HOSTILE_TREE=/path/to/an/old/checkout`` runs the same attacks against another tree's agents
(for the before/after figures): the tests then print and xfail where the old code loses.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import threading
import time

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import cpio, keyfile
from lab.agents import PYTHON, REPO, fake_boot, nbd_probe, stop_process, wait_for_output, write_key
from lab.netns import link_local, run as _run

pytestmark = pytest.mark.integration

TREE = os.environ.get("STIEFEL_HOSTILE_TREE") or REPO
BASELINE = TREE != REPO
ENV = dict(os.environ, PYTHONPATH=os.path.join(TREE, "collections"), PYTHONUNBUFFERED="1")
HTTP_PORT, NBD_PORT, DISCOVERY_PORT = 61571, 10809, 61570
SERIAL_RATE = 11520  # bytes/s: 115200 baud, 8N1


def _agent_argv(name, *args):
    argv = [PYTHON, os.path.join(TREE, "agents", "stiefel-" + name)] + list(args)
    if name == "server":  # the file limits a systemd service starts with: soft 1,024, hard higher
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        argv = ["prlimit", "--nofile=1024:%d" % (hard if hard != resource.RLIM_INFINITY else 524288), "--"] + argv
    return argv


class Server(object):
    """The server agent, its stdout a pipe drained at ``rate`` bytes/s (None: as fast as it comes)."""

    def __init__(self, ns, argv, log_path, rate=None):
        self.log_path = log_path
        self.rate = rate
        # stopped by PID in stop()
        self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
            ns.exec_argv(ns.server, *argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
        self._lock = threading.Lock()
        self._data = bytearray()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self):
        chunk = max(1, (self.rate or 0) // 10) if self.rate else 65536
        with open(self.log_path, "wb") as log:
            while True:
                started = time.monotonic()
                data = self.proc.stdout.read1(chunk) if self.rate else self.proc.stdout.read1(65536)
                if not data:
                    return
                log.write(data)
                log.flush()
                with self._lock:
                    self._data += data
                if self.rate:  # a serial line takes len/rate seconds for what it was given
                    time.sleep(max(0.0, len(data) / self.rate - (time.monotonic() - started)))

    def text(self):
        with self._lock:
            return self._data.decode("utf-8", "replace")

    def raw(self):
        with self._lock:
            return bytes(self._data)

    def wait_for(self, pattern, timeout=60):
        wait_for_output(self.proc, self.text, lambda text: re.search(pattern, text), pattern, timeout)

    def stop(self):
        stop_process(self.proc, 15)
        self._reader.join(10)


def _client(ns, tmp, key_path, name, timeout):
    """The real client until it has verified the payload: ``(proc, seconds from its first DISCOVER to the
    payload's end, run_dir)``."""
    run_dir = os.path.join(tmp, name)
    client = _agent_argv("client", "--key", key_path, "--cmdline-file", "/dev/null", "--run-dir", run_dir,
                         "--stop-before-kexec", "--timeout", str(timeout))
    argv = ns.exec_argv(ns.client, *client)
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=timeout + 30, check=False)
    seconds = time.monotonic() - started
    # The client's own clock, from its first DISCOVER to the payload's last byte: what the attack delays
    # (process start and link setup are the same with or without it, and slow on a loaded machine).
    stamps = re.findall(r"^\[ *([\d.]+)\] stiefel-client: (discovering|payload: [\d.]+ MB in )", proc.stdout, re.M)
    begin = [float(t) for t, what in stamps if what == "discovering"]
    end = [float(t) for t, what in stamps if what != "discovering"]
    if begin and end:
        seconds = end[-1] - begin[0]
    print("[%s] rc=%d in %.1f s (discovery to payload %.2f s)\n%s" % (
        name, proc.returncode, time.monotonic() - started, seconds, proc.stdout[-1500:]))
    return proc, seconds, run_dir


def _ramdisk_server(world, rate=None, disk=False):
    ns, tmp, agents = world
    key_path = write_key(os.path.join(tmp, "key"), keyfile.generate_key())
    args = ["--key", key_path, "--cmdline-file", "/dev/null", "--boot-dir", fake_boot(tmp),
            "--run-dir", os.path.join(tmp, "srv"), "--power-sysfs", os.path.join(tmp, "no-power")]
    if disk:
        image = os.path.join(tmp, "disk.img")
        with open(image, "wb") as handle:
            handle.truncate(16 * 1024 * 1024)
        args += ["--disk", image]
    server = Server(ns, _agent_argv("server", *args), os.path.join(tmp, "server.log"), rate=rate)
    agents.append(server)
    server.wait_for("stiefel-server: ready", 60)
    # The client namespace's side up (the real client would do it too) and the server's address known.
    _run("ip", "-n", ns.client, "link", "set", ns.veth_c, "up")
    server_addr = link_local(ns.server, ns.veth_s)
    link_local(ns.client, ns.veth_c)
    return ns, tmp, key_path, server, server_addr


# ------------------------------------------------------------------ 2,000 connections

FLOOD = r"""
import errno, resource, socket, sys, time
target, port, count, sources, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(","), float(sys.argv[5])
resource.setrlimit(resource.RLIMIT_NOFILE, (count + 256, count + 256))
scope = socket.if_nametoindex(target.split("%")[1])

def connect(number):
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.bind((sources[number % len(sources)], 0, 0, scope))
        sock.connect_ex((target, port, 0, scope))
    except OSError:
        pass
    return sock

started = time.monotonic()
socks = []
for number in range(count):
    socks.append(connect(number))
    time.sleep(0.002)  # paced, so that a small backlog does not simply drop the SYNs
    if number % 2:
        try:
            socks[-1].send(b"GET /payload/")  # a slow request: half a request line, never finished
        except OSError:
            pass
print("opened %d connections in %.1f s" % (len(socks), time.monotonic() - started), flush=True)
deadline = time.monotonic() + hold
while time.monotonic() < deadline:  # keep reopening what the server closed, at most `hold` seconds
    time.sleep(0.5)
    for index, sock in enumerate(socks):
        if time.monotonic() >= deadline:
            break
        try:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 and \
                    sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b"":
                continue  # the server sent something: keep it open anyway
        except BlockingIOError:
            continue  # open and idle, as meant
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                continue  # still connecting (the backlog is full)
        sock.close()
        socks[index] = connect(index)
print("held for %.0f s" % hold, flush=True)
"""


def _attacker_addresses(ns, count):
    """``count`` extra link-local addresses on the client side: an attacker is not limited to one."""
    lines = ["address add fe80::dead:%x/64 dev %s nodad" % (number + 1, ns.veth_c) for number in range(count)]
    subprocess.run(["ip", "-n", ns.client, "-batch", "-"], input="\n".join(lines) + "\n", text=True, check=True,
                   capture_output=True)
    return ["fe80::dead:%x" % (number + 1) for number in range(count)]


def test_two_thousand_connections_do_not_lock_out_the_client(world):
    ns, tmp, key_path, server, server_addr = _ramdisk_server(world)
    proc, quiet_seconds, _run_dir = _client(ns, tmp, key_path, "quiet", 60)
    assert proc.returncode == 0, proc.stdout + proc.stderr + server.text()

    # 2,000 connections from 250 addresses (8 each: within any per-address cap), half of them sending
    # half a request line and nothing more, reopened as the server closes them, for 40 s.
    sources = _attacker_addresses(ns, 250)
    # waited for below, killed by PID
    flood = subprocess.Popen(  # pylint: disable=consider-using-with
        ns.exec_argv(ns.client, PYTHON, "-c", FLOOD, "%s%%%s" % (server_addr, ns.veth_c), str(HTTP_PORT), "2000",
                     ",".join(sources), "50"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "opened" in flood.stdout.readline()
        # SYNs beyond the backlog are retried by the attacker's kernel (1 s, 3 s, 7 s): give them 12 s to get in
        deadline, established = time.monotonic() + 12, 0
        while time.monotonic() < deadline and established < 1900:
            time.sleep(1)
            established = _run("ip", "netns", "exec", ns.server, "ss", "-Htn", "state", "established",
                               "( sport = :%d )" % HTTP_PORT).stdout.count("\n")
        proc, flood_seconds, run_dir = _client(ns, tmp, key_path, "flooded", 60)
    finally:
        if flood.poll() is None:
            flood.kill()  # by PID
        flood.wait(10)
    text = server.text()
    print("HTTP connections the server held during the flood: %d" % established)
    print("FIGURE connection flood (%s): client served in %.1f s quiet, %.1f s under 2,000 connections (rc=%d)" % (
        "baseline " + TREE if BASELINE else "this tree", quiet_seconds, flood_seconds, proc.returncode))
    if BASELINE:
        pytest.xfail("the baseline tree: rc=%d, the flood named on its console: %s" % (
            proc.returncode, "connection flood" in text))
    assert proc.returncode == 0, proc.stdout + proc.stderr + text[-5000:]
    assert "stiefel-client: payload verified" in proc.stdout
    assert os.path.exists(os.path.join(run_dir, "payload", "kernel"))
    assert server.proc.poll() is None
    # the flood is named on the console, in a bounded number of lines
    assert "connection flood" in text, text[-3000:]
    server.wait_for(r"dropped \d+ more inputs in [\d.]+ s \(not logged one by one\): http fe80::dead:", 20)
    text = server.text()
    print(text[-2500:])
    assert text.count("\n") < 400, "the flood was logged line by line"


# ------------------------------------------------------------------ junk flood onto a slow console

JUNK = r"""
import os, socket, sys, time
target, port, seconds, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
scope = socket.if_nametoindex(target.split("%")[1])
count, started = 0, time.monotonic()
deadline = started + seconds
while time.monotonic() < deadline:
    for _ in range(100):
        try:
            sock.sendto(os.urandom(20 + count % 300), (target.split("%")[0], port, 0, scope))
            count += 1
        except OSError:
            pass
    if rate:  # paced: at most `rate` datagrams per second
        time.sleep(max(0.0, started + count / rate - time.monotonic()))
print("sent %d junk datagrams in %.0f s (%.0f/s)" % (count, seconds, count / seconds), flush=True)
"""


# 3,000 datagrams/s is about the flood (15 MB of console lines a minute); 0 is as fast as one Python
# sender goes (about 15,000/s here, more than the server's Python loop takes on this shared 2-core machine:
# the kernel then drops datagrams of the real client too, a CPU limit, not the console's).
@pytest.mark.parametrize("junk_rate", [3000, 0], ids=["3000-per-s", "unpaced"])
def test_junk_flood_on_a_slow_console_does_not_delay_the_client(world, junk_rate):
    ns, tmp, key_path, server, server_addr = _ramdisk_server(world, rate=SERIAL_RATE)
    proc, quiet_seconds, _run_dir = _client(ns, tmp, key_path, "quiet", 60)
    assert proc.returncode == 0, proc.stdout + proc.stderr + server.text()
    # waited for below, killed by PID
    junk = subprocess.Popen(  # pylint: disable=consider-using-with
        ns.exec_argv(ns.client, PYTHON, "-c", JUNK, "%s%%%s" % (server_addr, ns.veth_c), str(DISCOVERY_PORT), "25",
                     str(junk_rate)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(5)  # the console is well behind by now if every datagram gets a line
        proc, flood_seconds, _run_dir = _client(ns, tmp, key_path, "flooded", 90)
        out, _err = junk.communicate(timeout=60)
    finally:
        if junk.poll() is None:
            junk.kill()  # by PID
            junk.wait(10)
    print(out.strip())
    logged = len(server.raw())
    print("console bytes written during the test: %d (%.1f s at %d B/s)" % (logged, logged / SERIAL_RATE,
                                                                            SERIAL_RATE))
    print("FIGURE junk flood (%s) on a %d B/s console (%s): client served in %.1f s quiet, %.1f s under the flood "
          "(delay %.1f s, rc=%d)" % (out.strip(), SERIAL_RATE, "baseline " + TREE if BASELINE else "this tree",
                                     quiet_seconds, flood_seconds, flood_seconds - quiet_seconds, proc.returncode))
    if BASELINE and proc.returncode != 0:
        pytest.xfail("the baseline tree loses against the junk flood")
    assert proc.returncode == 0, proc.stdout + proc.stderr + server.text()[-3000:]
    if not BASELINE:
        server.wait_for(r"dropped \d+ more inputs in [\d.]+ s \(not logged one by one\): fe80::", 20)
    print(server.text()[-2500:])


# ------------------------------------------------------------------ control characters in a request

def test_control_characters_in_an_http_path_reach_the_console_escaped(world):
    ns, _tmp, _key_path, server, server_addr = _ramdisk_server(world)
    # a well-formed request line (so the handler itself quotes the path), ESC sequences and BEL in the path
    hostile = b"GET /\x1b[2J\x1b]0;owned\x07/\x1b[31mred\x9b HTTP/1.0\r\n\r\n"
    probe = ("import socket, sys\n"
             "s = socket.create_connection((sys.argv[1], %d), timeout=10)\n"
             "s.sendall(%r)\n"
             "print(s.recv(100).split(b'\\r\\n')[0].decode())\n" % (HTTP_PORT, hostile))
    out = _run(*ns.exec_argv(ns.client, PYTHON, "-c", probe, "%s%%%s" % (server_addr, ns.veth_c))).stdout
    print("answer: %s" % out.strip())
    assert out.startswith("HTTP/1.0 4")
    server.wait_for(r"dropped input from http fe80::", 10)
    raw = server.raw()
    line = [l for l in raw.split(b"\n") if b"dropped input from http" in l][-1]
    print("console line: %r" % line)
    if BASELINE and b"\x1b" in raw:
        pytest.xfail("the baseline tree writes the ESC sequences raw: %r" % line)
    assert b"\x1b" not in raw and b"\x07" not in raw and b"\r" not in raw
    assert b"\\x1b[2J\\x1b]0;owned\\x07" in line


# ------------------------------------------------------------------ listening only on the link in use

def _reachable(ns_name, host, port):
    probe = ("import socket, sys\n"
             "try:\n"
             "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close(); print('open')\n"
             "except OSError as exc:\n"
             "    print('closed: %s' % exc)\n")
    out = _run("ip", "netns", "exec", ns_name, PYTHON, "-c", probe, host, str(port)).stdout.strip()
    return out == "open", out


def test_http_and_nbd_listen_only_on_the_link_in_use(world):
    ns, tmp, _agents = world
    suffix = "%x" % (os.getpid() & 0xFFFFF)
    other_ns, other_s, other_x = "stfx" + suffix, "stfos" + suffix, "stfox" + suffix
    _run("ip", "netns", "add", other_ns)
    try:
        _listening_test(world, other_ns, other_s, other_x)
    finally:
        _run("ip", "netns", "del", other_ns, check=False)


def _listening_test(world, other_ns, other_s, other_x):
    ns, tmp, agents = world
    # a second interface of the laptop, into a network the config does not name, with a global address too
    _run("ip", "link", "add", other_s, "type", "veth", "peer", "name", other_x)
    _run("ip", "link", "set", other_s, "netns", ns.server)
    _run("ip", "link", "set", other_x, "netns", other_ns)
    _run("ip", "-n", ns.server, "link", "set", other_s, "up")
    _run("ip", "-n", other_ns, "link", "set", other_x, "up")
    _run("ip", "-n", ns.server, "addr", "add", "fd00:5ee::1/64", "dev", other_s, "nodad")
    _run("ip", "-n", other_ns, "addr", "add", "fd00:5ee::2/64", "dev", other_x, "nodad")
    key_path = write_key(os.path.join(tmp, "key"), keyfile.generate_key())
    image = os.path.join(tmp, "desktop.img")
    with open(image, "wb") as handle:
        handle.truncate(16 * 1024 * 1024)
    run_dir = os.path.join(tmp, "srv")
    os.makedirs(run_dir, mode=0o700)
    stale = "stiefel:%s\n" % ("ab" * 32)
    with open(os.path.join(run_dir, "nbd.psk"), "w") as handle:  # a previous run's session PSK
        handle.write(stale)
    conf = os.path.join(tmp, "server.conf")
    with open(conf, "w") as handle:
        handle.write("disk = %s\nboot_dir = %s\nkey = %s\ninterfaces = %s\nrun_dir = %s\n" % (
            image, fake_boot(tmp), key_path, ns.veth_s, run_dir))
    server = Server(ns, _agent_argv("server", "--config", conf, "--power-sysfs", os.path.join(tmp, "no-power")),
                    os.path.join(tmp, "server.log"))
    agents.append(server)
    server.wait_for("stiefel-server: ready", 60)
    proc, seconds, client_run = _client(ns, tmp, key_path, "client", 60)
    assert proc.returncode == 0, proc.stdout + proc.stderr + server.text()
    server_addr = link_local(ns.server, ns.veth_s)
    other_addr = link_local(ns.server, other_s)
    assert open(os.path.join(run_dir, "nbd.psk")).read() != stale  # this run made its own

    listening = _run("ip", "netns", "exec", ns.server, "ss", "-Hltn").stdout
    print(listening)
    results = {}
    for name, (target_ns, host) in {
            "unlisted link-local": (other_ns, "%s%%%s" % (other_addr, other_x)),
            "unlisted global": (other_ns, "fd00:5ee::1"),
            "listed link-local": (ns.client, "%s%%%s" % (server_addr, ns.veth_c))}.items():
        for port in (HTTP_PORT, NBD_PORT):
            results[(name, port)] = _reachable(target_ns, host, port)
            print("%s port %d: %s" % (name, port, results[(name, port)][1]))
    closed = [key for key, (is_open, _why) in results.items() if not key[0].startswith("listed") and is_open]
    print("FIGURE listening (%s): reachable from the unlisted interface: %s" % (
        "baseline " + TREE if BASELINE else "this tree", closed or "nothing"))
    if BASELINE and closed:
        pytest.xfail("the baseline tree listens on [::]: %s" % closed)
    assert not closed, listening
    assert results[("listed link-local", HTTP_PORT)][0] and results[("listed link-local", NBD_PORT)][0]
    assert "[::]:%d" % HTTP_PORT not in listening and "[::]:%d" % NBD_PORT not in listening
    assert "*:%d" % NBD_PORT not in listening

    # refused NBD attempts: plaintext and a wrong PSK, on the console (they were invisible)
    wrong = os.path.join(tmp, "wrong.psk")
    with open(wrong, "w") as handle:
        handle.write("stiefel:%s\n" % ("cd" * 32))
    out = nbd_probe(ns, "%s%%%s" % (server_addr, ns.veth_c), [("plaintext", None), ("wrong_psk", wrong)])
    print(out)
    assert all(result.startswith("refused") for result in out.values()) and len(out) == 2, out
    server.wait_for(r"dropped input from nbd port 10809: connection #\d+: plaintext NBD refused", 10)
    server.wait_for(r"dropped input from nbd port 10809: connection #\d+: TLS handshake failed: .*wrong or stale PSK",
                    10)

    # what the README shows a person: qemu-img info on the export, the session PSK in a keys.psk directory
    entries = cpio.read_newc(open(os.path.join(client_run, "nbd-psk.cpio"), "rb").read())
    psk = [e for e in entries if e.name == "etc/stiefel/nbd.psk"][0]
    psk_dir = os.path.join(tmp, "psk")
    os.makedirs(psk_dir, mode=0o700)
    fd = os.open(os.path.join(psk_dir, "keys.psk"), os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(psk.data)
    argv = ["qemu-img", "info", "--output=json", "--object",
            "tls-creds-psk,id=tls0,endpoint=client,dir=%s,username=stiefel" % psk_dir, "--image-opts",
            "driver=nbd,server.type=inet,server.host=%s%%%s,server.port=10809,export=stiefel,tls-creds=tls0" % (
                server_addr, ns.veth_c)]
    info = subprocess.run(ns.exec_argv(ns.client, *argv), capture_output=True, text=True, timeout=60, check=False)
    print(info.stdout + info.stderr)
    assert info.returncode == 0, info.stderr + server.text()[-2000:]
    assert json.loads(info.stdout)["virtual-size"] == 16 * 1024 * 1024
