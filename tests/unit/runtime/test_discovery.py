from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from ansible_collections.stiefel.system.plugins.module_utils import keyfile
from stiefel_runtime import discovery, messages
from ansible_collections.stiefel.system.plugins.module_utils.errors import (
    AuthenticationFailed,
    MalformedMessage,
    ProtocolError,
    ReplayedMessage,
    UnsupportedVersion,
    WrongKey,
)

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))


class Clock(object):
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def server_responder(clock=None):
    def fields():
        return {"role": messages.ROLE_SERVER, "http_port": 61571, "nbd_port": 10809, "export_name": "stiefel"}

    clock = clock or Clock()
    return discovery.Responder(KEY, fields, sessions=discovery.SessionBook(clock=clock), clock=clock)


def autokexec_responder(clock):
    return discovery.Responder(KEY, lambda: {"role": messages.ROLE_AUTOKEXEC},
                               challenges=messages.ChallengeBook(clock=clock), accept_kexec=True, clock=clock)


def open_session(client, server, ifindex=7, peer=None):
    offer = client.handle(server.handle(client.discover(ifindex))[0], "fe80::1", ifindex)
    accept, msg = server.handle(client.session_request(offer), peer)
    assert msg.type == messages.SESSION_REQUEST
    return offer, client.handle(accept, "fe80::1", ifindex)


def test_full_exchange_with_server():
    client = discovery.ClientDiscovery(KEY)
    server = server_responder()
    offer_bytes, msg = server.handle(client.discover(7))
    assert msg.type == messages.DISCOVER
    offer = client.handle(offer_bytes, "fe80::1", 7)
    assert isinstance(offer, discovery.Offer)
    assert offer.role == messages.ROLE_SERVER and offer.message.http_port == 61571
    assert offer.session_nonce is None and len(server.sessions) == 0  # an OFFER opens nothing
    accept_bytes, msg = server.handle(client.session_request(offer))
    assert msg.type == messages.SESSION_REQUEST and len(server.sessions) == 1
    accepted = client.handle(accept_bytes, "fe80::1", 7)
    assert accepted.session_nonce == msg.session_nonce != offer.server_nonce
    server.sessions.check(accepted.client_nonce, accepted.session_nonce)  # the session is open for the payload
    with pytest.raises(ReplayedMessage):
        server.sessions.check(offer.client_nonce, offer.server_nonce)  # the challenge is no session


def test_recorded_exchange_replayed_after_restart_or_window_opens_no_session():
    """Issue 13: a DISCOVER and SESSION_REQUEST recorded from the link, sent to a restarted server or after the
    replay window, get a challenge nobody can answer without the key, and no session."""
    clock = Clock()
    client = discovery.ClientDiscovery(KEY, clock=clock)
    server = server_responder(clock)
    discover = client.discover(1)
    offer = client.handle(server.handle(discover)[0], "fe80::1", 1)
    request = client.session_request(offer)
    server.handle(request)
    assert len(server.sessions) == 1
    with pytest.raises(ReplayedMessage):
        server.handle(request)  # the same instance: the challenge was used
    restarted = server_responder(clock)
    for target, advance in ((restarted, 0), (server, discovery.REPLAY_WINDOW + 1)):
        clock.now += advance
        reply, _unused = target.handle(discover)  # the replay window forgot it: a fresh challenge, nothing more
        challenge = messages.parse(KEY, reply).server_nonce
        assert challenge != offer.server_nonce
        with pytest.raises(ReplayedMessage):
            target.handle(request)
    assert len(restarted.sessions) == 0 and len(server.sessions) == 1


def test_session_accept_checks():
    client = discovery.ClientDiscovery(KEY)
    server = server_responder()
    offer = client.handle(server.handle(client.discover(1))[0], "fe80::1", 1)
    accept, _unused = server.handle(client.session_request(offer))
    stray = messages.build_session_accept(KEY, offer.client_nonce, messages.new_nonce(), messages.new_nonce())
    with pytest.raises(ReplayedMessage):
        client.handle(stray, "fe80::1", 1)  # answers no request of ours
    with pytest.raises(MalformedMessage, match="interface"):
        client.handle(accept, "fe80::1", 2)
    assert client.handle(accept, "fe80::1", 1).session_nonce is not None
    with pytest.raises(ReplayedMessage):
        client.handle(accept, "fe80::1", 1)  # accepted once


def test_sessions_bound_to_the_proving_peer():
    client = discovery.ClientDiscovery(KEY)
    server = server_responder()
    _offer, accepted = open_session(client, server, peer="fe80::1")
    with pytest.raises(ReplayedMessage, match="another address"):
        server.sessions.check(accepted.client_nonce, accepted.session_nonce, peer="fe80::666")
    server.sessions.check(accepted.client_nonce, accepted.session_nonce, peer="fe80::1")


def test_old_version_refused_by_version():
    v1 = bytearray(discovery.ClientDiscovery(KEY).discover(1))
    v1[4] = 1
    with pytest.raises(UnsupportedVersion, match="version 1, this side speaks 2"):
        server_responder().handle(bytes(v1))


@pytest.mark.parametrize("raw, expected", [("", 600.0), ("5", 5.0), ("0.5", 0.5), ("-1", 600.0), ("nan", 600.0),
                                           ("1e9", 600.0), ("x", 600.0)])
def test_replay_window_from_environment(raw, expected):
    assert discovery.replay_window_seconds({discovery.REPLAY_WINDOW_ENV: raw}) == expected


def test_replayed_discover_dropped_server_stays_usable():
    client = discovery.ClientDiscovery(KEY)
    server = server_responder()
    discover = client.discover(1)
    server.handle(discover)
    with pytest.raises(ReplayedMessage):
        server.handle(discover)
    server.handle(client.discover(1))


def test_offer_checks():
    clock = Clock()
    client = discovery.ClientDiscovery(KEY, clock=clock)
    server = server_responder()
    offer_bytes, _unused = server.handle(client.discover(1))
    with pytest.raises(MalformedMessage, match="interface"):
        client.handle(offer_bytes, "fe80::1", 2)  # arrived on another link
    client.handle(offer_bytes, "fe80::1", 1)
    with pytest.raises(ReplayedMessage):
        client.handle(offer_bytes, "fe80::1", 1)  # the same OFFER again
    # an OFFER for a nonce we never sent
    stray = messages.build_offer(KEY, messages.new_nonce(), messages.new_nonce(), messages.ROLE_SERVER)
    with pytest.raises(ReplayedMessage):
        client.handle(stray, "fe80::1", 1)
    # an OFFER that comes too late
    offer_bytes, _unused = server.handle(client.discover(1))
    clock.now += 3600
    with pytest.raises(ReplayedMessage):
        client.handle(offer_bytes, "fe80::1", 1)


def test_wrong_key_and_forgery():
    client = discovery.ClientDiscovery(OTHER)
    server = server_responder()
    with pytest.raises(WrongKey):
        server.handle(client.discover(1))
    good = bytearray(discovery.ClientDiscovery(KEY).discover(1))
    good[-3] ^= 0x40
    with pytest.raises(AuthenticationFailed):
        server.handle(bytes(good))


def test_server_ignores_kexec_requests_and_autokexec_session_requests():
    server = server_responder()
    with pytest.raises(MalformedMessage):
        server.handle(messages.build_kexec_request(KEY, messages.new_nonce(), messages.new_nonce()))
    with pytest.raises(MalformedMessage):
        autokexec_responder(Clock()).handle(
            messages.build_session_request(KEY, messages.new_nonce(), messages.new_nonce()))


def test_autokexec_challenge_once():
    clock = Clock()
    client = discovery.ClientDiscovery(KEY, clock=clock)
    responder = autokexec_responder(clock)
    offer = client.handle(responder.handle(client.discover(3))[0], "fe80::2", 3)
    assert offer.role == messages.ROLE_AUTOKEXEC
    request = client.kexec_request(offer)
    ack, msg = responder.handle(request)
    assert msg.type == messages.KEXEC_REQUEST
    assert client.handle(ack, "fe80::2", 3).type == messages.KEXEC_ACK
    with pytest.raises(ReplayedMessage):
        responder.handle(request)
    with pytest.raises(ReplayedMessage):
        client.handle(ack, "fe80::2", 3)  # the ACK again


def test_autokexec_expired_challenge():
    clock = Clock()
    client = discovery.ClientDiscovery(KEY, clock=clock)
    responder = autokexec_responder(clock)
    offer = client.handle(responder.handle(client.discover(3))[0], "fe80::2", 3)
    clock.now += 31
    with pytest.raises(ReplayedMessage):
        responder.handle(client.kexec_request(offer))


def test_session_book_uses_and_ttl():
    clock = Clock()
    book = discovery.SessionBook(uses=2, ttl=10, clock=clock)
    cn = messages.new_nonce()
    sn = book.issue(cn)
    with pytest.raises(ReplayedMessage):
        book.check(messages.new_nonce(), sn)
    book.check(cn, sn)
    book.check(cn, sn)
    with pytest.raises(ReplayedMessage):
        book.check(cn, sn)
    sn = book.issue(cn)
    clock.now += 11
    with pytest.raises(ReplayedMessage):
        book.check(cn, sn)


def test_session_book_payload_ends_the_session_and_a_new_one_closes_the_rest():
    book = discovery.SessionBook()
    cn = messages.new_nonce()
    older, newer = book.issue(cn), book.issue(cn)
    book.check(cn, newer)  # e.g. a passphrase attempt
    book.check(cn, newer, last=True)  # the payload
    with pytest.raises(ReplayedMessage):
        book.check(cn, newer)
    newest = book.issue(cn)
    book.keep_only(newest)
    with pytest.raises(ReplayedMessage):
        book.check(cn, older)
    book.check(cn, newest)


def test_session_book_bounded():
    book = discovery.SessionBook(capacity=4)
    for _unused in range(100):
        book.issue(messages.new_nonce())
    assert len(book) == 4


def test_split_address():
    assert discovery.split_address(("fe80::1%eth0", 61570, 0, 4)) == ("fe80::1", 61570, 4)


@given(st.binary(max_size=700))
def test_hostile_datagrams_to_every_handler(data):
    clock = Clock()
    client = discovery.ClientDiscovery(KEY, clock=clock)
    handlers = [server_responder(clock).handle, autokexec_responder(clock).handle,
                lambda d: client.handle(d, "fe80::1", 1)]
    for handle in handlers:
        with pytest.raises(ProtocolError):
            handle(data)
    # every handler still works afterwards
    server = server_responder(clock)
    offer_bytes, _unused = server.handle(client.discover(1))
    assert client.handle(offer_bytes, "fe80::1", 1).role == messages.ROLE_SERVER
    assert open_session(client, server_responder(clock), 1)[1].session_nonce is not None


def _mutate(data, original):
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
    if kind == "flip":
        pos = data.draw(st.integers(min_value=0, max_value=len(original) - 1))
        bit = data.draw(st.integers(min_value=0, max_value=7))
        mutated = bytearray(original)
        mutated[pos] ^= 1 << bit
        return bytes(mutated)
    if kind == "truncate":
        return original[:data.draw(st.integers(min_value=0, max_value=len(original) - 1))]
    return original + data.draw(st.binary(min_size=1, max_size=600))


@given(st.data())
def test_mutated_session_exchange_is_dropped(data):
    """Every mutation of a genuine SESSION_REQUEST (server) or SESSION_ACCEPT (client) is dropped, and neither
    side is left with a session; the genuine datagram still works once afterwards."""
    clock = Clock()
    client = discovery.ClientDiscovery(KEY, clock=clock)
    server = server_responder(clock)
    offer = client.handle(server.handle(client.discover(1))[0], "fe80::1", 1)
    request = client.session_request(offer)
    with pytest.raises(ProtocolError):
        server.handle(_mutate(data, request))
    assert len(server.sessions) == 0
    accept, _unused = server.handle(request)
    with pytest.raises(ProtocolError):
        client.handle(_mutate(data, accept), "fe80::1", 1)
    assert client.handle(accept, "fe80::1", 1).session_nonce is not None


@given(st.data())
def test_mutated_genuine_datagrams_are_dropped(data):
    clock = Clock()
    client = discovery.ClientDiscovery(KEY, clock=clock)
    responder = autokexec_responder(clock)
    discover = client.discover(1)
    offer_bytes, _unused = responder.handle(discover)
    offer = client.handle(offer_bytes, "fe80::1", 1)
    request = client.kexec_request(offer)
    target = data.draw(st.sampled_from(["discover", "request"]))
    original = discover if target == "discover" else request
    with pytest.raises(ProtocolError):
        responder.handle(_mutate(data, original))
    # the genuine request is still honoured exactly once
    ack, msg = responder.handle(request)
    assert msg.type == messages.KEXEC_REQUEST


def test_key_material_from_keyfile_works():
    key = keyfile.generate_key()
    client = discovery.ClientDiscovery(key)
    assert messages.parse(key, client.discover(1)).type == messages.DISCOVER


def test_drain_yields_every_pending_datagram_then_stops():
    import socket
    import time as _time

    receiver = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        receiver.bind(("::1", 0))
        receiver.setblocking(False)
        for payload in (b"one", b"two"):
            sender.sendto(payload, receiver.getsockname()[:2])
        _time.sleep(0.05)
        got = [(data, host) for data, host, _port, _scope in discovery.drain(receiver)]
        assert got == [(b"one", "::1"), (b"two", "::1")]
        assert list(discovery.drain(receiver)) == []
    finally:
        receiver.close()
        sender.close()
