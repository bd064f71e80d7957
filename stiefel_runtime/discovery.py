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
challenge in every OFFER; nothing else happens until that challenge is
answered with the key: KEXEC_REQUEST (autokexec) or SESSION_REQUEST (server,
which only then opens a session with a new session nonce, in SESSION_ACCEPT).
"""

from __future__ import annotations

import collections
import hmac
import os
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
REPLAY_WINDOW = 600.0
# Tests shorten the replay window to show what a DISCOVER replayed after it gets (nothing usable).
REPLAY_WINDOW_ENV = "STIEFEL_REPLAY_WINDOW"
# How long the client waits for SESSION_ACCEPT before it takes another OFFER.
SESSION_WAIT = 3.0


def replay_window_seconds(environ=None):
    """The replay window of DISCOVERs: REPLAY_WINDOW, or a positive number from $STIEFEL_REPLAY_WINDOW."""
    raw = (os.environ if environ is None else environ).get(REPLAY_WINDOW_ENV, "")
    try:
        value = float(raw)
    except ValueError:
        return REPLAY_WINDOW
    return value if 0 < value <= REPLAY_WINDOW else REPLAY_WINDOW


class Offer(object):
    """An authenticated OFFER that answers one of our DISCOVERs.

    ``server_nonce`` is its challenge; ``session_nonce`` is set once the
    server accepted our SESSION_REQUEST (a server or standalone OFFER is
    usable for HTTP and NBD only then).
    """

    __slots__ = ("message", "address", "ifindex", "port", "session_nonce")

    def __init__(self, message, address, ifindex, port, session_nonce=None):
        self.message = message
        self.address = address  # fe80::... without scope
        self.ifindex = ifindex
        self.port = port
        self.session_nonce = session_nonce

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
    """Client side: makes DISCOVERs and SESSION_REQUESTs, vets OFFERs, SESSION_ACCEPTs and KEXEC_ACKs."""

    def __init__(self, key, capacity=256, ttl=60.0, clock=time.monotonic):
        self.key = key
        self.capacity = capacity
        self.ttl = ttl
        self._clock = clock
        self._sent = collections.OrderedDict()  # client nonce -> (ifindex, sent at)
        self._offers_seen = messages.ReplayWindow(capacity=1024, ttl=600.0, clock=clock)
        self._kexec_sent = collections.OrderedDict()  # (client nonce, server nonce) -> sent at
        self._session_sent = collections.OrderedDict()  # (client nonce, challenge) -> (offer, sent at)

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
        """Vet a datagram; return an :class:`Offer` or the parsed KEXEC_ACK or POWER message.

        An OFFER of ours is returned without a session; a SESSION_ACCEPT is
        returned as its OFFER with ``session_nonce`` set. Raises
        ProtocolError (with the reason) for anything else.
        """
        msg = messages.parse(self.key, data, expect=(messages.OFFER, messages.KEXEC_ACK, messages.SESSION_ACCEPT,
                                                     messages.POWER))
        if msg.type == messages.POWER:
            self._expire()
            if msg.client_nonce not in self._sent:
                raise ReplayedMessage("POWER answers no DISCOVER of ours (unknown or expired client nonce)")
            return msg
        if msg.type == messages.SESSION_ACCEPT:
            pair = (msg.client_nonce, msg.server_nonce)
            entry = self._session_sent.get(pair)
            if entry is None:
                raise ReplayedMessage("SESSION_ACCEPT for a request we did not send (or already accepted)")
            offer, sent_at = entry
            if ifindex and offer.ifindex != ifindex:
                raise MalformedMessage("SESSION_ACCEPT arrived on interface %s, its request went out on %s" % (
                    ifindex, offer.ifindex))
            del self._session_sent[pair]
            if self._clock() - sent_at > self.ttl:
                raise ReplayedMessage("SESSION_ACCEPT arrived after %ss" % self.ttl)
            self._offers_seen.check(msg.session_nonce)
            return Offer(offer.message, offer.address, offer.ifindex, offer.port, session_nonce=msg.session_nonce)
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

    def session_request(self, offer):
        """The SESSION_REQUEST answering a server OFFER's challenge (proves the key; the server opens a session)."""
        self._session_sent[(offer.client_nonce, offer.server_nonce)] = (offer, self._clock())
        while len(self._session_sent) > self.capacity:
            self._session_sent.popitem(last=False)
        return messages.build_session_request(self.key, offer.client_nonce, offer.server_nonce)


class SessionBook(object):
    """Sessions opened for clients that proved the key (SESSION_REQUEST): each allows ``uses`` requests within
    ``ttl`` (passphrase attempts) and ends with its ``last`` one (the payload fetch: a client whose fetch fails
    asks for a new session), from the address that proved it when one is given."""

    def __init__(self, capacity=256, ttl=300.0, uses=4, clock=time.monotonic):
        self.capacity = capacity
        self.ttl = ttl
        self.uses = uses
        self._clock = clock
        self._open = collections.OrderedDict()  # session nonce -> [client nonce, issued at, uses left, peer]

    def issue(self, client_nonce, peer=None):
        server_nonce = messages.new_nonce()
        self._open[server_nonce] = [client_nonce, self._clock(), self.uses, peer]
        while len(self._open) > self.capacity:
            self._open.popitem(last=False)
        return server_nonce

    def check(self, client_nonce, server_nonce, consume=True, peer=None, last=False):
        """Raise ReplayedMessage unless the pair was issued (to ``peer``), is fresh and has uses left;
        ``last`` ends the session with this use."""
        entry = self._open.get(server_nonce)
        if entry is None:
            raise ReplayedMessage("unknown, expired or used-up session")
        issued_to, issued_at, left, owner = entry
        if not hmac.compare_digest(issued_to, client_nonce):
            raise ReplayedMessage("session was issued to another client nonce")
        if owner is not None and peer is not None and owner != peer:
            # the URL travels in clear: someone who read it off the link is not the client that proved the key
            raise ReplayedMessage("session belongs to another address")
        if self._clock() - issued_at > self.ttl:
            del self._open[server_nonce]
            raise ReplayedMessage("session expired")
        if last:
            del self._open[server_nonce]
        elif consume:
            entry[2] = left - 1
            if entry[2] <= 0:
                del self._open[server_nonce]

    def keep_only(self, server_nonce):
        """Close every session but this one (the NBD PSK is this session's now: the others are of no use)."""
        for other in [n for n in self._open if n != server_nonce]:
            del self._open[other]

    def __len__(self):
        return len(self._open)


class Responder(object):
    """Answering side: DISCOVER -> OFFER (a challenge, nothing else); the challenge answered with the key:
    SESSION_REQUEST -> SESSION_ACCEPT (server: ``sessions`` given) or KEXEC_REQUEST -> KEXEC_ACK (autokexec).

    ``offer_fields()`` returns the keyword arguments of ``build_offer``
    besides nonces (role, ports, export name, flags), so the server can flag
    a locked /boot. ``challenges`` is a ``messages.ChallengeBook``: each
    challenge is answerable once, within its ttl, for the client nonce it
    was issued to, and forgotten on restart, so a recording of an earlier
    exchange answers none. ``sessions`` (a :class:`SessionBook`) opens a
    session with a new session nonce for every proven SESSION_REQUEST.
    """

    def __init__(self, key, offer_fields, sessions=None, accept_kexec=False, clock=time.monotonic,
                 challenges=None, replay_window=None):
        self.key = key
        self.offer_fields = offer_fields
        self.challenges = challenges if challenges is not None else messages.ChallengeBook(clock=clock)
        self.sessions = sessions
        self.accept_kexec = accept_kexec
        ttl = replay_window_seconds() if replay_window is None else replay_window
        self._discovers = messages.ReplayWindow(capacity=4096, ttl=ttl, clock=clock)
        expect = [messages.DISCOVER]
        if sessions is not None:
            expect.append(messages.SESSION_REQUEST)
        if accept_kexec:
            expect.append(messages.KEXEC_REQUEST)
        self._expect = tuple(expect)

    def handle(self, data, peer=None):
        """Return ``(reply_bytes, message)``; raise ProtocolError for anything to drop.

        For an accepted KEXEC_REQUEST the message's type is KEXEC_REQUEST:
        the caller must act (kexec) after sending the ACK. For an accepted
        SESSION_REQUEST the message carries the new ``session_nonce``: the
        caller installs the session's NBD PSK. A DISCOVER changes nothing
        but the bounded challenge book.
        """
        msg = messages.parse(self.key, data, expect=self._expect)
        if msg.type == messages.DISCOVER:
            self._discovers.check(msg.client_nonce)
            challenge = self.challenges.issue(msg.client_nonce)
            reply = messages.build_offer(self.key, msg.client_nonce, challenge, **self.offer_fields())
            msg.server_nonce = challenge
            return reply, msg
        # the challenge must be one we issued to this client nonce, answered once, in time
        self.challenges.redeem(msg.client_nonce, msg.server_nonce)
        if msg.type == messages.KEXEC_REQUEST:
            return messages.build_kexec_ack(self.key, msg.client_nonce, msg.server_nonce), msg
        msg.session_nonce = self.sessions.issue(msg.client_nonce, peer)
        reply = messages.build_session_accept(self.key, msg.client_nonce, msg.server_nonce, msg.session_nonce)
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
