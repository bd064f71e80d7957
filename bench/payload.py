#!/usr/bin/env python3
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Boot payload delivery: throughput against a 2.5 GbE line and receiver memory (issue 7.2).

The real path end to end: in a server namespace the server agent's HTTP
handler (``server.make_handler`` on ``server.DualStackServer``) serves the
payload of a session it issued; in a client namespace the client agent's
``client.fetch_payload`` GETs it from the server's IPv6 link-local address,
decrypts, writes and SHA-256-verifies kernel and initrd into a tmpfs
directory. The two namespaces are the shaped cable of the NBD benchmark
(``netns.NetnsPair``: veth, htb on both ends, TCP payload ceiling of 2.5 GbE
at MTU 1500, 294.2 MB/s). The client's clock runs from the TCP connect to
the verified, closed files: what a booting desktop waits for. Process
start, imports and the server's manifest hashing are outside it.

Per payload size (50 and 200 MB: the receiver's peak RSS must not grow with
the payload) and repetition, interleaved so load changes hit both alike:

- ``plain TCP copy``: the same number of bytes over one plain TCP stream
  through the same shaper (what the cable gives one stream in this run),
- ``iter/receive_payload``: the stiefel payload as above.

Once per size, without network: ``send only`` (``iter_payload`` into a tmpfs
file) and ``receive only`` (``receive_payload`` from it), the CPU ceilings of
each side on this machine (on a 2-core host sender, receiver and the
shaped veth share the CPUs; real peers do not). Prints a table; never fails
(a measurement, not a test).

    sudo .venv/bin/python bench/payload.py [--sizes 50,200] [--repeat 3] [--rate-mbit 2500] [--output PATH]

Also writes every run as JSON to ``$STIEFEL_CACHE_DIR/bench/payload.json`` (or --output).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "collections"))
sys.path.insert(0, HERE)

from ansible_collections.stiefel.system.plugins.module_utils import keyfile
from stiefel_runtime import client, discovery, messages, payload, server
from benchenv import loadavg, sigterm_as_interrupt  # noqa: E402
from netns import HTB_BURST, NetnsPair, htb_rate_for, payload_ceiling  # noqa: E402

HTTP_PORT = 61599
PLAIN_PORT = 61598
BLOCK = 1 << 20
STUCK_FACTOR = 10  # a run taking 10x its time at the ceiling counts as stuck


def _status_kb(field):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_rss_kb():
    """Peak RSS of this process image (VmHWM; ru_maxrss would carry the forking parent's peak over exec)."""
    return _status_kb("VmHWM")


def rss_kb():
    return _status_kb("VmRSS")


# ------------------------------------------------------------------ roles (run inside the namespaces)

class _Source(object):
    """What ``server.BootSource.prepare`` leaves behind: the manifest and the two paths."""

    def __init__(self, kernel, initrd):
        self.paths = {"kernel": kernel, "initrd": initrd}
        self.manifest = payload.build_manifest(kernel, initrd, "root=UUID=bench ro")


class _QuietConsole(object):
    """The server agent's Console interface, printing nothing (its lines would only add noise here)."""

    def __call__(self, text):
        pass

    info = marker = debug = __call__

    def drop(self, source, reason):
        print("server dropped input from %s: %s" % (source, reason), file=sys.stderr, flush=True)


def role_server(args):
    """The server agent's HTTP payload service; issues one session per client nonce read from stdin."""
    key = bytes.fromhex(args.key)
    run_dir = tempfile.mkdtemp(prefix="stf-bench-srv-", dir="/dev/shm")
    state = server.ServerState(key, run_dir, HTTP_PORT, 0, "bench")
    state.source = _Source(args.kernel, args.initrd)
    httpd = server.DualStackServer(("::", HTTP_PORT), server.make_handler(state, _QuietConsole()))
    threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    plain = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    plain.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    plain.bind(("::", PLAIN_PORT))
    plain.listen(4)
    threading.Thread(target=_plain_sender, args=(plain, state.source.paths), name="plain", daemon=True).start()
    print("ready", flush=True)
    try:
        for line in sys.stdin:
            client_nonce = bytes.fromhex(line.strip())
            with state.lock:
                server_nonce = state.sessions.issue(client_nonce)
            print(server_nonce.hex(), flush=True)
    finally:
        httpd.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)


def _plain_sender(listener, paths):
    """The baseline: the same files as one plain TCP stream, per connection."""
    while True:
        conn = listener.accept()[0]
        with conn:
            for name in payload.FILE_NAMES:
                with open(paths[name], "rb") as handle:
                    while True:
                        block = handle.read(BLOCK)
                        if not block:
                            break
                        conn.sendall(block)


def role_client(args):
    """Time ``client.fetch_payload`` (or a plain TCP copy) from the server's link-local address."""
    key = bytes.fromhex(args.key)
    before = rss_kb()
    started = time.monotonic()
    if args.plain:
        sock = socket.create_connection((args.server + "%" + args.ifname, PLAIN_PORT))
        buf = bytearray(BLOCK)
        size = 0
        while True:
            got = sock.recv_into(buf)
            if not got:
                break
            size += got
        sock.close()
    else:
        cn, sn = bytes.fromhex(args.client_nonce), bytes.fromhex(args.server_nonce)
        offer_bytes = messages.build_offer(key, cn, sn, messages.ROLE_SERVER, http_port=HTTP_PORT, nbd_port=10809,
                                           export_name="bench")
        offer = discovery.Offer(messages.parse(key, offer_bytes, expect=(messages.OFFER,)), args.server, 0, 0,
                                session_nonce=sn)
        manifest = client.fetch_payload(key, offer, args.ifname, args.dest)
        size = manifest.total_size
    elapsed = time.monotonic() - started
    print(json.dumps({"bytes": size, "seconds": elapsed, "rss_before_kb": before, "rss_peak_kb": peak_rss_kb()}),
          flush=True)


def role_local(args):
    """No network: ``iter_payload`` into a tmpfs file, then ``receive_payload`` from it (each side's CPU ceiling)."""
    key = bytes.fromhex(args.key)
    cn, sn = messages.new_nonce(), messages.new_nonce()
    stream_path = os.path.join(args.dest, "stream")
    started = time.monotonic()
    manifest = payload.build_manifest(args.kernel, args.initrd, "root=UUID=bench ro")
    hashed = time.monotonic()
    with open(stream_path, "wb") as out:
        for record in payload.iter_payload(key, cn, sn, manifest, {"kernel": args.kernel, "initrd": args.initrd}):
            out.write(record)
    sent = time.monotonic()
    out_dir = os.path.join(args.dest, "files")
    os.makedirs(out_dir, exist_ok=True)
    before = rss_kb()
    with open(stream_path, "rb") as stream:
        received_at = time.monotonic()
        payload.receive_payload(stream.read, key, cn, out_dir)
        done = time.monotonic()
    peak = peak_rss_kb()
    parts = receive_parts(stream_path, key, cn, out_dir)
    os.unlink(stream_path)
    shutil.rmtree(out_dir, ignore_errors=True)
    size = manifest.total_size
    print(json.dumps({"send": {"bytes": size, "seconds": sent - hashed},
                      "manifest_seconds": hashed - started,
                      "receive": {"bytes": size, "seconds": done - received_at, "rss_before_kb": before,
                                  "rss_peak_kb": peak},
                      "receive_parts": parts}), flush=True)


def receive_parts(stream_path, key, client_nonce, out_dir):
    """Seconds of each piece of the receiver's work on the same stream, one after the other (issue 18.4).

    ``receive_payload`` does them all in one thread, record by record: reading and opening the
    records (AES-GCM), SHA-256 of the plaintext, writing it out. Timed apart they say what bounds
    the receiver once the line is faster than its CPU. The rest of receive-only's time is the
    receiver's own buffer handling in Python.
    """
    plain = []
    with open(stream_path, "rb") as stream:
        started = time.monotonic()
        for record in payload.StreamDecryptor(key, client_nonce).records(stream.read):
            plain.append(record)
        opened = time.monotonic()
    digest = hashlib.sha256()
    for record in plain:
        digest.update(record)
    hashed = time.monotonic()
    with open(os.path.join(out_dir, "parts"), "wb") as out:
        for record in plain:
            out.write(record)
    written = time.monotonic()
    os.unlink(os.path.join(out_dir, "parts"))
    return {"read + AES-GCM open": opened - started, "SHA-256": hashed - opened, "write (tmpfs)": written - hashed,
            "plaintext_bytes": sum(len(r) for r in plain)}


# ------------------------------------------------------------------ orchestration (root, on the host)

def _random_file(path, size):
    with open(path, "wb") as handle:
        left = size
        while left:
            block = os.urandom(min(left, BLOCK))
            handle.write(block)
            left -= len(block)


def _me(role):
    return [sys.executable, os.path.abspath(__file__), "--role", role]


def _last_json(text):
    return json.loads(text.strip().splitlines()[-1])


class Bench(object):
    def __init__(self, pair, key, kernel, initrd, work, ideal_seconds):
        self.pair, self.key, self.work = pair, key, work
        self.kernel, self.initrd = kernel, initrd
        self.timeout = max(60.0, STUCK_FACTOR * ideal_seconds)
        self.server = pair.popen("server", _me("server") + ["--key", key.hex(), "--kernel", kernel,
                                                            "--initrd", initrd],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.server.stdout.readline().strip() != "ready":
            raise RuntimeError("payload server did not start")
        self.address, self.ifname = pair.link_local("server"), pair.ifname["client"]

    def close(self):
        if self.server.poll() is None:
            self.server.stdin.close()
            self.server.wait(10)

    def fetch(self, plain):
        dest = tempfile.mkdtemp(prefix="recv-", dir=self.work)
        argv = _me("client") + ["--key", self.key.hex(), "--server", self.address, "--ifname", self.ifname,
                                "--dest", dest]
        if plain:
            argv.append("--plain")
        else:
            cn = messages.new_nonce()
            self.server.stdin.write(cn.hex() + "\n")
            self.server.stdin.flush()
            sn = self.server.stdout.readline().strip()
            argv += ["--client-nonce", cn.hex(), "--server-nonce", sn]
        try:
            proc = self.pair.run("client", argv, check=False, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            return {"error": "no result within %.0f s" % self.timeout}
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        if proc.returncode != 0:
            return {"error": proc.stderr.strip()[-300:]}
        return _last_json(proc.stdout)

    def local(self):
        dest = tempfile.mkdtemp(prefix="local-", dir=self.work)
        try:
            proc = subprocess.run(_me("local") + ["--key", self.key.hex(), "--kernel", self.kernel,
                                                  "--initrd", self.initrd, "--dest", dest],
                                  check=False, capture_output=True, text=True, timeout=600)
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        if proc.returncode != 0:
            return {"error": proc.stderr.strip()[-300:]}
        return _last_json(proc.stdout)


def summarise(size_mb, path, runs, ceiling_bps):
    """One row: the median run is the figure, best and every run are kept."""
    good = [r for r in runs if "error" not in r]
    row = {"size_mb": size_mb, "path": path, "runs": runs}
    if not good:
        row["error"] = runs[-1]["error"] if runs else "no run"
        return row
    rates = sorted(r["bytes"] / r["seconds"] for r in good)
    median = statistics.median(rates)
    row.update(bytes=good[0]["bytes"], seconds=good[0]["bytes"] / median, MBps=median / 1e6,
               ratio=median / ceiling_bps, best_ratio=rates[-1] / ceiling_bps, worst_ratio=rates[0] / ceiling_bps,
               errors=len(runs) - len(good))
    if "rss_peak_kb" in good[0]:
        row["rss_before_kb"] = max(r["rss_before_kb"] for r in good)
        row["rss_peak_kb"] = max(r["rss_peak_kb"] for r in good)
    return row


def congestion_control():
    try:
        with open("/proc/sys/net/ipv4/tcp_congestion_control") as handle:
            return handle.read().strip()
    except OSError:
        return "?"


def orchestrate(args):
    ceiling = payload_ceiling(args.rate_mbit * 1e6)
    htb = htb_rate_for(ceiling)
    key = keyfile.generate_key()
    results = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "rate_mbit": args.rate_mbit,
               "ceiling_MBps": ceiling / 1e6, "htb_rate_bit": htb, "htb_burst_bytes": None,
               "tcp_congestion_control": congestion_control(), "repeat": args.repeat,
               "load_start": loadavg(), "path": "server.make_handler -> client.fetch_payload, IPv6 link-local",
               "rows": []}
    work = tempfile.mkdtemp(prefix="stf-bench-payload-", dir="/dev/shm")
    pair = NetnsPair()
    main_pid = sigterm_as_interrupt()
    try:
        pair.create()
        results["htb_burst_bytes"] = pair.shape(htb, burst=args.htb_burst)
        for size_mb in [int(s) for s in args.sizes.split(",")]:
            kernel, initrd = os.path.join(work, "kernel"), os.path.join(work, "initrd")
            _random_file(kernel, size_mb * 1000 * 1000 * 3 // 4)
            _random_file(initrd, size_mb * 1000 * 1000 // 4)
            print("%d MB: send/receive without network ..." % size_mb, flush=True)
            bench = Bench(pair, key, kernel, initrd, work, size_mb * 1e6 / ceiling)
            try:
                local = bench.local()
                if "error" in local:
                    results["rows"] += [summarise(size_mb, path, [local], ceiling)
                                        for path in ("send only, no net", "receive only, no net")]
                else:
                    results["rows"].append(summarise(size_mb, "send only, no net", [local["send"]], ceiling))
                    results["rows"].append(summarise(size_mb, "receive only, no net", [local["receive"]], ceiling))
                    parts = dict(local.get("receive_parts") or {})
                    nbytes = parts.pop("plaintext_bytes", 0)
                    for part, seconds in parts.items():
                        if seconds > 0:
                            results["rows"].append(summarise(size_mb, "receiver part: %s" % part,
                                                             [{"bytes": nbytes, "seconds": seconds}], ceiling))
                runs = {True: [], False: []}
                for rep in range(args.repeat):
                    for plain in (True, False):
                        runs[plain].append(bench.fetch(plain))
                        r = runs[plain][-1]
                        print("%d MB %-15s run %d/%d: %s" % (
                            size_mb, "plain TCP" if plain else "stiefel payload", rep + 1, args.repeat,
                            r["error"] if "error" in r else "%.1f MB/s, %.1f %% of ceiling" % (
                                r["bytes"] / r["seconds"] / 1e6, 100 * r["bytes"] / r["seconds"] / ceiling)),
                              flush=True)
            finally:
                bench.close()
            results["rows"].append(summarise(size_mb, "plain TCP copy", runs[True], ceiling))
            results["rows"].append(summarise(size_mb, "iter/receive_payload", runs[False], ceiling))
    except KeyboardInterrupt:
        if os.getpid() != main_pid:
            os._exit(1)
        print("interrupted: cleaning up", flush=True)
        return None
    finally:
        if os.getpid() != main_pid:
            os._exit(1)  # never clean up from a forked helper
        pair.destroy()
        shutil.rmtree(work, ignore_errors=True)
    results["load_end"] = loadavg()
    return results


def print_table(results):
    print()
    print("Boot payload over veth shaped to %s Mbit/s (htb %.1f Mbit/s, burst %s; TCP payload ceiling %.1f MB/s), "
          "%s, median of %d" % (results["rate_mbit"], results["htb_rate_bit"] / 1e6,
                                "%s B" % results["htb_burst_bytes"] if results["htb_burst_bytes"] else "tc default",
                                results["ceiling_MBps"], results["tcp_congestion_control"], results["repeat"]))
    print("%-7s %-22s %8s %9s %9s %9s %11s %11s"
          % ("size", "path", "MB/s", "ceiling", "best", "worst", "RSS before", "RSS peak"))
    for r in results["rows"]:
        size = "%d MB" % r["size_mb"]
        if "error" in r:
            print("%-7s %-22s error: %s" % (size, r["path"], r["error"]))
            continue
        rss = ("%8.1f MB %8.1f MB" % (r["rss_before_kb"] / 1024, r["rss_peak_kb"] / 1024)
               if "rss_peak_kb" in r else "")
        print("%-7s %-22s %8.1f %8.1f%% %8.1f%% %8.1f%% %s" % (
            size, r["path"], r["MBps"], 100 * r["ratio"], 100 * r["best_ratio"], 100 * r["worst_ratio"], rss))
    print("load average %s at start, %s at end" % (results["load_start"], results["load_end"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["server", "client", "local"])
    parser.add_argument("--key")
    parser.add_argument("--client-nonce")
    parser.add_argument("--server-nonce")
    parser.add_argument("--kernel")
    parser.add_argument("--initrd")
    parser.add_argument("--server", help="client: the server's link-local address")
    parser.add_argument("--ifname", help="client: the interface the server is on")
    parser.add_argument("--dest")
    parser.add_argument("--plain", action="store_true", help="client: plain TCP copy instead of the payload")
    parser.add_argument("--sizes", default="50,200", help="payload sizes in MB")
    parser.add_argument("--repeat", type=int, default=3, help="runs per size and path (the table shows the median)")
    parser.add_argument("--rate-mbit", type=int, default=2500)
    parser.add_argument("--htb-burst", type=int, default=HTB_BURST,
                        help="htb burst in bytes (default %(default)s; 0 = tc's default, for comparison)")
    parser.add_argument("--output", default=None, help="JSON path (default $STIEFEL_CACHE_DIR/bench/payload.json)")
    args = parser.parse_args()
    roles = {"server": role_server, "client": role_client, "local": role_local}
    if args.role:
        return roles[args.role](args)
    if os.geteuid() != 0:
        print("bench/payload.py needs root (network namespaces)")
        return 0
    results = orchestrate(args)
    if results is None:
        return 130
    print_table(results)
    out_path = args.output or os.path.join(os.environ.get("STIEFEL_CACHE_DIR") or os.path.join(REPO, ".cache"),
                                           "bench", "payload.json")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as handle:
        handle.write(json.dumps(results, indent=1) + "\n")
    print("saved %s" % out_path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
