# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The laptop's autokexec service: reboot into the server ramdisk when an authenticated client asks.

It answers DISCOVER with an OFFER (ROLE_AUTOKEXEC) carrying a fresh
challenge; a KEXEC_REQUEST that answers that challenge (once, in time, with
the right key) gets a KEXEC_ACK, then the laptop kexecs into the ramdisk
with ``stiefel.role=server`` and the configured command line, the key
delivered in an extra cpio appended to the ramdisk initrd. It also triggers
when a configured NIC (by MAC) appears. Forged, replayed and wrongly keyed
packets are logged and dropped. It refuses to run on a system that was
itself booted by stiefel (``stiefel.mac=`` on /proc/cmdline).

The config file is the contract "autokexec config" of docs/dev/contracts.md
(``/etc/stiefel/autokexec.json``, written by the ``laptop`` role)::

    {"format": "stiefel-autokexec-config", "version": 1,
     "key_path": "/etc/stiefel/key",
     "ramdisk_kernel": "/usr/lib/stiefel/ramdisk/vmlinuz",
     "ramdisk_initrd": "/usr/lib/stiefel/ramdisk/initrd.img",
     "server_cmdline": "stiefel.role=server stiefel.disk=... stiefel.boot=UUID=... console=ttyS0",
     "server": {...},                        # informational
     "trigger_macs": ["52:54:00:ab:cd:01"],
     "listen_macs": ["52:54:00:ab:cd:02"],
     "netboot": {"kernel": "/usr/lib/stiefel/ramdisk/vmlinuz",     # optional: null / absent = off
                 "initrd": "/usr/lib/stiefel/ramdisk/initrd.img",
                 "cmdline": "stiefel.role=client stiefel.pair console=ttyS0,115200"}}

``server_cmdline`` is passed to kexec as it is (it must hold
``stiefel.role=server``). Discovery is answered on every interface; a NIC with
one of ``trigger_macs`` appearing also triggers. Scratch files go to
``$RUNTIME_DIRECTORY`` (the unit's ``/run/stiefel-autokexec``).

With ``netboot`` (the role's ``laptop_netboot``) the agent also answers network
boot on the stiefel port: when a link with one of ``listen_macs`` appears it runs
:class:`stiefel_runtime.netboot.Netboot` there (dnsmasq confined to that one
interface, the client ramdisk over HTTP, without any key) and stops it when the
link goes, before a kexec and at exit. A desktop booted that way has no key: it
pairs by the laptop's code (PAIR_* datagrams, :mod:`stiefel_runtime.pairing`),
answered only while netboot is configured and only on a stiefel link.

Under Secure Boot lockdown the running kernel only kexecs (kexec_file_load)
a server kernel signed by a key it trusts. ``--check-kexec`` asks it (a trial
``kexec -s -l`` of the server kernel and initrd, then ``kexec -s -u``) and
exits 1 with what to do when it would refuse: setup_server.yml runs it on the
running laptop, and the agent runs the same check when it starts, logging the
result on the console.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import subprocess
import sys

from ansible_collections.stiefel.system.plugins.module_utils import cpio, keyfile, keyschedule
from ansible_collections.stiefel.system.plugins.module_utils.errors import ProtocolError, StiefelError
from stiefel_runtime import discovery, kexec, lockdown, messages, netboot, pairing, wayback
from stiefel_runtime.common import Console, parse_cmdline, run_agent
from stiefel_runtime.netlink import LINK_ADDED, LINK_REMOVED, LinkManager

DEFAULT_CONFIG_PATH = "/etc/stiefel/autokexec.json"
DEFAULT_RUN_DIR = "/run/stiefel-autokexec"
CONFIG_FORMAT = "stiefel-autokexec-config"
CONFIG_VERSION = 1
MAX_CONFIG = 64 * 1024
MAX_NETBOOT_CMDLINE = 1024
_MAC = re.compile(r"\A[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z")


class AutokexecError(StiefelError):
    """The autokexec configuration is unusable or the kexec failed."""


def default_run_dir():
    return os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or DEFAULT_RUN_DIR


def _abs_path(doc, name):
    value = doc.get(name)
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value or len(value) > 1024:
        raise AutokexecError("%s must be an absolute path" % name)
    return value


def parse_config(raw):
    """Validate the config file contents; return a normalised dict (unknown keys are ignored)."""
    if isinstance(raw, (bytes, bytearray)):
        if len(raw) > MAX_CONFIG:
            raise AutokexecError("autokexec config larger than %d bytes" % MAX_CONFIG)
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise AutokexecError("autokexec config is not UTF-8") from None
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise AutokexecError("autokexec config is not JSON") from None
    if not isinstance(doc, dict):
        raise AutokexecError("autokexec config must be a JSON object")
    if doc.get("format") != CONFIG_FORMAT:
        raise AutokexecError("not a stiefel autokexec config (format %r)" % (str(doc.get("format"))[:64],))
    if doc.get("version") != CONFIG_VERSION or isinstance(doc.get("version"), bool):
        raise AutokexecError("autokexec config version must be %d" % CONFIG_VERSION)
    out = {"format": CONFIG_FORMAT, "version": CONFIG_VERSION}
    for name in ("key_path", "ramdisk_kernel", "ramdisk_initrd"):
        out[name] = _abs_path(doc, name)
    cmdline = doc.get("server_cmdline")
    if not isinstance(cmdline, str) or "\n" in cmdline or "\0" in cmdline or len(cmdline) > 2048:
        raise AutokexecError("server_cmdline must be one line of at most 2048 characters")
    roles = [w for w in cmdline.split() if w.startswith("stiefel.role=")]
    if roles != ["stiefel.role=server"]:
        raise AutokexecError("server_cmdline must hold stiefel.role=server exactly once (has %s)"
                             % (", ".join(roles) or "none"))
    out["server_cmdline"] = cmdline
    for name in ("trigger_macs", "listen_macs"):
        macs = doc.get(name, [])
        if not isinstance(macs, list) or not all(isinstance(m, str) and _MAC.match(m.lower()) for m in macs):
            raise AutokexecError("%s must be a list of MAC addresses (aa:bb:cc:dd:ee:ff)" % name)
        out[name] = sorted({m.lower() for m in macs})
    server = doc.get("server", {})
    out["server"] = server if isinstance(server, dict) else {}
    out["netboot"] = _parse_netboot(doc.get("netboot"), out["listen_macs"])
    return out


def _parse_netboot(doc, listen_macs):
    """The optional ``netboot`` object: None (off) or kernel, initrd and the client ramdisk's command line."""
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise AutokexecError("netboot must be an object or null")
    if not listen_macs:
        # dnsmasq runs only on the stiefel port: without one named it would have nowhere (safe) to run
        raise AutokexecError("netboot needs listen_macs (the stiefel port it serves on)")
    out = {"kernel": _abs_path(doc, "kernel"), "initrd": _abs_path(doc, "initrd")}
    cmdline = doc.get("cmdline")
    if not isinstance(cmdline, str) or len(cmdline) > MAX_NETBOOT_CMDLINE or any(
            c in cmdline for c in "\n\r\0"):
        raise AutokexecError("netboot cmdline must be one line of at most %d characters" % MAX_NETBOOT_CMDLINE)
    words = cmdline.split()
    if "stiefel.role=client" not in words or "stiefel.pair" not in words:
        # the served ramdisk has no key: without stiefel.pair it could never find the laptop
        raise AutokexecError("netboot cmdline must hold stiefel.role=client and stiefel.pair")
    out["cmdline"] = cmdline
    return out


def load_config(path):
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG + 1)
    except OSError as exc:
        raise AutokexecError("cannot read autokexec config %s: %s" % (path, exc.strerror or exc)) from None
    return parse_config(raw)


def stiefel_link_predicate(config):
    """Which links autokexec brings up: those whose MAC the config names."""
    macs = set(config.get("listen_macs", [])) | set(config.get("trigger_macs", []))
    return lambda link: (link.mac or "").lower() in macs


def already_stiefeled(proc_cmdline):
    """True when this system was booted by stiefel (it must never kexec away from an NBD root)."""
    return "mac" in parse_cmdline(proc_cmdline)


def server_archive(key_text, return_cmdline):
    """The extra initrd for the server ramdisk: the key (0600) and the laptop's own command line.

    The server kexecs back into the laptop's OS with that command line (wayback.RETURN_CMDLINE_PATH):
    the one it booted with, not the NBD one it serves to desktops.
    """
    archive = cpio.key_archive(key_text)
    if return_cmdline:
        # a second archive after the first (4-byte aligned): the kernel unpacks them in turn
        archive += cpio.write_newc([cpio.CpioEntry.file(wayback.RETURN_CMDLINE_PATH.lstrip("/"),
                                                        (return_cmdline + "\n").encode("utf-8"), 0o644)])
    return archive


class Decider(object):
    """Pure decision: datagram (and its interface) in -> ``(reply or None, trigger reason or None)``.

    Raises ProtocolError for anything to drop (the caller logs it).
    """

    def __init__(self, key, listen_indexes=None, clock=None):
        kwargs = {} if clock is None else {"clock": clock}
        self.key = key
        self.listen_indexes = listen_indexes  # None: every interface; else a callable(index) -> bool
        self.book = messages.ChallengeBook(**kwargs)
        self.responder = discovery.Responder(key, self.offer_fields, challenges=self.book, accept_kexec=True, **kwargs)

    @staticmethod
    def offer_fields():
        return {"role": messages.ROLE_AUTOKEXEC}

    def decide(self, data, ifindex):
        if self.listen_indexes is not None and not self.listen_indexes(ifindex):
            raise ProtocolError("datagram on interface %s, which is not a stiefel link" % ifindex)
        reply, msg = self.responder.handle(data)
        if msg.type == messages.KEXEC_REQUEST:
            return reply, "authenticated KEXEC_REQUEST"
        return reply, None


def check_kexec(config, log, run=subprocess.run, dry_run=False, **lockdown_paths):
    """True if the running kernel would kexec the server kernel; logs what was found, or why not and what to do.

    The server initrd goes in the trial as it is: initrds are not signature-checked, and the key
    stays out of the scratch directory until a desktop asks.
    """
    try:
        found = lockdown.check_kernel(config["ramdisk_kernel"], run=run, log=log, initrd=config["ramdisk_initrd"],
                                      cmdline=config["server_cmdline"], who=lockdown.LAPTOP, dry_run=dry_run,
                                      **lockdown_paths)
    except lockdown.LockdownRefusal as exc:
        log("kexec check: REFUSED: %s" % exc)
        return False
    except lockdown.KexecBusy as exc:
        log("kexec check: NOT CHECKED: %s" % exc)
        return False
    except (StiefelError, OSError) as exc:
        log("kexec check: REFUSED: cannot check the stiefel server kernel %s: %s" % (config["ramdisk_kernel"], exc))
        return False
    log("kexec check: %s" % found)
    return True


class AutokexecAgent(object):
    def __init__(self, config, console, run_dir=None, dry_run=False, discovery_port=discovery.PORT,
                 proc_cmdline_path="/proc/cmdline"):
        self.config = config
        self.console = console
        self.run_dir = run_dir or default_run_dir()
        self.dry_run = dry_run
        self.discovery_port = discovery_port
        self.proc_cmdline_path = proc_cmdline_path
        self.key = keyfile.read_key(config["key_path"])
        self.links = None
        self.sock = None
        self.decider = Decider(self.key)
        self.triggered = 0
        self.proc_cmdline = ""
        self.netboot = None  # the running Netboot, on the link (index, ifname) in netboot_link
        self.netboot_link = None
        self.netboot_factory = netboot.Netboot  # a seam for the unit tests

    # -- network boot on the stiefel port (laptop_netboot)
    def _listen_mac(self, mac):
        return (mac or "").lower() in self.config["listen_macs"]

    def on_link_events(self, events):
        """Start network boot when a listen link appears, stop it when that link goes."""
        if self.config.get("netboot") is None:
            return
        for event in events:
            if event.kind == LINK_ADDED and self.netboot_link is None and self._listen_mac(event.mac):
                self.netboot_link = (event.index, event.ifname)
                self.start_netboot()
            elif event.kind == LINK_REMOVED and self.netboot_link and event.index == self.netboot_link[0]:
                self.stop_netboot("link %s gone" % self.netboot_link[1])
                self.netboot_link = None

    def start_netboot(self):
        if self.netboot is not None or self.netboot_link is None:
            return
        index, ifname = self.netboot_link
        files = self.config["netboot"]
        service = self.netboot_factory(ifname, self.run_dir, files["kernel"], files["initrd"], files["cmdline"],
                                       log=self.console, log_drop=self.console.drop, stdout=sys.stdout)
        try:
            service.start(index)
        except (StiefelError, OSError) as exc:
            service.stop()
            self.console("netboot on %s failed: %s (a desktop can still boot a stick)" % (ifname, exc))
            return
        self.netboot = service

    def stop_netboot(self, why):
        if self.netboot is None:
            return
        service, self.netboot = self.netboot, None
        service.stop()
        self.console("netboot stopped (%s)" % why)

    def _on_stiefel_link(self, scope):
        if self.links is None:  # not started (unit tests): nothing to tell the links apart by
            return True
        link = self.links.links.get(scope)
        return link is not None and (self._listen_mac(link.mac)
                                     or (link.mac or "").lower() in self.config["trigger_macs"])

    def handle_pairing(self, data, host, port, scope):
        """PAIR_* from a network-booted desktop (no key yet): answered as the server ramdisk does."""
        source = "%s%%%s" % (host, scope)
        if self.config.get("netboot") is None:
            # no network boot offered, so no keyless desktop to pair: nothing to guess the code against
            self.console.drop(source, "pairing datagram, but network boot (laptop_netboot) is off")
        elif not self._on_stiefel_link(scope):
            self.console.drop(source, "pairing datagram on interface %s, which is not a stiefel link" % scope)
        else:
            # the lockout file goes there (the unit keeps the directory across restarts)
            os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
            pairing.answer_on(self, data, host, port, scope)

    def kexec_command(self):
        """Build ramdisk initrd + key cpio in run_dir; return (kernel, initrd, cmdline)."""
        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        initrd = os.path.join(self.run_dir, "ramdisk-with-key.img")
        key_cpio = server_archive(keyfile.encode_key(self.key), wayback.laptop_cmdline(self.proc_cmdline))
        kexec.concat_files(initrd, [self.config["ramdisk_initrd"]], key_cpio)
        return self.config["ramdisk_kernel"], initrd, self.config["server_cmdline"]

    def trigger(self, reason):
        self.triggered += 1
        self.console("kexec into the stiefel server ramdisk (%s)" % reason)
        # The server ramdisk serves the port itself: this OS's dnsmasq must not outlive it (kexec -e
        # does not stop processes, and a half-served DHCP exchange across the kexec would confuse both).
        self.stop_netboot("kexec")
        try:
            kernel, initrd, cmdline = self.kexec_command()
            kexec.load_and_execute(kernel, initrd, cmdline, log=self.console, dry_run=self.dry_run)
        except (StiefelError, OSError) as exc:
            self.console("kexec failed: %s; still listening" % exc)
        # Still here (a failed kexec, or a dry run): serve the port again.
        self.start_netboot()

    def handle_datagram(self, data, host, port, scope):
        source = "%s%%%s" % (host, scope)
        if messages.is_pairing(data):
            self.handle_pairing(data, host, port, scope)
            return None
        try:
            reply, reason = self.decider.decide(data, scope)
        except ProtocolError as exc:
            self.console.drop(source, discovery.describe(exc))
            return None
        try:
            self.sock.sendto(reply, (host, port, 0, scope))
        except OSError as exc:
            self.console("cannot answer %s: %s" % (source, exc))
        if reason:
            self.console("%s from %s" % (reason, source))
            self.trigger(reason)
        else:
            self.console.debug("offered a challenge to %s" % source)
        return reason

    def run(self):

        proc_cmdline = ""
        try:
            with open(self.proc_cmdline_path, "r", encoding="utf-8", errors="replace") as handle:
                proc_cmdline = handle.read(65536)
        except OSError:
            pass
        self.proc_cmdline = proc_cmdline
        if already_stiefeled(proc_cmdline):
            self.console("this system was booted by stiefel (stiefel.mac= on the kernel command line): "
                         "autokexec stays idle")
            return 0
        # Listen either way: the refusal is on the console, and a desktop that asks sees the kexec fail.
        check_kexec(self.config, self.console, dry_run=self.dry_run)
        macs = set(self.config["trigger_macs"])
        # Links named in the config are stiefel links: the laptop's network
        # manager is told to leave them alone, so autokexec brings them up
        # itself (IPv6 link-local is all it needs). Every other link belongs
        # to the laptop's own network setup and is only watched.
        self.links = LinkManager(manage=stiefel_link_predicate(self.config), log=self.console)
        # systemctl stop: unwind through the finally below, so dnsmasq is stopped by its PID
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        present = self.links.open()
        self.sock = discovery.open_listen_socket(self.discovery_port)
        self.console("listening for stiefel clients on UDP %d (%s), key id %s%s%s" % (
            self.discovery_port, "triggers: " + (", ".join(self.config["trigger_macs"]) or "requests only"),
            keyschedule.key_id_hex(self.key), ", network boot and pairing on " + ", ".join(
                self.config["listen_macs"]) if self.config.get("netboot") else "", ", dry run" if self.dry_run else ""))
        try:
            self.on_link_events(present)
            while True:
                readable, _w, _x = select.select([self.sock, self.links.fileno()], [], [])
                if self.links.fileno() in readable:
                    events = self.links.process()
                    self.on_link_events(events)
                    for event in events:
                        if event.kind == LINK_ADDED and (event.mac or "").lower() in macs:
                            self.trigger("stiefel NIC %s (%s) appeared" % (event.ifname, event.mac))
                if self.sock in readable:
                    for data, host, port, scope in discovery.drain(self.sock, self.console.drop):
                        self.handle_datagram(data, host, port, scope)
        finally:
            self.stop_netboot("exit")
            self.sock.close()
            self.links.close()


# ------------------------------------------------------------------ command line
def main(argv=None):
    parser = argparse.ArgumentParser(prog="stiefel-autokexec", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG_PATH)
    parser.add_argument("--key", help="override the key path of the config")
    parser.add_argument("--run-dir", default=None,
                        help="scratch directory (default: $RUNTIME_DIRECTORY or %s)" % DEFAULT_RUN_DIR)
    parser.add_argument("--proc-cmdline", default="/proc/cmdline")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the kexec commands instead of running them (tests on a host)")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--check-kexec", action="store_true",
                        help="only check that the running kernel would kexec the server kernel (exit 1 if not)")
    args = parser.parse_args(argv)
    console = Console("stiefel-autokexec", debug=args.debug)

    def start():
        config = load_config(args.config)
        if args.key:
            config["key_path"] = args.key
        if args.check_kexec:
            return 0 if check_kexec(config, console, dry_run=args.dry_run) else 1
        return AutokexecAgent(config, console, run_dir=args.run_dir, dry_run=args.dry_run,
                              proc_cmdline_path=args.proc_cmdline).run()

    return run_agent(console, start)
