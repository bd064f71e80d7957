# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Tell the laptop's server ramdisk what to do once this desktop is done: ``return``, ``poweroff`` or ``stay``.

Run in the laptop's OS booted on the desktop (``stiefelctl when-done POLICY``
or ``python3 -m stiefel_runtime.whendone POLICY``, as root: it reads the
stiefel key). It finds the server on the kernel command line the client
booted it with (``stiefel.server=`` and the NIC of ``stiefel.mac=``), sends
it a DISCOVER, answers the OFFER's fresh challenge with WHEN_DONE and waits
for the WHEN_DONE_ACK (docs/protocol.md): a recorded request is worth nothing
later. The policy holds for the rest of this server run; the laptop role's
``laptop_when_done`` is what the next run starts with.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import sys
import time

from ansible_collections.stiefel.system.plugins.module_utils import keyfile
from ansible_collections.stiefel.system.plugins.module_utils.errors import ProtocolError, ReplayedMessage, StiefelError
from stiefel_runtime import discovery, messages
from stiefel_runtime.common import DEFAULT_KEY_PATH, parse_cmdline, read_cmdline

ATTEMPTS = 3
ANSWER_TIMEOUT = 2.0


class WhenDoneError(StiefelError):
    """The server could not be found or did not acknowledge."""


def ifindex_of_mac(mac, sysfs_net="/sys/class/net"):
    """The ifindex of the interface with ``mac``, or None."""
    try:
        names = sorted(os.listdir(sysfs_net))
    except OSError:
        return None
    for name in names:
        try:
            with open(os.path.join(sysfs_net, name, "address"), encoding="ascii", errors="replace") as handle:
                if handle.read(64).strip().lower() != mac.lower():
                    continue
            with open(os.path.join(sysfs_net, name, "ifindex"), encoding="ascii", errors="replace") as handle:
                return int(handle.read(16).strip())
        except (OSError, ValueError):
            continue
    return None


def server_from_cmdline(text, sysfs_net="/sys/class/net"):
    """``(address, ifindex)`` of the server this system was booted from (the NBD hook's options)."""
    options = parse_cmdline(text)
    address, mac = options.get("server"), options.get("mac")
    if not isinstance(address, str) or not isinstance(mac, str):
        raise WhenDoneError("not booted by stiefel (no stiefel.server= and stiefel.mac= on the kernel command "
                            "line): name the server with --server ADDRESS%INTERFACE")
    index = ifindex_of_mac(mac, sysfs_net)
    if index is None:
        raise WhenDoneError("no interface with the stiefel MAC %s" % mac)
    return address.split("%", 1)[0], index


def parse_server(text):
    """``fe80::1%eth0`` or ``fe80::1%3`` -> ``(address, ifindex)``."""
    address, sep, scope = text.partition("%")
    if not sep or not scope:
        raise WhenDoneError("--server needs the interface too: ADDRESS%INTERFACE")
    if scope.isdigit():
        return address, int(scope)
    try:
        return address, socket.if_nametoindex(scope)
    except OSError:
        raise WhenDoneError("no interface %r" % scope[:32]) from None


def receive(sock, key, expect, client_nonce, deadline, log_drop=None):
    """The first authentic datagram of a type in ``expect`` for ``client_nonce`` before ``deadline``, or None.

    Anything else (junk, another key, an answer to another nonce) is dropped: told to ``log_drop(source,
    reason)`` (a Console's rate-limited, escaped drop log) when given, and waiting goes on.
    """
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        readable, _w, _x = select.select([sock], [], [], remaining)
        if not readable:
            return None
        got = discovery.receive(sock, log_drop)
        if got is None:
            continue
        data, (host, _port, scope) = got
        try:
            msg = messages.parse(key, data, expect=expect)
            if msg.client_nonce != client_nonce:
                raise ReplayedMessage("%s for a DISCOVER we did not just send" % msg.type_name)
        except ProtocolError as exc:
            if log_drop is not None:
                log_drop("%s%%%s" % (host, scope), discovery.describe(exc))
            continue
        return msg


def offer_from(sock, key, address, ifindex, port=discovery.PORT, timeout=ANSWER_TIMEOUT, log_drop=None):
    """One DISCOVER to the server at ``address%ifindex``; its fresh OFFER (a server ramdisk's) or None."""
    client_nonce = messages.new_nonce()
    sock.sendto(messages.build_discover(key, client_nonce), (address, port, 0, ifindex))
    offer = receive(sock, key, (messages.OFFER,), client_nonce, time.monotonic() + timeout, log_drop)
    if offer is not None and offer.role != messages.ROLE_SERVER:
        raise WhenDoneError("%s is not a server ramdisk (role %d)" % (address, offer.role))
    return offer


def ask(key, policy, address, ifindex, port=discovery.PORT, attempts=ATTEMPTS, timeout=ANSWER_TIMEOUT):
    """DISCOVER -> OFFER (challenge) -> WHEN_DONE -> WHEN_DONE_ACK; returns the acknowledged policy."""
    sock = discovery.open_client_socket()
    try:
        for _attempt in range(attempts):
            offer = offer_from(sock, key, address, ifindex, port, timeout)
            if offer is None:
                continue
            sock.sendto(messages.build_when_done(key, offer.client_nonce, offer.server_nonce, policy),
                        (address, port, 0, ifindex))
            ack = receive(sock, key, (messages.WHEN_DONE_ACK,), offer.client_nonce, time.monotonic() + timeout)
            if ack is not None and ack.server_nonce == offer.server_nonce:
                return ack.policy
        raise WhenDoneError("no answer from the server at %s%%%d after %d attempts" % (address, ifindex, attempts))
    finally:
        sock.close()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="stiefel-when-done", description=__doc__.splitlines()[0])
    parser.add_argument("policy", choices=sorted(messages.WHEN_DONE_POLICIES.values()))
    parser.add_argument("--key", default=DEFAULT_KEY_PATH)
    parser.add_argument("--server", help="ADDRESS%%INTERFACE (default: from the kernel command line)")
    parser.add_argument("--port", type=int, default=discovery.PORT)
    parser.add_argument("--cmdline-file", default="/proc/cmdline")
    parser.add_argument("--sysfs-net", default="/sys/class/net")
    args = parser.parse_args(argv)
    try:
        key = keyfile.read_key(args.key)
        if args.server:
            address, ifindex = parse_server(args.server)
        else:
            address, ifindex = server_from_cmdline(read_cmdline(args.cmdline_file), args.sysfs_net)
        got = ask(key, args.policy, address, ifindex, port=args.port)
    except (StiefelError, OSError) as exc:
        sys.stderr.write("stiefel when-done: %s\n" % exc)
        return 1
    print("stiefel when-done: the server at %s acknowledged: when this desktop is done, %s" % (address, got))
    return 0


if __name__ == "__main__":
    sys.exit(main())
