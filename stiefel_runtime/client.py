# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The client ramdisk agent (``stiefel.role=client``): find the laptop, fetch its boot payload, kexec into it.

Discovery runs on every interface at once (one socket, one DISCOVER per
ready link, re-sent every few seconds; links that appear later join as soon
as netlink reports their link-local address). An autokexec OFFER gets a
KEXEC_REQUEST (the laptop then kexecs into the server ramdisk; discovery
goes on); a server OFFER gets a SESSION_REQUEST (one at a time, so the
server's NBD PSK ends up being the session this client boots with), and its
SESSION_ACCEPT leads to the payload fetch, verification, the NBD hook's
command line, the PSK cpio appended to the laptop initrd, and kexec.

A kernel this desktop refused (lockdown: not signed by a key it trusts) is
remembered per server by its SHA-256: while it is held, that server's
payload is read only as far as its manifest (the same kernel: stop there),
so a changed kernel is still fetched at once; the same one again only after
a back-off that doubles with each repeat.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import select
import socket
import termios
import time

from ansible_collections.stiefel.system.plugins.module_utils import cpio, keyschedule
from ansible_collections.stiefel.system.plugins.module_utils.errors import ProtocolError, StiefelError
from stiefel_runtime import discovery, kexec, lockdown, messages, pairing, payload
from stiefel_runtime.common import (Console, DEFAULT_KEY_PATH, parse_cmdline, quiet_log, read_cmdline, RUN_DIR, run_agent,
                                    stdout_log, strip_stiefel_options)
from stiefel_runtime.netlink import LinkManager
from stiefel_runtime.power import describe_note

DISCOVER_INTERVAL = 2.0
HTTP_TIMEOUT = 30.0
PSK_PATH_IN_INITRD = "etc/stiefel/nbd.psk"
HOOK_OPTIONS = ("mac", "server", "port", "export", "tls")


# After this desktop refused a server's kernel, the same kernel is not fetched again for this long, doubling on
# each repeat up to the cap: a refusal under Secure Boot stays a refusal, and every fetch was the whole payload.
REFUSED_RETRY = 60.0
REFUSED_RETRY_MAX = 960.0


class ClientError(StiefelError):
    """The payload could not be fetched or used."""


class SameRefusedPayload(ClientError):
    """The server offers the kernel this desktop refused last time; the fetch stopped after the manifest."""


class RefusalMemory(object):
    """Per server, the kernel (its SHA-256) this desktop last refused and until when it is not fetched again."""

    def __init__(self, clock=time.monotonic, first=REFUSED_RETRY, cap=REFUSED_RETRY_MAX):
        self.clock = clock
        self.first = first
        self.cap = cap
        self._servers = {}  # server -> {"kernel", "until", "backoff", "said"}

    def refused(self, server, kernel_sha):
        """Note that ``server``'s kernel ``kernel_sha`` was refused; ``(the same as last time?, seconds held)``."""
        entry = self._servers.get(server)
        repeat = entry is not None and entry["kernel"] == kernel_sha
        backoff = min(entry["backoff"] * 2, self.cap) if repeat else self.first
        self._servers[server] = {"kernel": kernel_sha, "until": self.clock() + backoff, "backoff": backoff,
                                 "said": repeat}
        return repeat, backoff

    def held(self, server, kernel_sha):
        """Seconds before ``server``'s ``kernel_sha`` is fetched again (0: fetch it now, a changed one at once)."""
        entry = self._servers.get(server)
        if entry is None or entry["kernel"] != kernel_sha:
            return 0.0
        return max(0.0, entry["until"] - self.clock())

    def first_mention(self, server):
        """True once per hold: whether to say on the console that the refused kernel is offered again."""
        entry = self._servers[server]
        said, entry["said"] = entry["said"], True
        return not said


def hook_cmdline(base_cmdline, mac, server_address, nbd_port, export_name):
    """The laptop's command line plus the NBD-root hook's options (docs/dev/contracts.md)."""
    base = strip_stiefel_options(base_cmdline, HOOK_OPTIONS)
    extra = "stiefel.mac=%s stiefel.server=%s stiefel.port=%d stiefel.export=%s stiefel.tls=psk" % (
        mac.lower(), server_address.split("%", 1)[0], nbd_port, export_name)
    return (base + " " + extra).strip()


def psk_archive(key, client_nonce, server_nonce):
    """The extra cpio putting this session's NBD PSK at /etc/stiefel/nbd.psk (0600) in the laptop initramfs."""
    line = keyschedule.nbd_psk_line(key, client_nonce, server_nonce) + "\n"
    return cpio.write_newc([
        cpio.CpioEntry.directory("etc"),
        cpio.CpioEntry.directory("etc/stiefel", 0o700),
        cpio.CpioEntry.file(PSK_PATH_IN_INITRD, line.encode("ascii"), 0o600),
    ])


def url_path(kind, client_nonce, server_nonce):
    return "/%s/%s/%s" % (kind, client_nonce.hex(), server_nonce.hex())


def _connect(offer, ifname, timeout):
    host = "%s%%%s" % (offer.address, ifname or offer.ifindex)
    return http.client.HTTPConnection(host, offer.message.http_port, timeout=timeout)


def send_passphrase(key, offer, ifname, passphrase, timeout=HTTP_TIMEOUT):
    """POST the sealed passphrase for the session of the accepted ``offer``; return ``(ok, message)``."""
    blob = payload.seal_passphrase(key, offer.client_nonce, offer.session_nonce, passphrase)
    conn = _connect(offer, ifname, timeout)
    try:
        conn.request("POST", url_path("unlock", offer.client_nonce, offer.session_nonce), body=blob,
                     headers={"Host": "stiefel", "Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        text = resp.read(4096).decode("utf-8", "replace").strip()
        return resp.status == 200, "%d %s" % (resp.status, text)
    finally:
        conn.close()


def fetch_payload(key, offer, ifname, dest_dir, log=quiet_log, timeout=HTTP_TIMEOUT, on_manifest=None):
    """GET the payload of the accepted ``offer``'s session and verify it into ``dest_dir``; return the manifest.

    ``on_manifest`` sees the authenticated manifest first; what it raises ends the transfer there."""
    conn = _connect(offer, ifname, timeout)
    try:
        conn.request("GET", url_path("payload", offer.client_nonce, offer.session_nonce), headers={"Host": "stiefel"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise ClientError("server refused the payload: %d %s" % (
                resp.status, resp.read(4096).decode("utf-8", "replace").strip()))
        state = {"next": 0}

        def progress(done, total):
            percent = 100 * done // max(total, 1)
            if percent >= state["next"]:
                log("payload: %3d%% (%.1f of %.1f MB)" % (percent, done / 1e6, total / 1e6))
                state["next"] = percent - percent % 25 + 25

        return payload.receive_payload(resp.read, key, offer.client_nonce, dest_dir, progress, on_manifest)
    finally:
        conn.close()


class ClientAgent(object):
    """Discovers on every link and drives one boot."""

    def __init__(self, key, console, run_dir=RUN_DIR, mtu=None, stop_before_kexec=False, dry_run=False,
                 ask_passphrase=None, discovery_port=discovery.PORT, timeout=None):
        self.key = key
        self.console = console
        self.run_dir = run_dir
        self.mtu = mtu
        self.stop_before_kexec = stop_before_kexec
        self.dry_run = dry_run
        self.ask_passphrase = ask_passphrase or ask_passphrase_on_console
        self.discovery_port = discovery_port
        self.timeout = timeout
        self.disc = discovery.ClientDiscovery(key)
        self.links = None
        self.sock = None
        self.result = None
        self._session_wait_until = 0.0  # a SESSION_REQUEST is outstanding until then
        self._last_power_flags = 0  # the serving laptop's last POWER note (on AC says nothing)
        self.refusals = RefusalMemory()

    def _send_round(self):
        for link in self.links.ready_links():
            try:
                discovery.send_discover(self.sock, self.disc.discover(link.index), link.index, self.discovery_port)
            except OSError as exc:
                self.console.debug("cannot send DISCOVER on %s: %s" % (link.ifname, exc))

    def run(self):
        """Return 0 after --stop-before-kexec, otherwise kexec (never returns) or raise on timeout."""

        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        self.links = LinkManager(mtu=self.mtu, log=self.console)
        self.links.open()
        self.sock = discovery.open_client_socket()
        self.console.marker("discovery started")
        self.console("discovering on every interface (key id %s)" % keyschedule.key_id_hex(self.key))
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        next_round = time.monotonic()
        known_ready = set()
        try:
            while True:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise ClientError("no usable server found within %ss" % self.timeout)
                ready = {link.index for link in self.links.ready_links()}
                if now >= next_round or ready - known_ready:
                    self._send_round()
                    next_round = now + DISCOVER_INTERVAL
                known_ready = ready
                wait = next_round - time.monotonic()
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                readable, _w, _x = select.select([self.sock, self.links.fileno()], [], [], max(0.0, wait))
                if self.links.fileno() in readable:
                    self.links.process()
                if self.sock in readable:
                    for data, host, port, scope in discovery.drain(self.sock, self.console.drop):
                        result = self.handle_datagram(data, host, port, scope)
                        if result is not None:
                            return result
        finally:
            self.close()

    def handle_datagram(self, data, host, port, scope):
        source = "%s%%%s" % (host, scope)
        try:
            got = self.disc.handle(data, host, scope, port)
        except ProtocolError as exc:
            self.console.drop(source, discovery.describe(exc))
            return None
        if isinstance(got, messages.Message) and got.type == messages.POWER:
            if got.flags != self._last_power_flags:  # each change once, not every discovery round
                self.console("power: %s" % describe_note(got.flags, got.charge))
            self._last_power_flags = got.flags
            return None
        if isinstance(got, messages.Message):  # KEXEC_ACK
            self.console("laptop %s acknowledged: it is rebooting into server mode" % source)
            return None
        offer = got
        if offer.session_nonce is not None:
            self._session_wait_until = 0.0
            try:
                return self.boot_from(offer)
            except SameRefusedPayload as exc:
                self.console.debug("%s: %s" % (source, exc))
                return None
            except (StiefelError, OSError, http.client.HTTPException, socket.timeout) as exc:
                self.console("boot from %s failed: %s; discovering again" % (source, exc))
                return None
        if offer.role == messages.ROLE_AUTOKEXEC:
            self.console("laptop OS at %s offers autokexec: asking it to reboot into server mode" % source)
            try:
                self.sock.sendto(self.disc.kexec_request(offer), (host, port, 0, scope))
            except OSError as exc:
                self.console("cannot send KEXEC_REQUEST to %s: %s" % (source, exc))
            return None
        if offer.role not in (messages.ROLE_SERVER, messages.ROLE_STANDALONE):
            self.console("ignoring OFFER with role %d from %s" % (offer.role, source))
            return None
        if time.monotonic() < self._session_wait_until:
            # every accepted session replaces the server's NBD PSK: ask for one at a time
            self.console.debug("OFFER from %s while a session request is outstanding: not answered" % source)
            return None
        try:
            self.sock.sendto(self.disc.session_request(offer), (host, port, 0, scope))
        except OSError as exc:
            self.console("cannot send SESSION_REQUEST to %s: %s" % (source, exc))
            return None
        self._session_wait_until = time.monotonic() + discovery.SESSION_WAIT
        self.console.debug("answered the challenge of %s: asking for a session" % source)
        return None

    def _link(self, index):
        return self.links.links.get(index)

    def boot_from(self, offer):
        link = self._link(offer.ifindex)
        if link is None:
            raise ClientError("the interface of the OFFER is gone")
        self.console("server %s%%%s: http %d, nbd %d, export %r%s" % (
            offer.address, link.ifname, offer.message.http_port, offer.message.nbd_port, offer.message.export_name,
            ", /boot locked" if offer.message.needs_passphrase else ""))
        if offer.message.needs_passphrase:
            for attempt in range(3):
                passphrase = self.ask_passphrase("Passphrase for the laptop's encrypted /boot: ")
                if not passphrase:
                    raise ClientError("no passphrase given")
                ok, message = send_passphrase(self.key, offer, link.ifname, passphrase)
                if ok:
                    self.console("/boot unlocked")
                    break
                self.console("unlock refused (%s)%s" % (message, "; try again" if attempt < 2 else ""))
            else:
                raise ClientError("/boot stayed locked")
        dest = os.path.join(self.run_dir, "payload")
        os.makedirs(dest, mode=0o700, exist_ok=True)
        started = time.monotonic()
        manifest = fetch_payload(self.key, offer, link.ifname, dest, log=self.console,
                                 on_manifest=lambda m: self._not_refused_before(offer.address, m))
        elapsed = time.monotonic() - started
        self.console.marker("payload verified")
        self.console("payload: %.1f MB in %.2f s (%.1f MB/s)" % (
            manifest.total_size / 1e6, elapsed, manifest.total_size / 1e6 / max(elapsed, 1e-6)))
        cmdline = hook_cmdline(manifest.cmdline, link.mac, offer.address, offer.message.nbd_port or 10809,
                               offer.message.export_name or "stiefel")
        if self.stop_before_kexec:
            doc = json.loads(manifest.to_json().decode("utf-8"))
            doc["kexec_cmdline"] = cmdline
            doc["server"] = offer.address
            doc["interface"] = link.ifname
            stdout_log("stiefel-client: manifest " + json.dumps(doc, sort_keys=True))
            # What would be appended to the laptop initrd, for the test to attach the NBD export with.
            path = os.path.join(self.run_dir, "nbd-psk.cpio")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(psk_archive(self.key, offer.client_nonce, offer.session_nonce))
            return 0
        try:
            lockdown.check_kernel(os.path.join(dest, "kernel"), log=self.console, dry_run=self.dry_run)
        except lockdown.LockdownRefusal:
            repeat, backoff = self.refusals.refused(offer.address, manifest.files["kernel"][1])
            if repeat:  # the reasons were on the console the first time
                self._say_still_refused(backoff)
                raise SameRefusedPayload("refused the same kernel again") from None
            raise
        initrd = os.path.join(self.run_dir, "initrd-with-psk.img")
        kexec.concat_files(initrd, [os.path.join(dest, "initrd")],
                           psk_archive(self.key, offer.client_nonce, offer.session_nonce))
        os.unlink(os.path.join(dest, "initrd"))
        self.console("kernel command line: %s" % cmdline)
        self.console.marker("kexec")
        kexec.load_and_execute(os.path.join(dest, "kernel"), initrd, cmdline, log=self.console, dry_run=self.dry_run)
        return 0

    def _not_refused_before(self, server, manifest):
        held = self.refusals.held(server, manifest.files["kernel"][1])
        if not held:
            return
        if self.refusals.first_mention(server):
            self._say_still_refused(held)
        raise SameRefusedPayload("offers the refused kernel again: not fetched for another %d s" % round(held))

    def _say_still_refused(self, seconds):
        self.console("still refusing the laptop's kernel (same as before); retrying in %d s" % round(seconds))

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.links is not None:
            self.links.close()
            self.links = None


def passphrases_from_file(path):
    """An ask function answering with the file's lines in turn (tests; never on a real console)."""
    with open(path, "rb") as handle:
        lines = [line.rstrip(b"\n") for line in handle.read(64 * 1024).splitlines()]

    def ask(_prompt):
        return lines.pop(0) if lines else b""

    return ask


# A typed passphrase is cut here; payload.seal_passphrase refuses more than payload.MAX_PASSPHRASE anyway.
MAX_TYPED_PASSPHRASE = 2048
CONSOLE_PATHS = ("/dev/tty", "/dev/console")


def ask_passphrase_on_console(prompt, paths=CONSOLE_PATHS):
    """Ask on the controlling tty, else /dev/console (the ramdisk's agents have no controlling tty); return
    the typed line as bytes, b"" if nobody can answer.

    The terminal is opened as a bare file descriptor: Python's ``open(tty, "r+")`` wants a seekable file
    and refuses every terminal, so the prompt never reached a person.
    """
    for path in paths:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        except OSError:
            continue
        try:
            return _ask_raw(fd, prompt)
        except (OSError, EOFError, termios.error):
            continue
        finally:
            os.close(fd)
    return b""


def _ask_raw(fd, prompt):
    old = termios.tcgetattr(fd)
    new = termios.tcgetattr(fd)
    new[3] &= ~termios.ECHO
    # Echo off (and type-ahead dropped) before the prompt shows, as getpass does: whatever is typed once
    # the prompt is visible is kept.
    termios.tcsetattr(fd, termios.TCSAFLUSH, new)
    line = b""
    try:
        os.write(fd, prompt.encode("utf-8", "replace"))
        while True:
            chunk = os.read(fd, 1024)
            if not chunk:
                break
            line += chunk
            if b"\n" in line or b"\r" in line or len(line) > MAX_TYPED_PASSPHRASE:
                break
    finally:
        try:
            termios.tcsetattr(fd, termios.TCSADRAIN, old)
            os.write(fd, b"\n")
        except (OSError, termios.error):
            pass  # the terminal hung up
    ended = b"\n" in line or b"\r" in line
    line = line.replace(b"\r", b"\n").split(b"\n", 1)[0][:MAX_TYPED_PASSPHRASE]
    if not line and not ended:
        raise EOFError
    return line


# ------------------------------------------------------------------ command line
def main(argv=None):
    parser = argparse.ArgumentParser(prog="stiefel-client", description=__doc__.splitlines()[0])
    parser.add_argument("--key", default=DEFAULT_KEY_PATH)
    parser.add_argument("--cmdline-file", default="/proc/cmdline", help="read stiefel.* options from here")
    parser.add_argument("--run-dir", default=RUN_DIR)
    parser.add_argument("--stop-before-kexec", action="store_true",
                        help="print the verified manifest and exit 0 (tests)")
    parser.add_argument("--dry-run", action="store_true", help="print the kexec commands instead of running them")
    parser.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    parser.add_argument("--passphrase-file", help="answer /boot passphrase prompts from this file's lines (tests)")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    options = parse_cmdline(read_cmdline(args.cmdline_file))
    console = Console("stiefel-client", debug=args.debug or options.get("debug") is True)

    def start():
        # a network-booted ramdisk has no key file: pairing by code replaces it (issue 17)
        key = pairing.client_key(args.key, options, console, mtu=options.get("mtu"))
        return ClientAgent(key, console, run_dir=args.run_dir, mtu=options.get("mtu"),
                           stop_before_kexec=args.stop_before_kexec, dry_run=args.dry_run, timeout=args.timeout,
                           ask_passphrase=passphrases_from_file(args.passphrase_file)
                           if args.passphrase_file else None).run()

    return run_agent(console, start)
