# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The standalone server's config file (``stiefel-server --config /etc/stiefel/server.conf``).

Standalone mode serves a disk that is not in use (an external disk, an image
file) from a running laptop, without the kexec into the server ramdisk.

Format: UTF-8 text, at most ``MAX_CONFIG_SIZE`` bytes, one ``key = value``
per line; blank lines and lines starting with ``#`` are ignored; values are
taken verbatim after trimming (no quoting, no escapes, no interpolation)::

    # the disk or image file to serve (never the running system's own disk)
    disk = /srv/stiefel/desktop.img
    # where the payload comes from: a directory holding the boot config,
    # kernel and initrd ...
    boot_dir = /srv/stiefel/boot
    # ... or a partition holding them, mounted read-only just long enough to read it
    # boot = UUID=0b8f...
    key = /etc/stiefel/key
    # listen (and bring up) only these interfaces, by name or MAC; default:
    # every interface but lo, as they appear, none of them reconfigured
    interfaces = enp0s31f6 52:54:00:ab:cd:02
    mtu = 9000
    export_name = stiefel
    # answer PXE / UEFI HTTP boot on the first of those interfaces that is up
    # (issue 17), sending this keyless client ramdisk; a desktop pairs by code
    netboot = yes
    netboot_kernel = /usr/lib/stiefel/ramdisk/vmlinuz
    netboot_initrd = /usr/lib/stiefel/ramdisk/initrd.img

Keys: ``disk`` (required); exactly one of ``boot_dir`` and ``boot``;
optional ``key``, ``interfaces``, ``mtu`` (only with ``interfaces``: the
server changes no interface it was not given), ``export_name``,
``nbd_port``, ``http_port``, ``run_dir``, ``debug`` (yes/no), ``netboot``
(yes/no; yes needs ``interfaces``, ``netboot_kernel`` and
``netboot_initrd``: dnsmasq is confined to one named port). Unknown or
repeated keys, and anything else that is not this format, raise
:class:`ServerConfigError` naming the line.

The parser is pure (it never looks at the file system beyond reading the
file): whether the disk may be served is the agent's check at start
(``nbd_export.check_exportable``).
"""

from __future__ import annotations

import dataclasses
import re
import sys

from ansible_collections.stiefel.system.plugins.module_utils.errors import StiefelError

DEFAULT_PATH = "/etc/stiefel/server.conf"
DEFAULT_KEY_PATH = "/etc/stiefel/key"
DEFAULT_RUN_DIR = "/run/stiefel-server"
DEFAULT_HTTP_PORT = 61571
DEFAULT_NBD_PORT = 10809
DEFAULT_EXPORT_NAME = "stiefel"
MAX_CONFIG_SIZE = 64 * 1024
MAX_LINE = 4096
MAX_PATH = 1024
MAX_INTERFACES = 64
MIN_MTU = 1280
MAX_MTU = 65535

KEYS = ("disk", "boot_dir", "boot", "key", "interfaces", "mtu", "export_name", "nbd_port", "http_port",
        "run_dir", "debug", "netboot", "netboot_kernel", "netboot_initrd")
_KEY_RE = re.compile(r"\A[a-z_]{1,32}\Z")
_MAC_RE = re.compile(r"\A[0-9a-f]{2}([:-][0-9a-f]{2}){5}\Z")
# Linux interface names: 1-15 bytes, no '/', ':' or whitespace (dev_valid_name).
_IFNAME_RE = re.compile(r"\A[A-Za-z0-9_.@+-]{1,15}\Z")
_EXPORT_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_DEVICE_TAGS = ("UUID", "LABEL", "PARTUUID", "PARTLABEL")
_TRUE = ("yes", "true", "on", "1")
_FALSE = ("no", "false", "off", "0")


class ServerConfigError(StiefelError):
    """The standalone server config is not usable (the message names the key or line)."""


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """A validated standalone server config."""

    disk: str
    boot_dir: str | None = None
    boot: str | None = None
    key: str = DEFAULT_KEY_PATH
    interfaces: tuple = ()
    mtu: int | None = None
    export_name: str = DEFAULT_EXPORT_NAME
    nbd_port: int = DEFAULT_NBD_PORT
    http_port: int = DEFAULT_HTTP_PORT
    run_dir: str = DEFAULT_RUN_DIR
    debug: bool = False
    netboot: bool = False
    netboot_kernel: str | None = None
    netboot_initrd: str | None = None


def parse_lines(data) -> dict:
    """``key -> value`` (strings) from the file's bytes or text; raises ServerConfigError."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    if len(data) > MAX_CONFIG_SIZE:
        raise ServerConfigError("config is %d bytes, more than the %d allowed" % (len(data), MAX_CONFIG_SIZE))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ServerConfigError("config is not UTF-8 text (byte %d)" % exc.start) from None
    values = {}
    for number, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r").strip()
        if not line or line.startswith("#"):
            continue
        if len(line) > MAX_LINE:
            raise ServerConfigError("line %d: longer than %d characters" % (number, MAX_LINE))
        if any(ord(ch) < 32 and ch != "\t" for ch in line):
            raise ServerConfigError("line %d: control characters" % number)
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep:
            raise ServerConfigError("line %d: expected 'key = value'" % number)
        if not _KEY_RE.match(key) or key not in KEYS:
            raise ServerConfigError("line %d: unknown key %r (known: %s)" % (number, key[:40], ", ".join(KEYS)))
        if key in values:
            raise ServerConfigError("line %d: %s given twice" % (number, key))
        values[key] = value.strip()
    return values


def _path(key, value):
    if not value.startswith("/") or len(value) > MAX_PATH or "\0" in value:
        raise ServerConfigError("%s must be an absolute path (at most %d characters), got %r"
                                % (key, MAX_PATH, value[:80]))
    if any(part == ".." for part in value.split("/")):
        raise ServerConfigError("%s must not contain '..': %r" % (key, value[:80]))
    return value


def _number(key, value, low, high):
    if not value.isascii() or not value.isdigit() or len(value) > 5:
        raise ServerConfigError("%s must be a number %d-%d, got %r" % (key, low, high, value[:20]))
    number = int(value)
    if not low <= number <= high:
        raise ServerConfigError("%s must be a number %d-%d, got %d" % (key, low, high, number))
    return number


def _device_spec(value):
    """``boot``: a /dev path or UUID=/LABEL=/PARTUUID=/PARTLABEL= (as stiefel.boot= in the ramdisk)."""
    if value.startswith("/"):
        return _path("boot", value)
    tag, sep, rest = value.partition("=")
    if not sep or tag.upper() not in _DEVICE_TAGS or not rest or len(value) > MAX_PATH or any(
            ch.isspace() for ch in value):
        raise ServerConfigError("boot must be a device path or one of %s=..., got %r"
                                % ("=, ".join(_DEVICE_TAGS), value[:80]))
    return value


def parse_interfaces(value) -> tuple:
    """Interface names and MACs (lower-case, ':'-separated), separated by spaces or commas."""
    items = [item for item in re.split(r"[\s,]+", value) if item]
    if len(items) > MAX_INTERFACES:
        raise ServerConfigError("interfaces: more than %d entries" % MAX_INTERFACES)
    out = []
    for item in items:
        if _MAC_RE.match(item.lower()):
            item = item.lower().replace("-", ":")
        elif not _IFNAME_RE.match(item) or item in (".", ".."):
            raise ServerConfigError("interfaces: %r is neither an interface name nor a MAC address" % item[:40])
        if item == "lo":
            raise ServerConfigError("interfaces: lo cannot reach a client")
        if item not in out:
            out.append(item)
    return tuple(out)


def build(values: dict) -> ServerConfig:
    """Validate ``key -> string`` values (from the file, flags overriding) into a ServerConfig."""
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise ServerConfigError("unknown keys: %s" % ", ".join(map(str, unknown))[:200])
    for key, value in values.items():
        if not isinstance(value, str):
            raise ServerConfigError("%s must be a string" % key)
    if not values.get("disk"):
        raise ServerConfigError("disk is missing: name the disk or image file to serve (disk = /path)")
    if bool(values.get("boot_dir")) == bool(values.get("boot")):
        raise ServerConfigError("give exactly one of boot_dir (a directory) and boot (a partition) "
                                "to read the boot payload from")
    out = {"disk": _path("disk", values["disk"])}
    if values.get("boot_dir"):
        out["boot_dir"] = _path("boot_dir", values["boot_dir"])
    else:
        out["boot"] = _device_spec(values["boot"])
    for key in ("key", "run_dir"):
        if values.get(key):
            out[key] = _path(key, values[key])
    if values.get("interfaces"):
        out["interfaces"] = parse_interfaces(values["interfaces"])
    if values.get("mtu"):
        if not out.get("interfaces"):
            raise ServerConfigError("mtu needs interfaces: the standalone server changes no interface it was "
                                    "not given")
        out["mtu"] = _number("mtu", values["mtu"], MIN_MTU, MAX_MTU)
    if values.get("export_name"):
        if not _EXPORT_RE.match(values["export_name"]):
            raise ServerConfigError("export_name must be 1-64 characters of A-Z a-z 0-9 . _ - "
                                    "(not starting with . _ -), got %r" % values["export_name"][:80])
        out["export_name"] = values["export_name"]
    for key in ("nbd_port", "http_port"):
        if values.get(key):
            out[key] = _number(key, values[key], 1, 65535)
    if out.get("nbd_port", DEFAULT_NBD_PORT) == out.get("http_port", DEFAULT_HTTP_PORT):
        raise ServerConfigError("nbd_port and http_port must differ")
    for key in ("debug", "netboot"):
        if values.get(key):
            flag = values[key].lower()
            if flag not in _TRUE + _FALSE:
                raise ServerConfigError("%s must be yes or no, got %r" % (key, values[key][:20]))
            out[key] = flag in _TRUE
    for key in ("netboot_kernel", "netboot_initrd"):
        if values.get(key):
            if not out.get("netboot"):
                raise ServerConfigError("%s is set but netboot is not yes" % key)
            out[key] = _path(key, values[key])
    if out.get("netboot"):
        if not (out.get("netboot_kernel") and out.get("netboot_initrd")):
            raise ServerConfigError("netboot = yes needs netboot_kernel and netboot_initrd (the keyless client "
                                    "ramdisk)")
        if not out.get("interfaces"):
            raise ServerConfigError("netboot = yes needs interfaces: the DHCP server answers on one named port, "
                                    "never on every interface")
    return ServerConfig(**out)


def parse(data, overrides=None) -> ServerConfig:
    """The config in ``data`` (bytes or text), with ``overrides`` (flags) replacing its values."""
    values = parse_lines(data)
    values.update(overrides or {})
    return build(values)


def load(path, overrides=None) -> ServerConfig:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_SIZE + 1)
    except OSError as exc:
        raise ServerConfigError("cannot read %s: %s" % (path, exc.strerror or exc)) from None
    try:
        return parse(data, overrides)
    except ServerConfigError as exc:
        raise ServerConfigError("%s: %s" % (path, exc)) from None


def render(config: ServerConfig) -> str:
    """The file text for ``config`` (the role writes the same keys from its template)."""
    lines = ["disk = %s" % config.disk]
    lines.append("boot_dir = %s" % config.boot_dir if config.boot_dir else "boot = %s" % config.boot)
    lines.append("key = %s" % config.key)
    if config.interfaces:
        lines.append("interfaces = %s" % " ".join(config.interfaces))
    if config.mtu:
        lines.append("mtu = %d" % config.mtu)
    lines += ["export_name = %s" % config.export_name, "nbd_port = %d" % config.nbd_port,
              "http_port = %d" % config.http_port, "run_dir = %s" % config.run_dir,
              "debug = %s" % ("yes" if config.debug else "no")]
    if config.netboot:
        lines += ["netboot = yes", "netboot_kernel = %s" % config.netboot_kernel,
                  "netboot_initrd = %s" % config.netboot_initrd]
    return "\n".join(lines) + "\n"


def interface_filter(selectors):
    """A predicate on netlink ``Link`` objects: True for a link named or with a MAC in ``selectors``.

    None when ``selectors`` is empty (every non-loopback link).
    """
    if not selectors:
        return None
    wanted = frozenset(selectors)

    def selected(link):
        return link.ifname in wanted or (link.mac or "").lower() in wanted

    return selected


def check(path, out=None, err=None):
    """Parse the file at ``path`` and print it normalized: 0 valid, 2 refused (the reason on ``err``).

    ``python3 -m stiefel_runtime.server_config FILE`` runs only this, so the role's template
    validation needs neither pyroute2 nor cryptography (the server agent's imports).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        out.write(render(load(path)))
    except ServerConfigError as exc:
        err.write("stiefel-server: refused: %s\n" % exc)
        return 2
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.stderr.write("usage: python3 -m stiefel_runtime.server_config FILE\n")
        sys.exit(2)
    sys.exit(check(sys.argv[1]))
