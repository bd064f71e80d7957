# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""PXE / UEFI HTTP boot on the stiefel port: dnsmasq's argv, its process, the TFTP root (issue 17).

DHCP and TFTP come from dnsmasq (Debian's dnsmasq-base), confined three ways so it is
never a DHCP server for anyone else: it binds to the one stiefel interface only
(``--interface --bind-interfaces --except-interface=lo``), it hands out addresses
only from a /29 of its own in 169.254/16 (:data:`LINK_NET`, link-local: never
routed, so nothing on any other network can be given or take one), and it ignores
every client that is not a UEFI PXE or HTTP boot client (``--dhcp-match`` on the
client architecture, option 93). It serves no DNS (``--port=0``) and reads no
configuration file (``--conf-file=/dev/null``): the argv is the whole config.

TFTP serves the first loader: shim, the Debian-signed network GRUB (named ``grubx64.efi``,
which shim loads from beside itself), GRUB's http module and the one ``grub/grub.cfg``. That
config tries ``insmod http`` and, where it loads, sends GRUB to HTTP for the kernel and initrd
(``TFTP only for the first loader`` holds without Secure Boot). Under Secure Boot shim's verifier
refuses the unsigned http.mod (Debian 12's signed grubnetx64 has tftp built in, not http: seen in its
module list and under OVMF), so there GRUB fetches the Debian-signed kernel and the keyless initrd
over its built-in tftp from the same dnsmasq: ``vmlinuz`` and ``initrd.img`` are in the TFTP root too
(links to the files served over HTTP). No signed GRUB with http exists in Debian 12, and UEFI HTTP
boot of shim would still leave GRUB without http, so TFTP is the Secure Boot path.

Nothing in the TFTP root is secret: the client ramdisk is served without any key (a network-booted
desktop pairs by code, :mod:`stiefel_runtime.pairing`); :class:`Netboot` refuses, before anything
listens, an initrd that holds one (:func:`stiefel_runtime.keyless.check_keyless`).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import stat
import subprocess
import threading
import time

from ansible_collections.stiefel.system.plugins.module_utils.errors import StiefelError
from ansible_collections.stiefel.system.plugins.module_utils import nbd_export
from stiefel_runtime import httpserve, keyless
from stiefel_runtime.common import Console, quiet_log

# 169.254.157.0/29 (157 for nothing but being away from the /24s RFC 3927 reserves):
# the laptop is .1, desktops get .2-.6. A /29 because the link is point-to-point:
# one desktop, its firmware and its ramdisk each may take a lease.
LINK_NET = ipaddress.IPv4Network("169.254.157.0/29")
SERVER_ADDRESS = LINK_NET.network_address + 1
RANGE = (LINK_NET.network_address + 2, LINK_NET.broadcast_address - 1)
LEASE = "10m"
STARTUP_CHECK = 1.0  # seconds dnsmasq gets to fail its own setup checks before it counts as serving
HTTP_PORT = 61572

SHIM = "/usr/lib/shim/shimx64.efi.signed"
GRUB = "/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed"
# Debian's signed network GRUB has tftp built in but not http (it asks TFTP for
# $prefix/x86_64-efi/http.mod, seen under OVMF): the module from grub-efi-amd64-bin
# is part of the loader we serve. Under Secure Boot shim's verifier refuses an
# unsigned module, so there GRUB takes the kernel and initrd over TFTP (grub_cfg).
GRUB_HTTP_MOD = "/usr/lib/grub/x86_64-efi/http.mod"
# What shim and GRUB look for, relative to the TFTP root.
SHIM_NAME = "shimx64.efi"
GRUB_NAME = "grubx64.efi"
GRUB_CFG_NAME = "grub/grub.cfg"
GRUB_HTTP_NAME = "grub/x86_64-efi/http.mod"
KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.img"
LOADER_FILES = (SHIM_NAME, GRUB_NAME, GRUB_CFG_NAME, GRUB_HTTP_NAME)
# the kernel and initrd are in the TFTP root for GRUB under Secure Boot (no http module there)
TFTP_FILES = LOADER_FILES + (KERNEL_NAME, INITRD_NAME)
DEFAULT_CMDLINE = "stiefel.role=client stiefel.pair"

# RFC 4578 / IANA processor architecture types: 7 and 9 are x86-64 UEFI PXE, 16 x86-64 UEFI HTTP.
ARCH_EFI_PXE = (7, 9)
ARCH_EFI_HTTP = (16,)


class NetbootError(StiefelError):
    pass


def _iface_ok(ifname):
    if not ifname or len(ifname) > 15 or any(c in ifname for c in "/ \t\n,=") or ifname in (".", ".."):
        raise NetbootError("not an interface name: %r" % (ifname,))


def http_base(port=HTTP_PORT):
    return "http://%s:%d/netboot" % (SERVER_ADDRESS, port)


def _cmdline_ok(cmdline):
    if any(c in cmdline for c in "\n\r\"'$;{}\\#"):
        raise NetbootError("kernel command line for network boot has characters GRUB would interpret")
    return cmdline


def _entry(device, kernel, initrd, cmdline, title):
    return ("menuentry '%s' {\n"
            "  linux %s/%s %s\n"
            "  initrd %s/%s\n"
            "}\n" % (title, device, kernel, _cmdline_ok(cmdline), device, initrd))


def grub_cfg(port=HTTP_PORT, cmdline=DEFAULT_CMDLINE):
    """The TFTP ``grub.cfg``: the kernel and initrd over HTTP where GRUB can load its http module, else
    (Secure Boot: shim's verifier refuses the unsigned module) over the signed GRUB's built-in tftp."""
    return ("# stiefel.system: the kernel and initrd over HTTP; over TFTP where http.mod is refused (Secure Boot)\n"
            "set timeout=0\n"
            "if insmod http; then\n"
            "  configfile (http,%s:%d)/netboot/grub.cfg\n"
            "fi\n"
            "echo 'stiefel: no http module in GRUB (Secure Boot), kernel and initrd over TFTP'\n"
            % (SERVER_ADDRESS, port)
            + _entry("(tftp,%s)" % SERVER_ADDRESS, KERNEL_NAME, INITRD_NAME, cmdline,
                     "stiefel client (network boot, TFTP)"))


def http_grub_cfg(cmdline, port=HTTP_PORT):
    """The HTTP ``grub.cfg``: the signed kernel and the keyless client initrd (shim verifies the kernel)."""
    device = "(http,%s:%d)/netboot" % (SERVER_ADDRESS, port)
    return "set timeout=0\n" + _entry(device, KERNEL_NAME, INITRD_NAME, cmdline, "stiefel client (network boot)")


def prepare_tftp_root(root, shim=SHIM, grub=GRUB, port=HTTP_PORT, http_mod=GRUB_HTTP_MOD, kernel=None, initrd=None,
                      cmdline=DEFAULT_CMDLINE):
    """Fill ``root`` with the first loader, and links to ``kernel`` and ``initrd`` when given (GRUB's TFTP
    path); any other file there is removed."""
    for path in (shim, grub, http_mod):
        if not os.path.isfile(path):
            raise NetbootError("%s is missing (Debian packages shim-signed, grub-efi-amd64-signed and "
                               "grub-efi-amd64-bin)" % path)
    os.makedirs(os.path.join(root, os.path.dirname(GRUB_HTTP_NAME)), mode=0o755, exist_ok=True)
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel not in LOADER_FILES:
                os.unlink(os.path.join(dirpath, name))
    shutil.copyfile(shim, os.path.join(root, SHIM_NAME))
    shutil.copyfile(grub, os.path.join(root, GRUB_NAME))
    shutil.copyfile(http_mod, os.path.join(root, GRUB_HTTP_NAME))
    for src, name in ((kernel, KERNEL_NAME), (initrd, INITRD_NAME)):
        if src is not None:
            # a link, not a copy: the initrd is tens of MB; dnsmasq (not --tftp-secure) follows it
            os.symlink(os.path.abspath(src), os.path.join(root, name))
    nbd_export.atomic_write(os.path.join(root, GRUB_CFG_NAME), grub_cfg(port, cmdline), 0o644)
    return root


def dnsmasq_argv(ifname, tftp_root, run_dir, http_port=HTTP_PORT, dnsmasq="dnsmasq"):
    """The whole dnsmasq configuration as an argv (no shell, no config file)."""
    _iface_ok(ifname)
    netmask = str(LINK_NET.netmask)
    argv = [
        dnsmasq,
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--port=0",  # no DNS
        "--interface=%s" % ifname,
        "--bind-interfaces",
        "--except-interface=lo",
        "--listen-address=%s" % SERVER_ADDRESS,
        "--dhcp-range=%s,%s,%s,%s" % (RANGE[0], RANGE[1], netmask, LEASE),
        "--dhcp-leasefile=%s" % os.path.join(run_dir, "dnsmasq.leases"),
        "--pid-file",  # none: the agent holds the PID of its child
        "--log-facility=-",
        "--log-dhcp",
        "--dhcp-no-override",
        "--dhcp-option=option:router",  # none: the desktop must not route through the laptop
        "--enable-tftp",
        "--tftp-root=%s" % tftp_root,
        "--tftp-max=16",
    ]
    if os.geteuid() == 0:
        # the ramdisk may have no "nobody" user to drop to; dnsmasq still binds only the stiefel port
        argv.append("--user=root")
    for arch in ARCH_EFI_PXE:
        argv.append("--dhcp-match=set:efi-pxe,option:client-arch,%d" % arch)
    for arch in ARCH_EFI_HTTP:
        argv.append("--dhcp-match=set:efi-http,option:client-arch,%d" % arch)
    argv += [
        # anyone else on the link (not a UEFI boot client) gets no lease at all
        "--dhcp-ignore=tag:!efi-pxe,tag:!efi-http",
        "--dhcp-boot=tag:efi-pxe,%s,,%s" % (SHIM_NAME, SERVER_ADDRESS),
        # UEFI HTTP boot wants its vendor class echoed and a URL as the boot file
        "--dhcp-option-force=tag:efi-http,option:vendor-class,HTTPClient",
        "--dhcp-boot=tag:efi-http,%s/%s" % (http_base(http_port), SHIM_NAME),
    ]
    return argv


def add_link_address(ifindex, ipr=None):
    """Put :data:`SERVER_ADDRESS` on the stiefel port (netlink); already there is fine."""
    from pyroute2 import IPRoute  # pylint: disable=import-outside-toplevel
    from pyroute2.netlink.exceptions import NetlinkError  # pylint: disable=import-outside-toplevel

    own = ipr is None
    ipr = ipr or IPRoute()
    try:
        ipr.addr("add", index=ifindex, address=str(SERVER_ADDRESS), prefixlen=LINK_NET.prefixlen)
    except NetlinkError as exc:
        if exc.code != 17:  # EEXIST
            raise NetbootError("cannot add %s to interface %d: %s" % (SERVER_ADDRESS, ifindex, exc)) from None
    finally:
        if own:
            ipr.close()


class Dnsmasq(object):
    """One dnsmasq, started and stopped by its PID (never by name: other dnsmasqs are not ours)."""

    def __init__(self, ifname, tftp_root, run_dir, http_port=HTTP_PORT, dnsmasq="dnsmasq", stdout=None):
        self.argv = dnsmasq_argv(ifname, tftp_root, run_dir, http_port, dnsmasq)
        self.stdout = stdout
        self.proc = None
        self.startup_check = STARTUP_CHECK

    @property
    def pid(self):
        return self.proc.pid if self.proc is not None else None

    def start(self):
        if shutil.which(self.argv[0]) is None:
            raise NetbootError("dnsmasq is not installed (Debian package dnsmasq-base)")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,  # pylint: disable=consider-using-with
                                     stdout=self.stdout or subprocess.DEVNULL, stderr=subprocess.STDOUT)
        # dnsmasq checks its setup (interface, address, TFTP root, user and group) before it serves and
        # exits at once when one fails: say so now, not by a desktop that never gets an answer
        try:
            code = self.proc.wait(self.startup_check)
        except subprocess.TimeoutExpired:
            return self.proc.pid
        self.proc = None
        raise NetbootError("dnsmasq exited at start (exit %s): its message is on the console above" % code)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=10.0):
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        code, self.proc = self.proc.returncode, None
        return code


class _StaticHandler(httpserve.PrefetchedRequestHandler):
    """GET of a fixed set of files (the route table), nothing else; every refusal is logged escaped."""

    server_version = "stiefel-netboot"
    protocol_version = "HTTP/1.0"

    def log_message(self, format, *args):  # pylint: disable=redefined-builtin
        pass

    def _refuse(self, status, reason):
        self.server.log_drop("http %s" % self.client_address[0], "%d %s" % (status, reason))
        self.send_error(status)

    def do_GET(self):  # noqa: N802
        path = self.server.routes.get(self.path)
        if path is None:
            self._refuse(404, "no such file: %s" % self.path[:80])
            return
        try:
            handle = open(path, "rb")  # pylint: disable=consider-using-with
        except OSError as exc:
            self._refuse(503, "%s unreadable: %s" % (self.path, exc.strerror))
            return
        with handle:
            size = os.fstat(handle.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            shutil.copyfileobj(handle, self.wfile, 1 << 20)
        self.server.log("netboot: sent %s (%d bytes) to %s" % (self.path, size, self.client_address[0]))

    def do_HEAD(self):  # noqa: N802
        self._refuse(405, "HEAD not served")

    do_POST = do_PUT = do_HEAD


def http_routes(tftp_root, http_dir):
    """URL path -> file: the loaders (UEFI HTTP boot fetches shim by URL), the HTTP grub.cfg, kernel, initrd."""
    return {
        "/netboot/%s" % SHIM_NAME: os.path.join(tftp_root, SHIM_NAME),
        "/netboot/%s" % GRUB_NAME: os.path.join(tftp_root, GRUB_NAME),
        "/netboot/grub/grub.cfg": os.path.join(tftp_root, GRUB_CFG_NAME),
        "/netboot/grub.cfg": os.path.join(http_dir, "grub.cfg"),
        "/netboot/vmlinuz": os.path.join(http_dir, "vmlinuz"),
        "/netboot/initrd.img": os.path.join(http_dir, "initrd.img"),
    }


def prepare_http_dir(http_dir, kernel, initrd, cmdline, port=HTTP_PORT):
    """Link (or copy) the client kernel and its keyless initrd beside the HTTP grub.cfg."""
    os.makedirs(http_dir, mode=0o755, exist_ok=True)
    for src, name in ((kernel, "vmlinuz"), (initrd, "initrd.img")):
        dst = os.path.join(http_dir, name)
        if os.path.lexists(dst):
            os.unlink(dst)
        os.symlink(os.path.abspath(src), dst)
    nbd_export.atomic_write(os.path.join(http_dir, "grub.cfg"), http_grub_cfg(cmdline, port), 0o644)


class StaticServer(httpserve.BoundedHTTPServer):
    """The network boot files on ``SERVER_ADDRESS:port`` (the stiefel port's IPv4 link address only)."""

    def __init__(self, routes, log=quiet_log, log_drop=None, limits=None):
        super().__init__(_StaticHandler, limits=limits, log=log, log_drop=log_drop)
        self.routes = dict(routes)
        self._thread = None

    def start(self, port=HTTP_PORT, host=None):
        bound = self.listen("netboot", host or str(SERVER_ADDRESS), port)
        self._thread = threading.Thread(target=self.serve_forever, name="netboot-http", daemon=True)
        self._thread.start()
        return bound

    def stop(self):
        self.shutdown()
        self.server_close()


class Netboot(object):
    """What an agent that serves starts on its stiefel port: dnsmasq (DHCP + TFTP) and the HTTP files."""

    def __init__(self, ifname, run_dir, kernel, initrd, cmdline, http_port=HTTP_PORT, log=quiet_log, log_drop=None,
                 stdout=None):
        self.ifname = ifname
        self.run_dir = os.path.join(run_dir, "netboot")
        self.http_port = http_port
        self.tftp_root = os.path.join(self.run_dir, "tftp")
        self.http_dir = os.path.join(self.run_dir, "http")
        self.files = (kernel, initrd, cmdline)
        self.log = log
        self.log_drop = log_drop
        self.stdout = stdout
        self.dnsmasq = None
        self.http = None

    def start(self, ifindex):
        kernel, initrd, cmdline = self.files
        _cmdline_ok(cmdline)
        started = time.monotonic()
        try:
            segments = keyless.check_keyless(initrd)
        except (keyless.InitrdSecretError, OSError) as exc:
            # before anything listens: a desktop must never be sent a key
            raise NetbootError("refusing to serve %s over the network: %s" % (initrd, exc)) from None
        for path in (kernel, initrd):
            if not os.stat(path).st_mode & stat.S_IROTH:
                # dnsmasq running as root sends only world-readable files over TFTP (GRUB's Secure Boot path)
                raise NetbootError("%s is not world-readable: dnsmasq would not send it (it holds no key: chmod "
                                   "0644 it)" % path)
        self.log("netboot: %s holds no stiefel key (%d archives checked in %.1f s)" % (
            initrd, len(segments), time.monotonic() - started))
        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        add_link_address(ifindex)
        prepare_tftp_root(self.tftp_root, port=self.http_port, kernel=kernel, initrd=initrd, cmdline=cmdline)
        prepare_http_dir(self.http_dir, *self.files, port=self.http_port)
        self.http = StaticServer(http_routes(self.tftp_root, self.http_dir), log=self.log, log_drop=self.log_drop)
        self.http.start(self.http_port)
        self.dnsmasq = Dnsmasq(self.ifname, self.tftp_root, self.run_dir, self.http_port, stdout=self.stdout)
        pid = self.dnsmasq.start()
        self.log("netboot: PXE / UEFI HTTP boot on %s (%s, dnsmasq pid %d, HTTP %s)" % (
            self.ifname, LINK_NET, pid, http_base(self.http_port)))
        return pid

    def stop(self):
        if self.dnsmasq is not None:
            self.dnsmasq.stop()
            self.dnsmasq = None
        if self.http is not None:
            self.http.stop()
            self.http = None


def main(argv=None):
    """``python3 -m stiefel_runtime.netboot IFNAME RUN_DIR``: serve the first loader on IFNAME until SIGTERM."""
    import argparse  # pylint: disable=import-outside-toplevel
    import socket  # pylint: disable=import-outside-toplevel
    import sys  # pylint: disable=import-outside-toplevel

    parser = argparse.ArgumentParser(prog="stiefel-netboot", description=main.__doc__)
    parser.add_argument("ifname")
    parser.add_argument("run_dir")
    parser.add_argument("--http-port", type=int, default=HTTP_PORT)
    parser.add_argument("--kernel", required=True)
    parser.add_argument("--initrd", required=True, help="the client ramdisk, without any key")
    parser.add_argument("--cmdline", default=DEFAULT_CMDLINE)
    args = parser.parse_args(argv)
    console = Console("stiefel-netboot")
    service = Netboot(args.ifname, args.run_dir, args.kernel, args.initrd, args.cmdline, args.http_port,
                      log=console, log_drop=console.drop, stdout=sys.stdout)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        service.start(socket.if_nametoindex(args.ifname))
    except (StiefelError, OSError) as exc:
        console("netboot not started: %s" % exc)
        sys.stderr.write("stiefel-netboot: %s\n" % exc)
        service.stop()
        return 1
    console.marker("ready")
    try:
        service.dnsmasq.proc.wait()
    finally:
        service.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
