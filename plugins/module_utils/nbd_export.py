# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""THE NBD export settings of stiefel.system: one implementation for everyone.

Users: the ``nbd_serve`` module, the server ramdisk agent (``stiefel-server``)
and ``bench/nbd_throughput.py``. All of them build the server command line
here, so the benchmark measures exactly what the laptop serves.

The server is nbdkit's ``file`` plugin (93-95 % of the TCP payload ceiling
at 1 and 2.5 GbE in our measurements, ahead of nbd-server and qemu-nbd). It
advertises flush and FUA, and multi-conn whenever nbdkit itself deems it
safe (the file plugin with the page cache, also under the ``cow`` filter,
whose overlay is shared by all connections). ``multi_conn=False`` hides it.
The export name is enforced (``exportname`` filter, strict): a client asking
for another name is refused.

TLS: ``tls_psk_file`` turns on ``--tls=require --tls-psk=FILE`` (plaintext is
refused). nbdkit 1.32 has no ``--tls-priority`` option and uses GnuTLS'
``NORMAL`` priority, which on Debian 12 picks ChaCha20-Poly1305 for PSK
sessions (about 10x slower than AES-GCM here). With ``tls_aes_gcm_only``
(default) the server runs with ``GNUTLS_SYSTEM_PRIORITY_FILE`` pointing at a
file whose ``[overrides]`` disable every other bulk cipher, so only
AES-128/256-GCM can be negotiated. nbdkit logs the negotiated suite with
``-D nbdkit.tls.session=1`` (see :func:`parse_tls_session_cipher`).

API for other parts (the ramdisk agent in particular)::

    from ansible_collections.stiefel.system.plugins.module_utils.nbd_export import (
        ExportSettings, server_argv, server_env, write_gnutls_priority_file,
        spawn_foreground, export_uri, probe_export, verify_export)

    s = ExportSettings(path="/dev/nvme0n1", name="stiefel",
                       address="fe80::1%stiefel0", port=10809,
                       tls_psk_file="/run/stiefel/nbd.psk")
    prio = write_gnutls_priority_file("/run/stiefel/nbd-gnutls.conf")
    proc = spawn_foreground(s, prio)          # subprocess.Popen of nbdkit -f
    info = probe_export(export_uri(s, for_client=True))   # nbdinfo --json
    problems = verify_export(s, info)         # [] when flags are as promised

Also here (used by ``nbd_serve``): the recorded-state file
(:func:`state_to_json` / :func:`parse_state`), pidfile supervision
(:func:`pid_matches`) and the systemd unit (:func:`render_systemd_unit`). The
check that refuses exporting a device in use is ``blockdev.check_exportable``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time

from ansible_collections.stiefel.system.plugins.module_utils.errors import NbdExportError
from ansible_collections.stiefel.system.plugins.module_utils.fileio import write_atomic

DEFAULT_PORT = 10809
DEFAULT_EXPORT_NAME = "stiefel"
STATE_VERSION = 1

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PSK_USER_RE = re.compile(r"^([^:\s]{1,128}):[0-9a-fA-F]+$")

# GnuTLS system configuration that leaves AES-GCM as the only bulk cipher.
# It applies to every priority string, including nbdkit's built-in NORMAL.
GNUTLS_AES_GCM_ONLY = """\
# Written by stiefel.system (nbd_export): NBD over TLS uses AES-GCM only.
# GnuTLS on Debian 12 would pick ChaCha20-Poly1305 for PSK sessions.
[overrides]
tls-disabled-cipher = CHACHA20-POLY1305
tls-disabled-cipher = AES-128-CCM
tls-disabled-cipher = AES-256-CCM
tls-disabled-cipher = AES-128-CCM-8
tls-disabled-cipher = AES-256-CCM-8
tls-disabled-cipher = AES-128-CBC
tls-disabled-cipher = AES-256-CBC
tls-disabled-cipher = CAMELLIA-128-GCM
tls-disabled-cipher = CAMELLIA-256-GCM
tls-disabled-cipher = CAMELLIA-128-CBC
tls-disabled-cipher = CAMELLIA-256-CBC
tls-disabled-cipher = 3DES-CBC
"""
AES_GCM_CIPHERS = frozenset(("AES-128-GCM", "AES-256-GCM"))


class NbdInfoError(NbdExportError):
    """``nbdinfo --json`` output that is not a usable description of the export."""


class StateFileError(NbdExportError):
    """A recorded export state file that is unreadable or not ours."""


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    """What is served, where, and how. Immutable; compare with ``==``."""

    path: str
    name: str = DEFAULT_EXPORT_NAME
    address: str = "::"
    port: int = DEFAULT_PORT
    read_only: bool = False
    copy_on_write: bool = False
    multi_conn: bool = True
    tls_psk_file: str | None = None
    tls_aes_gcm_only: bool = True
    threads: int = 16

    def __post_init__(self):
        for field in ("read_only", "copy_on_write", "multi_conn", "tls_aes_gcm_only"):
            if not isinstance(getattr(self, field), bool):
                raise NbdExportError("%s must be a boolean" % field)
        if not isinstance(self.path, str) or not self.path.startswith("/") or "\0" in self.path:
            raise NbdExportError("path must be an absolute path, got %r" % (self.path,))
        if not isinstance(self.name, str) or not NAME_RE.match(self.name):
            raise NbdExportError(
                "export name must be 1-64 characters of A-Z a-z 0-9 . _ - (not starting with . _ -), got %r"
                % (self.name,))
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 1 <= self.port <= 65535:
            raise NbdExportError("port must be an integer 1-65535, got %r" % (self.port,))
        if not isinstance(self.threads, int) or isinstance(self.threads, bool) or not 1 <= self.threads <= 1024:
            raise NbdExportError("threads must be an integer 1-1024, got %r" % (self.threads,))
        if not isinstance(self.address, str):
            raise NbdExportError("address must be a string")
        try:
            ipaddress.ip_address(self.address)
        except ValueError:
            raise NbdExportError("address must be an IP address (IPv6 may carry a %%scope), got %r"
                                 % (self.address,)) from None
        if self.tls_psk_file is not None and (
                not isinstance(self.tls_psk_file, str) or not self.tls_psk_file.startswith("/")
                or "\0" in self.tls_psk_file):
            raise NbdExportError("tls_psk_file must be an absolute path or None")
        if self.read_only and self.copy_on_write:
            raise NbdExportError("read_only and copy_on_write exclude each other "
                                 "(copy_on_write already keeps the exported data unchanged)")

    @property
    def writable(self) -> bool:
        return not self.read_only

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data) -> "ExportSettings":
        if not isinstance(data, dict):
            raise NbdExportError("settings must be a mapping")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise NbdExportError("unknown settings: %s" % ", ".join(sorted(map(str, unknown))))
        try:
            return cls(**data)
        except TypeError as exc:
            raise NbdExportError("incomplete settings: %s" % exc) from None


# ---------------------------------------------------------------- server argv

def server_argv(settings: ExportSettings, *, foreground: bool = True, pidfile: str | None = None,
                nbdkit: str = "nbdkit", debug_tls: bool = False, verbose: bool = False,
                socket_activation: bool = False, log_attempts: bool = False) -> list:
    """The nbdkit command line serving ``settings``.

    ``foreground`` keeps nbdkit attached (agents, tests, benches); otherwise
    it daemonizes once its sockets are bound and writes ``pidfile``.
    ``debug_tls`` adds ``-D nbdkit.tls.session=1`` so the negotiated cipher
    is logged on stderr. ``socket_activation``: nbdkit serves the listening
    sockets it is handed (``LISTEN_FDS``, see :func:`spawn_foreground`)
    instead of binding ``address``/``port`` itself. ``log_attempts``: the
    negotiation messages that show a refused attempt (plaintext, failed TLS
    handshake) on stderr, for :func:`refused_attempt` (the data path stays
    quiet).
    """
    argv = [nbdkit]
    if foreground:
        argv.append("--foreground")
    if pidfile:
        argv += ["--pidfile", pidfile]
    quiet = debug_tls or log_attempts
    if verbose or quiet:  # debug messages need --verbose
        argv.append("--verbose")
    if debug_tls:
        argv += ["-D", "nbdkit.tls.session=1"]
    if quiet:  # keep the per-request debug messages quiet
        argv += ["-D", "nbdkit.backend.datapath=0", "-D", "nbdkit.backend.controlpath=0"]
    if not socket_activation:
        argv += ["--ipaddr", settings.address, "--port", str(settings.port)]
    argv += ["--threads", str(settings.threads), "--newstyle"]
    if settings.read_only:
        argv.append("--readonly")
    if settings.tls_psk_file:
        argv += ["--tls=require", "--tls-psk=%s" % settings.tls_psk_file]
    # The first filter is the outermost layer.
    if not settings.multi_conn:
        argv.append("--filter=multi-conn")
    argv.append("--filter=exportname")
    if settings.copy_on_write:
        argv.append("--filter=cow")
    argv += ["file", "file=%s" % settings.path]
    argv += ["exportname=%s" % settings.name, "exportname-strict=true", "exportname-list=explicit"]
    if not settings.multi_conn:
        argv.append("multi-conn-mode=disable")
    return argv


def server_env(settings: ExportSettings, priority_file: str | None, base: dict | None = None) -> dict:
    """The environment for nbdkit: ``base`` (default ``os.environ``) plus the
    GnuTLS override when TLS with AES-GCM only is asked for."""
    env = dict(os.environ if base is None else base)
    env.pop("GNUTLS_SYSTEM_PRIORITY_FILE", None)
    extra = tls_environment(settings, priority_file)
    env.update(extra)
    return env


def tls_environment(settings: ExportSettings, priority_file: str | None) -> dict:
    """Only the variables :func:`server_env` adds (for a systemd unit)."""
    if settings.tls_psk_file and settings.tls_aes_gcm_only:
        if not priority_file:
            raise NbdExportError("TLS with AES-GCM only needs a GnuTLS priority file")
        return {"GNUTLS_SYSTEM_PRIORITY_FILE": priority_file,
                "GNUTLS_SYSTEM_PRIORITY_FAIL_ON_INVALID": "1"}
    return {}


def atomic_write(path: str, data: str, mode: int = 0o600) -> bool:
    """Write ``data`` to ``path`` via a temp file + rename; False if unchanged."""
    try:
        with open(path, "r", encoding="utf-8") as handle:
            if handle.read() == data and stat.S_IMODE(os.stat(path).st_mode) == mode:
                return False
    except (OSError, UnicodeDecodeError):
        pass
    write_atomic(path, data, mode)
    return True


def write_gnutls_priority_file(path: str) -> str:
    """Write the AES-GCM-only GnuTLS override to ``path`` (0644) and return it."""
    atomic_write(path, GNUTLS_AES_GCM_ONLY, 0o644)
    return path


# Socket activation needs LISTEN_PID to be nbdkit's own PID and the sockets at fds 3, 4, ...: set in the
# child between fork and exec by this exec shim (a shell cannot name fds above 9 portably, and a
# preexec_fn is unsafe in a threaded agent).
_ACTIVATION_SHIM = (
    "import fcntl, os, sys\n"
    "fds = [int(fd) for fd in sys.argv[1].split(',')]\n"
    "high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 3 + len(fds)) for fd in fds]\n"
    "for fd in fds: os.close(fd)\n"
    "for number, fd in enumerate(high): os.dup2(fd, 3 + number); os.close(fd)\n"
    "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)))\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n")


def spawn_foreground(settings: ExportSettings, priority_file: str | None = None, *,
                     debug_tls: bool = False, listen_sockets=None, log_attempts: bool = False,
                     python: str | None = None, **popen_kwargs) -> subprocess.Popen:
    """Start nbdkit in the foreground (for agents and benches); the caller owns it.

    ``listen_sockets``: bound, listening sockets nbdkit serves (socket
    activation), e.g. one per link-local address of the links in use;
    ``settings.address``/``port`` are then not bound by nbdkit.
    """
    argv = server_argv(settings, foreground=True, debug_tls=debug_tls, socket_activation=bool(listen_sockets),
                       log_attempts=log_attempts)
    env = server_env(settings, priority_file, popen_kwargs.pop("env", None))
    if listen_sockets:
        fds = [sock.fileno() for sock in listen_sockets]
        argv = [python or sys.executable, "-c", _ACTIVATION_SHIM, ",".join(map(str, fds))] + argv
        popen_kwargs["pass_fds"] = tuple(popen_kwargs.get("pass_fds", ())) + tuple(fds)
    return subprocess.Popen(argv, env=env, **popen_kwargs)  # pylint: disable=consider-using-with


_TLS_REQUIRED = re.compile(r"\A(?:nbdkit: )?\S*\w\[(\d+)\]: debug: replying to (NBD_OPT_\w+) with NBD_REP_ERR_TLS_REQD")
_HANDSHAKE_FAILED = re.compile(r"\A(?:nbdkit: )?\S*\w\[(\d+)\]: error: gnutls_handshake: (.*?)(?: \(-?\d+/-?\d+\))?\s*\Z")
_CONN_ERROR = re.compile(r"\A(?:nbdkit: )?\S*\w\[(\d+)\]: error: (.*?)\s*\Z")


def refused_attempt(line: str):
    """``(connection number, reason)`` when an nbdkit log line shows a refused connection attempt, else None.

    nbdkit (``log_attempts``) says ``file[3]: debug: replying to NBD_OPT_GO
    with NBD_REP_ERR_TLS_REQD`` for a plaintext client, ``file[4]: error:
    gnutls_handshake: An illegal parameter has been received`` for a wrong
    PSK, and names no peer address.
    """
    match = _TLS_REQUIRED.match(line)
    if match:
        return int(match.group(1)), "plaintext NBD refused (%s without TLS; TLS-PSK is required)" % match.group(2)
    match = _HANDSHAKE_FAILED.match(line)
    if match:
        reason = match.group(2)
        if "SNI" in reason:
            reason += " (a libnbd client given an IPv6 address sends it as the TLS server name: use qemu-img, " \
                      "see the README)"
        elif "illegal parameter" in reason or "decryption" in reason.lower():
            reason += " (wrong or stale PSK)"
        return int(match.group(1)), "TLS handshake failed: %s" % reason[:200]
    match = _CONN_ERROR.match(line)
    if match:
        return int(match.group(1)), "connection failed: %s" % match.group(2)[:200]
    return None


def host_for_uri(address: str) -> str:
    """``address`` as the host part of an NBD URI (wildcards become loopback)."""
    addr = ipaddress.ip_address(address)
    if addr.is_unspecified:
        return "localhost"
    if addr.version == 6:
        text = str(address)
        return "[%s]" % text.replace("%", "%25")
    return str(addr)


def export_uri(settings: ExportSettings, *, host: str | None = None, for_client: bool = False,
               tls_username: str | None = None) -> str:
    """The NBD URI of the export (``nbd://`` or ``nbds://`` with TLS).

    With ``for_client`` and TLS, the URI carries the PSK user and file so
    libnbd tools (nbdinfo, nbdcopy) can connect: only use it on the server.
    """
    host = host or host_for_uri(settings.address)
    if not settings.tls_psk_file:
        return "nbd://%s:%d/%s" % (host, settings.port, settings.name)
    if not for_client:
        return "nbds://%s:%d/%s" % (host, settings.port, settings.name)
    user = tls_username or psk_username(settings.tls_psk_file)
    return "nbds://%s@%s:%d/%s?tls-psk-file=%s" % (
        user, host, settings.port, settings.name, settings.tls_psk_file)


def psk_username(psk_file: str) -> str:
    """The first user name in an nbdkit/GnuTLS PSK file (``user:hex`` lines)."""
    try:
        with open(psk_file, "r", encoding="utf-8") as handle:
            for line in handle:
                match = PSK_USER_RE.match(line.strip())
                if match:
                    return match.group(1)
    except (OSError, UnicodeDecodeError) as exc:
        raise NbdExportError("cannot read PSK file %s: %s" % (psk_file, exc)) from None
    raise NbdExportError("PSK file %s holds no user:hexkey line" % psk_file)


def parse_tls_session_cipher(log_text: str) -> list:
    """Ciphers named in nbdkit's ``TLS session: (TLS1.3)--(AES-128-GCM)`` debug lines."""
    found = []
    for match in re.finditer(r"TLS session: \S*\(([A-Za-z0-9-]+)\)[ \t]*$", log_text, re.MULTILINE):
        found.append(match.group(1))
    return found


# ---------------------------------------------------------------- nbdinfo

@dataclasses.dataclass(frozen=True)
class ExportInfo:
    name: str
    size: int
    read_only: bool
    can_flush: bool
    can_fua: bool
    can_multi_conn: bool
    tls: bool

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


NBDINFO_MAX = 1 << 20


def parse_nbdinfo_json(text, export_name: str | None = None) -> ExportInfo:
    """Parse ``nbdinfo --json`` output; raise :class:`NbdInfoError` on anything odd."""
    if isinstance(text, (bytes, bytearray)):
        if len(text) > NBDINFO_MAX:
            raise NbdInfoError("nbdinfo output is too large")
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise NbdInfoError("nbdinfo output is not UTF-8") from None
    if not isinstance(text, str):
        raise NbdInfoError("nbdinfo output must be text")
    if len(text) > NBDINFO_MAX:
        raise NbdInfoError("nbdinfo output is too large")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise NbdInfoError("nbdinfo output is not JSON") from None
    if not isinstance(doc, dict):
        raise NbdInfoError("nbdinfo output is not a JSON object")
    exports = doc.get("exports")
    if not isinstance(exports, list) or not exports:
        raise NbdInfoError("nbdinfo output lists no exports")
    chosen = None
    for entry in exports:
        if not isinstance(entry, dict):
            raise NbdInfoError("nbdinfo export entry is not an object")
        if export_name is None or entry.get("export-name") == export_name:
            chosen = entry
            break
    if chosen is None:
        raise NbdInfoError("nbdinfo output has no export named %r" % (export_name,))

    def flag(key):
        value = chosen.get(key)
        if not isinstance(value, bool):
            raise NbdInfoError("nbdinfo field %s is missing or not a boolean" % key)
        return value

    size = chosen.get("export-size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size >= 1 << 63:
        raise NbdInfoError("nbdinfo field export-size is missing or invalid")
    name = chosen.get("export-name", "")
    if not isinstance(name, str):
        raise NbdInfoError("nbdinfo field export-name is not a string")
    tls = doc.get("TLS", False)
    if not isinstance(tls, bool):
        raise NbdInfoError("nbdinfo field TLS is not a boolean")
    return ExportInfo(name=name, size=size, read_only=flag("is_read_only"), can_flush=flag("can_flush"),
                      can_fua=flag("can_fua"), can_multi_conn=flag("can_multi_conn"), tls=tls)


def probe_export(uri: str, *, nbdinfo: str = "nbdinfo", timeout: float = 30.0, run=subprocess.run,
                 env: dict | None = None) -> ExportInfo:
    """Ask the running export about itself with ``nbdinfo --json --no-content URI``.

    ``--no-content``: by default nbdinfo reads the start of the export and describes it with file(1);
    nothing here needs that, and nbdinfo 1.14 without file(1) installed (a minimal Debian) prints
    uninitialised memory as the ``content`` field, so the JSON was at random not UTF-8.
    """
    try:
        proc = run([nbdinfo, "--json", "--no-content", uri], capture_output=True, timeout=timeout, check=False,
                   env=env)
    except FileNotFoundError:
        raise NbdExportError("%s not found (Debian package libnbd-bin)" % nbdinfo) from None
    except subprocess.TimeoutExpired:
        raise NbdExportError("nbdinfo timed out after %ss" % timeout) from None
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace") if isinstance(proc.stderr, bytes) else str(proc.stderr)
        raise NbdExportError("nbdinfo failed (rc=%s): %s" % (proc.returncode, err.strip()))
    return parse_nbdinfo_json(proc.stdout)


def expected_flags(settings: ExportSettings) -> dict:
    """The flags an export with ``settings`` must advertise."""
    return {
        "read_only": settings.read_only,
        "can_flush": True,
        "can_fua": settings.writable,
        "can_multi_conn": settings.multi_conn,
        "tls": bool(settings.tls_psk_file),
    }


def verify_export(settings: ExportSettings, info: ExportInfo, size: int | None = None) -> list:
    """Differences between what ``settings`` promise and what the server advertises."""
    problems = []
    for key, want in expected_flags(settings).items():
        have = getattr(info, key)
        if have != want:
            problems.append("%s is %s, expected %s" % (key, have, want))
    if size is not None and info.size != size:
        problems.append("size is %d, expected %d" % (info.size, size))
    return problems


def source_size(path: str) -> int:
    """Size in bytes of an image file or block device."""
    with open(path, "rb") as handle:
        return handle.seek(0, os.SEEK_END)


# ---------------------------------------------------------------- recorded state

STATE_MAX = 64 * 1024


def state_to_json(settings: ExportSettings, argv: list, extra: dict | None = None) -> str:
    doc = {"version": STATE_VERSION, "kind": "stiefel-nbd-export", "settings": settings.to_dict(),
           "argv": list(argv)}
    if extra:
        doc["extra"] = extra
    return json.dumps(doc, sort_keys=True, indent=1) + "\n"


def parse_state(text):
    """Parse a state file into ``(settings, argv)``; :class:`StateFileError` otherwise."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise StateFileError("state file is not UTF-8") from None
    if not isinstance(text, str) or len(text) > STATE_MAX:
        raise StateFileError("state file is too large or not text")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise StateFileError("state file is not JSON") from None
    if not isinstance(doc, dict) or doc.get("kind") != "stiefel-nbd-export":
        raise StateFileError("not a stiefel NBD export state file")
    if doc.get("version") != STATE_VERSION:
        raise StateFileError("unsupported state file version %r" % (doc.get("version"),))
    argv = doc.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise StateFileError("state file argv is not a list of strings")
    try:
        settings = ExportSettings.from_dict(doc.get("settings"))
    except NbdExportError as exc:
        raise StateFileError("state file settings are invalid: %s" % exc) from None
    return settings, argv


def read_state(path: str):
    """``(settings, argv)`` recorded at ``path``, or ``None`` if it is absent or unusable."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(STATE_MAX + 1)
    except FileNotFoundError:
        return None
    try:
        return parse_state(data)
    except StateFileError:
        return None


# ---------------------------------------------------------------- pidfile supervision

def read_pidfile(path: str) -> int | None:
    try:
        with open(path, "r", encoding="ascii") as handle:
            text = handle.read(32).strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text.isdigit() or not 1 < int(text) < 1 << 22:
        return None
    return int(text)


def process_argv(pid: int) -> list | None:
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    if not raw:
        return None
    return [part.decode("utf-8", "surrogateescape") for part in raw.rstrip(b"\0").split(b"\0")]


def pid_matches(pid: int | None, argv: list) -> bool:
    """True if process ``pid`` runs exactly ``argv`` (program compared by basename)."""
    if not pid:
        return False
    running = process_argv(pid)
    if not running or len(running) != len(argv):
        return False
    return os.path.basename(running[0]) == os.path.basename(argv[0]) and running[1:] == argv[1:]


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM then, after ``timeout``, SIGKILL one process; wait until it is gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_running(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    while is_running(pid):
        time.sleep(0.05)


def is_running(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid, "r", encoding="ascii", errors="replace") as handle:
            fields = handle.read().rsplit(")", 1)[-1].split()
    except OSError:
        return False
    return bool(fields) and fields[0] != "Z"


def start_daemon(settings: ExportSettings, pidfile: str, priority_file: str | None,
                 logfile: str | None = None, nbdkit: str = "nbdkit", timeout: float = 15.0) -> int:
    """Start nbdkit detached (it forks once listening) and return its PID from ``pidfile``."""
    argv = server_argv(settings, foreground=False, pidfile=pidfile, nbdkit=nbdkit)
    env = server_env(settings, priority_file)
    try:
        os.unlink(pidfile)
    except FileNotFoundError:
        pass
    # nbdkit's daemon child may keep stderr open: never use a pipe here.
    if logfile:
        log = open(logfile, "ab+")  # pylint: disable=consider-using-with
    else:
        log = tempfile.TemporaryFile()  # pylint: disable=consider-using-with
    try:
        start = log.seek(0, os.SEEK_END)
        try:
            proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                  timeout=timeout, check=False)
        except FileNotFoundError:
            raise NbdExportError("%s not found (Debian package nbdkit)" % nbdkit) from None
        if proc.returncode != 0:
            log.seek(start)
            message = log.read(8192).decode("utf-8", "replace").strip()
            raise NbdExportError("nbdkit failed to start (rc=%d): %s" % (proc.returncode, message))
    finally:
        log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = read_pidfile(pidfile)
        if pid and pid_matches(pid, argv):
            return pid
        time.sleep(0.05)
    raise NbdExportError("nbdkit did not write its pidfile %s" % pidfile)


# ---------------------------------------------------------------- systemd

def _systemd_quote(arg: str) -> str:
    if arg and re.match(r"^[A-Za-z0-9_@%+=:,./-]+$", arg) and "%" not in arg:
        return arg
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return '"%s"' % escaped


def unit_name(name: str) -> str:
    return "stiefel-nbd-%s.service" % name


def render_systemd_unit(settings: ExportSettings, pidfile: str, priority_file: str | None,
                        nbdkit: str = "/usr/bin/nbdkit") -> str:
    """A forking service running nbdkit with ``settings`` (nbdkit writes ``pidfile`` once listening)."""
    argv = server_argv(settings, foreground=False, pidfile=pidfile, nbdkit=nbdkit)
    lines = [
        "# Generated by stiefel.system (nbd_serve); changes are overwritten.",
        "[Unit]",
        "Description=stiefel NBD export %s (nbdkit)" % settings.name,
        "Documentation=man:nbdkit(1) man:nbdkit-file-plugin(1)",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=forking",
        "PIDFile=%s" % pidfile,
    ]
    for key, value in sorted(tls_environment(settings, priority_file).items()):
        lines.append("Environment=%s" % _systemd_quote("%s=%s" % (key, value)))
    lines += [
        "ExecStart=%s" % " ".join(_systemd_quote(a) for a in argv),
        "Restart=on-failure",
        "RestartSec=2",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)
