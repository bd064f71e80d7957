# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Run every stiefel benchmark, print one table of ratios against the targets (issue 7).

    sudo .venv/bin/python bench/run.py [--quick] [--only nbd,randio,payload,image] [--skip-cold]
                                       [--chart docs/bench.png] [--collect-only]

Runs ``nbd_throughput.py``, ``random_io.py``, ``payload.py`` and ``image.py`` one after the other
(each prints its own progress and table), collects their JSON from
``$STIEFEL_CACHE_DIR/bench/`` (default ``<repo>/.cache/bench/``) into
``summary.json`` together with the date, the options and the machine facts
(cores, load average before and after each benchmark: shared build machines are
often busy, so the load is printed next to the numbers), prints one table with
every number next to its target (met / missed), and with ``--chart`` renders a
PNG bar chart with matplotlib (Agg backend).

Benchmarks measure; they never fail: a benchmark that crashes or cannot run is
reported in the table and the exit status is still 0. Only usage errors exit 2.
``--collect-only`` skips running and rebuilds summary, table and chart from the
JSON files already in the cache directory (keeping the date, options and load
figures of the previous ``summary.json``, if there is one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from benchenv import cache_dir, loadavg  # noqa: E402
BENCHES = ("nbd", "nbd10", "randio", "payload", "payload10", "image")
SCRIPTS = {"nbd": "nbd_throughput.py", "nbd10": "nbd_throughput.py", "randio": "random_io.py",
           "payload": "payload.py", "payload10": "payload.py", "image": "image.py"}
NEEDS_ROOT = {"nbd", "nbd10", "randio", "payload", "payload10"}

# targets from issue 7
TARGET_NBD = 0.93            # fraction of the TCP payload ceiling
TARGET_PAYLOAD = 0.90        # fraction of the TCP payload ceiling
TARGET_INITRD_BYTES = 60e6   # compressed initrd
TARGET_COLD_S = 300.0        # cold build
TARGET_UNCHANGED_S = 30.0    # unchanged rebuild
# configurations the NBD target is about; the others are for comparison
NBD_STIEFEL = ("nbdkit", "nbdkit TLS")
# links beyond 2.5 GbE (issue 18.4): judged as a share of the raw TCP stream of the same run, not of a line rate
NBD_BEYOND = ("10GbE", "veth")


def log(msg: str) -> None:
    print("[bench %s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


def bench_argv(name: str, args: argparse.Namespace, out: Path) -> list:
    argv = [sys.executable, str(HERE / SCRIPTS[name]), "--output", str(out)]
    if name in ("nbd", "nbd10"):  # one pass of 256 MiB, or the median of three passes of 1 GiB
        argv += ["--quick"] if args.quick else ["--repeat", "3"]
        # issue 7's links, and (issue 18.4) 10 GbE and the bare veth, each a share of the same run's raw TCP
        argv += ["--rates", "1GbE,2.5GbE" if name == "nbd" else "10GbE,veth"]
    if name == "payload":  # the median of several runs, and their best, against other jobs' load
        argv += ["--repeat", "3" if args.quick else "5"]
    if name == "payload10":  # issue 18.4: the payload receiver at 10 GbE; 50 MB would take 45 ms there
        argv += ["--rate-mbit", "10000", "--sizes", "200", "--repeat", "3"]
    if name == "randio" and args.quick:  # one pass of 3 s per cell instead of three of 4 s
        argv.append("--quick")
    if name == "image" and args.skip_cold:
        argv.append("--skip-cold")
    return argv


def run_one(name: str, args: argparse.Namespace, out: Path) -> dict:
    """Run one benchmark script (its output goes straight to the terminal); never raises."""
    info = {"script": SCRIPTS[name], "load_start": loadavg()}
    if name in NEEDS_ROOT and os.geteuid() != 0:
        info.update(status="skipped", reason="needs root (network namespaces)")
        return info
    argv = bench_argv(name, args, out)
    info["argv"] = argv[1:]
    started_wall = time.time()
    started = time.monotonic()
    try:
        proc = subprocess.run(argv, cwd=REPO, check=False)
        info["rc"] = proc.returncode
    except (OSError, KeyboardInterrupt) as exc:
        info["rc"] = None
        info["reason"] = "%s: %s" % (type(exc).__name__, exc)
    info["seconds"] = round(time.monotonic() - started, 1)
    info["load_end"] = loadavg()
    fresh = out.exists() and out.stat().st_mtime >= started_wall - 1
    skipped = (load_json(out) or {}).get("skipped") if info["rc"] == 0 and fresh else None
    if skipped:  # the script ran and chose not to measure (e.g. image --skip-cold on a fresh checkout)
        info.update(status="skipped", reason=skipped)
    elif info["rc"] == 0 and fresh:
        info["status"] = "ok"
    else:
        info["status"] = "failed"
        info.setdefault("reason", "exit status %s%s" % (info["rc"], "" if fresh else ", no fresh JSON"))
    return info


def load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ the table

def status(ok) -> str:
    if ok is None:
        return ""
    return "met" if ok else "MISSED"


def pct(x) -> str:
    return "%.2f %%" % (100 * x)


def nbd_rows(data: dict, group: str = "nbd") -> list:
    rows = []
    for rate, cal in data.get("calibration", {}).items():
        rows.append((group, "%s raw TCP through the shaper (calibration)" % rate if cal.get("htb_rate_bit")
                     else "%s raw TCP, no shaper (the machine's ceiling)" % rate,
                     pct(cal["raw_tcp_ratio"]) if cal.get("htb_rate_bit") else "%.0f MB/s" % (cal["raw_tcp_Bps"] / 1e6),
                     "", "%.0f MB/s" % (cal["raw_tcp_Bps"] / 1e6) if cal.get("htb_rate_bit") else "", None))
    for run in data.get("runs", []):
        label = "%-6s %-18s %-5s C=%d" % (run["rate"], run["server"], run["direction"], run["connections"])
        if run["rate"] in NBD_BEYOND:  # issue 18.4: a ratio to raw TCP of the same run, no target
            note = "of raw TCP in the same run%s" % (
                "" if run["rate"] == "veth" else " (%s of the line's ceiling)" % pct(run["ratio"]))
            if "load1" in run:
                note += ", load %.1f" % run["load1"]
            rows.append((group, label, pct(run["ratio_to_raw_tcp"]), "", note, None))
            continue
        stiefel = run["server"] in NBD_STIEFEL
        note = "" if stiefel else "comparison"
        if run.get("repeats", 1) > 1:
            note = ", ".join(x for x in (note, "median of %d (best %s, worst %s)" % (
                run["repeats"], pct(run["best_ratio"]), pct(run["worst_ratio"]))) if x)
        rows.append((group, label,
                     pct(run["ratio"]), ">= %.0f %%" % (100 * TARGET_NBD), note,
                     run["ratio"] >= TARGET_NBD if stiefel else None))
    return rows


def payload_rows(data: dict, group: str = "payload") -> list:
    rows = []
    rate = data.get("rate_mbit", 2500)
    judged = rate == 2500  # issue 7's target is for 2.5 GbE; other rates are reported, not judged
    prefix = "" if judged else "%g GbE " % (rate / 1000)
    for row in data.get("rows", []):
        label = "%s%d MB %s" % (prefix, row["size_mb"], row["path"])
        if "error" in row:
            rows.append((group, label, "error", "", row["error"][-60:], False))
            continue
        stiefel = row["path"] == "iter/receive_payload" and judged
        spread = ""
        if "best_ratio" in row and len(row.get("runs", [])) > 1:
            spread = ", median of %d (best %s, worst %s)" % (
                len(row["runs"]), pct(row["best_ratio"]), pct(row["worst_ratio"]))
        rows.append((group, label, pct(row["ratio"]), ">= %.0f %%" % (100 * TARGET_PAYLOAD) if stiefel else "",
                     ("%.1f MB/s" % row["MBps"] if stiefel or not judged else "reference") + spread,
                     row["ratio"] >= TARGET_PAYLOAD if stiefel else None))
    peaks = {row["size_mb"]: row["rss_peak_kb"] for row in data.get("rows", [])
             if row.get("path") == "iter/receive_payload" and "rss_peak_kb" in row}
    for size_mb, kb in sorted(peaks.items()):
        rows.append((group, "%s%d MB receiver peak RSS" % (prefix, size_mb), "%.1f MB" % (kb / 1024), "", "",
                     None))
    if len(peaks) >= 2:
        small, large = min(peaks), max(peaks)
        growth = (peaks[large] - peaks[small]) / 1024
        rows.append((group, "peak RSS growth %d -> %d MB payload" % (small, large), "%+.1f MB" % growth,
                     "bounded", "", abs(growth) < 0.1 * (large - small)))
    return rows


def randio_rows(data: dict) -> list:
    """Every path's IOPS and mean latency, then the issue 18.3 targets (random_io.py judges them)."""
    rows = []
    for cell in data.get("cells", []):
        cpu = ", ".join("%s %.0f" % (role, cell["%s_cpu_us_per_io" % role]) for role in ("proxy", "relay", "server")
                        if "%s_cpu_us_per_io" % role in cell)
        rows.append(("randio", "%-26s %-9s QD%d" % (cell["path"], cell["op"], cell["depth"]),
                     "%.0f IOPS" % cell["iops"], "", "%.0f us mean latency, %s%s%s" % (
                         cell["lat_mean_us"], "median of %d" % cell["runs"] if cell.get("runs", 1) > 1 else "1 run",
                         ", CPU us/IO: " + cpu if cpu else "",
                         ", load %.1f" % cell["load1"] if "load1" in cell else ""),
                     None))
    for target in data.get("targets", []):
        rows.append(("randio", target["name"], "%.2f" % target["ratio"], target["target"], "", target["met"]))
    if data.get("error"):
        rows.append(("randio", "(setup error: %s)" % data["error"][-80:], "", "", "", None))
    return rows


def image_rows(data: dict) -> list:
    rows = []
    if "initrd_bytes" in data:
        rows.append(("image", "initrd compressed (%s)" % data.get("compression", "?"),
                     "%.1f MB" % (data["initrd_bytes"] / 1e6), "<= %.0f MB" % (TARGET_INITRD_BYTES / 1e6), "",
                     data["initrd_bytes"] <= TARGET_INITRD_BYTES))
        rows.append(("image", "initrd uncompressed", "%.1f MB" % (data["initrd_uncompressed_bytes"] / 1e6), "",
                     "%s of %s modules" % (data.get("modules_kept"), data.get("modules_total")), None))
        rows.append(("image", "kernel (vmlinuz)", "%.1f MB" % (data["kernel_bytes"] / 1e6), "", "", None))
    if "cold_build_s" in data:
        rows.append(("image", "cold build", "%.1f s" % data["cold_build_s"], "<= %.0f min" % (TARGET_COLD_S / 60),
                     "carried over" if data.get("cold_build_carried_over") else "",
                     data["cold_build_s"] <= TARGET_COLD_S))
    if "unchanged_rebuild_s" in data:
        rows.append(("image", "unchanged rebuild", "%.1f s" % data["unchanged_rebuild_s"],
                     "<= %.0f s" % TARGET_UNCHANGED_S, "", data["unchanged_rebuild_s"] <= TARGET_UNCHANGED_S))
    if "overlay_rebuild_s" in data:
        rows.append(("image", "overlay-only rebuild", "%.1f s" % data["overlay_rebuild_s"], "", "", None))
    for key, label in (("init", "TCG boot to /init"), ("agent", "TCG boot to agent start")):
        if key in data.get("boot", {}):
            rows.append(("image", label, "%.1f s" % data["boot"][key], "", "QEMU TCG, no KVM", None))
    return rows


def build_rows(summary: dict) -> list:
    rows = []
    makers = {"nbd": nbd_rows, "nbd10": lambda data: nbd_rows(data, "nbd10"), "randio": randio_rows,
              "payload": payload_rows, "payload10": lambda data: payload_rows(data, "payload10"),
              "image": image_rows}
    for name in BENCHES:
        bench = summary["benchmarks"].get(name)
        if bench is None:
            continue
        if bench.get("data") is None:
            what = "skipped" if bench.get("status") == "skipped" else "no result"
            rows.append((name, "(%s: %s)" % (what, bench.get("reason", bench.get("status"))), "", "", "", None))
            continue
        rows.extend(makers[name](bench["data"]))
    return rows


def fmt_load(values) -> str:
    return "/".join("%.1f" % v for v in values) if values else "?"


def print_table(summary: dict, rows: list) -> None:
    print()
    print("stiefel benchmarks, %s, %s, %d cores, options: %s" % (
        summary["date"], summary["host"], summary["cores"], summary["options"] or "(none)"))
    print("load average (1/5/15 min): %s at start, %s at end"
          % (fmt_load(summary["load_start"]), fmt_load(summary["load_end"])))
    widths = [7, max([len(r[1]) for r in rows] + [11]), 9, 9, 6]
    head = ("bench", "measurement", "value", "target", "status")
    line = "  ".join("%-*s" % (w, h) for w, h in zip(widths, head)) + "  note"
    print(line)
    print("-" * len(line))
    current = None
    for group, label, value, target, note, ok in rows:
        if group != current:
            current = group
            bench = summary["benchmarks"].get(group, {})
            if bench.get("load_start"):
                print("[%s: %s, %s s, load %s -> %s%s]" % (
                    group, bench.get("status", "?"), bench.get("seconds", "?"), fmt_load(bench["load_start"]),
                    fmt_load(bench.get("load_end")), ", from an earlier run" if bench.get("collected_only") else ""))
        print("  ".join(["%-*s" % (widths[0], group), "%-*s" % (widths[1], label), "%*s" % (widths[2], value),
                         "%-*s" % (widths[3], target), "%-*s" % (widths[4], status(ok))]) + "  " + note)
    met = sum(1 for r in rows if r[5] is True)
    missed = sum(1 for r in rows if r[5] is False)
    print("targets: %d met, %d missed (benchmarks measure; nothing here fails a run)" % (met, missed))


# ------------------------------------------------------------------ the chart

def render_chart(summary: dict, path: Path) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    groups = []  # (label, [(bar label, ratio)], target)
    nbd = (summary["benchmarks"].get("nbd") or {}).get("data") or {}
    cells = {}
    for run in nbd.get("runs", []):
        cells.setdefault((run["rate"], run["server"]), []).append(
            ("%s C%d" % (run["direction"], run["connections"]), run["ratio"],
             run.get("best_ratio") if run.get("repeats", 1) > 1 else None))
    for (rate, server), bars in cells.items():
        groups.append(("%s\n%s" % (rate, server), bars, TARGET_NBD))
    pay = (summary["benchmarks"].get("payload") or {}).get("data") or {}
    pbars = {}
    for row in pay.get("rows", []):
        if "ratio" in row and row["path"] in ("iter/receive_payload", "plain TCP copy"):
            pbars.setdefault(row["size_mb"], []).append(
                ("payload" if row["path"] == "iter/receive_payload" else "plain TCP", row["ratio"],
                 row.get("best_ratio") if len(row.get("runs", [])) > 1 else None))
    for size_mb, bars in sorted(pbars.items()):
        groups.append(("payload\n%d MB" % size_mb, bars, TARGET_PAYLOAD))
    if not groups:
        log("chart: no NBD or payload numbers, nothing drawn")
        return
    colours = {"read C1": "#4c72b0", "read C4": "#8fb0e0", "write C1": "#dd8452", "write C4": "#f2c09a",
               "payload": "#55a868", "plain TCP": "#b5d9b9"}
    fig, ax = plt.subplots(figsize=(11, 4.6), dpi=90)
    x = 0.0
    ticks, labels, seen = [], [], set()
    width = 0.2
    for label, bars, target in groups:
        start = x
        for name, ratio, best in bars:
            ax.bar(x, 100 * ratio, width, color=colours.get(name, "#999999"),
                   label=name if name not in seen else None, edgecolor="white", linewidth=0.5)
            seen.add(name)
            if best is not None:  # bars are medians; the tick is the best run
                ax.hlines(100 * best, x - width / 3, x + width / 3, colors="#333333", linewidth=1.2,
                          label=None if "best run" in seen else "best run")
                seen.add("best run")
            x += width
        ax.hlines(100 * target, start - width / 2, x - width / 2, colors="#c44e52", linewidth=1.6,
                  label=None if "target" in seen else "target")
        seen.add("target")
        ticks.append((start + x - width) / 2)
        labels.append(label)
        x += width * 1.6
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("% of TCP payload ceiling (MTU 1500)\nmedian of the runs")
    ax.set_ylim(0, 110)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    size = nbd.get("size_bytes")
    ax.set_title("stiefel benchmarks %s: NBD%s and boot payload (2.5GbE) vs shaped line rate "
                 "(targets: NBD 93 %%, payload 90 %%)"
                 % (summary["date"][:10], " %d MiB" % (size >> 20) if size else ""), fontsize=10)
    fig.text(0.99, 0.01, "%d cores, load %s -> %s, options: %s" % (
        summary["cores"], fmt_load(summary["load_start"]), fmt_load(summary["load_end"]),
        summary["options"] or "(none)"), ha="right", fontsize=7, color="#555555")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)
    log("chart: %s (%d bytes)" % (path, path.stat().st_size))


def randio_base(path: str, paths: list) -> str:
    """The plain direct path a random I/O path is compared with: the one with as many connections."""
    spread = re.search(r" \d+ conns$", path)
    base = "plain direct" + (spread.group(0) if spread else "")
    return base if base in paths else "plain direct"


def render_randio_chart(summary: dict, path: Path) -> None:
    """Random I/O against plain direct: IOPS share at QD32 and latency multiple at QD1, per path."""
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    data = (summary["benchmarks"].get("randio") or {}).get("data") or {}
    cells = {(c["path"], c["op"], c["depth"]): c for c in data.get("cells", [])}
    # each path against the plain direct path with as many connections ("... 4 conns": "plain direct 4 conns")
    bases = {p: randio_base(p, data.get("paths", [])) for p in data.get("paths", [])}
    paths = [p for p in data.get("paths", []) if p != "raw TCP" and not p.startswith("plain direct")]
    if not paths or not any(k[0] == "plain direct" for k in cells):
        log("random I/O chart: no numbers, nothing drawn")
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), dpi=90)
    # bars are clipped: qemu-nbd's tens of times would flatten every other bar
    panels = ((axes[0], 32, "iops", "QD32 IOPS / plain direct (with as many connections)", 0.85, ">= 0.85", 2.0),
              (axes[1], 1, "lat_mean_us", "QD1 mean latency / plain direct (with as many connections)", 1.3,
               "<= 1.3", 6.0))
    for ax, depth, key, title, target, target_label, clip in panels:
        width = 0.38
        for i, (op, colour) in enumerate((("randread", "#4c72b0"), ("randwrite", "#dd8452"))):
            values = []
            for name in paths:
                base = cells.get((bases[name], op, depth))
                cell = cells.get((name, op, depth))
                values.append(cell[key] / base[key] if cell and base and base[key] else 0.0)
            xs = [j + (i - 0.5) * width for j in range(len(paths))]
            ax.bar(xs, [min(v, clip) for v in values], width, color=colour, label=op)
            for x, v in zip(xs, values):
                ax.text(x, min(v, clip) + clip / 100, "%.2f" % v, ha="center", fontsize=7)
        ax.axhline(target, color="#c44e52", linewidth=1.4, label="target %s" % target_label)
        ax.set_xticks(range(len(paths)))
        ax.set_xticklabels([textwrap.fill(p, 11) for p in paths], fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, clip * 1.1)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("stiefel random I/O %s: 4 KiB, fio nbd engine, shaped 2.5 GbE, median of %s pass(es) "
                 "(bars clipped, labels exact)" % (summary["date"][:10], data.get("repeat", "?")), fontsize=10)
    fig.text(0.99, 0.01, "%d cores, load %s -> %s" % (
        summary["cores"], fmt_load(data.get("load_start")), fmt_load(data.get("load_end"))),
        ha="right", fontsize=7, color="#555555")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)
    log("random I/O chart: %s (%d bytes)" % (path, path.stat().st_size))


# ------------------------------------------------------------------ main

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--quick", action="store_true",
                        help="NBD: one pass of 256 MiB instead of three of 1 GiB; payload: 3 runs instead of 5")
    parser.add_argument("--only", default=",".join(BENCHES), help="comma list of: %s" % ", ".join(BENCHES))
    parser.add_argument("--skip-cold", action="store_true", help="image.py: reuse the last cold build")
    parser.add_argument("--chart", default=None,
                        help="write a PNG bar chart here (e.g. docs/bench.png) and the random I/O one beside it "
                             "(docs/bench-randio.png)")
    parser.add_argument("--collect-only", action="store_true",
                        help="do not run anything: summarise the JSON already in the cache directory")
    args = parser.parse_args(argv)
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(only) - set(BENCHES))
    if unknown or not only:
        parser.error("--only: unknown benchmark(s) %s; choose from %s"
                     % (", ".join(unknown) or "(none)", ", ".join(BENCHES)))
    args.only = [b for b in BENCHES if b in only]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = cache_dir() / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    flags = (("--quick", args.quick), ("--skip-cold", args.skip_cold), ("--collect-only", args.collect_only))
    options = " ".join(flag for flag, on in flags if on)
    if args.only != list(BENCHES):
        options = (options + " --only " + ",".join(args.only)).strip()
    summary = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
               "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
               "options": options, "load_start": loadavg(), "benchmarks": {}}
    previous = load_json(out_dir / "summary.json") if args.collect_only else None
    if previous:  # re-render the last run: keep its date, options and load figures
        for key in ("date", "host", "cores", "kernel", "python", "options", "load_start", "load_end"):
            if key in previous:
                summary[key] = previous[key]
        summary["rerendered"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    started = time.monotonic()
    for i, name in enumerate(args.only, 1):
        out = out_dir / ("%s.json" % name)
        if args.collect_only:
            info = {k: v for k, v in ((previous or {}).get("benchmarks", {}).get(name) or {}).items() if k != "data"}
            if info.get("status") not in ("ok", "collected"):  # its JSON came from elsewhere: no time or load
                info = {}
            info.update(status="collected", collected_only=True)
        else:
            log("benchmark %d/%d: %s (load %s)" % (i, len(args.only), name, fmt_load(loadavg())))
            info = run_one(name, args, out)
            log("benchmark %d/%d: %s %s in %s s"
                % (i, len(args.only), name, info["status"], info.get("seconds", 0)))
        data = load_json(out) if info["status"] in ("ok", "collected") else None
        if data is None and info["status"] == "collected":
            info.update(status="missing", reason="no %s" % out)
        if isinstance(data, dict) and data.get("skipped"):  # --collect-only of a skipped run
            info.update(status="skipped", reason=data["skipped"])
            data = None
        info["data"] = data
        summary["benchmarks"][name] = info
    if not previous:
        summary["load_end"] = loadavg()
    summary["seconds_total"] = round(time.monotonic() - started, 1)
    rows = build_rows(summary)
    summary["table"] = [{"bench": r[0], "measurement": " ".join(r[1].split()), "value": r[2], "target": r[3],
                         "note": r[4], "met": r[5]} for r in rows]
    print_table(summary, rows)
    path = out_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=1) + "\n")
    log("saved %s (%.0f s total)" % (path, summary["seconds_total"]))
    if args.chart:
        chart = Path(args.chart)
        for render, target in ((render_chart, chart), (render_randio_chart, chart.with_name(chart.stem + "-randio.png"))):
            try:
                render(summary, target)
            except Exception as exc:  # pylint: disable=broad-except  # a chart never fails the run
                log("chart failed: %s: %s" % (type(exc).__name__, exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
