# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The server ramdisk agent (``stiefel.role=server``): discovery answers, boot payload over HTTP, disk over NBD.

Pieces, each usable alone (unit tests drive them without sockets):

* :class:`~stiefel_runtime.bootfiles.BootSource` finds the laptop's kernel,
  initrd and cmdline in its /boot and builds the authenticated manifest once.
* :class:`ServerState` holds the sessions handed out in OFFERs, the /boot
  lock state, the NBD PSK of the latest session and the counters shown on
  the console. :meth:`ServerState.route` is the HTTP decision (method, path
  -> status, reason) used by the request handler.
* :mod:`~stiefel_runtime.power` decides the AC/battery warning, :mod:`~stiefel_runtime.storage`
  finds, unlocks and mounts /boot, :mod:`~stiefel_runtime.procfs` reads the NBD counters.
* :class:`ServerAgent` wires them to sockets, netlink, nbdkit and the console.
* :class:`StandaloneServer` is the same agent on a running laptop serving a
  spare disk or image file (config: ``server_config``), without the ramdisk.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from ansible_collections.stiefel.system.plugins.module_utils import blockdev, keyfile, keyschedule, nbd_export
from ansible_collections.stiefel.system.plugins.module_utils.errors import ProtocolError, StiefelError
from stiefel_runtime import discovery, httpserve, keyless, messages, netboot, pairing, payload, server_config, wayback
from stiefel_runtime.bootfiles import BootSource
from stiefel_runtime.common import beep, Console, DEFAULT_KEY_PATH, EXIT_FAILED, EXIT_REFUSED, parse_cmdline, quiet_log, read_cmdline, RUN_DIR
from stiefel_runtime.netlink import LinkManager
from stiefel_runtime.power import power_note, power_warning, read_power_supplies
from stiefel_runtime.procfs import process_io, tcp_peers
from stiefel_runtime.storage import boot_dir_of, logical_block_size, luks_open, mount_read_only, resolve_device

DEFAULT_HTTP_PORT = 61571
MAX_UNLOCK_BODY = 4096
STATUS_INTERVAL = 30.0
PEERS_INTERVAL = 5.0
POWER_INTERVAL = 30.0
DEFAULT_SHUTDOWN_CHARGE = 10  # laptop_shutdown_charge's default
# Supervision of nbdkit: a dead one is restarted on the same sockets' port with the
# same session PSK, so the desktop's proxy reconnects and replays (stiefel.timeout).
# At most NBD_RESTART_BURST restarts in NBD_RESTART_WINDOW seconds: a crash loop
# waits out the window instead of spinning.
NBD_RESTART_BURST = 5
NBD_RESTART_WINDOW = 60.0
KEEPALIVE_IDLE = 10
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3
_NONCE_HEX = r"([0-9a-f]{32})"
_PAYLOAD_PATH = re.compile(r"\A/payload/%s/%s\Z" % (_NONCE_HEX, _NONCE_HEX))
_UNLOCK_PATH = re.compile(r"\A/unlock/%s/%s\Z" % (_NONCE_HEX, _NONCE_HEX))


# ------------------------------------------------------------------ state and HTTP decisions

class ServerState(object):
    """Everything the discovery loop and the HTTP threads share (behind one lock)."""

    def __init__(self, key, run_dir, http_port, nbd_port, export_name, needs_unlock=False, log=quiet_log,
                 clock=time.monotonic, role=messages.ROLE_SERVER):
        self.key = key
        self.role = role
        self.run_dir = run_dir
        self.http_port = http_port
        self.nbd_port = nbd_port
        self.export_name = export_name
        self.locked = needs_unlock
        self.log = log
        self.lock = threading.Lock()
        self.sessions = discovery.SessionBook(clock=clock)
        self.responder = discovery.Responder(key, self.offer_fields, sessions=self.sessions, clock=clock)
        self.psk_path = os.path.join(run_dir, "nbd.psk")
        self.payload_count = 0
        self.payload_bytes = 0
        self.clients = {}  # address -> last action
        self.unlock = None  # callable(passphrase bytes) -> None, raises StiefelError
        self.source = None  # BootSource, once /boot is readable
        self.power = None  # (flags, charge) of the POWER note that follows each OFFER; None sends none

    def offer_fields(self):
        return {
            "role": self.role,
            "http_port": self.http_port,
            "nbd_port": self.nbd_port,
            "export_name": self.export_name,
            "flags": messages.FLAG_NEEDS_PASSPHRASE if self.locked else 0,
        }

    def power_fields(self, offer):
        """The POWER note bound to ``offer`` (a DISCOVER just answered), or None."""
        if self.power is None:
            return None
        flags, charge = self.power
        return messages.build_power(self.key, offer.client_nonce, offer.server_nonce, flags, charge)

    def answer(self, data, peer=None):
        """The first reply of :meth:`replies` (raises ProtocolError to drop)."""
        return self.replies(data, peer)[0]

    def replies(self, data, peer=None):
        """A datagram from the discovery socket (sent by ``peer``) -> the replies (raises ProtocolError to drop).

        An OFFER is followed by the POWER note when there is one (the serving laptop's battery).

        Only a SESSION_REQUEST answering a fresh challenge opens a session and replaces the NBD PSK: whoever
        revokes the PSK a client holds has proven the key just now (a recorded exchange proves nothing).
        """
        with self.lock:
            reply, msg = self.responder.handle(data, peer)
            if msg.type == messages.SESSION_REQUEST:
                line = keyschedule.nbd_psk_line(self.key, msg.client_nonce, msg.session_nonce) + "\n"
                nbd_export.atomic_write(self.psk_path, line, 0o600)
                self.sessions.keep_only(msg.session_nonce)
                if peer is not None:
                    self.clients[peer] = "session opened, NBD session key ready"
                self.log("client %s: proved the key, session opened; the NBD PSK is now this session's" % (
                    peer or "?"))
            note = self.power_fields(msg) if msg.type == messages.DISCOVER else None
        return [reply] if note is None else [reply, note]

    def route(self, method, path, peer=None):
        """``(status, reason, client_nonce, session_nonce, kind)`` for a request (no side effects but session use).

        The nonces are those of a session opened by SESSION_REQUEST (bound to ``peer`` when given).
        """
        if method == "GET":
            match = _PAYLOAD_PATH.match(path)
            kind = "payload"
        elif method == "POST":
            match = _UNLOCK_PATH.match(path)
            kind = "unlock"
        else:
            return 405, "method %s not allowed" % method[:16], None, None, None
        if match is None:
            return 404, "no such resource", None, None, None
        client_nonce = bytes.fromhex(match.group(1))
        server_nonce = bytes.fromhex(match.group(2))
        with self.lock:
            if kind == "payload" and self.locked:
                return 409, "/boot is still locked: send the passphrase first", client_nonce, server_nonce, kind
            if kind == "unlock" and not self.locked:
                return 409, "/boot is not locked", client_nonce, server_nonce, kind
            if kind == "payload" and self.source is None:
                return 503, "the laptop's /boot is not readable", client_nonce, server_nonce, kind
            try:
                # one payload per session: a recorded URL is worth nothing once the client fetched
                self.sessions.check(client_nonce, server_nonce, peer=peer, last=kind == "payload")
            except ProtocolError as exc:
                return 403, str(exc), client_nonce, server_nonce, kind
        return 200, "ok", client_nonce, server_nonce, kind

    def session_started(self, client, client_nonce, server_nonce):  # pylint: disable=unused-argument
        """The client of a proven session fetches its payload (the PSK was installed when the session opened)."""
        with self.lock:
            self.clients[client] = "fetching payload"

    def payload_done(self, client, sent):
        with self.lock:
            self.payload_count += 1
            self.payload_bytes += sent
            self.clients[client] = "payload sent (%.1f MB), NBD session key ready" % (sent / 1e6)


def write_placeholder_psk(path):
    """nbdkit needs a PSK file at start: a random one nobody knows, until the first session."""
    nbd_export.atomic_write(path, "stiefel:%s\n" % secrets.token_hex(32), 0o600)


def make_handler(state: ServerState, console):
    """The request handler class bound to ``state``."""

    class Handler(httpserve.PrefetchedRequestHandler):
        server_version = "stiefel-server"
        sys_version = ""
        protocol_version = "HTTP/1.0"

        def log_message(self, format, *args):  # pylint: disable=redefined-builtin
            console.debug("http %s: %s" % (self.client_address[0], format % args))

        def log_error(self, format, *args):  # pylint: disable=redefined-builtin
            # malformed request lines, oversized headers, timeouts: hostile or broken input
            console.drop("http %s" % self.client_address[0], (format % args)[:200])

        def _refuse(self, status, reason):
            console.drop("http %s" % self.client_address[0], "%s %s -> %d %s" % (
                self.command, self.path[:100], status, reason))
            body = (reason + "\n").encode("utf-8", "replace")
            try:
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:
                pass

        def do_GET(self):  # noqa: N802
            self._dispatch()

        def do_POST(self):  # noqa: N802
            self._dispatch()

        def do_PUT(self):  # noqa: N802
            self._refuse(405, "method not allowed")

        def _dispatch(self):
            status, reason, client_nonce, server_nonce, kind = state.route(self.command, self.path,
                                                                           self.client_address[0].split("%", 1)[0])
            if status != 200:
                self._refuse(status, reason)
                return
            if kind == "payload":
                self._payload(client_nonce, server_nonce)
            else:
                self._unlock(client_nonce, server_nonce)

        def _payload(self, client_nonce, server_nonce):
            client = self.client_address[0]
            source = state.source
            state.session_started(client, client_nonce, server_nonce)
            console("client %s: sending payload (%.1f MB)" % (client, source.manifest.total_size / 1e6))
            sent = 0
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                for record in payload.iter_payload(state.key, client_nonce, server_nonce, source.manifest, source.paths):
                    self.wfile.write(record)
                    sent += len(record)
                self.wfile.flush()
            except OSError as exc:
                console("client %s: payload transfer broken after %d bytes: %s" % (client, sent, exc))
                return
            state.payload_done(client, sent)
            console("client %s: payload sent (%d bytes)" % (client, sent))

        def _unlock(self, client_nonce, server_nonce):
            try:
                length = int(self.headers.get("Content-Length", "-1"))
            except ValueError:
                length = -1
            if not 0 < length <= MAX_UNLOCK_BODY:
                self._refuse(400, "unlock body must have a Content-Length of 1..%d" % MAX_UNLOCK_BODY)
                return
            blob = self.rfile.read(length)
            try:
                passphrase = payload.open_passphrase(state.key, client_nonce, server_nonce, blob)
            except ProtocolError as exc:
                self._refuse(403, "sealed passphrase rejected: %s" % exc)
                return
            try:
                state.unlock(passphrase)
            except StiefelError as exc:
                self._refuse(403, "unlock failed: %s" % exc)
                return
            except OSError as exc:
                # cryptsetup or mount missing, /run full: not the passphrase's fault, and the client must
                # hear it (an escaping exception only closed the connection, with a traceback on the console)
                self._refuse(500, "unlock failed on the server: %s" % exc)
                return
            with state.lock:
                state.locked = False
            console("client %s: /boot unlocked" % self.client_address[0])
            body = b"unlocked\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    Handler.console = console
    return Handler


class DualStackServer(httpserve.BoundedHTTPServer):
    """The payload port (:class:`~stiefel_runtime.httpserve.BoundedHTTPServer`), its refusals on the console.

    The agent adds a listener per link in use; given ``address`` (``(host, port)``: tests, tools) it
    listens there at once and ``server_address`` is ``(host, bound port)``.
    """

    def __init__(self, address=None, handler_class=None, console=None, limits=None):
        if console is None:
            console = getattr(handler_class, "console", None)  # make_handler's
        super().__init__(handler_class, limits=limits, log_drop=console.drop if console is not None else None,
                         log=console if console is not None else quiet_log)
        self.server_address = None
        if address is not None:
            self.server_address = (address[0], self.listen("address", address[0], address[1]))


def listening_socket(host, port, scope_id, backlog=128):
    """A TCP socket listening on ``[host%scope_id]:port`` only (IPv6, for nbdkit's socket activation)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        set_keepalive(sock)
        sock.bind((host, port, 0, scope_id))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def set_keepalive(sock):
    """Keepalive on a listening socket (accepted connections inherit it).

    A desktop that powered off or lost the cable while idle sends no FIN: without probes its connection
    stays ESTABLISHED here for ever and the way back never sees the client gone (about 25 s with these).
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                        ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


# ------------------------------------------------------------------ the agent

class ServerAgent(object):
    """The running server: netlink links, discovery answers, HTTP payload, nbdkit, console status."""

    role = messages.ROLE_SERVER
    # LinkManager's ``manage``: the ramdisk owns every link; standalone mode only the ones it was given.
    manage_links = True
    # The ramdisk keeps answering (and says why on the console) when the disk cannot be served;
    # standalone mode has nothing to offer without it.
    strict = False
    # The way back (:mod:`~stiefel_runtime.wayback`): a DoneWatcher in the ramdisk, None standalone
    # (a laptop serving a spare disk runs its own OS already).
    way_back = None
    return_cmdline = None  # the laptop's own command line, from autokexec
    _nbd_clean = 0  # clean disconnects (NBD_CMD_DISC) nbdkit logged, counted by its log thread
    _way_back_seen = None
    way_back_seams = {}  # wayback.finish's run/poweroff/flush: unit tests only
    # stiefel.shutdown_charge= (laptop_shutdown_charge): the charge at which the desktop is asked to shut down;
    # None (standalone) sends no POWER notes.
    shutdown_charge = None
    # Network boot (issue 17): ``(kernel, initrd, cmdline)`` of the keyless client ramdisk to answer PXE / UEFI
    # HTTP boot with, on the first selected link that is up; None: off.
    netboot_files = None
    netboot_factory = netboot.Netboot  # a seam for the unit tests

    def __init__(self, key, console, run_dir=RUN_DIR, boot_dir=None, boot_spec=None, luks_spec=None, disk=None,
                 mtu=None, http_port=DEFAULT_HTTP_PORT, nbd_port=nbd_export.DEFAULT_PORT,
                 export_name=nbd_export.DEFAULT_EXPORT_NAME, power_sysfs="/sys/class/power_supply",
                 discovery_port=discovery.PORT):
        self.key = key
        self.console = console
        self.run_dir = run_dir
        self.boot_dir = boot_dir
        self.boot_spec = boot_spec
        self.luks_spec = luks_spec
        self.disk = disk
        self.mtu = mtu
        self.power_sysfs = power_sysfs
        self.discovery_port = discovery_port
        self.state = ServerState(key, run_dir, http_port, nbd_port if disk else 0, export_name,
                                 needs_unlock=bool(luks_spec), log=console, role=self.role)
        self.state.unlock = self._unlock
        self.links = None
        self.http = None
        self.nbd = None
        self.sock = None
        self._stop = False
        self._last_power = (0, "")
        self._nbd_peers = set()
        self._nbd_disk = None  # the resolved disk, once start_nbd has checked it
        self._nbd_keys = None  # the (ifindex, address) pairs nbdkit listens on
        self._nbd_deferred = False
        self._listen_failed = set()
        self._nbd_restarts = []  # monotonic times of the last supervised restarts
        self._nbd_held = False  # the rate limit's "waiting" said once per hold
        self.netboot = None  # the running Netboot, on the link (index, ifname) in netboot_link
        self.netboot_link = None
        self._netboot_failed = set()

    # -- /boot
    def _mount_point(self):
        return os.path.join(self.run_dir, "boot")

    def hook_options(self):
        """Options for the laptop's NBD-root hook that depend on the exported disk."""
        if not self.disk:
            return ""
        try:
            disk = resolve_device(self.disk, log=self.console)
        except StiefelError:
            return ""
        return "stiefel.blocksize=%d" % logical_block_size(disk)

    def _load_boot(self, device):
        mountpoint = self._mount_point()
        mount_read_only(device, mountpoint)
        try:
            source = BootSource(boot_dir_of(mountpoint), self.run_dir, self.console)
            source.prepare(copy=True, extra_cmdline=self.hook_options())
        finally:
            subprocess.run(["umount", mountpoint], check=False)
        return source

    def _mapping_name(self):
        """The laptop's own name for the unlocked /boot (``stiefel.boot=/dev/mapper/<name>``), else stiefel-boot."""
        spec = self.boot_spec or ""
        if spec.startswith("/dev/mapper/") and re.match(r"\A[A-Za-z0-9_.+-]{1,64}\Z", spec[len("/dev/mapper/"):]):
            return spec[len("/dev/mapper/"):]
        return "stiefel-boot"

    def _unlock(self, passphrase):
        device = resolve_device(self.luks_spec, log=self.console)
        name = self._mapping_name()
        mapped = luks_open(device, name, passphrase)
        try:
            target = mapped
            if self.boot_spec and not self.boot_spec.startswith("/dev/mapper/"):
                target = resolve_device(self.boot_spec, timeout=10, log=self.console)  # e.g. UUID= of the inner fs
            source = self._load_boot(target)
        finally:
            subprocess.run(["cryptsetup", "close", name], check=False)
        self.state.source = source

    def prepare_boot(self):
        try:
            if self.boot_dir:
                source = BootSource(self.boot_dir, self.run_dir, self.console)
                source.prepare(extra_cmdline=self.hook_options())
                self.state.source = source
            elif self.luks_spec:
                self.console("/boot is LUKS-encrypted: waiting for the client to send the passphrase")
            elif self.boot_spec:
                self.state.source = self._load_boot(resolve_device(self.boot_spec, log=self.console))
            else:
                self.console("no stiefel.boot= given: no boot payload to serve")
        except (StiefelError, OSError) as exc:
            self.console("cannot read the laptop's /boot: %s" % exc)

    # -- NBD
    def start_nbd(self):
        """Check the disk and make this run's PSK; nbdkit starts once a link in use has its address."""
        if not self.disk:
            self.console("no stiefel.disk= given: not serving a disk over NBD")
            return
        disk = resolve_device(self.disk, log=self.console)
        # Always a fresh one: a run directory that is not tmpfs still holds the last run's session PSK.
        write_placeholder_psk(self.state.psk_path)
        self._nbd_disk = disk
        self._sync_nbd(self._wanted_listeners())

    def _spawn_nbd(self, wanted):
        """nbdkit on sockets bound to the link-local address of each link in use (socket activation)."""
        socks, where = [], []
        for index, address in sorted(wanted):
            try:
                socks.append(listening_socket(address, self.state.nbd_port, index))
                where.append("[%s%%%s]:%d" % (address, wanted[(index, address)], self.state.nbd_port))
            except OSError as exc:
                if ("nbd", index, address) not in self._listen_failed:
                    self._listen_failed.add(("nbd", index, address))
                    self.console("cannot listen for NBD on %s%%%s: %s" % (address, wanted[(index, address)], exc))
        if not socks:
            return
        try:
            prio = nbd_export.write_gnutls_priority_file(os.path.join(self.run_dir, "nbd-gnutls.conf"))
            settings = nbd_export.ExportSettings(path=self._nbd_disk, name=self.state.export_name,
                                                 port=self.state.nbd_port, tls_psk_file=self.state.psk_path)
            self.nbd = nbd_export.spawn_foreground(settings, prio, listen_sockets=socks, log_attempts=True,
                                                   stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        finally:
            for sock in socks:
                sock.close()  # nbdkit has them now
        self._nbd_keys = sorted(wanted)
        self._nbd_deferred = False
        threading.Thread(target=self._watch_nbd_log, args=(self.nbd.stderr,), name="nbdkit-log", daemon=True).start()
        self.console("serving %s (%.1f GB) over NBD on %s, export %r, TLS-PSK AES-GCM, flush+FUA (nbdkit pid %d)" % (
            self._nbd_disk, nbd_export.source_size(self._nbd_disk) / 1e9, ", ".join(where), self.state.export_name,
            self.nbd.pid))

    def _watch_nbd_log(self, stream):
        """nbdkit's stderr: refused attempts become (rate-limited) drops, its other messages console lines."""
        last = None
        try:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\n")
                found = nbd_export.refused_attempt(line)
                if wayback.CLEAN_DISCONNECT in line:
                    self._nbd_clean += 1
                if found is not None:
                    number, reason = found
                    if number != last:  # a plaintext client is refused once per option it tries
                        self.console.drop("nbd port %d" % self.state.nbd_port, "connection #%d: %s" % (number, reason))
                        last = number
                elif ": debug: " not in line and line.strip():
                    self.console("nbdkit: %s" % line[:300])
        except (OSError, ValueError):
            pass
        finally:
            stream.close()

    def _stop_nbd(self):
        if self.nbd is not None:
            nbd_export.stop_pid(self.nbd.pid)
            self.nbd.wait()
            self.nbd = None
        self._nbd_keys = None

    def _sync_nbd(self, wanted):
        if self._nbd_disk is None or not wanted:
            return
        if self.nbd is not None and sorted(wanted) == self._nbd_keys:
            return
        if self.nbd is not None:
            if tcp_peers(self.state.nbd_port):
                if not self._nbd_deferred:
                    self._nbd_deferred = True
                    self.console("the links in use changed; nbdkit moves to them once no NBD client is attached")
                return
            self.console("the links in use changed: restarting nbdkit on them")
            self._stop_nbd()
        try:
            self._spawn_nbd(wanted)
        except (StiefelError, OSError) as exc:
            self.console("cannot start nbdkit: %s" % exc)
            if self.strict:
                raise

    def _check_nbd(self, now=None):
        """Restart a dead nbdkit (logged, at most NBD_RESTART_BURST per NBD_RESTART_WINDOW)."""
        if self.nbd is None or self.nbd.poll() is None:
            return
        now = time.monotonic() if now is None else now
        self._nbd_restarts = [t for t in self._nbd_restarts if now - t < NBD_RESTART_WINDOW]
        if len(self._nbd_restarts) >= NBD_RESTART_BURST:
            if not self._nbd_held:
                self._nbd_held = True
                self.console("nbdkit exited (rc=%s) %d times in %d s: next restart in %d s" % (
                    self.nbd.returncode, len(self._nbd_restarts) + 1, NBD_RESTART_WINDOW,
                    NBD_RESTART_WINDOW - (now - self._nbd_restarts[0]) + 1))
            return
        self._nbd_held = False
        self._nbd_restarts.append(now)
        self.console("nbdkit exited (rc=%s): restarting it" % self.nbd.returncode)
        self.nbd = None
        self._nbd_keys = None
        try:
            self._sync_nbd(self._wanted_listeners())
        except (StiefelError, OSError) as exc:
            self.console("cannot restart nbdkit: %s" % exc)

    # -- where HTTP and NBD listen
    def listen_filter(self):
        """A predicate on links, or None: every link the ramdisk manages is one discovery answers on."""
        return None

    def _wanted_listeners(self):
        """``{(ifindex, link-local address): ifname}`` of the links in use (ready and selected)."""
        if self.links is None:
            return {}
        selected = self.listen_filter()
        return {(link.index, link.link_local): link.ifname for link in self.links.ready_links()
                if selected is None or selected(link)}

    def sync_listeners(self):
        """HTTP and NBD follow the links in use: bound to each one's link-local address, nothing else."""
        wanted = self._wanted_listeners()
        if self.http is not None:
            have = set(self.http.listening())
            for key in sorted(have - set(wanted)):
                self.http.unlisten(key)
                self.console("payload no longer on HTTP [%s%%%d]:%d (link gone)" % (
                    key[1], key[0], self.state.http_port))
            for key in sorted(set(wanted) - have):
                try:
                    self.http.listen(key, key[1], self.state.http_port, key[0])
                except OSError as exc:
                    if ("http",) + key not in self._listen_failed:
                        self._listen_failed.add(("http",) + key)
                        self.console("cannot listen for HTTP on %s%%%s: %s" % (key[1], wanted[key], exc))
                    continue
                self.console("payload on HTTP [%s%%%s]:%d" % (key[1], wanted[key], self.state.http_port))
        self._sync_nbd(wanted)
        self.sync_netboot(wanted)

    def sync_netboot(self, wanted):
        """Network boot follows its link: started on the first link in use, stopped when that link goes.

        One link only: dnsmasq is confined to one port (:mod:`stiefel_runtime.netboot`)."""
        if not self.netboot_files:
            return
        links = {index: ifname for (index, _address), ifname in wanted.items()}
        if self.netboot is not None and self.netboot_link[0] not in links:
            self.stop_netboot("link gone")
        if self.netboot is not None or not links:
            return
        index = min(links)
        if (index, links[index]) in self._netboot_failed:
            return
        service = self.netboot_factory(links[index], self.run_dir, *self.netboot_files, log=self.console,
                                       log_drop=self.console.drop)
        try:
            service.start(index)
        except (StiefelError, OSError) as exc:
            service.stop()
            self._netboot_failed.add((index, links[index]))  # said once; a new link (index) is tried afresh
            self.console("cannot answer network boot on %s: %s" % (links[index], exc))
            return
        self.netboot, self.netboot_link = service, (index, links[index])

    def stop_netboot(self, why):
        if self.netboot is not None:
            self.netboot.stop()
            self.console("netboot stopped on %s (%s)" % (self.netboot_link[1], why))
        self.netboot = self.netboot_link = None

    # -- status
    def status_line(self):
        parts = []
        with self.state.lock:
            clients = dict(self.state.clients)
            count, sent = self.state.payload_count, self.state.payload_bytes
        peers = tcp_peers(self.state.nbd_port) if self.nbd is not None else []
        io = process_io(self.nbd.pid) if self.nbd is not None else None
        parts.append("payloads sent: %d (%.1f MB)" % (count, sent / 1e6))
        if io is not None:
            parts.append("NBD read %.1f MB, written %.1f MB" % (io[0] / 1e6, io[1] / 1e6))
        parts.append("NBD clients: %s" % (", ".join(sorted(set(peers))) or "none"))
        for client, what in sorted(clients.items()):
            parts.append("%s: %s" % (client, what))
        return "; ".join(parts)

    def check_nbd_peers(self):
        """Say on the console when an NBD client connects or goes away."""
        peers = set(tcp_peers(self.state.nbd_port)) if self.nbd is not None else set()
        for peer in sorted(peers - self._nbd_peers):
            self.console("NBD client %s connected" % peer)
        for peer in sorted(self._nbd_peers - peers):
            self.console("NBD client %s disconnected; %s" % (peer, self.status_line()))
        self._nbd_peers = peers

    def check_power(self):
        supplies = read_power_supplies(self.power_sysfs)
        if self.shutdown_charge is not None:
            note = power_note(supplies, shutdown_charge=self.shutdown_charge)
            if note[0] & messages.POWER_SHUT_DOWN and not (self.state.power or (0,))[0] & messages.POWER_SHUT_DOWN:
                self.console("power: at %s%% (laptop_shutdown_charge %d%%): asking the desktop to shut down cleanly"
                             % (note[1], self.shutdown_charge))
            with self.state.lock:
                self.state.power = note
        level, message = power_warning(supplies)
        if level and (level, message) != self._last_power:
            beep(message, loud=level >= 2, log=self.console)
        elif level >= 2:
            beep(message, loud=True)
        elif not level and self._last_power[0]:
            self.console("power: %s" % message)
        self._last_power = (level, message)

    # -- the way back
    def check_way_back(self, now=None):
        """Feed the DoneWatcher; once it is due, stop and flush the export and follow the policy."""
        if self.way_back is None:
            return
        with self.state.lock:
            seen = (self.state.payload_count, tuple(sorted(self.state.clients.items())), self._nbd_clean)
        previous = self._way_back_seen or seen
        self._way_back_seen = seen
        activity = seen[:2] != previous[:2]
        clean = seen[2] != previous[2]
        now = time.monotonic() if now is None else now
        if not self.way_back.observe(now, len(self._nbd_peers), activity=activity, clean=clean):
            return
        self.follow_way_back(**self.way_back_seams)

    def follow_way_back(self, **seams):
        source = self.state.source
        paths = source.paths if source is not None else {}
        cmdline = self.return_cmdline
        # only the return boots a command line: poweroff and stay need none, and saying so would mislead
        if cmdline is None and source is not None and self.way_back.policy == wayback.RETURN:
            cmdline = wayback.laptop_cmdline(source.manifest.cmdline)
            self.console("way back: no command line from autokexec: using the served one without stiefel.* "
                         "options")
        try:
            wayback.finish(self.way_back.policy, self._stop_nbd, self._nbd_disk, paths.get("kernel"),
                           paths.get("initrd"), cmdline or "", log=self.console, **seams)
        except (StiefelError, OSError) as exc:
            self.console("way back failed: %s; serving the disk again" % exc)
            self.way_back.state = "idle"
            self._sync_nbd(self._wanted_listeners())

    def handle_when_done(self, data, host, port, scope):
        """WHEN_DONE (``python3 -m stiefel_runtime when-done``): answers a fresh OFFER challenge, sets the policy."""
        source = "%s%%%s" % (host, scope)
        try:
            msg = messages.parse(self.key, data, expect=(messages.WHEN_DONE,))
            if self.way_back is None:
                raise ProtocolError("WHEN_DONE, but this server has no way back (standalone mode)")
            with self.state.lock:
                self.state.responder.challenges.redeem(msg.client_nonce, msg.server_nonce)
        except ProtocolError as exc:
            self.console.drop(source, discovery.describe(exc))
            return
        self.way_back.set_policy(msg.policy, who="client %s" % host)
        try:
            self.sock.sendto(messages.build_when_done(self.key, msg.client_nonce, msg.server_nonce, msg.policy,
                                                      ack=True), (host, port, 0, scope))
        except OSError as exc:
            self.console("cannot answer %s: %s" % (source, exc))

    # -- main loop
    def handle_datagram(self, data, host, port, scope):
        source = "%s%%%s" % (host, scope)
        if messages.is_pairing(data):  # a network-booted desktop without a key pairs by code (issue 17)
            pairing.answer_on(self, data, host, port, scope)
            return
        if messages.datagram_type(data) == messages.WHEN_DONE:
            self.handle_when_done(data, host, port, scope)
            return
        try:
            replies = self.state.replies(data, host)
        except ProtocolError as exc:
            self.console.drop(source, discovery.describe(exc))
            return
        try:
            for reply in replies:
                self.sock.sendto(reply, (host, port, 0, scope))
        except OSError as exc:
            self.console("cannot answer %s: %s" % (source, exc))
            return
        self.console.debug("offered to %s" % source)

    def run(self, ready_timeout=None):

        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        self.links = LinkManager(mtu=self.mtu, manage=self.manage_links, log=self.console)
        self.links.open()
        self.prepare_boot()
        try:
            self.start_nbd()
        except (StiefelError, OSError) as exc:
            if self.strict:
                self.close()
                raise
            self.console("cannot serve the disk: %s" % exc)
        limits = httpserve.Limits.for_fd_limit(httpserve.raise_fd_limit())
        self.http = DualStackServer(handler_class=make_handler(self.state, self.console), console=self.console,
                                    limits=limits)
        threading.Thread(target=self.http.serve_forever, name="http", daemon=True).start()
        self.sync_listeners()
        self.sock = discovery.open_listen_socket(self.discovery_port)
        self.console.marker("ready")
        self.console("answering discovery on UDP %d, payload on HTTP %d, key id %s" % (
            self.discovery_port, self.state.http_port, keyschedule.key_id_hex(self.key)))
        next_status = time.monotonic() + STATUS_INTERVAL
        next_power = next_peers = time.monotonic()
        try:
            while not self._stop:
                now = time.monotonic()
                if now >= next_power:
                    self.check_power()
                    next_power = now + POWER_INTERVAL
                if now >= next_peers:
                    self.check_nbd_peers()
                    # every few seconds, not every status line: a desktop's proxy is waiting to reconnect
                    self._check_nbd()
                    self.check_way_back()
                    next_peers = now + PEERS_INTERVAL
                if now >= next_status:
                    self.console("status: " + self.status_line())
                    next_status = now + STATUS_INTERVAL
                timeout = max(0.0, min(next_status, next_power, next_peers) - time.monotonic())
                readable, _w, _x = select.select([self.sock, self.links.fileno()], [], [], timeout)
                if self.links.fileno() in readable:
                    self.links.process()
                    self.sync_listeners()  # before any datagram: an OFFER names ports that must be listening
                self.console.tick()
                if self.sock in readable:
                    for data, host, port, scope in discovery.drain(self.sock, self.console.drop):
                        self.handle_datagram(data, host, port, scope)
        finally:
            self.close()

    def stop(self):
        self._stop = True

    def close(self):
        self.stop_netboot("exit")
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
            self.http = None
        self._stop_nbd()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.links is not None:
            self.links.close()


class StandaloneServer(ServerAgent):
    """A running laptop serving a spare disk or image file (``stiefel-server --config``): no ramdisk, no kexec.

    What differs from the ramdisk server: OFFERs carry ``ROLE_STANDALONE``;
    only the configured interfaces are brought up (and given the MTU), none
    at all when no interface is named, and discovery arriving on any other
    interface is ignored; the disk must pass the same in-use check as the
    ``nbd_serve`` module (never the running system's own disk); a payload or
    disk that cannot be served is fatal at start, before any interface is
    touched.
    """

    role = messages.ROLE_STANDALONE
    strict = True

    def __init__(self, key, console, config, power_sysfs="/sys/class/power_supply", discovery_port=discovery.PORT):
        super().__init__(key, console, run_dir=config.run_dir, boot_dir=config.boot_dir, boot_spec=config.boot,
                         disk=config.disk, mtu=config.mtu, http_port=config.http_port, nbd_port=config.nbd_port,
                         export_name=config.export_name, power_sysfs=power_sysfs, discovery_port=discovery_port)
        self.selected = server_config.interface_filter(config.interfaces)
        self.manage_links = self.selected or False
        self.interfaces = config.interfaces
        if config.netboot:
            self.netboot_files = (config.netboot_kernel, config.netboot_initrd, netboot.DEFAULT_CMDLINE)

    def check_disk(self):
        blockdev.check_exportable(self.disk, writable_export=True)

    def run(self, ready_timeout=None):
        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        self.check_disk()
        if self.netboot_files:
            # fatal at start like a disk in use: a keyed initrd must never be offered (Netboot checks again)
            try:
                keyless.check_keyless(self.netboot_files[1])
            except (keyless.InitrdSecretError, OSError) as exc:
                raise netboot.NetbootError("netboot_initrd %s: %s" % (self.netboot_files[1], exc)) from None
        if self.boot_dir:
            source = BootSource(self.boot_dir, self.run_dir, self.console)
            source.prepare(extra_cmdline=self.hook_options())
        else:
            source = self._load_boot(resolve_device(self.boot_spec, timeout=5, log=self.console))
        self.state.source = source
        self.console("standalone mode: listening on %s; no interface is reconfigured but those named%s" % (
            ", ".join(self.interfaces) or "every interface but lo",
            "; network boot on the first of them that is up" if self.netboot_files else ""))
        super().run(ready_timeout)

    def prepare_boot(self):
        """Done in :meth:`run` already, where a failure stops the server."""

    def listen_filter(self):
        return self.selected

    def start_nbd(self):
        self.check_disk()  # again: /boot was mounted in between, and time passed
        super().start_nbd()

    def handle_datagram(self, data, host, port, scope):
        link = self.links.links.get(scope) if self.links is not None else None
        if link is None or (self.selected is not None and not self.selected(link)):
            self.console.debug("ignoring a datagram from %s%%%s: not a listening interface" % (host, scope))
            return
        super().handle_datagram(data, host, port, scope)


# ------------------------------------------------------------------ command line
def _terminate(_signum, _frame):
    # SystemExit unwinds through ServerAgent.run's cleanup, so nbdkit is stopped with us
    # (a plain SIGTERM death would leave it serving).
    sys.exit(143)


def standalone_config(args):
    """The ServerConfig from --config and the flags (flags win)."""
    overrides = {}
    for key, value in (("disk", args.disk), ("boot_dir", args.boot_dir), ("boot", args.boot), ("key", args.key),
                       ("run_dir", args.run_dir), ("export_name", args.export_name), ("mtu", args.mtu),
                       ("http_port", args.http_port), ("nbd_port", args.nbd_port)):
        if value is not None:
            overrides[key] = str(value)
    if args.interface:
        overrides["interfaces"] = " ".join(args.interface)
    if args.debug:
        overrides["debug"] = "yes"
    if args.config:
        return server_config.load(args.config, overrides)
    return server_config.build(overrides)


def run_standalone(args):
    console = Console("stiefel-server", debug=args.debug)
    try:
        config = standalone_config(args)
        console.debug_enabled = config.debug
        key = keyfile.read_key(config.key)
        agent = StandaloneServer(key, console, config, power_sysfs=args.power_sysfs)
        agent.run()
    except (server_config.ServerConfigError, blockdev.DeviceInUse) as exc:
        console("refused: %s" % exc)
        return EXIT_REFUSED
    except StiefelError as exc:
        console("fatal: %s" % exc)
        return EXIT_FAILED
    return 0


def run_ramdisk(args):
    options = parse_cmdline(read_cmdline(args.cmdline_file))
    console = Console("stiefel-server", debug=args.debug or options.get("debug") is True)
    try:
        key = keyfile.read_key(args.key or DEFAULT_KEY_PATH)
        agent = ServerAgent(
            key, console, run_dir=args.run_dir or RUN_DIR, boot_dir=args.boot_dir,
            boot_spec=None if args.boot_dir else options.get("boot") or None,
            luks_spec=None if args.boot_dir else options.get("luksboot") or None,
            disk=args.disk or options.get("disk") or None, mtu=options.get("mtu"),
            http_port=args.http_port or DEFAULT_HTTP_PORT, nbd_port=args.nbd_port or 10809,
            export_name=args.export_name or "stiefel", power_sysfs=args.power_sysfs)
        setup_way_back(agent, options, args.return_cmdline_file)
        agent.shutdown_charge = shutdown_charge_from(options, log=console)
        agent.run()
    except StiefelError as exc:
        console("fatal: %s" % exc)
        return EXIT_FAILED
    return 0


def shutdown_charge_from(options, log=quiet_log, default=DEFAULT_SHUTDOWN_CHARGE):
    """``stiefel.shutdown_charge=`` (0-100) or ``default``; anything else is said and ignored."""
    value = options.get("shutdown_charge")
    if value is None:
        return default
    if isinstance(value, str) and value.isdigit() and int(value) <= 100:
        return int(value)
    log("ignoring stiefel.shutdown_charge=%r: not a percentage; using %d" % (str(value)[:16], default))
    return default


def setup_way_back(agent, options, return_cmdline_file):
    """The ramdisk server's policy for when the desktop is done (stiefel.when_done=, stiefel.return_wait=)."""
    policy, wait = wayback.policy_from(options, log=agent.console)
    agent.way_back = wayback.DoneWatcher(policy, wait, log=agent.console)
    agent.return_cmdline = wayback.read_return_cmdline(return_cmdline_file)
    agent.console("way back: when the desktop is done: %s (waits %d s for a dropped client, %d s after a clean "
                  "disconnect)%s" % (policy, wait, min(wait, wayback.CLEAN_WAIT), "" if policy != wayback.RETURN else
                                     "; laptop command line %r" % (agent.return_cmdline or "(the served one)")))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="stiefel-server", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="standalone mode: serve what this file names (e.g. /etc/stiefel/server.conf)")
    parser.add_argument("--check-config", metavar="FILE",
                        help="only parse a standalone config file and print it normalized (exit 0 valid, 2 refused)")
    parser.add_argument("--standalone", action="store_true", help="standalone mode from the flags alone")
    parser.add_argument("--key", help="the stiefel key (default /etc/stiefel/key)")
    parser.add_argument("--cmdline-file", default="/proc/cmdline", help="ramdisk: read stiefel.* options from here")
    parser.add_argument("--boot-dir", help="serve the payload from this directory (the laptop's /boot content)")
    parser.add_argument("--boot", help="standalone: the partition holding /boot (path or UUID=...), read read-only")
    parser.add_argument("--disk", help="export this disk or image file over NBD (instead of stiefel.disk=)")
    parser.add_argument("--interface", action="append", metavar="NAME|MAC",
                        help="standalone: listen on (and bring up) this interface; repeat for more")
    parser.add_argument("--mtu", help="standalone: MTU for the named interfaces")
    parser.add_argument("--run-dir", help="scratch directory (default /run/stiefel, standalone /run/stiefel-server)")
    parser.add_argument("--http-port", type=int)
    parser.add_argument("--nbd-port", type=int)
    parser.add_argument("--export-name")
    parser.add_argument("--power-sysfs", default="/sys/class/power_supply")
    parser.add_argument("--return-cmdline-file", default=wayback.RETURN_CMDLINE_PATH,
                        help="ramdisk: the laptop's own command line for the way back (written by autokexec)")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    if args.check_config:
        return server_config.check(args.check_config)
    standalone = bool(args.config or args.standalone)
    if not standalone and (args.boot or args.interface or args.mtu):
        parser.error("--boot, --interface and --mtu are for standalone mode (--config or --standalone)")
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return run_standalone(args) if standalone else run_ramdisk(args)
    except KeyboardInterrupt:
        return 130
