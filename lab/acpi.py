"""A laptop battery for a QEMU VM: an ACPI SSDT (``-acpitable file=...``) with a Control Method Battery.

QEMU emulates no battery, and Debian's kernel is built without the ``test_power`` driver
(``# CONFIG_TEST_POWER is not set``). Real laptops describe their battery to the kernel the way this table
does: a ``PNP0C0A`` device whose ``_BIF``/``_BST`` answer design capacity and the present state, and an
``ACPI0003`` AC adapter whose ``_PSR`` says whether it is plugged in. Debian's own ``battery`` and ``ac``
drivers (autoloaded by udev from the devices' modaliases) then register ``/sys/class/power_supply/BAT0`` and
``ADP0`` as on any laptop, so the code under test reads a real kernel battery; only the firmware is ours.

The AML is written here (a handful of opcodes) rather than compiled with iasl, so the tests need no
acpica-tools; ``iasl -d`` on the output gives back the ASL in :func:`battery_ssdt`'s docstring.
"""

from __future__ import annotations

import struct

# ACPI 6.x, 20.2 (AML grammar): the few opcodes a battery needs.
_SCOPE, _NAME, _METHOD, _RETURN, _PACKAGE = 0x10, 0x08, 0x14, 0xA4, 0x12
_DEVICE = b"\x5b\x82"
_ZERO, _ONE, _BYTE, _WORD, _DWORD, _STRING = 0x00, 0x01, 0x0A, 0x0B, 0x0C, 0x0D
# _BST state bits (ACPI 10.2.2.6)
DISCHARGING, CHARGING = 1, 2


def _pkg_length(body_len):
    """PkgLength encoding of a body of ``body_len`` bytes (the length counts its own bytes)."""
    if body_len + 1 < 0x40:
        return bytes([body_len + 1])
    for extra in (1, 2, 3):
        total = body_len + 1 + extra
        if total < 1 << (4 + 8 * extra):
            out = [(extra << 6) | (total & 0x0F)]
            out += [(total >> (4 + 8 * i)) & 0xFF for i in range(extra)]
            return bytes(out)
    raise ValueError("package too long: %d" % body_len)


def _seg(name):
    return name.ljust(4, "_").encode("ascii")


def _data(value):
    if isinstance(value, str):
        return bytes([_STRING]) + value.encode("ascii") + b"\0"
    if isinstance(value, bytes):
        return value
    if value == 0:
        return bytes([_ZERO])
    if value == 1:
        return bytes([_ONE])
    if value <= 0xFF:
        return bytes([_BYTE, value])
    if value <= 0xFFFF:
        return bytes([_WORD]) + struct.pack("<H", value)
    return bytes([_DWORD]) + struct.pack("<I", value)


def _package(*items):
    body = bytes([len(items)]) + b"".join(_data(item) for item in items)
    return bytes([_PACKAGE]) + _pkg_length(len(body)) + body


def _name(name, value):
    return bytes([_NAME]) + _seg(name) + _data(value)


def _method_returning(name, value):
    body = _seg(name) + b"\x00" + bytes([_RETURN]) + _data(value)  # no arguments, not serialized
    return bytes([_METHOD]) + _pkg_length(len(body)) + body


def _device(name, *terms):
    body = _seg(name) + b"".join(terms)
    return _DEVICE + _pkg_length(len(body)) + body


def eisa_id(text):
    """``EisaId("PNP0C0A")``: three letters in 5 bits each and four hex digits, as the DWord AML stores."""
    letters = ((ord(text[0]) - 0x40) << 10) | ((ord(text[1]) - 0x40) << 5) | (ord(text[2]) - 0x40)
    product = int(text[3:], 16)
    return struct.unpack("<I", struct.pack(">HH", letters, product))[0]


def battery_ssdt(charge, ac_online=False, full_mwh=50000):
    """The SSDT bytes of a battery at ``charge`` percent, discharging unless ``ac_online``::

        Scope (\\_SB) {
            Device (BAT0) {
                Name (_HID, EisaId ("PNP0C0A"))  Name (_UID, 1)
                Method (_STA) { Return (0x1F) }  // present, enabled, battery present
                Name (_BIF, Package () { 0 /* mWh */, FULL, FULL, 1, 11100, FULL/10, FULL/20, 1, 1,
                                         "STIEFEL-TEST", "1", "LION", "stiefel" })
                Method (_BST) { Return (Package () { STATE, 10000, FULL * charge / 100, 11100 }) }
            }
            Device (ADP0) {
                Name (_HID, "ACPI0003")
                Method (_STA) { Return (0x0F) }
                Method (_PSR) { Return (AC) }
            }
        }
    """
    if not 0 <= charge <= 100:
        raise ValueError(charge)
    state = CHARGING if ac_online else DISCHARGING
    battery = _device(
        "BAT0", _name("_HID", _data(eisa_id("PNP0C0A"))), _name("_UID", 1), _method_returning("_STA", 0x1F),
        _name("_BIF", _package(0, full_mwh, full_mwh, 1, 11100, full_mwh // 10, full_mwh // 20, 1, 1,
                               "STIEFEL-TEST", "1", "LION", "stiefel")),
        _method_returning("_BST", _package(state, 10000, full_mwh * charge // 100, 11100)))
    adapter = _device("ADP0", _name("_HID", "ACPI0003"), _method_returning("_STA", 0x0F),
                      _method_returning("_PSR", 1 if ac_online else 0))
    scope_body = b"\x5c" + _seg("_SB") + battery + adapter
    aml = bytes([_SCOPE]) + _pkg_length(len(scope_body)) + scope_body
    header = struct.pack("<4sIBB6s8sI4sI", b"SSDT", 36 + len(aml), 2, 0, b"STIEFL", b"BATTERY ", 1, b"STFL", 1)
    table = bytearray(header + aml)
    table[9] = (-sum(table)) & 0xFF
    return bytes(table)


def write_battery_ssdt(path, charge, ac_online=False):
    """Write :func:`battery_ssdt` to ``path`` (for ``-acpitable file=PATH``); return ``path``."""
    with open(path, "wb") as handle:
        handle.write(battery_ssdt(charge, ac_online=ac_online))
    return path
