"""bench/: run.py's report of a skipped benchmark, and random_io.py's pieces that need no namespaces."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"


def load(name: str):
    """bench/ is a folder of scripts, not a package: load one by path."""
    spec = importlib.util.spec_from_file_location("stiefel_bench_%s" % name, BENCH / ("%s.py" % name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(name="run")
def fixture_run():
    return load("run")


@pytest.fixture(name="randio")
def fixture_randio():
    return load("random_io")


def test_skip_cold_on_a_fresh_cache_is_a_skip_not_a_failure(run, tmp_path, monkeypatch, capsys):
    """A fresh checkout has no earlier bench build: image.py really runs and says it skipped."""
    monkeypatch.setenv("STIEFEL_CACHE_DIR", str(tmp_path))
    assert run.main(["--only", "image", "--skip-cold"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "bench" / "summary.json").read_text())
    image = summary["benchmarks"]["image"]
    assert image["status"] == "skipped"
    assert "no earlier bench build" in image["reason"]
    assert "(skipped: --skip-cold and no earlier bench build" in out
    assert "failed" not in out
    # re-rendering the last run keeps it a skip
    assert run.main(["--only", "image", "--collect-only"]) == 0
    summary = json.loads((tmp_path / "bench" / "summary.json").read_text())
    assert summary["benchmarks"]["image"]["status"] == "skipped"


def test_a_benchmark_without_fresh_json_is_still_a_failure(run, tmp_path):
    args = run.parse_args(["--only", "image"])
    run.SCRIPTS["image"] = "does-not-exist.py"  # python exits 2: no JSON
    try:
        info = run.run_one("image", args, tmp_path / "image.json")
    finally:
        run.SCRIPTS["image"] = "image.py"
    assert info["status"] == "failed"
    assert "no fresh JSON" in info["reason"]


def test_the_proxy_program_is_read_from_the_attach_script(randio):
    script = randio.attach_proxy_script(randio.ATTACH_SCRIPT.read_text())
    assert script.startswith("rp=$((20000 + $$ % 20000)); bash -c ")
    assert "exec -a @socat socat" in script and "exec -a @nbdkit nbdkit " in script
    assert "--filter=retry nbd hostname=127.0.0.1" in script
    assert randio.TLS_OPTIONS in script
    assert "-P \"$4\"" in script and "-U \"$2\"" in script
    plain = randio.proxy_variant(script, tls=False)
    assert "tls=" not in plain and "hostname=127.0.0.1" in plain
    assert "exec -a @nbdkit nbdkit --threads 32 " in randio.proxy_variant(script, threads=32)


@pytest.mark.parametrize("text", ["", "exec nbdkit nbd socket-fd=3", "bash -c 'exec nbdkit -f --run true'"])
def test_a_script_without_the_daemon_proxy_is_refused(randio, text):
    with pytest.raises(ValueError):
        randio.attach_proxy_script(text)


def fio_report(side: str, ios: int = 1000, iops: float = 2500.0) -> str:
    job = {"jobname": "x", "error": 0,
           "read": {"total_ios": 0, "iops": 0.0}, "write": {"total_ios": 0, "iops": 0.0}}
    job[side] = {"total_ios": ios, "iops": iops, "lat_ns": {"mean": 400000.0},
                 "clat_ns": {"mean": 390000.0, "percentile": {"50.000000": 380000, "99.000000": 900000}}}
    return "note: both iodepth >= 1 and synchronous I/O engine are selected\n" + json.dumps({"jobs": [job]})


@pytest.mark.parametrize("side", ["read", "write"])
def test_parse_fio_takes_the_side_that_did_io(randio, side):
    got = randio.parse_fio(fio_report(side))
    assert got == {"iops": 2500.0, "lat_mean_us": 400.0, "lat_p50_us": 380.0, "lat_p99_us": 900.0, "ios": 1000}


@pytest.mark.parametrize("text", [
    "", "fio: engine nbd not loadable", "{", "{}", '{"jobs": []}', '{"jobs": [{}, {}]}',
    '{"jobs": [{"error": 5}]}', '{"jobs": [{"read": {"total_ios": 0}}]}', '{"jobs": "x"}',
])
def test_parse_fio_refuses_hostile_or_empty_reports(randio, text):
    with pytest.raises((ValueError, TypeError, AttributeError, KeyError)):
        randio.parse_fio(text)


def test_judge_applies_the_issue_18_targets(randio):
    def cell(iops, lat):
        return {"iops": iops, "lat_mean_us": lat}
    cells = {("plain direct", "randread", 32): cell(10000, 3200), ("proxy TLS", "randread", 32): cell(8600, 3700),
             ("plain direct", "randread", 1): cell(5000, 200), ("proxy TLS", "randread", 1): cell(3000, 330),
             ("plain direct", "randwrite", 32): cell(10000, 3200), ("proxy TLS", "randwrite", 32): cell(8400, 3800)}
    rows = {(r["op"], r["depth"]): r for r in randio.judge(cells)}
    assert rows[("randread", 32)]["met"] is True
    assert rows[("randread", 1)]["met"] is False and rows[("randread", 1)]["ratio"] == pytest.approx(1.65)
    assert rows[("randwrite", 32)]["met"] is False
    assert ("randwrite", 1) not in rows  # a missing cell gives no verdict rather than a wrong one


def test_median_cells_skip_errors_and_take_medians(randio):
    samples = [{"path": "p", "op": "randread", "depth": 1, "iops": x, "lat_mean_us": 1e6 / x} for x in (1, 3, 2)]
    samples.append({"path": "p", "op": "randread", "depth": 1, "error": "fio died"})
    cell = randio.median_cells(samples)[("p", "randread", 1)]
    assert (cell["iops"], cell["best_iops"], cell["worst_iops"], cell["runs"]) == (2, 3, 1, 3)


def test_run_table_rows_for_random_io(run):
    data = {"cells": [{"path": "proxy TLS", "op": "randread", "depth": 32, "iops": 9000.0, "lat_mean_us": 3500.0,
                       "runs": 3}],
            "targets": [{"name": "randread QD32 IOPS proxy TLS / plain direct", "ratio": 0.9, "target": ">= 0.85",
                         "met": True}]}
    rows = run.randio_rows(data)
    assert rows[0][2] == "9000 IOPS" and rows[0][5] is None
    assert rows[1][2:4] == ("0.90", ">= 0.85") and rows[1][5] is True


def test_thread_sampler_counts_a_thread_that_exits_while_sampling(randio):
    """nbdkit's per-connection threads end with fio's connection; their CPU time must not vanish."""
    sampler = randio.ThreadSampler({"me": os.getpid()})
    sampler.start()

    def burn():
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass
    worker = threading.Thread(target=burn)
    worker.start()
    worker.join()
    cpu, wait = sampler.stop()["me"]
    assert cpu >= 0.15e9  # most of the exited thread's 0.3 s of CPU, seen by the 0.1 s samples
    assert wait >= 0


def test_random_io_chart_is_drawn_from_the_summary(run, tmp_path):
    cells = [{"path": p, "op": op, "depth": d, "iops": 1000.0 * (2 if p == "plain direct" else 1),
              "lat_mean_us": 50.0 * (1 if p == "plain direct" else 3)}
             for p in ("plain direct", "proxy TLS") for op in ("randread", "randwrite") for d in (1, 32)]
    summary = {"date": "2026-12-01T18:00:00", "cores": 2,
               "benchmarks": {"randio": {"data": {"cells": cells, "paths": ["raw TCP", "plain direct", "proxy TLS"],
                                                  "repeat": 3, "load_start": [1, 1, 1], "load_end": [2, 2, 2]}}}}
    out = tmp_path / "bench-randio.png"
    run.render_randio_chart(summary, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run.render_randio_chart({"date": "x", "cores": 2, "benchmarks": {}}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


@pytest.fixture(name="nbd")
def fixture_nbd():
    return load("nbd_throughput")


def test_proxy_levers_change_only_what_they_name(randio):
    text = randio.ATTACH_SCRIPT.read_text()
    real = randio.attach_proxy_script(text)
    direct = randio.attach_proxy_script(text, relay=False)
    assert "socat" not in direct and 'hostname="$8"' in direct and randio.TLS_OPTIONS in direct
    assert "--filter=retry" in direct and direct.endswith('5 2 "" "$0"')
    nodelay = randio.attach_proxy_script(text, nodelay=True)
    assert nodelay.count("nodelay") == 2 and nodelay.replace("fork,nodelay", "fork").replace(
        "$2,nodelay,", "$2,") == real
    bare = randio.proxy_variant(real, retry=False)
    assert "retry" not in bare and randio.TLS_OPTIONS in bare and "hostname=127.0.0.1" in bare
    with pytest.raises(ValueError):
        randio.proxy_variant(bare, retry=False)
    with pytest.raises(ValueError):
        randio.attach_proxy_script(text.replace("hostname=127.0.0.1 ", "hostname=::1 "), relay=False)


@pytest.mark.parametrize("depth, conns, iodepth, jobs", [(32, 4, 8, 4), (1, 4, 1, 1), (32, 1, 32, 1)])
def test_fio_spreads_the_queue_over_the_laptops_connections(randio, depth, conns, iodepth, jobs):
    argv = randio.fio_argv("nbd://x/", "randread", depth, 3, 1 << 20, conns)
    assert "--iodepth=%d" % iodepth in argv
    assert ("--numjobs=%d" % jobs in argv and "--group_reporting" in argv) == (jobs > 1)


def test_judge_also_judges_the_spread_pair(randio):
    cells = {(randio.BASELINE_CONNS, "randread", 32): {"iops": 20000, "lat_mean_us": 1600},
             (randio.REAL_PATH_CONNS, "randread", 32): {"iops": 10000, "lat_mean_us": 3200}}
    rows = randio.judge(cells)
    assert [(r["name"], r["met"]) for r in rows] == [
        ("randread QD32 IOPS proxy TLS 4 conns / plain direct 4 conns", False)]
    assert rows[0]["ratio"] == pytest.approx(0.5)


def test_thread_times_follows_the_relays_children(randio):
    child = subprocess.Popen(["sleep", "30"])  # pylint: disable=consider-using-with
    try:
        assert wait_until(lambda: str(child.pid) in randio.thread_times(os.getpid(), children=True))
        assert str(child.pid) not in randio.thread_times(os.getpid())
    finally:
        child.kill()
        child.wait()


def wait_until(predicate, seconds=5.0):
    end = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def test_nbd_plan_beyond_2_5_gbe_runs_only_stiefels_exports(nbd):
    plan = nbd.build_plan(["10GbE", nbd.UNSHAPED])
    assert {p[1] for p in plan} == {"nbdkit", "nbdkit TLS"} and len(plan) == 16
    assert [p[0] for p in plan] == ["10GbE"] * 8 + [nbd.UNSHAPED] * 8  # one link at a time
    full = nbd.build_plan(list(nbd.RATES))
    assert {p[1] for p in full if p[0] == "2.5GbE"} == {"nbdkit", "nbd-server", "nbdkit TLS", "nbdkit TLS default"}
    with pytest.raises(SystemExit) as exc:
        nbd.main(["--rates", "40GbE"])
    assert exc.value.code == 2


def test_run_table_judges_fast_links_against_raw_tcp_not_a_line_rate(run):
    data = {"calibration": {"veth": {"raw_tcp_Bps": 2.0e9, "raw_tcp_ratio": 1.0, "htb_rate_bit": None}},
            "runs": [{"rate": "10GbE", "server": "nbdkit TLS", "direction": "read", "connections": 4,
                      "ratio": 0.40, "ratio_to_raw_tcp": 0.80, "load1": 3.2},
                     {"rate": "veth", "server": "nbdkit", "direction": "write", "connections": 1,
                      "ratio": 0.5, "ratio_to_raw_tcp": 0.5}]}
    rows = run.nbd_rows(data)
    assert rows[0][1:3] == ("veth raw TCP, no shaper (the machine's ceiling)", "2000 MB/s")
    assert rows[1][2:4] == ("80.00 %", "") and rows[1][5] is None
    assert "40.00 % of the line's ceiling" in rows[1][4] and "load 3.2" in rows[1][4]
    assert rows[2][2] == "50.00 %" and "line" not in rows[2][4]


def test_payload_at_10_gbe_is_reported_not_judged(run):
    data = {"rate_mbit": 10000, "rows": [
        {"size_mb": 200, "path": "iter/receive_payload", "ratio": 0.3, "MBps": 353.0, "rss_peak_kb": 20480},
        {"size_mb": 200, "path": "receiver part: SHA-256", "ratio": 1.2, "MBps": 1400.0}]}
    rows = run.payload_rows(data, "payload10")
    assert rows[0][:4] == ("payload10", "10 GbE 200 MB iter/receive_payload", "30.00 %", "") and rows[0][5] is None
    assert rows[1][1] == "10 GbE 200 MB receiver part: SHA-256"
    assert rows[2][1] == "10 GbE 200 MB receiver peak RSS"
    two = run.payload_rows({"rows": [{"size_mb": 50, "path": "iter/receive_payload", "ratio": 0.95, "MBps": 280.0}]})
    assert two[0][3] == ">= 90 %" and two[0][5] is True


def test_receive_parts_time_the_receivers_pieces_on_a_real_stream(tmp_path):
    pay = load("payload")
    from stiefel_runtime import messages, payload  # pylint: disable=import-outside-toplevel
    kernel, initrd = tmp_path / "kernel", tmp_path / "initrd"
    kernel.write_bytes(os.urandom(300000))
    initrd.write_bytes(os.urandom(700000))
    key, cn, sn = os.urandom(32), messages.new_nonce(), messages.new_nonce()
    manifest = payload.build_manifest(str(kernel), str(initrd), "ro")
    stream = tmp_path / "stream"
    with open(stream, "wb") as out:
        for record in payload.iter_payload(key, cn, sn, manifest, {"kernel": str(kernel), "initrd": str(initrd)}):
            out.write(record)
    (tmp_path / "out").mkdir()
    parts = pay.receive_parts(str(stream), key, cn, str(tmp_path / "out"))
    assert parts["plaintext_bytes"] > 1000000  # the manifest, then both files
    assert set(parts) == {"read + AES-GCM open", "SHA-256", "write (tmpfs)", "plaintext_bytes"}
    assert list((tmp_path / "out").iterdir()) == []


def test_random_io_chart_compares_spread_paths_with_the_spread_baseline(run):
    paths = ["raw TCP", "plain direct", "proxy TLS", "plain direct 4 conns", "proxy TLS 4 conns"]
    assert run.randio_base("proxy TLS 4 conns", paths) == "plain direct 4 conns"
    assert run.randio_base("proxy TLS", paths) == "plain direct"
    assert run.randio_base("proxy TLS 8 conns", paths) == "plain direct"  # no such baseline measured
