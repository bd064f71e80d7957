# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The server's HTTP front: bounded in connections, time and threads, whatever the link sends.

Anyone on the link can connect to the payload port. A thread per connection
with no read timeout (``ThreadingHTTPServer``) let about 1,000 idle
connections use up the agent's file descriptors, and the real client then
found no usable server. Here:

* one selector thread accepts and reads request heads; a connection gets
  ``header_timeout`` seconds (in total, not per byte: slow senders gain
  nothing) and ``max_head`` bytes to send its request line and headers;
* at most ``per_peer`` connections per source address are open at once,
  further ones are closed at accept;
* at most ``max_pending`` connections wait for their head (kept well below
  the file limit); a new one beyond that evicts the oldest waiting one, so
  a flood from many addresses cannot lock out a client that speaks at once;
* complete requests go to ``workers`` threads (queue ``queue_size``, beyond
  it 503); their sockets time out after ``io_timeout`` seconds of silence;
* every refused, evicted or timed-out connection is a drop on the console
  (which rate-limits and summarises them: one line names the flood).

Listening sockets can be added and removed while serving (one per
link-local address of the links in use).
"""

from __future__ import annotations

import collections
import http.server
import io
import queue
import resource
import selectors
import socket
import threading
import time

from stiefel_runtime.common import quiet_log


class Limits(object):
    """The HTTP front's bounds (defaults sized for one real client and a hostile link)."""

    def __init__(self, header_timeout=5.0, io_timeout=20.0, max_head=8192, per_peer=8, max_pending=256,
                 workers=8, queue_size=16, backlog=512):
        self.header_timeout = header_timeout
        self.io_timeout = io_timeout
        self.max_head = max_head
        self.per_peer = per_peer
        self.max_pending = max_pending
        self.workers = workers
        self.queue_size = queue_size
        self.backlog = backlog

    @classmethod
    def for_fd_limit(cls, soft_limit, **kwargs):
        """Limits whose connections fit in ``soft_limit`` files with room for everything else the agent opens."""
        limits = cls(**kwargs)
        if soft_limit == resource.RLIM_INFINITY or soft_limit < 0:
            return limits
        room = max(16, soft_limit - 128 - limits.workers - limits.queue_size)
        limits.max_pending = max(8, min(limits.max_pending, room // 2))
        return limits


def raise_fd_limit():
    """Raise the soft RLIMIT_NOFILE to the hard one (systemd's soft default is 1,024); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


class _Prefixed(io.RawIOBase):
    """A socket's byte stream with the request head the selector already read in front of it."""

    def __init__(self, head, sock):
        super().__init__()
        self._head = memoryview(head)
        self._sock = sock

    def readable(self):
        return True

    def readinto(self, buffer):
        if self._head:
            count = min(len(buffer), len(self._head))
            buffer[:count] = self._head[:count]
            self._head = self._head[count:]
            return count
        return self._sock.recv_into(buffer)


class _Writer(io.RawIOBase):
    """Unbuffered, complete writes (a socket file's ``write`` may send only part)."""

    def __init__(self, sock):
        super().__init__()
        self._sock = sock

    def writable(self):
        return True

    def write(self, data):
        self._sock.sendall(data)
        return len(data)


class PrefetchedRequestHandler(http.server.BaseHTTPRequestHandler):
    """A request handler for :class:`BoundedHTTPServer`: ``request`` is ``(socket, head bytes)``."""

    io_timeout = 20.0  # when the server has no Limits of its own

    def setup(self):
        self.connection, head = self.request
        limits = getattr(self.server, "limits", None)
        self.connection.settimeout(limits.io_timeout if limits is not None else self.io_timeout)
        self.rfile = io.BufferedReader(_Prefixed(head, self.connection))
        self.wfile = _Writer(self.connection)

    def finish(self):
        for stream in (self.wfile, self.rfile):
            try:
                stream.close()
            except OSError:
                pass


class _Pending(object):
    __slots__ = ("sock", "peer", "address", "deadline", "buffer", "discard")

    def __init__(self, sock, peer, address, deadline):
        self.sock = sock
        self.peer = peer
        self.address = address
        self.deadline = deadline
        self.buffer = bytearray()
        self.discard = False  # answered already (oversized head): read and drop until EOF, so no RST loses the answer


def _head_complete(buffer):
    return b"\r\n\r\n" in buffer or b"\n\n" in buffer


class BoundedHTTPServer(object):
    """Serve ``handler_class`` (a :class:`PrefetchedRequestHandler`) on listeners added with :meth:`listen`."""

    def __init__(self, handler_class, limits=None, log_drop=None, log=quiet_log, clock=time.monotonic):
        self.handler_class = handler_class
        self.limits = limits or Limits()
        self.log_drop = log_drop or (lambda source, reason: None)
        self.log = log
        self._clock = clock
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._lock = threading.Lock()
        self._commands = collections.deque()
        self._listeners = {}  # key -> socket
        self._pending = collections.OrderedDict()  # socket -> _Pending, oldest first
        self._peers = collections.Counter()  # peer address -> open connections (pending or in a worker)
        self._queue = queue.Queue(self.limits.queue_size)
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._workers = []
        self.counters = collections.Counter()

    # -- listeners (any thread)
    def listen(self, key, host, port, scope_id=0):
        """Bind and listen on ``(host, port, 0, scope_id)`` under ``key``; returns the bound port."""
        # IPv4 only for network boot's link address (firmware and GRUB speak IPv4 HTTP)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port, 0, scope_id) if family == socket.AF_INET6 else (host, port))
            sock.listen(self.limits.backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        with self._lock:
            old = self._listeners.pop(key, None)
            self._listeners[key] = sock
        if old is not None:
            self._command(("remove", old))
        self._command(("add", sock))
        return sock.getsockname()[1]

    def unlisten(self, key):
        with self._lock:
            old = self._listeners.pop(key, None)
        if old is not None:
            self._command(("remove", old))

    def listening(self):
        with self._lock:
            return sorted(self._listeners)

    def _command(self, command):
        self._commands.append(command)
        if self._stopped.is_set() or not self._workers:
            self._apply_commands()  # not serving (yet): apply now
        else:
            self._wake()

    def _wake(self):
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _apply_commands(self):
        while True:
            try:
                verb, sock = self._commands.popleft()
            except IndexError:
                return
            if verb == "add":
                self._selector.register(sock, selectors.EVENT_READ, ("listen", None))
            else:
                try:
                    self._selector.unregister(sock)
                except (KeyError, ValueError):
                    pass
                sock.close()

    # -- serving
    def serve_forever(self):
        for number in range(self.limits.workers):
            worker = threading.Thread(target=self._work, name="http-%d" % number, daemon=True)
            worker.start()
            self._workers.append(worker)
        self._apply_commands()
        try:
            while not self._stop.is_set():
                self._apply_commands()
                self._expire()
                timeout = 1.0
                if self._pending:
                    first = next(iter(self._pending.values()))
                    timeout = min(timeout, max(0.0, first.deadline - self._clock()))
                for key, _mask in self._selector.select(timeout):
                    kind, _name = key.data
                    if kind == "wake":
                        try:
                            self._wake_r.recv(4096)
                        except OSError:
                            pass
                    elif kind == "listen":
                        self._accept(key.fileobj)
                    else:
                        self._read(key.fileobj)
        finally:
            self._stopped.set()

    def shutdown(self):
        self._stop.set()
        self._wake()
        if self._workers:
            self._stopped.wait(5)
        for _worker in self._workers:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                break

    def server_close(self):
        self._apply_commands()  # closes the listeners removed since the loop last ran
        with self._lock:
            listeners = list(self._listeners.values())
            self._listeners.clear()
        for sock in listeners + list(self._pending):
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
        self._pending.clear()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- selector thread
    def _release(self, peer):
        with self._lock:
            self._peers[peer] -= 1
            if self._peers[peer] <= 0:
                del self._peers[peer]

    def _close_pending(self, sock, reason=None):
        entry = self._pending.pop(sock, None)
        if entry is not None and reason:
            self.log_drop("http %s" % entry.peer, reason)  # before the peer can see the close
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()
        if entry is not None:
            self._release(entry.peer)

    def _accept(self, listener):
        for _round in range(64):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE/ENFILE: nothing to accept with; say so (rate-limited) and let the backlog wait
                self.counters["accept_failed"] += 1
                self.log_drop("http listener", "accept failed: %s" % exc)
                return
            peer = address[0]
            with self._lock:
                over = self._peers[peer] >= self.limits.per_peer
                if not over:
                    self._peers[peer] += 1
            if over:
                self.counters["per_peer"] += 1
                self.log_drop("http %s" % peer, "connection flood: more than %d connections at once from one address"
                              % self.limits.per_peer)
                sock.close()
                continue
            if len(self._pending) >= self.limits.max_pending:
                oldest = next(iter(self._pending))
                self.counters["evicted"] += 1
                self._close_pending(oldest, "connection flood: oldest of %d unfinished requests closed"
                                    % self.limits.max_pending)
            sock.setblocking(False)
            self._pending[sock] = _Pending(sock, peer, address, self._clock() + self.limits.header_timeout)
            self._selector.register(sock, selectors.EVENT_READ, ("conn", None))

    def _read(self, sock):
        entry = self._pending.get(sock)
        if entry is None:
            return
        try:
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close_pending(sock, "connection failed before a request: %s" % exc)
            return
        if entry.discard:
            if not data:
                self._close_pending(sock)
            return
        if not data:
            self.counters["closed_early"] += 1
            self._close_pending(sock, "connection closed before a complete request")
            return
        entry.buffer += data
        if _head_complete(entry.buffer):
            self._dispatch(entry)
        elif len(entry.buffer) > self.limits.max_head:
            self.counters["oversized"] += 1
            entry.discard = True
            entry.buffer = bytearray()
            self.log_drop("http %s" % entry.peer, "request head over %d bytes: 431" % self.limits.max_head)
            try:
                sock.send(b"HTTP/1.0 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n\r\n")
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._close_pending(sock)

    def _expire(self):
        now = self._clock()
        while self._pending:
            sock, entry = next(iter(self._pending.items()))
            if entry.deadline > now:
                return
            if entry.discard:
                self._close_pending(sock)
                continue
            self.counters["timed_out"] += 1
            self._close_pending(sock, "no complete request within %.0f s (slow or idle connection)"
                                % self.limits.header_timeout)

    def _dispatch(self, entry):
        sock = entry.sock
        del self._pending[sock]
        self._selector.unregister(sock)
        try:
            sock.setblocking(True)
            self._queue.put_nowait((sock, entry.peer, entry.address, bytes(entry.buffer)))
        except queue.Full:
            self.counters["busy"] += 1
            self.log_drop("http %s" % entry.peer, "all %d request threads busy: 503" % self.limits.workers)
            try:
                sock.send(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", socket.MSG_DONTWAIT)
            except OSError:
                pass
            sock.close()
            self._release(entry.peer)

    # -- worker threads
    def _work(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            sock, peer, address, head = item
            try:
                self.handler_class((sock, head), address, self)
            except Exception as exc:  # pylint: disable=broad-except
                # a handler bug must not cost a worker thread: the next client still needs it
                self.log("http %s: request failed: %s: %s" % (peer, type(exc).__name__, exc))
            finally:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
                self._release(peer)
