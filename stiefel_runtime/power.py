# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The serving laptop's power: AC or battery, from sysfs, and the warning the server beeps."""

from __future__ import annotations

import glob
import os

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


def power_warning(supplies, low=LOW_BATTERY):
    """``(level, message)``: 0 = fine (on AC, or no battery), 1 = on battery, 2 = on battery and low."""
    batteries = [s for s in supplies if s.get("type") == "Battery"]
    mains = [s for s in supplies if s.get("type") in ("Mains", "USB", "USB_C", "USB_PD")]
    if not batteries:
        return 0, "no battery"
    on_ac = any(s.get("online") == 1 for s in mains) or any(s.get("status") in ("Charging", "Full") for s in batteries)
    if on_ac:
        return 0, "on AC power"
    capacities = [s["capacity"] for s in batteries if isinstance(s.get("capacity"), int)]
    capacity = min(capacities) if capacities else None
    if capacity is not None and capacity <= low:
        return 2, "WARNING: the laptop runs on battery and is LOW (%d%%): connect its power supply NOW" % capacity
    return 1, "warning: the laptop runs on battery (%s): connect its power supply" % (
        "%d%%" % capacity if capacity is not None else "unknown charge")
