"""The agents' console: network text escaped, drops summarised instead of logged one by one."""

from __future__ import annotations

import io

from hypothesis import given, settings, strategies as st

from stiefel_runtime.common import Console, DropSummary, escape, reason_kind


class Clock(object):
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def console(**kwargs):
    clock = Clock()
    out = io.StringIO()
    return Console("t", stream=out, clock=clock, timer=False, **kwargs), clock, out


def test_escape_terminal_controls_and_forged_lines():
    text = "GET /\x1b[2J\x1b]0;owned\x07/x\r\n[   1.000] stiefel-server: ready\u202e\x7f\x9b\\"
    out = escape(text)
    assert out == ("GET /\\x1b[2J\\x1b]0;owned\\x07/x\\x0d\\x0a[   1.000] stiefel-server: ready\\u202e\\x7f\\x9b\\\\")
    assert "\x1b" not in out and "\n" not in out and "\r" not in out


def test_escape_keeps_ordinary_text_and_undecodable_bytes_are_visible():
    assert escape("fe80::1%veth0: bad MAC (3 bytes) ü ✓") == "fe80::1%veth0: bad MAC (3 bytes) ü ✓"
    assert escape(b"\xff\x1b".decode("utf-8", "surrogateescape")) == "\\udcff\\x1b"
    assert escape("a\u2028b\u2029c\u200bd") == "a\\u2028b\\u2029c\\u200bd"


def test_escape_limit_marks_the_cut():
    assert escape("x" * 50, limit=10) == "x" * 10 + "..."
    assert escape("\x00" * 10, limit=9) == "\\x00\\x00..."


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_escape_output_is_one_printable_line(text):
    out = escape(text)
    assert all(ch == " " or ch.isprintable() for ch in out)
    # injective enough to read back: every backslash in the output starts an escape
    escaped = sum(1 for ch in text if ch != "\\" and escape(ch).startswith("\\"))
    assert out.replace("\\\\", "").count("\\") == escaped


def test_console_lines_are_escaped():
    con, _clock, out = console()
    con("http fe80::1: GET /\x1b[31mred\nfake")
    con.drop("http fe80::1%2", "GET /\x1b]0;x\x07 -> 404 no such resource")
    con.marker("ready\x1b")
    text = out.getvalue()
    assert "\x1b" not in text and "\x07" not in text
    assert text.count("\n") == 3
    assert "GET /\\x1b[31mred\\x0afake" in text and "stiefel" not in text


def test_reason_kind_folds_varying_parts():
    assert reason_kind("datagram of 17 bytes: too short") == reason_kind("datagram of 3 bytes: too short")
    assert reason_kind("GET '/\\x1bxyz' -> 404") == reason_kind("GET '/abc' -> 404")
    assert reason_kind("bad MAC") != reason_kind("unknown type")
    assert len(reason_kind("x" * 500)) <= 60


def test_drop_flood_is_summarised_per_interval():
    con, clock, out = console(drop_interval=10.0, drop_burst=3)
    for number in range(10000):
        con.drop("fe80::bad%2", "datagram of %d bytes: bad MAC" % (number % 90))
        if number % 3 == 0:
            con.drop("fe80::ugly%2", "unknown message type %d" % number)
        clock.now += 0.0005
    con.drop("fe80::bad%2", "bad MAC")  # 5 s in: still the same interval
    assert con.dropped == 10000 + 3334 + 1
    assert out.getvalue().count("dropped input from") == 3
    clock.now += 10.0
    con.tick()
    text = out.getvalue()
    lines = text.splitlines()
    assert len(lines) == 4, text
    summary = lines[-1]
    assert "dropped 13332 more inputs in" in summary
    assert "fe80::bad%2: 9999 (datagram of # bytes: bad MAC 9998, bad MAC 1)" in summary
    assert "fe80::ugly%2: 3333 (unknown message type # 3333)" in summary
    # the next interval starts afresh: its first drops are shown again
    con.drop("fe80::bad%2", "bad MAC")
    assert out.getvalue().count("dropped input from") == 4


def test_summary_comes_with_the_next_drop_when_no_tick():
    con, clock, out = console(drop_interval=1.0, drop_burst=1)
    con.drop("a", "x")
    con.drop("a", "x")
    clock.now += 2
    con.drop("b", "y")
    lines = out.getvalue().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        "dropped input from a: x", "dropped 1 more inputs in 2.0 s (not logged one by one): a: 1 (x 1)",
        "dropped input from b: y"]


def test_summary_bounds_sources_and_reasons():
    summary = DropSummary(interval=10.0, burst=0, max_sources=4, top=2)
    for number in range(1000):
        summary.offer(0.0, "peer%d" % (number % 50), "reason %s" % chr(65 + number % 20))
    assert len(summary.by_source) == 4
    assert all(len(kinds) <= 8 for _count, kinds in summary.by_source.values())
    (line,) = summary.flush(10.0)
    assert line.startswith("dropped 1000 more inputs in 10.0 s")
    assert "peer0: 20" in line and "peer1: 20" in line
    assert "960 from 3 other sources" in line
    assert summary.flush(20.0) == []


def test_nothing_suppressed_means_no_summary():
    con, clock, out = console(drop_burst=5)
    for _attempt in range(5):
        con.drop("a", "x")
    clock.now += 60
    con.tick()
    assert out.getvalue().count("\n") == 5
    assert "more inputs" not in out.getvalue()


def test_timer_writes_a_due_summary_without_further_input():
    out = io.StringIO()
    con = Console("t", stream=out, drop_interval=0.2, drop_burst=1)
    con.drop("a", "x")
    con.drop("a", "x")
    import time

    deadline = time.monotonic() + 5
    while "more inputs" not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "dropped 1 more inputs" in out.getvalue()
