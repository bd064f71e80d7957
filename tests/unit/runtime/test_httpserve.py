"""The bounded HTTP front against idle, slow, oversized and too many connections (on ::1)."""

from __future__ import annotations

import contextlib
import http.client
import resource
import socket
import threading
import time

import pytest

from stiefel_runtime import httpserve


class Hello(httpserve.PrefetchedRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self):  # noqa: N802
        body = b"hello " + self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        data = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # pylint: disable=redefined-builtin
        pass


@contextlib.contextmanager
def serving(limits, log=None):
    """A front on ::1 with ``limits``: ``(server, port, drop reasons)``."""
    drops = []
    server = httpserve.BoundedHTTPServer(Hello, limits=limits, log_drop=lambda source, reason: drops.append(reason),
                                         log=log or (lambda text: None))
    port = server.listen("lo", "::1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, port, drops
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def front():
    limits = httpserve.Limits(header_timeout=1.0, io_timeout=2.0, max_head=1024, per_peer=4, max_pending=6,
                              workers=2, queue_size=2)
    with serving(limits) as parts:
        yield parts


def get(port, path="/x", timeout=5):
    conn = http.client.HTTPConnection("::1", port, timeout=timeout)
    conn.request("GET", path)
    resp = conn.getresponse()
    return resp.status, resp.read()


def test_serves_requests_and_bodies(front):
    _server, port, drops = front
    assert get(port, "/a") == (200, b"hello /a")
    conn = http.client.HTTPConnection("::1", port, timeout=5)
    conn.request("POST", "/p", body=b"z" * 5000)
    assert conn.getresponse().read() == b"z" * 5000
    assert drops == []


def test_idle_and_slow_connections_time_out_and_are_named(front):
    server, port, drops = front
    idle = socket.create_connection(("::1", port))
    slow = socket.create_connection(("::1", port))
    slow.sendall(b"GET /payl")
    time.sleep(0.3)
    slow.sendall(b"oad/")  # trickling does not extend the deadline
    deadline = time.monotonic() + 5
    while server.counters["timed_out"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.counters["timed_out"] == 2
    assert idle.recv(10) == b"" and slow.recv(10) == b""
    assert drops.count(
        "no complete request within 1 s (slow or idle connection)") == 2
    assert get(port) == (200, b"hello /x")


def test_per_peer_cap_refuses_at_accept(front):
    server, port, drops = front
    held = [socket.create_connection(("::1", port)) for _conn in range(4)]
    extra = socket.create_connection(("::1", port))
    assert extra.recv(10) == b""  # closed at once
    assert server.counters["per_peer"] >= 1
    assert any("more than 4 connections at once from one address" in reason for reason in drops)
    for sock in held:
        sock.close()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            assert get(port) == (200, b"hello /x")
            break
        except (ConnectionError, http.client.HTTPException):
            time.sleep(0.1)  # the server notices the closed ones on its next read
    else:
        pytest.fail("not served after the held connections closed")


def test_pending_cap_evicts_the_oldest_not_the_newcomer():
    limits = httpserve.Limits(header_timeout=30.0, per_peer=100, max_pending=5, workers=1, queue_size=1)
    with serving(limits) as (server, port, drops):
        idle = [socket.create_connection(("::1", port)) for _conn in range(20)]
        assert get(port) == (200, b"hello /x")  # a client that speaks at once is served
        assert server.counters["evicted"] >= 15
        assert any("connection flood: oldest of 5 unfinished requests closed" in reason for reason in drops)
        for sock in idle:
            sock.close()


def test_oversized_head_gets_431_without_a_reset(front):
    server, port, drops = front
    sock = socket.create_connection(("::1", port))
    sock.sendall(b"GET /" + b"A" * 20000 + b" HTTP/1.0\r\n\r\n")
    assert sock.recv(100).startswith(b"HTTP/1.0 431 ")
    sock.close()
    assert server.counters["oversized"] == 1
    assert any("request head over 1024 bytes" in reason for reason in drops)


def test_busy_workers_answer_503():
    limits = httpserve.Limits(header_timeout=5.0, io_timeout=1.5, per_peer=10, workers=1, queue_size=1)
    with serving(limits) as (_server, port, drops):
        # the one worker and the one queue place taken by requests whose bodies never come
        stalled = []
        for _round in range(2):
            sock = socket.create_connection(("::1", port))
            sock.sendall(b"POST /p HTTP/1.0\r\nContent-Length: 100\r\n\r\n")
            stalled.append(sock)
            time.sleep(0.1)
        other = socket.create_connection(("::1", port))
        other.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert other.recv(100).startswith(b"HTTP/1.0 503")
        assert "all 1 request threads busy: 503" in drops
        for sock in stalled:
            sock.close()
        deadline = time.monotonic() + 5
        while get(port)[0] != 200:
            assert time.monotonic() < deadline, "the worker stayed busy"
            time.sleep(0.1)


def test_listeners_come_and_go_while_serving(front):
    server, port, _drops = front
    second = server.listen("again", "::1", 0)
    assert sorted(server.listening()) == ["again", "lo"]
    assert get(second) == (200, b"hello /x")
    server.unlisten("again")
    assert "again" not in server.listening()
    # The selector thread closes the socket on its next turn; until then the kernel may still take a
    # connection into the backlog. Poll until connecting fails (refused, or reset when it raced the close).
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("::1", second), timeout=2).close()
        except (ConnectionRefusedError, ConnectionResetError):
            break
        assert time.monotonic() < deadline, "still accepting 30 s after unlisten"
        time.sleep(0.05)
    assert get(port) == (200, b"hello /x")


def test_limits_fit_the_file_limit():
    small = httpserve.Limits.for_fd_limit(256)
    assert small.max_pending + small.workers + small.queue_size < 256 - 64
    assert httpserve.Limits.for_fd_limit(1 << 20).max_pending == httpserve.Limits().max_pending
    assert httpserve.Limits.for_fd_limit(resource.RLIM_INFINITY).max_pending == httpserve.Limits().max_pending


def test_raise_fd_limit_reaches_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))
        got = httpserve.raise_fd_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == got
        assert got == hard or hard == resource.RLIM_INFINITY
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_request_body_that_never_comes_times_out():
    with serving(httpserve.Limits(io_timeout=0.5, workers=1)) as (_server, port, _drops):
        sock = socket.create_connection(("::1", port))
        sock.sendall(b"POST /p HTTP/1.0\r\nContent-Length: 100\r\n\r\n")
        started = time.monotonic()
        sock.settimeout(10)
        assert sock.recv(100) == b""
        assert time.monotonic() - started < 5
        assert get(port) == (200, b"hello /x")  # the worker is free again
