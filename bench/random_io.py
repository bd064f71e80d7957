# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""4 KiB random I/O on the real NBD client path: IOPS at queue depth 1 and 32 (issue 18.3).

    sudo .venv/bin/python bench/random_io.py              # 3 passes of 4 s per cell
    sudo .venv/bin/python bench/random_io.py --quick      # 1 pass of 3 s

A root filesystem lives on 4 KiB random reads and writes. The client here is
fio's ``nbd`` engine (libnbd, asynchronous, ``iodepth`` requests in flight on
one connection): C, so the client's own cost is small and alike for every
path, unlike a Python loop or a kernel under QEMU TCG. Server and client
namespaces are joined by the shaped cable of ``netns.py`` (2.5 GbE). The
server namespace runs nbdkit exactly as the laptop does
(``nbd_export.server_argv``, plain and TLS-PSK AES-GCM, a 256 MiB tmpfs file
so no disk is measured); the client namespace runs the TLS proxy exactly as
``roles/laptop/files/stiefel-nbd-attach`` starts it: the script's own
``bash -c`` texts are read from the file and run (the socat TCP relay on
127.0.0.1, ``--filter=retry``, ``tls=require``, nbdkit daemonized with a pidfile),
with fio on its Unix socket where the laptop has nbd-client.

Paths, each measured for randread and randwrite at QD1 and QD32:

- ``raw TCP``: 4 KiB request/reply ping-pong through the same cable (a read is
  a 28-byte request and a 16+4096-byte reply, a write the other way round);
  the link's round trip with no NBD server, the floor,
- ``plain direct``: fio straight to the plaintext server (the baseline of the
  targets),
- ``proxy plain``: the proxy without its TLS options, to the plaintext server,
- ``proxy TLS``: the real path,
- ``plain direct 4 conns`` and ``proxy TLS 4 conns``: the same two paths with
  the queue depth spread over 4 connections (fio ``numjobs``), as the
  laptop's kernel client spreads its requests over ``nbd-client -C 4``,
- levers (on unless ``--no-levers``): ``proxy TLS no retry`` (the proxy
  without ``--filter=retry``, which makes nbdkit serialize the requests of
  each connection) and ``proxy TLS no relay`` (the proxy dials the server
  itself instead of through the socat relay); with ``--qemu-lever`` and
  qemu-nbd installed also ``qemu-nbd TLS proxy`` (qemu-nbd as the TLS-PSK
  client on the same Unix socket; measured far worse on 2026-12-01).

Every pass runs every cell once, in the same order, so load drift hits all
paths alike; the figure is the median over passes. Targets (issue 18.3):
proxy + TLS keeps >= 85 % of the plain direct IOPS at QD32 and at most 1.3x
its mean latency at QD1. Prints a table, writes
``$STIEFEL_CACHE_DIR/bench/randio.json``. Exits 0 (2 on usage errors; a missing
tool is a skip, said in the JSON); removes its namespaces and stops its processes by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "collections"))
sys.path.insert(0, str(HERE))

from ansible_collections.stiefel.system.plugins.module_utils import nbd_export as ne  # noqa: E402
from benchenv import cache_dir, loadavg, sigterm_as_interrupt  # noqa: E402
from netns import NetnsPair, htb_rate_for, payload_ceiling, wait_for  # noqa: E402

MiB = 1 << 20
BLOCK = 4096
EXPORT_BYTES = 256 * MiB
RATE = "2.5GbE"
RATE_BITS = 2.5e9
PORT_PLAIN, PORT_TLS, PORT_RAW = 10809, 10811, 5202
ATTACH_SCRIPT = REPO / "roles" / "laptop" / "files" / "stiefel-nbd-attach"
# NBD simple request header (28 bytes) and simple reply header (16 bytes)
NBD_REQUEST, NBD_REPLY = 28, 16
DEPTHS = (1, 32)
OPS = ("randread", "randwrite")
TARGET_QD32_IOPS = 0.85      # proxy + TLS keeps this fraction of plain direct IOPS
TARGET_QD1_LATENCY = 1.3     # proxy + TLS latency at most this multiple of plain direct
REAL_PATH = "proxy TLS"
BASELINE = "plain direct"
# the laptop's nbd-client -C (NBD_CONNECTIONS in stiefel-nbd-attach): the kernel spreads requests over them
LAPTOP_CONNS = 4
REAL_PATH_CONNS = "proxy TLS %d conns" % LAPTOP_CONNS
BASELINE_CONNS = "plain direct %d conns" % LAPTOP_CONNS

RAW_SERVER = r"""
import socket, sys
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(4)
print("ready", flush=True)
def serve(conn):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    req, rep = [int(x) for x in conn.recv(64).split()]
    conn.sendall(b"ok")
    buf = bytearray(req); reply = bytes(rep); view = memoryview(buf)
    while True:
        got = 0
        while got < req:
            n = conn.recv_into(view[got:])
            if not n:
                return
            got += n
        conn.sendall(reply)
while True:
    conn, _ = srv.accept()
    try:
        serve(conn)
    except (OSError, ValueError):  # the client leaves with requests in flight
        pass
    conn.close()
"""

RAW_CLIENT = r"""
import json, socket, sys, time
host, port, req, rep, depth, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \
    int(sys.argv[5]), float(sys.argv[6])
sock = socket.create_connection((host, port))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
sock.sendall(b"%d %d" % (req, rep)); assert sock.recv(2) == b"ok"
request = bytes(req); buf = bytearray(rep); view = memoryview(buf)
sent = []
def recv_one():
    got = 0
    while got < rep:
        n = sock.recv_into(view[got:])
        if not n:
            raise SystemExit("server closed")
        got += n
for _ in range(depth):
    sent.append(time.monotonic()); sock.sendall(request)
done = 0; lat = 0.0
start = time.monotonic(); end = start + seconds
while True:
    recv_one()
    now = time.monotonic()
    lat += now - sent[done]; done += 1
    if now >= end:
        break
    sent.append(time.monotonic()); sock.sendall(request)
took = time.monotonic() - start
print(json.dumps({"iops": done / took, "lat_mean_us": 1e6 * lat / done, "ops": done}))
"""


def log(msg: str) -> None:
    print("[randio %s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


# ------------------------------------------------------------------ the proxy, as the laptop starts it

def attach_proxy_script(text: str, relay: bool = True, nodelay: bool = False) -> str:
    """The ``bash -c`` programs with which stiefel-nbd-attach starts its TCP relay and TLS proxy, as one.

    Its positional parameters are $0 host, $1 port, $2 export, $3 socket, $4 PSK file, $5 pidfile
    (the relay's pid goes to "$5.relay"). Read from the script itself so the benchmark cannot drift
    from what the laptop runs. ``relay=False`` (a lever) lets the proxy dial the server itself
    (``hostname=`` the server's address) instead of going through socat on 127.0.0.1;
    ``nodelay=True`` (a lever) sets TCP_NODELAY on both of the relay's sockets (socat's ``nodelay``).
    """
    found = re.search(r"bash -c '(echo \$\$ > \"\$4\"; exec -a @socat socat [^']*)'", text)
    proxy = re.search(r"bash -c '(exec -a @nbdkit nbdkit [^']*)'", text)
    if not found or not proxy:
        raise ValueError("no TCP relay (bash -c '... exec -a @socat socat ...') and daemonized nbdkit proxy "
                         "command (bash -c '... exec -a @nbdkit nbdkit ...') found")
    # the relay's $0 port $1 host $2 port $3 user timeout (ms) $4 pidfile; the proxy's $0 relay port
    # $1 export $2 socket $3 PSK file $4 pidfile $5 retries $6 retry delay $7 debug options.
    # The laptop's server is a scoped IPv6 address, the bench's cable IPv4.
    relay_program = found.group(1).replace('"TCP6:[$1]:$2,', '"TCP:$1:$2,')
    if relay_program == found.group(1):
        raise ValueError("the TCP relay does not dial TCP6:[$1]:$2")
    if nodelay and "nodelay" not in relay_program:
        relay_program = relay_program.replace("reuseaddr,fork", "reuseaddr,fork,nodelay", 1).replace(
            '"TCP:$1:$2,', '"TCP:$1:$2,nodelay,', 1)
    if not relay:
        direct = proxy.group(1).replace("hostname=127.0.0.1 ", 'hostname="$8" ')
        if direct == proxy.group(1):
            raise ValueError("the proxy does not dial hostname=127.0.0.1")
        return 'exec bash -c %s "$1" "$2" "$3" "$4" "$5" 5 2 "" "$0"' % shlex.quote(direct)
    return ('rp=$((20000 + $$ %% 20000)); bash -c %s "$rp" "$0" "$1" 10000 "$5.relay" & sleep 1; '
            'exec bash -c %s "$rp" "$2" "$3" "$4" "$5" 5 2 ""' % (shlex.quote(relay_program),
                                                                  shlex.quote(proxy.group(1))))


TLS_OPTIONS = ' tls=require tls-username=stiefel tls-psk="$3"'
RETRY_FILTER = "--filter=retry "
RETRY_OPTIONS = ' retries="$5" retry-delay="$6" retry-exponential=no'


def proxy_variant(script: str, tls: bool = True, threads: int | None = None, retry: bool = True) -> str:
    """The laptop's proxy program, optionally without its TLS options, without the retry filter
    (which makes nbdkit serialize each connection's requests) or with another nbdkit --threads."""
    if not tls:
        if TLS_OPTIONS not in script:
            raise ValueError("the proxy command has no %r to remove" % TLS_OPTIONS.strip())
        script = script.replace(TLS_OPTIONS, "")
    if not retry:
        if RETRY_FILTER not in script or RETRY_OPTIONS not in script:
            raise ValueError("the proxy command has no retry filter to remove")
        script = script.replace(RETRY_FILTER, "").replace(RETRY_OPTIONS, "")
    if threads:
        script = script.replace("exec -a @nbdkit nbdkit ", "exec -a @nbdkit nbdkit --threads %d " % threads, 1)
    return script


# ------------------------------------------------------------------ fio

def fio_argv(uri: str, op: str, depth: int, seconds: float, size: int, conns: int = 1) -> list:
    """fio's nbd engine on ``uri``; ``conns`` > 1 spreads the queue depth over that many connections
    (one fio job each, reported as one), as the laptop's kernel client spreads its requests over the
    ``nbd-client -C`` connections."""
    jobs = max(1, min(conns, depth))
    argv = ["fio", "--name=%s-qd%d" % (op, depth), "--ioengine=nbd", "--uri=%s" % uri, "--rw=%s" % op,
            "--bs=%d" % BLOCK, "--iodepth=%d" % (depth // jobs), "--size=%d" % size, "--time_based",
            "--runtime=%gs" % seconds, "--ramp_time=1s", "--norandommap", "--randrepeat=0",
            "--output-format=json"]
    if jobs > 1:
        argv += ["--numjobs=%d" % jobs, "--group_reporting"]
    return argv


def parse_fio(text: str) -> dict:
    """IOPS and latency (mean, p50, p99 in microseconds) of the one job of a fio JSON report."""
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON in fio output")
    report = json.loads(text[start:])
    jobs = report.get("jobs")
    if not isinstance(jobs, list) or len(jobs) != 1:
        raise ValueError("fio report does not have exactly one job")
    job = jobs[0]
    if job.get("error"):
        raise ValueError("fio job error %s" % job["error"])
    side = max((job.get("read") or {}, job.get("write") or {}), key=lambda s: s.get("total_ios", 0))
    if not side.get("total_ios"):
        raise ValueError("fio did no I/O")
    lat = side.get("lat_ns") or side.get("clat_ns") or {}
    pcts = (side.get("clat_ns") or {}).get("percentile") or {}
    got = {"iops": float(side["iops"]), "lat_mean_us": float(lat.get("mean", 0)) / 1000,
           "lat_p50_us": float(pcts.get("50.000000", 0)) / 1000, "lat_p99_us": float(pcts.get("99.000000", 0)) / 1000,
           "ios": int(side["total_ios"])}
    if "usr_cpu" in job and "sys_cpu" in job and job.get("job_runtime") and got["iops"] > 0:
        # fio's own CPU, as a share of its runtime (ms), per I/O
        got["fio_cpu_us_per_io"] = (float(job["usr_cpu"]) + float(job["sys_cpu"])) / 100 * 1e6 / got["iops"]
    return got


def thread_times(pid: int, children: bool = False) -> dict:
    """tid -> (on-CPU ns, run-queue wait ns) of every thread of ``pid`` (/proc/PID/task/*/schedstat).

    The wait is time a thread was runnable but had no CPU: on a busy shared machine it is the part
    of a request's latency that is the machine's load, not the path's cost. ``children`` adds the
    threads of ``pid``'s child processes (socat's relay forks one per connection).
    """
    times = {}
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return times
    for tid in tasks:
        try:
            fields = Path("/proc/%d/task/%s/schedstat" % (pid, tid)).read_text().split()
            times[tid] = (int(fields[0]), int(fields[1]))
        except (OSError, ValueError, IndexError):
            continue
        if children:
            try:
                kids = Path("/proc/%d/task/%s/children" % (pid, tid)).read_text().split()
            except OSError:
                kids = []
            for kid in kids:
                if kid.isdigit():
                    times.update(thread_times(int(kid)))
    return times


class ThreadSampler(threading.Thread):
    """CPU and run-queue wait of some processes' threads over one cell.

    nbdkit serves each connection on threads that exit with it, taking their schedstat along, so
    the threads are sampled every 0.1 s while fio runs; a thread that appears counts from zero.
    """

    def __init__(self, pids: dict):
        super().__init__(daemon=True)
        self.pids = pids
        self.first = {role: thread_times(pid, role == "relay") for role, pid in pids.items()}
        self.last = {role: dict(t) for role, t in self.first.items()}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            self.sample()

    def sample(self) -> None:
        for role, pid in self.pids.items():
            self.last[role].update(thread_times(pid, role == "relay"))

    def stop(self) -> dict:
        """role -> (CPU ns, wait ns) since the start."""
        self.done.set()
        self.join()
        self.sample()
        totals = {}
        for role, last in self.last.items():
            first = self.first[role]
            totals[role] = tuple(sum(v[i] - first.get(tid, (0, 0))[i] for tid, v in last.items()) for i in (0, 1))
        return totals


# ------------------------------------------------------------------ judging

def judge(cells: dict) -> list:
    """Target rows: (name, value, target, ok) from median cells keyed (path, op, depth).

    QD32 is judged on one connection (the issue's figure) and, where measured, spread over the
    laptop's connections on both sides (the real path as the kernel client drives it)."""
    rows = []
    for op in OPS:
        for real_path, base_path in ((REAL_PATH, BASELINE), (REAL_PATH_CONNS, BASELINE_CONNS)):
            real, base = cells.get((real_path, op, 32)), cells.get((base_path, op, 32))
            if real and base and base["iops"] > 0:
                ratio = real["iops"] / base["iops"]
                rows.append({"name": "%s QD32 IOPS %s / %s" % (op, real_path, base_path), "op": op, "depth": 32,
                             "kind": "iops", "ratio": ratio, "target": ">= %.2f" % TARGET_QD32_IOPS,
                             "met": ratio >= TARGET_QD32_IOPS})
        real, base = cells.get((REAL_PATH, op, 1)), cells.get((BASELINE, op, 1))
        if real and base and base["lat_mean_us"] > 0:
            ratio = real["lat_mean_us"] / base["lat_mean_us"]
            rows.append({"name": "%s QD1 latency %s / %s" % (op, REAL_PATH, BASELINE), "op": op, "depth": 1,
                         "kind": "latency", "ratio": ratio, "target": "<= %.2f" % TARGET_QD1_LATENCY,
                         "met": ratio <= TARGET_QD1_LATENCY})
    return rows


def median_cells(samples: list) -> dict:
    grouped = {}
    for sample in samples:
        if "error" not in sample:
            grouped.setdefault((sample["path"], sample["op"], sample["depth"]), []).append(sample)
    cells = {}
    for key, runs in grouped.items():
        iops = sorted(r["iops"] for r in runs)
        cells[key] = {"iops": statistics.median(iops), "best_iops": iops[-1], "worst_iops": iops[0],
                      "lat_mean_us": statistics.median(r["lat_mean_us"] for r in runs), "runs": len(runs)}
        for extra in ("lat_p99_us", "fio_cpu_us_per_io", "server_cpu_us_per_io", "server_wait_us_per_io",
                      "proxy_cpu_us_per_io", "proxy_wait_us_per_io", "relay_cpu_us_per_io", "relay_wait_us_per_io",
                      "load1"):
            if all(extra in r for r in runs):
                cells[key][extra] = statistics.median(r[extra] for r in runs)
    return cells


# ------------------------------------------------------------------ setup

class Rig:
    """The namespaces, both servers, the raw TCP echo and the proxies; all stopped by PID."""

    def __init__(self, work: Path, pair: NetnsPair):
        self.work, self.pair = work, pair
        self.proxy_pids: list = []
        self.uris: dict = {}
        self.conns: dict = {}  # path -> connections fio opens (1 unless named "... N conns")
        self.pids: dict = {}  # path -> {"server": pid, "proxy": pid}: whose CPU time a cell costs
        self.psk = work / "nbd.psk"
        self.proxy_roles: dict = {}  # the last proxy started: role -> pid

    def start(self, levers: bool, qemu_lever: bool = False, only: list | None = None) -> None:
        pair, work = self.pair, self.work
        export = work / "export.img"
        block = secrets.token_bytes(16 * MiB)  # incompressible, non-zero: reads move real data
        with open(export, "wb") as handle:
            for _block in range(EXPORT_BYTES // len(block)):
                handle.write(block)
        self.psk.write_text("stiefel:%s\n" % secrets.token_hex(32))
        self.psk.chmod(0o600)
        prio = ne.write_gnutls_priority_file(str(work / "gnutls-aes-gcm.conf"))
        addr = pair.addr["server"]
        plain = ne.ExportSettings(path=str(export), address=addr, port=PORT_PLAIN)
        tls = ne.ExportSettings(path=str(export), address=addr, port=PORT_TLS, tls_psk_file=str(self.psk))
        servers = {}
        for name, settings in (("plain", plain), ("tls", tls)):
            with open(work / ("server-%s.log" % name), "wb") as logfile:
                servers[name] = pair.popen("server", ne.server_argv(settings), env=ne.server_env(settings, prio),
                                           stdout=logfile, stderr=logfile).pid
        self.uris["plain direct"] = ne.export_uri(plain)
        self.pids["plain direct"] = {"server": servers["plain"]}
        raw = pair.popen("server", [sys.executable, "-c", RAW_SERVER, addr, str(PORT_RAW)],
                         stdout=subprocess.PIPE, text=True)
        if raw.stdout.readline().strip() != "ready":
            raise RuntimeError("raw TCP echo server did not start")
        self.probe(self.uris["plain direct"])
        self.probe(ne.export_uri(tls, for_client=True))
        text = ATTACH_SCRIPT.read_text()
        script = attach_proxy_script(text)
        proxies = [("proxy plain", proxy_variant(script, tls=False), PORT_PLAIN),
                   (REAL_PATH, script, PORT_TLS)]
        if levers:
            # what the measurement points at: the retry filter (it makes nbdkit serialize the
            # requests of each connection) and the socat hop
            nodelay = attach_proxy_script(text, nodelay=True)
            proxies += [("proxy TLS no retry", proxy_variant(script, retry=False), PORT_TLS),
                        ("proxy TLS no relay", attach_proxy_script(text, relay=False), PORT_TLS)]
            if nodelay != script:  # the laptop's relay does not set TCP_NODELAY yet
                proxies += [("proxy TLS nodelay", nodelay, PORT_TLS),
                            ("proxy TLS nodelay no retry", proxy_variant(nodelay, retry=False), PORT_TLS)]
        for name, program, port in proxies:
            self.uris[name] = self.start_proxy(name, program, port)
            self.pids[name] = dict(self.proxy_roles, server=servers["plain" if port == PORT_PLAIN else "tls"])
        if levers and qemu_lever and shutil.which("qemu-nbd"):
            self.uris["qemu-nbd TLS proxy"] = self.start_qemu_proxy(PORT_TLS)
            self.pids["qemu-nbd TLS proxy"] = {"server": servers["tls"], "proxy": self.proxy_pids[-1][0]}
        # the same two paths as the laptop drives them: the queue spread over its connections
        for name, base in ((BASELINE_CONNS, BASELINE), (REAL_PATH_CONNS, REAL_PATH)):
            self.uris[name], self.pids[name], self.conns[name] = self.uris[base], self.pids[base], LAPTOP_CONNS
        if only:
            for name in [n for n in self.uris if n not in only and n != BASELINE]:
                del self.uris[name]

    def probe(self, uri: str) -> None:
        def attempt():
            return self.pair.run("client", ["nbdinfo", "--size", uri], check=False).returncode == 0
        if not wait_for(attempt, timeout=15, interval=0.2):
            raise RuntimeError("export %s did not come up" % uri)

    def start_proxy(self, name: str, program: str, port: int) -> str:
        tag = re.sub(r"[^a-z0-9]+", "-", name.lower())
        sock, pidfile = self.work / ("%s.sock" % tag), self.work / ("%s.pid" % tag)
        with open(self.work / ("%s.log" % tag), "ab") as logfile:
            # $0..$5 as in stiefel-nbd-attach: host, port, export, socket, psk file, pidfile
            proc = self.pair.run("client", ["bash", "-c", program, self.pair.addr["server"], str(port),
                                            ne.DEFAULT_EXPORT_NAME, str(sock), str(self.psk), str(pidfile)],
                                 stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile, capture_output=False,
                                 check=False, timeout=30)
        pid = wait_for(lambda: ne.read_pidfile(str(pidfile)), timeout=10)
        self.proxy_roles = {}
        if pid:
            self.proxy_pids.append((pid, "@nbdkit"))
            self.proxy_roles["proxy"] = pid
        relay = ne.read_pidfile(str(pidfile) + ".relay")
        if relay:
            self.proxy_pids.append((relay, "@socat"))
            self.proxy_roles["relay"] = relay
        if proc.returncode != 0 or not pid or not wait_for(sock.exists, timeout=20):
            raise RuntimeError("proxy %s did not start: %s" % (
                name, (self.work / ("%s.log" % tag)).read_text(errors="replace")[-500:]))
        uri = "nbd+unix:///%s?socket=%s" % (ne.DEFAULT_EXPORT_NAME, sock)
        self.probe(uri)
        return uri

    def start_qemu_proxy(self, port: int) -> str:
        """Lever: qemu-nbd as the TLS-PSK client proxy (one event loop, coroutines) instead of nbdkit's nbd plugin."""
        pskdir = self.work / "qemu-psk"
        pskdir.mkdir(mode=0o700, exist_ok=True)
        shutil.copyfile(self.psk, pskdir / "keys.psk")  # qemu's tls-creds-psk reads DIR/keys.psk, user:hex lines
        (pskdir / "keys.psk").chmod(0o600)
        sock, pidfile = self.work / "qemu-nbd.sock", self.work / "qemu-nbd.pid"
        creds = "tls-creds-psk,id=tls0,endpoint=client,dir=%s,username=%s" % (pskdir, ne.psk_username(str(self.psk)))
        argv = ["qemu-nbd", "--object", creds,
                "--image-opts", "driver=nbd,server.type=inet,server.host=%s,server.port=%d,export=%s,tls-creds=tls0"
                % (self.pair.addr["server"], port, ne.DEFAULT_EXPORT_NAME),
                "-k", str(sock), "-t", "--fork", "--pid-file", str(pidfile)]
        proc = self.pair.run("client", argv, check=False, timeout=30)
        pid = ne.read_pidfile(str(pidfile))
        if pid:
            self.proxy_pids.append((pid, "qemu-nbd"))
        if proc.returncode != 0 or not pid:
            raise RuntimeError("qemu-nbd proxy did not start: %s" % proc.stderr.decode(errors="replace")[-300:])
        uri = "nbd+unix:///?socket=%s" % sock
        self.probe(uri)
        return uri

    def stop(self) -> None:
        for pid, name in self.proxy_pids:
            argv = ne.process_argv(pid) or [""]
            if os.path.basename(argv[0]) == name:  # still our proxy, not a recycled PID
                ne.stop_pid(pid)
        self.proxy_pids.clear()
        self.pair.destroy()


def measure(rig: Rig, path: str, op: str, depth: int, seconds: float) -> dict:
    if path == "raw TCP":
        req, rep = (NBD_REQUEST, NBD_REPLY + BLOCK) if op == "randread" else (NBD_REQUEST + BLOCK, NBD_REPLY)
        proc = rig.pair.run("client", [sys.executable, "-c", RAW_CLIENT, rig.pair.addr["server"], str(PORT_RAW),
                                       str(req), str(rep), str(depth), str(seconds + 1)],
                            check=False, text=True, timeout=seconds + 60)
        if proc.returncode != 0:
            raise RuntimeError("raw TCP client: %s" % proc.stderr.strip()[-300:])
        return json.loads(proc.stdout)
    sampler = ThreadSampler(rig.pids.get(path, {}))
    sampler.start()
    try:
        proc = rig.pair.run("client", fio_argv(rig.uris[path], op, depth, seconds, EXPORT_BYTES,
                                               rig.conns.get(path, 1)), check=False,
                            text=True, timeout=seconds + 60)
    finally:
        used = sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError("fio: %s" % (proc.stderr.strip() or proc.stdout.strip())[-300:])
    result = parse_fio(proc.stdout)
    ios = result["iops"] * (seconds + 1)  # the 1 s ramp is done but not counted by fio
    for role, (cpu, wait) in used.items():
        result["%s_cpu_us_per_io" % role] = cpu / 1e3 / ios
        result["%s_wait_us_per_io" % role] = wait / 1e3 / ios
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--quick", action="store_true", help="one pass of 3 s per cell")
    parser.add_argument("--repeat", type=int, default=3, help="passes (default 3; --quick: 1)")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per cell after 1 s ramp (default 4)")
    parser.add_argument("--no-levers", dest="levers", action="store_false", help="no lever paths")
    parser.add_argument("--qemu-lever", action="store_true", help="also qemu-nbd as the TLS proxy")
    parser.add_argument("--paths", default=None,
                        help="comma list: measure only these paths (raw TCP and plain direct always)")
    parser.add_argument("--output", default=None, help="JSON (default $STIEFEL_CACHE_DIR/bench/randio.json)")
    args = parser.parse_args(argv)
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()] if args.paths else None
    repeat, seconds = (1, 3.0) if args.quick else (args.repeat, args.seconds)
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    out_path = Path(args.output) if args.output else cache_dir() / "bench" / "randio.json"
    missing = [tool for tool in ("fio", "nbdkit", "nbdinfo", "nsenter", "tc", "bash") if not shutil.which(tool)]
    if missing:  # a skip, not a failure: run.py says so in its table
        skipped = "missing %s%s" % (", ".join(missing), " (apt-get install fio)" if "fio" in missing else "")
        print("skipped: %s" % skipped, file=sys.stderr)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps({"skipped": skipped}) + "\n")
        return 0
    main_pid = sigterm_as_interrupt()

    work = Path(tempfile.mkdtemp(prefix="stf-randio-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    pair = NetnsPair()
    rig = Rig(work, pair)
    results = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname(), "rate": RATE,
               "block": BLOCK, "export_bytes": EXPORT_BYTES, "seconds_per_cell": seconds, "repeat": repeat,
               "client": "fio %s, ioengine=nbd (libnbd)" % fio_version(), "load_start": loadavg(), "samples": []}
    t_all = time.monotonic()
    try:
        log("namespaces %s <-> %s shaped to %s; servers, raw echo, proxies"
            % (pair.ns["server"], pair.ns["client"], RATE))
        pair.create()
        ceiling = payload_ceiling(RATE_BITS)
        results["htb_rate_bit"] = htb_rate_for(ceiling)
        results["htb_burst_bytes"] = pair.shape(results["htb_rate_bit"])
        rig.start(args.levers, args.qemu_lever, args.paths)
        paths = ["raw TCP"] + list(rig.uris)
        results["paths"] = paths
        plan = [(p, op, d) for op in OPS for d in DEPTHS for p in paths]
        total, done = len(plan) * repeat, 0
        log("%d cells x %d pass%s x %.0f s (+1 s ramp), load %s" % (
            len(plan), repeat, "es" if repeat > 1 else "", seconds, "/".join("%.1f" % x for x in loadavg())))
        for rep in range(1, repeat + 1):
            for path, op, depth in plan:
                sample = {"path": path, "op": op, "depth": depth, "pass": rep, "load1": loadavg()[0]}
                try:
                    sample.update(measure(rig, path, op, depth, seconds))
                except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
                    sample["error"] = str(exc)
                done += 1
                results["samples"].append(sample)
                log("  [%2d/%d] %-26s %-9s QD%-2d %s, load %.1f" % (done, total, path, op, depth, (
                    "error: %s" % sample["error"][-120:]) if "error" in sample else "%8.0f IOPS  %7.1f us mean" % (
                        sample["iops"], sample["lat_mean_us"]), sample["load1"]))
    except KeyboardInterrupt:
        if os.getpid() != main_pid:
            os._exit(1)
        log("interrupted: cleaning up")
        return 130
    except (RuntimeError, ValueError, OSError) as exc:
        results["error"] = "%s: %s" % (type(exc).__name__, exc)
        log("setup failed: %s" % results["error"])
    finally:
        if os.getpid() != main_pid:
            os._exit(1)  # never clean up from a forked helper
        rig.stop()
        shutil.rmtree(work, ignore_errors=True)
    cells = median_cells(results["samples"])
    results["cells"] = [dict(path=k[0], op=k[1], depth=k[2], **v) for k, v in cells.items()]
    results["targets"] = judge(cells)
    results["load_end"] = loadavg()
    results["seconds_total"] = round(time.monotonic() - t_all, 1)
    print_table(results)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=1) + "\n")
    log("saved %s (%.0f s total)" % (out_path, results["seconds_total"]))
    return 0


def fio_version() -> str:
    try:
        return subprocess.run(["fio", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "?"


def print_table(results: dict) -> None:
    cells = {(c["path"], c["op"], c["depth"]): c for c in results["cells"]}
    print()
    print("4 KiB random I/O over the shaped %s cable, %s, median of %d pass(es) of %g s, load %s -> %s" % (
        results["rate"], results["client"], results["repeat"], results["seconds_per_cell"],
        "/".join("%.1f" % x for x in results["load_start"]), "/".join("%.1f" % x for x in results["load_end"])))
    head = "%-21s" % "path" + "".join("%22s" % ("%s QD%d" % (op[4:], d)) for op in OPS for d in DEPTHS)
    print(head)
    print("-" * len(head))
    for path in results.get("paths", []):
        line = "%-21s" % path
        for op in OPS:
            for depth in DEPTHS:
                cell = cells.get((path, op, depth))
                line += "%22s" % ("%.0f IOPS %.0f us" % (cell["iops"], cell["lat_mean_us"]) if cell else "-")
        print(line)
    print("CPU per I/O (us, medians; fio = the client, proxy = the laptop's TLS proxy (nbdkit), relay = its socat, "
          "server = nbdkit) and "
          "run-queue wait per I/O (us a runnable thread had no CPU: the machine's load, not the path)")
    for path in results.get("paths", []):
        for op in OPS:
            parts = []
            for depth in DEPTHS:
                cell = cells.get((path, op, depth)) or {}
                costs = " ".join("%s %.1f" % (role, cell["%s_cpu_us_per_io" % role])
                                 for role in ("fio", "proxy", "relay", "server") if "%s_cpu_us_per_io" % role in cell)
                waits = " ".join("%s %.1f" % (role, cell["%s_wait_us_per_io" % role])
                                 for role in ("proxy", "relay", "server") if "%s_wait_us_per_io" % role in cell)
                if costs:
                    parts.append("QD%d cpu %s%s, load %.1f" % (
                        depth, costs, ", wait " + waits if waits else "", cell.get("load1", float("nan"))))
            if parts:
                print("  %-21s %-9s %s" % (path, op, "; ".join(parts)))
    for row in results["targets"]:
        print("%-55s %6.2f  target %s  %s" % (row["name"], row["ratio"], row["target"], "met" if row["met"] else "MISSED"))
    for path in results.get("paths", []):
        if path in ("raw TCP", BASELINE):
            continue
        for op in OPS:
            base, cell = cells.get((BASELINE, op, 32)), cells.get((path, op, 32))
            if base and cell:
                print("  %-21s %-9s QD32 IOPS %.2f of plain direct; QD1 latency %.2fx" % (
                    path, op, cell["iops"] / base["iops"],
                    cells[(path, op, 1)]["lat_mean_us"] / cells[(BASELINE, op, 1)]["lat_mean_us"]
                    if (path, op, 1) in cells and (BASELINE, op, 1) in cells else float("nan")))
    if "error" in results:
        print("setup error: %s" % results["error"])


if __name__ == "__main__":
    sys.exit(main())
