#!/usr/bin/env python3
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Boot payload streaming: throughput against a 2.5 GbE line and receiver memory (issue 7.2).

Two network namespaces joined by a veth pair, both ends shaped with htb to
2500 Mbit/s (TCP payload ceiling at MTU 1500: 294.2 MB/s). The sender streams
``payload.iter_payload`` (AES-256-GCM records) over TCP; the receiver runs
``payload.receive_payload`` (decrypt, write, SHA-256 verify) into a tmpfs
directory. Payload sizes 50 MB and 200 MB show that the receiver's peak RSS
does not grow with the payload. A plain TCP copy of the same bytes is the
baseline, and ``receive_payload`` from a tmpfs file (no network) shows the
receiver's own CPU ceiling on this machine (on a 2-core host, sender,
receiver and the shaped veth share the CPUs; real peers do not). Prints a table; never fails (a measurement, not a test).

    sudo .venv/bin/python bench/payload.py [--sizes 50,200] [--rate-mbit 2500] [--output PATH]

Also writes the rows as JSON to ``$STIEFEL_CACHE_DIR/bench/payload.json`` (or --output).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "collections"))

from ansible_collections.stiefel.system.plugins.module_utils import keyfile, messages, payload  # noqa: E402

PORT = 61599
CEILING_2500 = 294.2  # MB/s, TCP payload at MTU 1500 (design brief, section 4)


def _status_kb(field):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_kb():
    """Peak RSS of this process image (VmHWM; ru_maxrss would carry the forking parent's peak over exec)."""
    return _status_kb("VmHWM")


def current_rss_kb():
    return _status_kb("VmRSS")


# ------------------------------------------------------------------ the two roles (run inside namespaces)

def role_sender(args):
    key = bytes.fromhex(args.key)
    cn, sn = bytes.fromhex(args.client_nonce), bytes.fromhex(args.server_nonce)
    manifest = payload.build_manifest(args.kernel, args.initrd, "root=UUID=bench ro")
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("::", PORT))
    listener.listen(1)
    print("listening", flush=True)
    conn = listener.accept()[0]
    if args.plain:
        for path in (args.kernel, args.initrd):
            with open(path, "rb") as handle:
                while True:
                    block = handle.read(1 << 20)
                    if not block:
                        break
                    conn.sendall(block)
    else:
        for record in payload.iter_payload(key, cn, sn, manifest, {"kernel": args.kernel, "initrd": args.initrd}):
            conn.sendall(record)
    conn.close()
    listener.close()


def role_receiver(args):
    key = bytes.fromhex(args.key)
    cn = bytes.fromhex(args.client_nonce)
    before = current_rss_kb()
    if args.local:
        sock = None
        stream = open(args.host, "rb", buffering=1 << 20)
    else:
        sock = socket.create_connection((args.host, PORT))
        stream = sock.makefile("rb", buffering=1 << 20)
    started = time.monotonic()
    if args.plain:
        total = 0
        while True:
            block = stream.read(1 << 20)
            if not block:
                break
            total += len(block)
        size = total
    else:
        manifest = payload.receive_payload(stream.read, key, cn, args.dest)
        size = manifest.total_size
    elapsed = time.monotonic() - started
    if sock is not None:
        sock.close()
    stream.close()
    print(json.dumps({"bytes": size, "seconds": elapsed, "rss_before_kb": before, "rss_peak_kb": rss_kb()}),
          flush=True)


# ------------------------------------------------------------------ orchestration (root, on the host)

def run(argv, check=True):
    return subprocess.run(argv, check=check, capture_output=True, text=True)


class Lab(object):
    def __init__(self, rate_mbit):
        pid = os.getpid() & 0xFFFF
        self.a, self.b = "stfbs%x" % pid, "stfbr%x" % pid
        self.va, self.vb = "stfbva%x" % pid, "stfbvb%x" % pid
        self.rate = rate_mbit

    def __enter__(self):
        for ns in (self.a, self.b):
            run(["ip", "netns", "add", ns])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
        run(["ip", "link", "add", self.va, "type", "veth", "peer", "name", self.vb])
        run(["ip", "link", "set", self.va, "netns", self.a])
        run(["ip", "link", "set", self.vb, "netns", self.b])
        for ns, dev, addr in ((self.a, self.va, "fd5e:be::1/64"), (self.b, self.vb, "fd5e:be::2/64")):
            run(["ip", "-n", ns, "addr", "add", addr, "dev", dev, "nodad"])
            run(["ip", "-n", ns, "link", "set", dev, "mtu", "1500", "up"])
            run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb",
                 "default", "10"])
            run(["ip", "netns", "exec", ns, "tc", "class", "add", "dev", dev, "parent", "1:", "classid", "1:10",
                 "htb", "rate", "%dmbit" % self.rate, "ceil", "%dmbit" % self.rate])
            # GSO/TSO would hand htb 64 KiB super-packets: shape real 1500-byte frames
            run(["ip", "netns", "exec", ns, "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off"],
                check=False)
        return self

    def __exit__(self, *exc):
        for ns in (self.a, self.b):
            run(["ip", "netns", "del", ns], check=False)


def measure_local(key, kernel, initrd, dest, work):
    """receive_payload from a file on tmpfs, no network: the receiver's own CPU ceiling here."""
    cn, sn = messages.new_nonce(), messages.new_nonce()
    manifest = payload.build_manifest(kernel, initrd, "root=UUID=bench ro")
    stream_path = os.path.join(work, "stream")
    with open(stream_path, "wb") as out:
        for record in payload.iter_payload(key, cn, sn, manifest, {"kernel": kernel, "initrd": initrd}):
            out.write(record)
    recv = run([sys.executable, os.path.abspath(__file__), "--role", "receiver", "--local", "--host", stream_path,
                "--dest", dest, "--key", key.hex(), "--client-nonce", cn.hex(), "--server-nonce", sn.hex()],
               check=False)
    os.unlink(stream_path)
    if recv.returncode != 0:
        return {"error": recv.stderr.strip()[-300:]}
    return json.loads(recv.stdout.strip().splitlines()[-1])


def _random_file(path, size):
    with open(path, "wb") as handle:
        left = size
        while left:
            block = os.urandom(min(left, 1 << 20))
            handle.write(block)
            left -= len(block)


def measure(lab, key, kernel, initrd, dest, plain):
    cn, sn = messages.new_nonce(), messages.new_nonce()
    common = ["--key", key.hex(), "--client-nonce", cn.hex(), "--server-nonce", sn.hex()]
    if plain:
        common.append("--plain")
    me = [sys.executable, os.path.abspath(__file__)]
    sender = subprocess.Popen(["ip", "netns", "exec", lab.a] + me + ["--role", "sender", "--kernel", kernel,
                                                                     "--initrd", initrd] + common,
                              stdout=subprocess.PIPE, text=True)
    try:
        sender.stdout.readline()  # "listening"
        recv = run(["ip", "netns", "exec", lab.b] + me + ["--role", "receiver", "--host", "fd5e:be::1", "--dest",
                                                          dest] + common, check=False)
        sender.wait(60)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    if recv.returncode != 0:
        return {"error": recv.stderr.strip()[-300:]}
    return json.loads(recv.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["sender", "receiver"])
    parser.add_argument("--key")
    parser.add_argument("--client-nonce")
    parser.add_argument("--server-nonce")
    parser.add_argument("--kernel")
    parser.add_argument("--initrd")
    parser.add_argument("--host")
    parser.add_argument("--dest")
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--local", action="store_true", help="receiver: read the stream from a file (CPU only)")
    parser.add_argument("--sizes", default="50,200", help="payload sizes in MB")
    parser.add_argument("--rate-mbit", type=int, default=2500)
    parser.add_argument("--output", default=None, help="JSON path (default $STIEFEL_CACHE_DIR/bench/payload.json)")
    args = parser.parse_args()
    if args.role == "sender":
        return role_sender(args)
    if args.role == "receiver":
        return role_receiver(args)
    if os.geteuid() != 0:
        print("bench/payload.py needs root (network namespaces)")
        return 0
    ceiling = CEILING_2500 * args.rate_mbit / 2500.0
    key = keyfile.generate_key()
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    work = tempfile.mkdtemp(prefix="stf-bench-payload-", dir="/dev/shm")
    rows = []
    try:
        with Lab(args.rate_mbit) as lab:
            for size_mb in [int(s) for s in args.sizes.split(",")]:
                kernel, initrd = os.path.join(work, "kernel"), os.path.join(work, "initrd")
                _random_file(kernel, size_mb * 1000 * 1000 * 3 // 4)
                _random_file(initrd, size_mb * 1000 * 1000 // 4)
                dest = os.path.join(work, "recv")
                os.makedirs(dest, exist_ok=True)
                print("measuring %d MB receive_payload from tmpfs (no network) ..." % size_mb, flush=True)
                rows.append((size_mb, "receive only, no net", measure_local(key, kernel, initrd, dest, work)))
                shutil.rmtree(dest, ignore_errors=True)
                for plain in (True, False):
                    dest = os.path.join(work, "recv")
                    os.makedirs(dest, exist_ok=True)
                    print("measuring %d MB %s ..." % (size_mb, "plain TCP" if plain else "stiefel payload"), flush=True)
                    result = measure(lab, key, kernel, initrd, dest, plain)
                    shutil.rmtree(dest, ignore_errors=True)
                    rows.append((size_mb, "plain TCP copy" if plain else "iter/receive_payload", result))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print("Boot payload over veth shaped to %d Mbit/s (TCP payload ceiling %.1f MB/s)" % (args.rate_mbit, ceiling))
    print("%-8s %-22s %10s %10s %10s %14s %14s" % ("size", "path", "MB/s", "ceiling", "seconds", "RSS before", "RSS peak"))
    for size_mb, path, r in rows:
        if "error" in r:
            print("%-8s %-22s error: %s" % ("%d MB" % size_mb, path, r["error"]))
            continue
        rate = r["bytes"] / 1e6 / r["seconds"]
        print("%-8s %-22s %10.1f %9.1f%% %10.2f %11.1f MB %11.1f MB" % (
            "%d MB" % size_mb, path, rate, 100 * rate / ceiling, r["seconds"], r["rss_before_kb"] / 1024,
            r["rss_peak_kb"] / 1024))
    out_path = args.output or os.path.join(os.environ.get("STIEFEL_CACHE_DIR") or os.path.join(REPO, ".cache"),
                                           "bench", "payload.json")
    results = {"started": started, "rate_mbit": args.rate_mbit, "ceiling_MBps": ceiling, "rows": []}
    for size_mb, path, r in rows:
        row = dict(r, size_mb=size_mb, path=path)
        if "error" not in r:
            row["MBps"] = r["bytes"] / 1e6 / r["seconds"]
            row["ratio"] = row["MBps"] / ceiling
        results["rows"].append(row)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as handle:
        handle.write(json.dumps(results, indent=1) + "\n")
    print("saved %s" % out_path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
