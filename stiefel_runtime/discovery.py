# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Discovery over IPv6 link-local multicast: the client's and the answering sides.

Wire format and crypto are in ``messages``; this module only decides what
to do with a datagram (pure classes: datagram in, reply or drop out) and
opens the sockets. The client sends one DISCOVER per interface to
``ff02::1%<if>`` port 61570 with a fresh nonce, all from one socket (the
scope id picks the interface), and accepts an OFFER only if it answers a
nonce it sent on the interface the OFFER arrived on. The answering side
(server ramdisk, autokexec) drops replayed DISCOVERs and hands out a fresh
server nonce (the challenge) in every OFFER.
"""

from __future__ import annotations

import collections
import hmac
import socket
import time

from stiefel_runtime import messages
from ansible_collections.stiefel.system.plugins.module_utils.errors import (
    MalformedMessage,
    ProtocolError,
    ReplayedMessage,
)

ALL_NODES = "ff02::1"
PORT = messages.DISCOVERY_PORT


class Offer(object):
    """An authenticated OFFER that answers one of our DISCOVERs."""

    __slots__ = ("message", "address", "ifindex", "port")

    def __init__(self, message, address, ifindex, port):
        self.message = message
        self.address = address  # fe80::... without scope
        self.ifindex = ifindex
        self.port = port

    @property
    def role(self):
        return self.message.role

    @property
    def client_nonce(self):
        return self.message.client_nonce

    @property
    def server_nonce(self):
        return self.message.server_nonce

    def __repr__(self):
        return "Offer(role=%s from %s%%%s)" % (self.message.role, self.address, self.ifindex)


def split_address(addr):
    """``(host, port, flowinfo, scope_id)`` from recvfrom -> ``(host without %scope, port, scope_id)``."""
    host = addr[0].split("%", 1)[0]
    port = addr[1]
    scope = addr[3] if len(addr) > 3 else 0
    return host, port, scope


class ClientDiscovery(object):
    """Client side: makes DISCOVERs and vets OFFERs and KEXEC_ACKs."""

    def __init__(self, key, capacity=256, ttl=60.0, clock=time.monotonic):
        self.key = key
        self.capacity = capacity
        self.ttl = ttl
        self._clock = clock
        self._sent = collections.OrderedDict()  # client nonce -> (ifindex, sent at)
        self._offers_seen = messages.ReplayWindow(capacity=1024, ttl=600.0, clock=clock)
        self._kexec_sent = collections.OrderedDict()  # (client nonce, server nonce) -> sent at

    def _expire(self):
        now = self._clock()
        while self._sent:
            nonce, (_index, sent_at) = next(iter(self._sent.items()))
            if now - sent_at <= self.ttl and len(self._sent) <= self.capacity:
                break
            self._sent.popitem(last=False)

    def discover(self, ifindex):
        """A fresh DISCOVER for the interface ``ifindex``."""
        nonce = messages.new_nonce()
        self._sent[nonce] = (ifindex, self._clock())
        self._expire()
        return messages.build_discover(self.key, nonce)

    def handle(self, data, address, ifindex, port=PORT):
        """Vet a datagram; return an :class:`Offer` or the parsed KEXEC_ACK message.

        Raises ProtocolError (with the reason) for anything else.
        """
        msg = messages.parse(self.key, data, expect=(messages.OFFER, messages.KEXEC_ACK))
        if msg.type == messages.KEXEC_ACK:
            pair = (msg.client_nonce, msg.server_nonce)
            if self._kexec_sent.pop(pair, None) is None:
                raise ReplayedMessage("KEXEC_ACK for a request we did not send (or already acknowledged)")
            return msg
        self._expire()
        entry = self._sent.get(msg.client_nonce)
        if entry is None:
            raise ReplayedMessage("OFFER answers no DISCOVER of ours (unknown or expired client nonce)")
        sent_if, _sent_at = entry
        if ifindex and sent_if != ifindex:
            raise MalformedMessage("OFFER arrived on interface %s, its DISCOVER was sent on %s" % (ifindex, sent_if))
        self._offers_seen.check(msg.server_nonce)
        return Offer(msg, address, ifindex, port)

    def kexec_request(self, offer):
        """The KEXEC_REQUEST answering an autokexec OFFER's challenge."""
        pair = (offer.client_nonce, offer.server_nonce)
        self._kexec_sent[pair] = self._clock()
        while len(self._kexec_sent) > self.capacity:
            self._kexec_sent.popitem(last=False)
        return messages.build_kexec_request(self.key, offer.client_nonce, offer.server_nonce)


class SessionBook(object):
    """Server nonces issued in OFFERs, each usable a few times within ``ttl`` (payload fetch retries)."""

    def __init__(self, capacity=256, ttl=300.0, uses=4, clock=time.monotonic):
        self.capacity = capacity
        self.ttl = ttl
        self.uses = uses
        self._clock = clock
        self._open = collections.OrderedDict()  # server nonce -> [client nonce, issued at, uses left]

    def issue(self, client_nonce):
        server_nonce = messages.new_nonce()
        self._open[server_nonce] = [client_nonce, self._clock(), self.uses]
        while len(self._open) > self.capacity:
            self._open.popitem(last=False)
        return server_nonce

    def check(self, client_nonce, server_nonce, consume=True):
        """Raise ReplayedMessage unless the pair was issued, is fresh and has uses left."""
        entry = self._open.get(server_nonce)
        if entry is None:
            raise ReplayedMessage("unknown, expired or used-up session")
        issued_to, issued_at, left = entry
        if not hmac.compare_digest(issued_to, client_nonce):
            raise ReplayedMessage("session was issued to another client nonce")
        if self._clock() - issued_at > self.ttl:
            del self._open[server_nonce]
            raise ReplayedMessage("session expired")
        if consume:
            entry[2] = left - 1
            if entry[2] <= 0:
                del self._open[server_nonce]

    def __len__(self):
        return len(self._open)


class Responder(object):
    """Answering side: DISCOVER -> OFFER; for autokexec also KEXEC_REQUEST -> KEXEC_ACK.

    ``offer_fields()`` returns the keyword arguments of ``build_offer``
    besides nonces (role, ports, export name, flags), so the server can flag
    a locked /boot. ``book`` hands out server nonces: a :class:`SessionBook`
    (server) or a ``messages.ChallengeBook`` (autokexec, one answer each).
    """

    def __init__(self, key, offer_fields, book=None, accept_kexec=False, clock=time.monotonic):
        self.key = key
        self.offer_fields = offer_fields
        self.book = book if book is not None else SessionBook(clock=clock)
        self.accept_kexec = accept_kexec
        self._discovers = messages.ReplayWindow(capacity=4096, ttl=600.0, clock=clock)
        self._requests = messages.ReplayWindow(capacity=4096, ttl=600.0, clock=clock)

    def handle(self, data):
        """Return ``(reply_bytes, message)``; raise ProtocolError for anything to drop.

        For an accepted KEXEC_REQUEST the message's type is KEXEC_REQUEST:
        the caller must act (kexec) after sending the ACK.
        """
        expect = (messages.DISCOVER, messages.KEXEC_REQUEST) if self.accept_kexec else (messages.DISCOVER,)
        msg = messages.parse(self.key, data, expect=expect)
        if msg.type == messages.DISCOVER:
            self._discovers.check(msg.client_nonce)
            server_nonce = self.book.issue(msg.client_nonce)
            reply = messages.build_offer(self.key, msg.client_nonce, server_nonce, **self.offer_fields())
            msg.server_nonce = server_nonce
            return reply, msg
        # KEXEC_REQUEST: the challenge must be one we issued to this client nonce, answered once.
        self._requests.check(msg.client_nonce + msg.server_nonce)
        if hasattr(self.book, "redeem"):
            self.book.redeem(msg.client_nonce, msg.server_nonce)
        else:
            self.book.check(msg.client_nonce, msg.server_nonce)
        reply = messages.build_kexec_ack(self.key, msg.client_nonce, msg.server_nonce)
        return reply, msg


# ------------------------------------------------------------------ sockets

def open_listen_socket(port=PORT, bind_address="::"):
    """UDP socket receiving DISCOVERs sent to ff02::1 (joined by every IPv6 interface)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((bind_address, port))
    sock.setblocking(False)
    return sock


def open_client_socket():
    """UDP socket sending DISCOVERs on any interface (scope id) and receiving the unicast replies."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
    sock.bind(("::", 0))
    sock.setblocking(False)
    return sock


def send_discover(sock, datagram, ifindex, port=PORT):
    sock.sendto(datagram, (ALL_NODES, port, 0, ifindex))


def receive(sock, log_drop=None):
    """Read one datagram; return ``(data, (host, port, scope))`` or None if nothing is pending."""
    try:
        data, addr = sock.recvfrom(messages.MAX_DATAGRAM + 1)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        if log_drop is not None:
            log_drop("socket", "receive failed: %s" % exc)
        return None
    return data, split_address(addr)


def drain(sock, log_drop=None):
    """Yield ``(data, host, port, scope)`` for every datagram pending on the non-blocking ``sock``."""
    while True:
        got = receive(sock, log_drop)
        if got is None:
            return
        data, (host, port, scope) = got
        yield data, host, port, scope


def describe(error: ProtocolError) -> str:
    return "%s: %s" % (type(error).__name__, error)
