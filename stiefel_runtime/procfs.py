# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Counters the server shows from /proc: a process's I/O and the peers of a TCP port."""

from __future__ import annotations

import socket


def process_io(pid):
    """``(read_bytes, written_bytes)`` a process did through syscalls (rchar/wchar), or None."""
    try:
        with open("/proc/%d/io" % pid, "r", encoding="ascii") as handle:
            fields = dict(line.split(":", 1) for line in handle.read().splitlines() if ":" in line)
        return int(fields["rchar"]), int(fields["wchar"])
    except (OSError, KeyError, ValueError):
        return None


def tcp_peers(port, path="/proc/net/tcp6"):
    """Remote addresses with an established TCP connection to local ``port``."""
    peers = []
    try:
        with open(path, "r", encoding="ascii") as handle:
            lines = handle.read().splitlines()[1:]
    except OSError:
        return peers
    for line in lines:
        parts = line.split()
        if len(parts) < 4 or parts[3] != "01":
            continue
        try:
            local_port = int(parts[1].split(":")[1], 16)
            remote = parts[2].split(":")[0]
        except (IndexError, ValueError):
            continue
        if local_port != port:
            continue
        raw = bytes.fromhex(remote)
        addr = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        peers.append(socket.inet_ntop(socket.AF_INET6, addr))
    return peers
