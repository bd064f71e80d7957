# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The ramdisk build's APT sources: the mirror and suite come from the host's configuration."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

from ansible_collections.stiefel.system.plugins.module_utils.errors import RamdiskBuildError


@dataclass
class SourceEntry:
    types: list = field(default_factory=list)
    uris: list = field(default_factory=list)
    suites: list = field(default_factory=list)
    components: list = field(default_factory=list)
    enabled: bool = True


def parse_deb822_sources(text):
    """Parse a deb822 ``.sources`` file into :class:`SourceEntry` objects.

    Unknown fields are ignored, comment lines dropped, continuation lines
    (starting with whitespace) appended to the previous field. Stanzas missing
    Types/URIs/Suites are skipped.
    """
    entries = []
    stanzas = []
    current = {}
    last = None
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if current:
                stanzas.append(current)
            current, last = {}, None
            continue
        if raw[0] in " \t":
            if last is not None:
                current[last] += " " + raw.strip()
            continue
        key, sep, value = raw.partition(":")
        if not sep:
            continue
        last = key.strip().lower()
        current[last] = value.strip()
    if current:
        stanzas.append(current)
    for st in stanzas:
        types = st.get("types", "").split()
        uris = st.get("uris", "").split()
        suites = st.get("suites", "").split()
        if not (types and uris and suites):
            continue
        enabled = st.get("enabled", "yes").strip().lower() not in ("no", "false", "0")
        entries.append(SourceEntry(types, uris, suites, st.get("components", "").split(), enabled))
    return entries


def parse_one_line_sources(text):
    """Parse one-line-style ``sources.list`` text (``deb [opts] uri suite comp...``)."""
    entries = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        kind = parts[0]
        if kind not in ("deb", "deb-src"):
            continue
        rest = parts[1:]
        if rest and rest[0].startswith("["):
            # options: [ a=b c=d ] possibly split over several words
            while rest and not rest[0].endswith("]"):
                rest = rest[1:]
            rest = rest[1:]
        if len(rest) < 2:
            continue
        entries.append(SourceEntry([kind], [rest[0]], [rest[1]], rest[2:], True))
    return entries


def read_host_sources(etc_apt="/etc/apt"):
    """All APT source entries configured on this host, in APT's reading order."""
    entries = []
    main_list = os.path.join(etc_apt, "sources.list")
    if os.path.isfile(main_list):
        with open(main_list, encoding="utf-8", errors="replace") as f:
            entries += parse_one_line_sources(f.read())
    for path in sorted(glob.glob(os.path.join(etc_apt, "sources.list.d", "*"))):
        if path.endswith(".list"):
            parse = parse_one_line_sources
        elif path.endswith(".sources"):
            parse = parse_deb822_sources
        else:
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            entries += parse(f.read())
    return entries


def _is_derived_suite(suite, base):
    return suite.startswith(base + "-") or suite.startswith(base + "/")


def select_mirrors(entries, mirror="", suite="", components=None):
    """Choose the suite and the mmdebstrap mirror lines.

    Returns ``(mirror_uri, suite, components, lines)``. With ``mirror`` given it
    wins (one line). Otherwise the first enabled ``deb`` entry whose suite is a
    plain release name (no ``-updates``/``-security``) sets mirror and suite, and
    every host entry for that suite and its ``-updates``/``-security`` companions
    becomes a line (so the image gets security fixes). Backports and
    proposed-updates are left out.
    """
    debs = [e for e in entries if e.enabled and "deb" in e.types]
    if mirror:
        if not suite:
            raise RamdiskBuildError("ramdisk_mirror is set, so ramdisk_suite must be set too")
        comps = list(components or ["main"])
        return mirror, suite, comps, ["deb %s %s %s" % (mirror, suite, " ".join(comps))]
    primary = None
    for e in debs:
        for s in e.suites:
            if "-" in s or "/" in s:
                continue
            if suite and s != suite:
                continue
            if any(u.rstrip("/").endswith("-security") for u in e.uris):
                continue
            primary = (e.uris[0], s, e.components or ["main"])
            break
        if primary:
            break
    if primary is None:
        raise RamdiskBuildError(
            "no usable Debian source in the host's APT configuration%s; set ramdisk_mirror and ramdisk_suite"
            % (" for suite %r" % suite if suite else ""))
    base_uri, base_suite, base_comps = primary
    comps = list(components) if components else list(base_comps)
    lines = []
    for e in debs:
        for s in e.suites:
            if s != base_suite and not _is_derived_suite(s, base_suite):
                continue
            if s.endswith("-backports") or s.endswith("-proposed-updates"):
                continue
            for u in e.uris:
                line = "deb %s %s %s" % (u, s, " ".join(comps))
                if line not in lines:
                    lines.append(line)
    return base_uri, base_suite, comps, lines
