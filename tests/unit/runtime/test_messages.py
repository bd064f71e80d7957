from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from stiefel_runtime import messages as m
from ansible_collections.stiefel.system.plugins.module_utils.errors import (
    AuthenticationFailed,
    MalformedMessage,
    OversizedMessage,
    ProtocolError,
    ReplayedMessage,
    TruncatedMessage,
    UnsupportedVersion,
    WrongKey,
)

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))
CN = b"c" * 16
SN = b"s" * 16
SS = b"S" * 16  # a session nonce


def all_messages(key=KEY):
    return [
        m.build_discover(key, CN),
        m.build_offer(key, CN, SN, m.ROLE_SERVER, 8080, 10809, "stiefel", m.FLAG_NEEDS_PASSPHRASE),
        m.build_offer(key, CN, SN, m.ROLE_AUTOKEXEC),
        m.build_kexec_request(key, CN, SN),
        m.build_kexec_ack(key, CN, SN),
        m.build_session_request(key, CN, SN),
        m.build_session_accept(key, CN, SN, SS),
    ]


def test_roundtrip():
    disc, offer, challenge, req, ack, sreq, sacc = (m.parse(KEY, d) for d in all_messages())
    assert disc.type == m.DISCOVER and disc.client_nonce == CN
    assert offer.type == m.OFFER and offer.role == m.ROLE_SERVER and offer.needs_passphrase
    assert (offer.http_port, offer.nbd_port, offer.export_name, offer.server_nonce) == (8080, 10809, "stiefel", SN)
    assert challenge.role == m.ROLE_AUTOKEXEC and not challenge.needs_passphrase
    assert req.type == m.KEXEC_REQUEST and (req.client_nonce, req.server_nonce) == (CN, SN)
    assert ack.type == m.KEXEC_ACK
    assert sreq.type == m.SESSION_REQUEST and (sreq.client_nonce, sreq.server_nonce, sreq.session_nonce) == (CN, SN, None)
    assert sacc.type == m.SESSION_ACCEPT and (sacc.client_nonce, sacc.server_nonce, sacc.session_nonce) == (CN, SN, SS)


@pytest.mark.parametrize("data", all_messages(OTHER))
def test_wrong_key_is_rejected(data):
    with pytest.raises(WrongKey):
        m.parse(KEY, data)


@pytest.mark.parametrize("index", range(len(all_messages())))
def test_every_bit_flip_is_rejected(index):
    data = all_messages()[index]
    for pos in range(len(data)):
        for bit in (0x01, 0x80):
            bad = bytearray(data)
            bad[pos] ^= bit
            with pytest.raises(ProtocolError):
                m.parse(KEY, bytes(bad))


def test_type_confusion_is_rejected():
    # A DISCOVER re-labelled as KEXEC_REQUEST must fail: the MAC keys differ.
    data = bytearray(m.build_kexec_ack(KEY, CN, SN))
    data[5] = m.KEXEC_REQUEST
    with pytest.raises(AuthenticationFailed):
        m.parse(KEY, bytes(data))
    with pytest.raises(MalformedMessage, match="unexpected"):
        m.parse(KEY, m.build_discover(KEY, CN), expect=(m.KEXEC_REQUEST,))
    # a KEXEC_REQUEST (autokexec subkey) re-labelled as SESSION_REQUEST (discovery subkey), and back
    data = bytearray(m.build_kexec_request(KEY, CN, SN))
    data[5] = m.SESSION_REQUEST
    with pytest.raises(AuthenticationFailed):
        m.parse(KEY, bytes(data))
    data = bytearray(m.build_session_request(KEY, CN, SN))
    data[5] = m.KEXEC_REQUEST
    with pytest.raises(AuthenticationFailed):
        m.parse(KEY, bytes(data))


@pytest.mark.parametrize("index", range(len(all_messages())))
def test_version_1_datagrams_are_refused_by_version(index):
    """A v1 peer (OFFER opened sessions) is told so before anything else is looked at."""
    data = bytearray(all_messages()[index])
    data[4] = 1
    with pytest.raises(UnsupportedVersion, match="protocol version 1, this side speaks 2"):
        m.parse(KEY, bytes(data))


def test_version_and_truncation_and_size():
    data = bytearray(m.build_discover(KEY, CN))
    data[4] = 3
    with pytest.raises(UnsupportedVersion):
        m.parse(KEY, bytes(data))
    with pytest.raises(TruncatedMessage):
        m.parse(KEY, m.build_discover(KEY, CN)[:20])
    with pytest.raises(OversizedMessage):
        m.parse(KEY, b"STFL" + b"\x00" * 600)
    with pytest.raises(OversizedMessage):
        m.build_offer(KEY, CN, SN, m.ROLE_SERVER, export_name="x" * 65)


@given(st.binary(max_size=1024))
def test_random_bytes_raise_protocol_errors_only(data):
    with pytest.raises(ProtocolError):
        m.parse(KEY, data)


@given(st.integers(0, len(all_messages()) - 1), st.data())
def test_truncations_and_extensions(index, data):
    msg = all_messages()[index]
    cut = data.draw(st.integers(0, len(msg) - 1))
    with pytest.raises(ProtocolError):
        m.parse(KEY, msg[:cut])
    extra = data.draw(st.binary(min_size=1, max_size=64))
    with pytest.raises(ProtocolError):
        m.parse(KEY, msg + extra)


def test_replay_window_drops_repeats_and_forgets_old():
    now = [0.0]
    window = m.ReplayWindow(capacity=3, ttl=10, clock=lambda: now[0])
    window.check(b"a" * 16)
    with pytest.raises(ReplayedMessage):
        window.check(b"a" * 16)
    now[0] = 11
    window.check(b"a" * 16)  # expired: accepted again (the challenge guards actions)
    for n in (b"b", b"c", b"d", b"e"):
        window.check(n * 16)
    assert len(window) <= 3


def test_challenge_book_single_use_expiry_and_binding():
    now = [0.0]
    book = m.ChallengeBook(ttl=30, clock=lambda: now[0])
    sn = book.issue(CN)
    with pytest.raises(ReplayedMessage):
        book.redeem(b"d" * 16, sn)  # another client
    sn = book.issue(CN)
    book.redeem(CN, sn)
    with pytest.raises(ReplayedMessage):
        book.redeem(CN, sn)  # used
    sn = book.issue(CN)
    now[0] = 31
    with pytest.raises(ReplayedMessage):
        book.redeem(CN, sn)  # expired
    with pytest.raises(ReplayedMessage):
        book.redeem(CN, b"z" * 16)  # never issued


def test_challenge_book_is_bounded():
    book = m.ChallengeBook(capacity=4)
    first = book.issue(CN)
    for _unused in range(10):
        book.issue(CN)
    with pytest.raises(ReplayedMessage):
        book.redeem(CN, first)
