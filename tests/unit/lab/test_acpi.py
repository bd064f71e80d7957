"""lab.acpi: the SSDT with a battery that the QEMU power test hands to QEMU."""

from __future__ import annotations

import struct

import pytest

from lab import acpi


def test_eisa_id_matches_the_well_known_values():
    assert acpi.eisa_id("PNP0C0A") == 0x0A0CD041
    assert acpi.eisa_id("PNP0A03") == 0x030AD041


@pytest.mark.parametrize("length", [0, 1, 62, 63, 64, 200, 4094, 4095, 5000, 70000])
def test_pkg_length_counts_its_own_bytes(length):
    encoded = acpi._pkg_length(length)  # pylint: disable=protected-access
    lead = encoded[0] >> 6
    assert len(encoded) == lead + 1
    if lead == 0:
        total = encoded[0] & 0x3F
    else:
        total = encoded[0] & 0x0F
        for i, byte in enumerate(encoded[1:]):
            total |= byte << (4 + 8 * i)
    assert total == length + len(encoded)


@pytest.mark.parametrize("charge,ac_online", [(5, False), (100, True), (0, False)])
def test_table_header_length_and_checksum(charge, ac_online):
    table = acpi.battery_ssdt(charge, ac_online=ac_online)
    signature, length, revision = struct.unpack_from("<4sIB", table)
    assert (signature, length, revision) == (b"SSDT", len(table), 2)
    assert sum(table) % 256 == 0
    assert b"BAT0" in table and b"ADP0" in table and b"ACPI0003\0" in table


def test_remaining_capacity_is_the_charge_of_the_full_capacity():
    table = acpi.battery_ssdt(5, full_mwh=50000)
    # _BST's package: state 1 (discharging), rate 10000 (WordPrefix), remaining 2500, voltage 11100
    assert b"_BST\x00\xa4\x12" in table
    assert b"\x04\x01\x0b" + struct.pack("<H", 10000) + b"\x0b" + struct.pack("<H", 2500) in table


def test_charge_out_of_range_is_refused():
    with pytest.raises(ValueError):
        acpi.battery_ssdt(101)
