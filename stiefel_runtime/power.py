# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The serving laptop's power: AC or battery, from sysfs, and the warning the server beeps."""

from __future__ import annotations

import glob
import os

from stiefel_runtime import messages

LOW_BATTERY = 20


def read_power_supplies(sysfs="/sys/class/power_supply"):
    """``[{"name", "type", "online", "capacity", "status"}]`` from sysfs (missing values are None)."""
    supplies = []
    for path in sorted(glob.glob(os.path.join(sysfs, "*"))):
        entry = {"name": os.path.basename(path)}
        for field in ("type", "online", "capacity", "status"):
            try:
                with open(os.path.join(path, field), "r", encoding="ascii", errors="replace") as handle:
                    value = handle.read(64).strip()
            except OSError:
                value = None
            if field in ("online", "capacity") and value is not None:
                try:
                    value = int(value)
                except ValueError:
                    value = None
            entry[field] = value
        supplies.append(entry)
    return supplies


def battery_state(supplies):
    """``(has_battery, on_battery, charge)``; charge is the lowest battery's percent, or None."""
    batteries = [s for s in supplies if s.get("type") == "Battery"]
    mains = [s for s in supplies if s.get("type") in ("Mains", "USB", "USB_C", "USB_PD")]
    if not batteries:
        return False, False, None
    on_ac = any(s.get("online") == 1 for s in mains) or any(s.get("status") in ("Charging", "Full") for s in batteries)
    capacities = [s["capacity"] for s in batteries if isinstance(s.get("capacity"), int) and 0 <= s["capacity"] <= 100]
    return True, not on_ac, min(capacities) if capacities else None


def power_warning(supplies, low=LOW_BATTERY):
    """``(level, message)``: 0 = fine (on AC, or no battery), 1 = on battery, 2 = on battery and low."""
    has_battery, on_battery, capacity = battery_state(supplies)
    if not has_battery:
        return 0, "no battery"
    if not on_battery:
        return 0, "on AC power"
    if capacity is not None and capacity <= low:
        return 2, "WARNING: the laptop runs on battery and is LOW (%d%%): connect its power supply NOW" % capacity
    return 1, "warning: the laptop runs on battery (%s): connect its power supply" % (
        "%d%%" % capacity if capacity is not None else "unknown charge")


def power_note(supplies, low=LOW_BATTERY, shutdown_charge=None):
    """``(flags, charge)`` of the POWER note (messages.POWER_*); SHUT_DOWN at or below ``shutdown_charge``."""
    _has_battery, on_battery, charge = battery_state(supplies)
    flags = 0
    if on_battery:
        flags |= messages.POWER_ON_BATTERY
        if charge is not None and charge <= low:
            flags |= messages.POWER_LOW
        if charge is not None and shutdown_charge is not None and charge <= shutdown_charge:
            flags |= messages.POWER_SHUT_DOWN
    return flags, charge


def describe_note(flags, charge):
    """One line for a console or a log: what a POWER note says."""
    level = "unknown charge" if charge is None else "%d%%" % charge
    if flags & messages.POWER_SHUT_DOWN:
        return "the laptop serving this disk is on battery at %s: it asks this desktop to shut down cleanly" % level
    if flags & messages.POWER_LOW:
        return "the laptop serving this disk is on battery and LOW (%s): connect its power supply" % level
    if flags & messages.POWER_ON_BATTERY:
        return "the laptop serving this disk is on battery (%s)" % level
    return "the laptop serving this disk is on AC power"
