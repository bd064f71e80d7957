#!/usr/bin/env python3
"""NBD read/write throughput as a fraction of the shaped line rate (issue 7.1).

    sudo .venv/bin/python bench/nbd_throughput.py            # 1 GiB, the real numbers
    sudo .venv/bin/python bench/nbd_throughput.py --quick    # 256 MiB

A server namespace and a client namespace are joined by a veth pair shaped
with htb so the TCP payload ceiling is that of 1 GbE (117.7 MB/s) and 2.5 GbE
(294.2 MB/s) at MTU 1500. In the server namespace the same file (on tmpfs,
so the disk is not what is measured) is served side by side by:

- ``nbdkit``: exactly the stiefel export settings (``nbd_export.server_argv``),
- ``nbd-server``: the upstream Stiefelsystem way (an export with only
  ``exportname`` and ``copyonwrite = false``),
- ``nbdkit TLS``: the stiefel settings with TLS-PSK (AES-GCM forced), and for
  contrast ``nbdkit TLS default``: GnuTLS' own choice (ChaCha20 on Debian 12),
  at 2.5 GbE only.

Beyond 2.5 GbE (issue 18.4), ``nbdkit`` and ``nbdkit TLS`` also run over the
cable shaped to 10 GbE (1177 MB/s) and over the bare veth (``veth``: no
shaper, the machine's own ceiling). There the figure to read is the ratio to
the raw TCP stream of the same run (``ratio_to_raw_tcp``): on 2 shared cores
raw TCP itself stays below 10 GbE, and on the bare veth it is the ceiling.

nbdcopy in the client namespace reads each export to ``null:`` and writes a
random file into it (``--flush``), with 1 and 4 connections. A raw TCP
stream calibrates the shaper. Prints a table, saves JSON to
``$STIEFEL_CACHE_DIR/bench/nbd.json``. Cleans up namespaces and processes
(by PID) even on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
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
UNSHAPED = "veth"  # no shaper: the machine's own ceiling, the raw TCP stream of the same run
RATES = {"1GbE": 1e9, "2.5GbE": 2.5e9, "10GbE": 10e9, UNSHAPED: None}
# beyond 2.5 GbE (issue 18.4) only stiefel's own exports, plain and TLS: the comparisons stay at the slower links
FAST = ("10GbE", UNSHAPED)
PORTS = {"nbdkit": 10809, "nbd-server": 10810, "nbdkit TLS": 10811, "nbdkit TLS default": 10812}
TCP_PORT = 5201

RAW_SINK = r"""
import socket, sys, time
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(1)
print("ready", flush=True)
conn, _ = srv.accept()
total = 0; start = None
buf = bytearray(1 << 20)
while True:
    n = conn.recv_into(buf)
    if not n:
        break
    if start is None:
        start = time.monotonic()
    total += n
print(total, time.monotonic() - start, flush=True)
"""

RAW_SOURCE = r"""
import os, socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])))
chunk = os.urandom(1 << 20)
left = int(sys.argv[3])
while left > 0:
    n = min(left, len(chunk)); sock.sendall(chunk[:n]); left -= n
sock.shutdown(socket.SHUT_WR); sock.recv(1)
"""


def log(msg):
    print("[nbd-bench %s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


def random_file(path: Path, size: int) -> None:
    """Incompressible, non-zero data (nbdcopy skips zeroes): a 16 MiB random block, repeated."""
    block = secrets.token_bytes(16 * MiB)
    with open(path, "wb") as handle:
        left = size
        while left:
            n = min(left, len(block))
            handle.write(block[:n])
            left -= n


def raw_tcp(pair: NetnsPair, size: int) -> float:
    """Bytes/s of a plain TCP stream server -> client through the shaper."""
    sink = pair.popen("client", [sys.executable, "-c", RAW_SINK, pair.addr["client"], str(TCP_PORT)],
                      stdout=subprocess.PIPE, text=True)
    assert sink.stdout.readline().strip() == "ready"
    pair.run("server", [sys.executable, "-c", RAW_SOURCE, pair.addr["client"], str(TCP_PORT), str(size)],
             timeout=600)
    total, seconds = sink.stdout.readline().split()
    sink.wait(timeout=30)
    return int(total) / float(seconds)


def nbdcopy(pair: NetnsPair, direction: str, uri: str, conns: int, src: Path, flush: bool) -> float:
    """Seconds for one nbdcopy; writes end with a flush when the export has one (nbd-server has not).

    ``-T`` as well as ``-C``: nbdcopy opens at most one connection per thread and defaults to one
    thread per core, so on a 2-core machine ``-C 4`` alone copies over 2 connections.
    """
    par = ["-C", str(conns), "-T", str(conns)]
    if direction == "read":
        argv = ["nbdcopy"] + par + [uri, "null:"]
    else:
        argv = ["nbdcopy"] + par + (["--flush"] if flush else []) + [str(src), uri]
    start = time.monotonic()
    proc = pair.run("client", argv, timeout=900, check=False)
    if proc.returncode != 0:
        raise RuntimeError("%s failed: %s" % (" ".join(argv), proc.stderr.decode(errors="replace").strip()))
    return time.monotonic() - start


def build_plan(rates: list) -> list:
    """(link, server, direction, connections) in run order, one link at a time (it is reshaped once per pass)."""
    plan = []
    for rate in [r for r in RATES if r in rates]:
        servers = ("nbdkit", "nbdkit TLS") if rate in FAST else ("nbdkit", "nbd-server")
        if rate == "2.5GbE":
            servers += ("nbdkit TLS", "nbdkit TLS default")
        plan += [(rate, server, d, c) for server in servers for d in ("read", "write") for c in (1, 4)]
    return plan


def summarise(cell: tuple, samples: list, calibration: dict, size: int) -> dict:
    """One table cell over every pass: the median is the figure; best and worst are kept beside it."""
    rate, server, direction, conns = cell
    rates = sorted(x["Bps"] for x in samples if (x["rate"], x["server"], x["direction"], x["connections"]) == cell)
    median = statistics.median(rates)
    ceiling = calibration["ceiling_Bps"]
    return {"rate": rate, "server": server, "direction": direction, "connections": conns, "repeats": len(rates),
            "seconds": size / median, "Bps": median, "ratio": median / ceiling,
            "best_ratio": rates[-1] / ceiling, "worst_ratio": rates[0] / ceiling,
            "ratio_to_raw_tcp": median / calibration["raw_tcp_Bps"],
            "load1": statistics.median(x.get("load1", float("nan")) for x in samples
                                       if (x["rate"], x["server"], x["direction"], x["connections"]) == cell)}


def probe(pair: NetnsPair, uri: str) -> ne.ExportInfo:
    def attempt():
        proc = pair.run("client", ["nbdinfo", "--json", uri], check=False)
        return ne.parse_nbdinfo_json(proc.stdout) if proc.returncode == 0 else None
    info = wait_for(attempt, timeout=15)
    if info is None:
        raise RuntimeError("export %s did not come up" % uri)
    return info


def start_servers(pair: NetnsPair, work: Path, export: Path) -> dict:
    """Start every server in the server namespace; return name -> client URI."""
    addr = pair.addr["server"]
    uris = {}
    psk = work / "nbd.psk"
    psk.write_text("stiefel:%s\n" % secrets.token_hex(32))
    psk.chmod(0o600)
    prio = ne.write_gnutls_priority_file(str(work / "gnutls-aes-gcm.conf"))
    variants = {
        "nbdkit": ne.ExportSettings(path=str(export), address=addr, port=PORTS["nbdkit"]),
        "nbdkit TLS": ne.ExportSettings(path=str(export), address=addr, port=PORTS["nbdkit TLS"],
                                        tls_psk_file=str(psk)),
        "nbdkit TLS default": ne.ExportSettings(path=str(export), address=addr, port=PORTS["nbdkit TLS default"],
                                                tls_psk_file=str(psk), tls_aes_gcm_only=False),
    }
    for name, settings in variants.items():
        logfile = open(work / ("%s.log" % name.replace(" ", "-")), "wb")  # pylint: disable=consider-using-with
        pair.popen("server", ne.server_argv(settings, debug_tls=bool(settings.tls_psk_file)),
                   env=ne.server_env(settings, prio), stdout=logfile, stderr=logfile)
        logfile.close()
        uris[name] = ne.export_uri(settings, for_client=True)
    # upstream Stiefelsystem: nbd-server, export with only exportname and copyonwrite = false
    conf = work / "nbd-server.conf"
    conf.write_text("[generic]\nport = %d\n[stiefel]\nexportname = %s\ncopyonwrite = false\n"
                    % (PORTS["nbd-server"], export))
    pidfile = work / "nbd-server.pid"
    pair.run("server", ["nbd-server", "-C", str(conf), "-p", str(pidfile)])
    pid = wait_for(lambda: ne.read_pidfile(str(pidfile)), timeout=10)
    if not pid:
        raise RuntimeError("nbd-server did not write its pidfile")
    uris["nbd-server"] = "nbd://%s:%d/stiefel" % (addr, PORTS["nbd-server"])
    uris["_nbd_server_pid"] = pid
    return uris


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="export size in MiB (default 1024)")
    parser.add_argument("--quick", action="store_true", help="256 MiB instead of 1 GiB")
    parser.add_argument("--repeat", type=int, default=1,
                        help="passes over every transfer; the table shows each cell's median (default 1)")
    parser.add_argument("--rates", default=",".join(RATES),
                        help="comma list of links (default all: %(default)s; " + UNSHAPED + " = the bare veth)")
    parser.add_argument("--output", default=None, help="JSON path (default $STIEFEL_CACHE_DIR/bench/nbd.json)")
    args = parser.parse_args(argv)
    args.rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    unknown = sorted(set(args.rates) - set(RATES))
    if unknown or not args.rates:
        parser.error("--rates: unknown link(s) %s; choose from %s" % (", ".join(unknown) or "(none)", ", ".join(RATES)))
    size = (256 if args.quick else args.size_mib) * MiB
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    for tool in ("nbdkit", "nbd-server", "nbdcopy", "nbdinfo", "nsenter", "tc"):
        if not shutil.which(tool):
            print("missing tool: %s" % tool, file=sys.stderr)
            return 2
    out_path = Path(args.output) if args.output else cache_dir() / "bench" / "nbd.json"

    main_pid = sigterm_as_interrupt()

    work = Path(tempfile.mkdtemp(prefix="stf-nbdbench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    pair = NetnsPair()
    nbd_server_pid = None
    results = {"size_bytes": size, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname(),
               "flags": {}, "calibration": {}, "runs": [], "tls_ciphers": {}}
    t_all = time.monotonic()
    try:
        log("stage 1/4: %d MiB random export and source files in %s" % (size // MiB, work))
        export, src = work / "export.img", work / "source.img"
        random_file(export, size)
        random_file(src, size)
        log("stage 2/4: namespaces %s <-> %s, servers" % (pair.ns["server"], pair.ns["client"]))
        pair.create()
        uris = start_servers(pair, work, export)
        nbd_server_pid = uris.pop("_nbd_server_pid")
        for name, uri in uris.items():
            info = probe(pair, uri)
            results["flags"][name] = info.to_dict()
            log("  %-19s flush=%s fua=%s multi-conn=%s tls=%s" % (name, info.can_flush, info.can_fua,
                                                                  info.can_multi_conn, info.tls))
        plan = build_plan(args.rates)
        total = len(plan) * args.repeat
        passes = "%d pass%s" % (args.repeat, "es" if args.repeat > 1 else "")
        log("stage 3/4: %d transfers of %d MiB (%s)" % (total, size // MiB, passes))
        samples, raws, done = [], {}, 0
        for rep in range(1, args.repeat + 1):
            current = None
            for rate, server, direction, conns in plan:
                if rate != current:
                    current = rate
                    if RATES[rate] is None:
                        htb, burst = None, pair.unshape()
                    else:
                        htb = htb_rate_for(payload_ceiling(RATES[rate]))
                        burst = pair.shape(htb)
                    raw = raw_tcp(pair, min(size, 512 * MiB) if RATES[rate] else max(size, 1024 * MiB))
                    raws.setdefault(rate, []).append(raw)
                    # the bare veth has no line rate: its ceiling is the raw TCP stream of this run
                    ceiling = payload_ceiling(RATES[rate]) if RATES[rate] else statistics.median(raws[rate])
                    results["calibration"][rate] = {"htb_rate_bit": htb, "htb_burst_bytes": burst,
                                                    "ceiling_Bps": ceiling,
                                                    "raw_tcp_Bps": statistics.median(raws[rate]),
                                                    "raw_tcp_ratio": statistics.median(raws[rate]) / ceiling,
                                                    "raw_tcp_runs_Bps": raws[rate]}
                    log("  %s: %s, ceiling %.1f MB/s, raw TCP %.1f MB/s (%.1f %%), load %s"
                        % (rate, "htb %.1f Mbit/s burst %d B" % (htb / 1e6, burst) if htb else "no shaper",
                           ceiling / 1e6, raw / 1e6, 100 * raw / ceiling,
                           "/".join("%.1f" % x for x in loadavg())))
                ceiling = results["calibration"][rate]["ceiling_Bps"]
                load1 = loadavg()[0]
                seconds = nbdcopy(pair, direction, uris[server], conns, src, results["flags"][server]["can_flush"])
                done += 1
                samples.append({"rate": rate, "server": server, "direction": direction, "connections": conns,
                                "pass": rep, "seconds": seconds, "Bps": size / seconds, "load1": load1})
                log("  [%2d/%d %3d%%] %-6s %-19s %-5s C=%d  %7.1f MB/s  %5.1f %% of ceiling, %5.1f %% of raw TCP"
                    ", load %.1f" % (done, total, 100 * done // total, rate, server, direction, conns,
                                     size / seconds / 1e6, 100 * size / seconds / ceiling,
                                     100 * size / seconds / statistics.median(raws[rate]), load1))
        results["samples"] = samples
        results["repeat"] = args.repeat
        results["runs"] = [summarise(cell, samples, results["calibration"][cell[0]], size) for cell in plan]
        for name in ("nbdkit TLS", "nbdkit TLS default"):
            text = (work / ("%s.log" % name.replace(" ", "-"))).read_text(errors="replace")
            results["tls_ciphers"][name] = sorted(set(ne.parse_tls_session_cipher(text)))
        log("stage 4/4: report")
    except KeyboardInterrupt:
        if os.getpid() != main_pid:
            os._exit(1)
        log("interrupted: cleaning up")
        return 130
    finally:
        if os.getpid() != main_pid:
            os._exit(1)  # never clean up from a forked helper
        pair.destroy()
        if nbd_server_pid:
            running = ne.process_argv(nbd_server_pid) or [""]
            if os.path.basename(running[0]) == "nbd-server":
                ne.stop_pid(nbd_server_pid)
        shutil.rmtree(work, ignore_errors=True)
    results["seconds_total"] = time.monotonic() - t_all
    print_table(results)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=1) + "\n")
    log("saved %s (%.0f s total)" % (out_path, results["seconds_total"]))
    return 0


def print_table(results: dict) -> None:
    print()
    print("NBD throughput, %d MiB, fraction of the TCP payload ceiling (MTU 1500)" % (results["size_bytes"] // MiB))
    for rate, cal in results["calibration"].items():
        print("  %-6s ceiling %.1f MB/s, %s, raw TCP %.1f MB/s = %.1f %%"
              % (rate, cal["ceiling_Bps"] / 1e6, "htb %.1f Mbit/s burst %s B" % (
                  cal["htb_rate_bit"] / 1e6, cal.get("htb_burst_bytes", "?")) if cal.get("htb_rate_bit")
                 else "no shaper (the ceiling is raw TCP)", cal["raw_tcp_Bps"] / 1e6, 100 * cal["raw_tcp_ratio"]))
    repeat = results.get("repeat", 1)
    for key, title in (("ratio", "median of %d" % repeat if repeat > 1 else ""),
                       ("best_ratio", "best of %d" % repeat if repeat > 1 else None),
                       ("ratio_to_raw_tcp", "median, as a share of the raw TCP stream of the same run")):
        if title is None:
            continue
        print()
        print("%-6s %-19s %8s %8s %8s %8s  %s" % ("link", "server", "read C1", "read C4", "write C1", "write C4",
                                                  title))
        rows = {}
        for run in results["runs"]:
            rows.setdefault((run["rate"], run["server"]), {})[(run["direction"], run["connections"])] = run[key]
        for (rate, server), cells in rows.items():
            print("%-6s %-19s %s" % (rate, server, " ".join(
                "%7.1f%%" % (100 * cells[k]) if k in cells else "%8s" % "-"
                for k in (("read", 1), ("read", 4), ("write", 1), ("write", 4)))))
    print("(raw TCP = one plain TCP stream through the same shaper in the same run; JSON has ratio_to_raw_tcp)")
    print()
    print("%-19s %6s %6s %10s %6s" % ("advertised", "flush", "FUA", "multi-conn", "TLS"))
    for name, flags in results["flags"].items():
        print("%-19s %6s %6s %10s %6s" % (name, flags["can_flush"], flags["can_fua"], flags["can_multi_conn"],
                                          flags["tls"]))
    for name, ciphers in results["tls_ciphers"].items():
        print("TLS cipher negotiated by %s: %s" % (name, ", ".join(ciphers) or "?"))


if __name__ == "__main__":
    sys.exit(main())
