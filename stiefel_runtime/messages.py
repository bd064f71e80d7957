# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Discovery and autokexec datagrams (wire format v2), replay window, challenges.

Layout of every datagram (big-endian)::

    magic "STFL" | version u8 | type u8 | key_id 8 | body | HMAC-SHA256 32

The MAC covers everything before it and is keyed with the purpose's subkey
(discovery or autokexec), so a message of one kind cannot be replayed as
another and a MAC never reveals the key. See docs/protocol.md.

Version 2 (issue 13): an OFFER carries only a challenge; the server opens a
session (and its NBD PSK) only for a SESSION_REQUEST that answers a fresh
challenge, so a recorded DISCOVER replayed later obtains nothing.
"""

from __future__ import annotations

import collections
import hmac
import hashlib
import secrets
import struct
import time

from ansible_collections.stiefel.system.plugins.module_utils import keyschedule
from ansible_collections.stiefel.system.plugins.module_utils.errors import (
    AuthenticationFailed,
    MalformedMessage,
    OversizedMessage,
    ReplayedMessage,
    TruncatedMessage,
    UnsupportedVersion,
    WrongKey,
)

MAGIC = b"STFL"
# 2: OFFER holds a challenge, sessions need SESSION_REQUEST/SESSION_ACCEPT. v1 peers are refused by version.
VERSION = 2
DISCOVERY_PORT = 61570
MAX_DATAGRAM = 512
MAC_BYTES = 32
NONCE_BYTES = keyschedule.NONCE_BYTES
HEADER = struct.Struct(">4sBB8s")
MAX_EXPORT_NAME = 64

# Message types. DISCOVER, OFFER and the SESSION pair use the discovery
# subkey, the KEXEC pair the autokexec subkey.
DISCOVER = 1
OFFER = 2
KEXEC_REQUEST = 3
KEXEC_ACK = 4
SESSION_REQUEST = 5
SESSION_ACCEPT = 6
# The desktop asks the server ramdisk what to do once it is done (stiefel_runtime.whendone); the
# request answers a fresh OFFER challenge like SESSION_REQUEST does.
WHEN_DONE = 7
WHEN_DONE_ACK = 8
# The serving laptop's power, sent by a server ramdisk right after each OFFER and bound to it (same nonces).
# A datagram of its own, not an OFFER field: every OFFER parser so far refuses trailing bytes and unknown
# flags, so a longer OFFER would cut off the sticks already flashed; they drop a POWER as an unknown type.
POWER = 9
TYPE_NAMES = {DISCOVER: "DISCOVER", OFFER: "OFFER", KEXEC_REQUEST: "KEXEC_REQUEST", KEXEC_ACK: "KEXEC_ACK",
              SESSION_REQUEST: "SESSION_REQUEST", SESSION_ACCEPT: "SESSION_ACCEPT", WHEN_DONE: "WHEN_DONE",
              WHEN_DONE_ACK: "WHEN_DONE_ACK", POWER: "POWER"}
_PURPOSE = {
    DISCOVER: keyschedule.DISCOVERY,
    OFFER: keyschedule.DISCOVERY,
    KEXEC_REQUEST: keyschedule.AUTOKEXEC,
    KEXEC_ACK: keyschedule.AUTOKEXEC,
    SESSION_REQUEST: keyschedule.DISCOVERY,
    SESSION_ACCEPT: keyschedule.DISCOVERY,
    WHEN_DONE: keyschedule.DISCOVERY,
    WHEN_DONE_ACK: keyschedule.DISCOVERY,
    POWER: keyschedule.DISCOVERY,
}
# WHEN_DONE's policy byte (wayback's names).
WHEN_DONE_POLICIES = {1: "return", 2: "poweroff", 3: "stay"}

# OFFER roles: who answered.
ROLE_SERVER = 1  # the server ramdisk: payload and NBD are available
ROLE_AUTOKEXEC = 2  # the laptop's normal OS: answer with KEXEC_REQUEST to reboot it
ROLE_STANDALONE = 3  # a running system serving a spare disk (no kexec)
ROLES = (ROLE_SERVER, ROLE_AUTOKEXEC, ROLE_STANDALONE)

FLAG_NEEDS_PASSPHRASE = 0x01
KNOWN_FLAGS = FLAG_NEEDS_PASSPHRASE

_OFFER_FIXED = struct.Struct(">16s16sBBHHB")  # client nonce, server nonce, role, flags, http, nbd, name length
_NONCE_PAIR = struct.Struct(">16s16s")
_NONCE_TRIPLE = struct.Struct(">16s16s16s")  # client nonce, challenge, session nonce
_WHEN_DONE = struct.Struct(">16s16sB")  # client nonce, challenge, policy
_POWER = struct.Struct(">16s16sBB")  # client nonce, the OFFER's challenge, power flags, charge (CHARGE_UNKNOWN)

POWER_ON_BATTERY = 0x01
POWER_LOW = 0x02  # at or below the server's warning level
POWER_SHUT_DOWN = 0x04  # at or below laptop_shutdown_charge: the desktop should shut down cleanly now
KNOWN_POWER_FLAGS = POWER_ON_BATTERY | POWER_LOW | POWER_SHUT_DOWN
CHARGE_UNKNOWN = 255


class Message(object):
    """A parsed, authenticated datagram.

    ``server_nonce`` is the server's challenge (OFFER, both request/answer
    pairs); ``session_nonce`` only exists in SESSION_ACCEPT: the session's
    keys, URLs and NBD PSK come from ``client_nonce`` and ``session_nonce``.
    """

    __slots__ = ("type", "client_nonce", "server_nonce", "session_nonce", "role", "flags", "http_port", "nbd_port",
                 "export_name", "policy", "charge")

    def __init__(self, msg_type, client_nonce, server_nonce=None, role=None, flags=0,
                 http_port=None, nbd_port=None, export_name=None, session_nonce=None):
        self.type = msg_type
        self.client_nonce = client_nonce
        self.server_nonce = server_nonce
        self.session_nonce = session_nonce
        self.role = role
        self.flags = flags
        self.http_port = http_port
        self.nbd_port = nbd_port
        self.export_name = export_name
        self.policy = None  # WHEN_DONE and its ACK: return, poweroff or stay
        self.charge = None  # POWER: percent, None when the server cannot tell (its flags are in ``flags``)

    @property
    def type_name(self):
        return TYPE_NAMES.get(self.type, str(self.type))

    @property
    def needs_passphrase(self):
        return bool(self.flags & FLAG_NEEDS_PASSPHRASE)

    def __repr__(self):
        return "Message(%s)" % self.type_name


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def _mac(key: bytes, msg_type: int, data: bytes) -> bytes:
    return hmac.new(keyschedule.subkey(key, _PURPOSE[msg_type]), data, hashlib.sha256).digest()


def _seal(key: bytes, msg_type: int, body: bytes) -> bytes:
    head = HEADER.pack(MAGIC, VERSION, msg_type, keyschedule.key_id(key))
    data = head + body
    out = data + _mac(key, msg_type, data)
    if len(out) > MAX_DATAGRAM:
        raise OversizedMessage("message would be %d bytes, limit %d" % (len(out), MAX_DATAGRAM))
    return out


def _check_nonce(name, value):
    if not isinstance(value, (bytes, bytearray)) or len(value) != NONCE_BYTES:
        raise MalformedMessage("%s must be %d bytes" % (name, NONCE_BYTES))


def build_discover(key: bytes, client_nonce: bytes) -> bytes:
    _check_nonce("client nonce", client_nonce)
    return _seal(key, DISCOVER, bytes(client_nonce))


def build_offer(key: bytes, client_nonce: bytes, server_nonce: bytes, role: int, http_port: int = 0,
                nbd_port: int = 0, export_name: str = "", flags: int = 0) -> bytes:
    _check_nonce("client nonce", client_nonce)
    _check_nonce("server nonce", server_nonce)
    if role not in ROLES:
        raise MalformedMessage("unknown role %r" % (role,))
    if flags & ~KNOWN_FLAGS:
        raise MalformedMessage("unknown flags 0x%x" % flags)
    name = export_name.encode("utf-8")
    if len(name) > MAX_EXPORT_NAME:
        raise OversizedMessage("export name longer than %d bytes" % MAX_EXPORT_NAME)
    body = _OFFER_FIXED.pack(bytes(client_nonce), bytes(server_nonce), role, flags, http_port, nbd_port, len(name)) + name
    return _seal(key, OFFER, body)


def build_kexec_request(key: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    _check_nonce("client nonce", client_nonce)
    _check_nonce("server nonce", server_nonce)
    return _seal(key, KEXEC_REQUEST, _NONCE_PAIR.pack(bytes(client_nonce), bytes(server_nonce)))


def build_kexec_ack(key: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    _check_nonce("client nonce", client_nonce)
    _check_nonce("server nonce", server_nonce)
    return _seal(key, KEXEC_ACK, _NONCE_PAIR.pack(bytes(client_nonce), bytes(server_nonce)))


def build_session_request(key: bytes, client_nonce: bytes, challenge: bytes) -> bytes:
    """The client's proof of the key over the server's fresh challenge (from an OFFER)."""
    _check_nonce("client nonce", client_nonce)
    _check_nonce("challenge", challenge)
    return _seal(key, SESSION_REQUEST, _NONCE_PAIR.pack(bytes(client_nonce), bytes(challenge)))


def build_session_accept(key: bytes, client_nonce: bytes, challenge: bytes, session_nonce: bytes) -> bytes:
    _check_nonce("client nonce", client_nonce)
    _check_nonce("challenge", challenge)
    _check_nonce("session nonce", session_nonce)
    return _seal(key, SESSION_ACCEPT, _NONCE_TRIPLE.pack(bytes(client_nonce), bytes(challenge), bytes(session_nonce)))


def build_when_done(key: bytes, client_nonce: bytes, challenge: bytes, policy: str, ack: bool = False) -> bytes:
    """WHEN_DONE (or its ACK, which repeats the request's fields) asking for ``policy`` (return/poweroff/stay)."""
    _check_nonce("client nonce", client_nonce)
    _check_nonce("challenge", challenge)
    codes = {name: code for code, name in WHEN_DONE_POLICIES.items()}
    if policy not in codes:
        raise MalformedMessage("unknown when-done policy %r" % (policy,))
    return _seal(key, WHEN_DONE_ACK if ack else WHEN_DONE,
                 _WHEN_DONE.pack(bytes(client_nonce), bytes(challenge), codes[policy]))


def build_power(key: bytes, client_nonce: bytes, server_nonce: bytes, flags: int, charge=None) -> bytes:
    """The POWER note that follows the OFFER carrying ``server_nonce``."""
    _check_nonce("client nonce", client_nonce)
    _check_nonce("server nonce", server_nonce)
    if flags & ~KNOWN_POWER_FLAGS:
        raise MalformedMessage("unknown power flags 0x%x" % flags)
    if charge is not None and not 0 <= charge <= 100:
        raise MalformedMessage("charge %r is not a percentage" % (charge,))
    body = _POWER.pack(bytes(client_nonce), bytes(server_nonce), flags, CHARGE_UNKNOWN if charge is None else charge)
    return _seal(key, POWER, body)


def datagram_type(data) -> int | None:
    """The type byte of something shaped like a datagram of this version (NOT authenticated: only to route it)."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < HEADER.size:
        return None
    magic, version, msg_type, _kid = HEADER.unpack_from(bytes(data[:HEADER.size]))
    return msg_type if magic == MAGIC and version == VERSION else None


def parse(key: bytes, data: bytes, expect=None) -> Message:
    """Authenticate and parse a datagram.

    ``expect`` is an iterable of acceptable types; others are rejected before
    their body is looked at. Raises a ProtocolError subclass for anything
    that is not an authentic message of this version made with ``key``.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise MalformedMessage("datagram must be bytes")
    data = bytes(data)
    if len(data) > MAX_DATAGRAM:
        raise OversizedMessage("datagram of %d bytes exceeds %d" % (len(data), MAX_DATAGRAM))
    if len(data) < HEADER.size + MAC_BYTES:
        raise TruncatedMessage("datagram of %d bytes is shorter than a header and MAC" % len(data))
    magic, version, msg_type, kid = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MalformedMessage("not a stiefel datagram (bad magic)")
    if version != VERSION:
        # checked before the key: a peer left on another version is told so, not "wrong key"
        raise UnsupportedVersion("protocol version %d, this side speaks %d (update the other side)" % (version, VERSION))
    if msg_type not in _PURPOSE:
        raise MalformedMessage("unknown message type %d" % msg_type)
    if expect is not None and msg_type not in expect:
        raise MalformedMessage("unexpected message type %s" % TYPE_NAMES[msg_type])
    if not hmac.compare_digest(kid, keyschedule.key_id(key)):
        raise WrongKey("message made with another stiefel key (key id %s)" % kid.hex())
    signed, tag = data[:-MAC_BYTES], data[-MAC_BYTES:]
    if not hmac.compare_digest(tag, _mac(key, msg_type, signed)):
        raise AuthenticationFailed("%s failed authentication" % TYPE_NAMES[msg_type])
    body = signed[HEADER.size:]
    if msg_type == DISCOVER:
        if len(body) != NONCE_BYTES:
            raise MalformedMessage("DISCOVER body must be %d bytes" % NONCE_BYTES)
        return Message(DISCOVER, body)
    if msg_type == SESSION_ACCEPT:
        if len(body) != _NONCE_TRIPLE.size:
            raise MalformedMessage("SESSION_ACCEPT body must be %d bytes" % _NONCE_TRIPLE.size)
        client_nonce, challenge, session_nonce = _NONCE_TRIPLE.unpack(body)
        return Message(SESSION_ACCEPT, client_nonce, challenge, session_nonce=session_nonce)
    if msg_type in (WHEN_DONE, WHEN_DONE_ACK):
        if len(body) != _WHEN_DONE.size:
            raise MalformedMessage("%s body must be %d bytes" % (TYPE_NAMES[msg_type], _WHEN_DONE.size))
        client_nonce, challenge, code = _WHEN_DONE.unpack(body)
        if code not in WHEN_DONE_POLICIES:
            raise MalformedMessage("%s names unknown policy %d" % (TYPE_NAMES[msg_type], code))
        msg = Message(msg_type, client_nonce, challenge)
        msg.policy = WHEN_DONE_POLICIES[code]
        return msg
    if msg_type == POWER:
        if len(body) != _POWER.size:
            raise MalformedMessage("POWER body must be %d bytes" % _POWER.size)
        client_nonce, challenge, flags, charge = _POWER.unpack(body)
        if flags & ~KNOWN_POWER_FLAGS:
            raise MalformedMessage("POWER has unknown flags 0x%x" % flags)
        if charge > 100 and charge != CHARGE_UNKNOWN:
            raise MalformedMessage("POWER charge %d is not a percentage" % charge)
        msg = Message(POWER, client_nonce, challenge, flags=flags)
        msg.charge = None if charge == CHARGE_UNKNOWN else charge
        return msg
    if msg_type in (KEXEC_REQUEST, KEXEC_ACK, SESSION_REQUEST):
        if len(body) != _NONCE_PAIR.size:
            raise MalformedMessage("%s body must be %d bytes" % (TYPE_NAMES[msg_type], _NONCE_PAIR.size))
        client_nonce, server_nonce = _NONCE_PAIR.unpack(body)
        return Message(msg_type, client_nonce, server_nonce)
    # OFFER
    if len(body) < _OFFER_FIXED.size:
        raise MalformedMessage("OFFER body too short")
    client_nonce, server_nonce, role, flags, http_port, nbd_port, name_len = _OFFER_FIXED.unpack_from(body)
    name = body[_OFFER_FIXED.size:]
    if len(name) != name_len or name_len > MAX_EXPORT_NAME:
        raise MalformedMessage("OFFER export name length does not match")
    if role not in ROLES:
        raise MalformedMessage("OFFER names unknown role %d" % role)
    if flags & ~KNOWN_FLAGS:
        raise MalformedMessage("OFFER has unknown flags 0x%x" % flags)
    try:
        export_name = name.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedMessage("OFFER export name is not UTF-8") from None
    return Message(OFFER, client_nonce, server_nonce, role, flags, http_port, nbd_port, export_name)


class ReplayWindow(object):
    """Remembers recent nonces; a nonce seen again within ``ttl`` is a replay.

    Bounded in memory: at most ``capacity`` nonces; when full, the oldest is
    forgotten (an attacker flooding fresh forged packets never gets this
    far: the MAC is checked first).
    """

    def __init__(self, capacity: int = 4096, ttl: float = 600.0, clock=time.monotonic):
        self.capacity = capacity
        self.ttl = ttl
        self._clock = clock
        self._seen = collections.OrderedDict()

    def _expire(self, now):
        while self._seen:
            nonce, seen_at = next(iter(self._seen.items()))
            if now - seen_at <= self.ttl and len(self._seen) <= self.capacity:
                break
            self._seen.popitem(last=False)

    def check(self, nonce: bytes) -> None:
        """Record ``nonce``; raise ReplayedMessage if it was already seen."""
        now = self._clock()
        self._expire(now)
        if nonce in self._seen:
            raise ReplayedMessage("nonce %s was already used" % nonce.hex()[:12])
        self._seen[nonce] = now
        self._expire(now)

    def __len__(self):
        return len(self._seen)


class ChallengeBook(object):
    """Server nonces handed out in OFFERs, each answerable once, for ``ttl`` seconds."""

    def __init__(self, capacity: int = 256, ttl: float = 30.0, clock=time.monotonic):
        self.capacity = capacity
        self.ttl = ttl
        self._clock = clock
        self._open = collections.OrderedDict()

    def issue(self, client_nonce: bytes) -> bytes:
        now = self._clock()
        server_nonce = new_nonce()
        self._open[server_nonce] = (client_nonce, now)
        while len(self._open) > self.capacity:
            self._open.popitem(last=False)
        return server_nonce

    def redeem(self, client_nonce: bytes, server_nonce: bytes) -> None:
        """Consume the challenge; raise ReplayedMessage if unknown, used, expired or for another client."""
        entry = self._open.pop(server_nonce, None)
        if entry is None:
            raise ReplayedMessage("answer to an unknown or already used challenge")
        issued_to, issued_at = entry
        if self._clock() - issued_at > self.ttl:
            raise ReplayedMessage("answer to an expired challenge")
        if not hmac.compare_digest(issued_to, client_nonce):
            raise ReplayedMessage("challenge was issued to another client nonce")


# ------------------------------------------------------------------ pairing (issue 17)
#
# A network-booted desktop has no key: it pairs with the code the laptop shows (SPAKE2, then key
# confirmation both ways, the desktop first). Same header as above, key id all zeros (no key yet), no
# HMAC trailer: SPAKE2 and the confirmations authenticate the exchange. Every body has one fixed size.
#
#   PAIR_HELLO      c->s  client nonce | SPAKE2 message A
#   PAIR_CHALLENGE  s->c  client nonce | server nonce | SPAKE2 message B
#   PAIR_PROOF      c->s  client nonce | server nonce | HMAC(confirm c2s, transcript)
#   PAIR_WELCOME    s->c  client nonce | server nonce | HMAC(confirm s2c, transcript) | AES-GCM(stiefel key)
#   PAIR_REFUSED    s->c  client nonce | server nonce | reason u8 | retry after (s) u32   (not authenticated)
# 16 and up: well clear of the keyed types (1-15 are theirs to grow into).
PAIR_HELLO = 16
PAIR_CHALLENGE = 17
PAIR_PROOF = 18
PAIR_WELCOME = 19
PAIR_REFUSED = 20
PAIRING_TYPES = (PAIR_HELLO, PAIR_CHALLENGE, PAIR_PROOF, PAIR_WELCOME, PAIR_REFUSED)
TYPE_NAMES.update({PAIR_HELLO: "PAIR_HELLO", PAIR_CHALLENGE: "PAIR_CHALLENGE", PAIR_PROOF: "PAIR_PROOF",
                   PAIR_WELCOME: "PAIR_WELCOME", PAIR_REFUSED: "PAIR_REFUSED"})
NO_KEY_ID = bytes(keyschedule.KEY_ID_BYTES)
SPAKE_BYTES = 33  # the spake2 package's Ed25519 group: side byte + point
CONFIRM_BYTES = 32
GCM_NONCE_BYTES = 12
SEALED_KEY_BYTES = GCM_NONCE_BYTES + 32 + 16
REFUSED_WRONG_CODE = 1
REFUSED_LOCKED = 2
REFUSED_BUSY = 3
REFUSED_REASONS = {REFUSED_WRONG_CODE: "wrong pairing code", REFUSED_LOCKED: "pairing locked after wrong codes",
                   REFUSED_BUSY: "pairing busy"}
_PAIR_BODY = {
    PAIR_HELLO: struct.Struct(">16s33s"),
    PAIR_CHALLENGE: struct.Struct(">16s16s33s"),
    PAIR_PROOF: struct.Struct(">16s16s32s"),
    PAIR_WELCOME: struct.Struct(">16s16s32s60s"),
    PAIR_REFUSED: struct.Struct(">16s16sBI"),
}
PAIR_DESKTOP_ID = b"stiefel.system desktop"
PAIR_LAPTOP_ID = b"stiefel.system laptop"


class PairingMessage(object):
    __slots__ = ("type", "client_nonce", "server_nonce", "spake", "confirm", "sealed_key", "reason", "retry_after",
                 "head")

    def __init__(self, msg_type, client_nonce, server_nonce=None, spake=None, confirm=None, sealed_key=None,
                 reason=None, retry_after=None, head=b""):
        self.type = msg_type
        self.client_nonce = client_nonce
        self.server_nonce = server_nonce
        self.spake = spake
        self.confirm = confirm
        self.sealed_key = sealed_key
        self.reason = reason
        self.retry_after = retry_after
        self.head = head

    @property
    def type_name(self):
        return TYPE_NAMES[self.type]

    @property
    def body(self):
        """The fields as sent (the transcript is HELLO body + CHALLENGE body)."""
        return self.head[HEADER.size:]


def is_pairing(data) -> bool:
    """True for a datagram that claims to be a pairing message (parse_pairing decides if it is one)."""
    return len(data) >= HEADER.size and data[:4] == MAGIC and data[5] in PAIRING_TYPES


def _pair(msg_type, *fields):
    out = HEADER.pack(MAGIC, VERSION, msg_type, NO_KEY_ID) + _PAIR_BODY[msg_type].pack(*fields)
    return out


def build_pair_hello(client_nonce, spake):
    _check_nonce("client nonce", client_nonce)
    if len(spake) != SPAKE_BYTES:
        raise MalformedMessage("SPAKE2 message must be %d bytes" % SPAKE_BYTES)
    return _pair(PAIR_HELLO, client_nonce, spake)


def build_pair_challenge(client_nonce, server_nonce, spake):
    _check_nonce("client nonce", client_nonce)
    _check_nonce("server nonce", server_nonce)
    if len(spake) != SPAKE_BYTES:
        raise MalformedMessage("SPAKE2 message must be %d bytes" % SPAKE_BYTES)
    return _pair(PAIR_CHALLENGE, client_nonce, server_nonce, spake)


def pairing_transcript(hello, challenge) -> bytes:
    """Both sides' first messages as sent: what the confirmations and the wrapped key are bound to."""
    return hello[HEADER.size:] + challenge[HEADER.size:]


def _confirm(keys, purpose, transcript):
    return hmac.new(keys[purpose], transcript, hashlib.sha256).digest()


def pairing_keys(spake_key, hello, challenge):
    transcript = pairing_transcript(hello, challenge)
    return transcript, keyschedule.pairing_keys(spake_key, transcript)


def build_pair_proof(client_nonce, server_nonce, keys, transcript):
    return _pair(PAIR_PROOF, client_nonce, server_nonce, _confirm(keys, keyschedule.PAIRING_CONFIRM_C2S, transcript))


def check_pair_proof(msg, keys, transcript):
    if not hmac.compare_digest(msg.confirm, _confirm(keys, keyschedule.PAIRING_CONFIRM_C2S, transcript)):
        raise AuthenticationFailed("PAIR_PROOF does not confirm the key: wrong pairing code")


def build_pair_welcome(client_nonce, server_nonce, keys, transcript, stiefel_key):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # pylint: disable=import-outside-toplevel

    confirm = _confirm(keys, keyschedule.PAIRING_CONFIRM_S2C, transcript)
    gcm_nonce = secrets.token_bytes(GCM_NONCE_BYTES)
    aad = HEADER.pack(MAGIC, VERSION, PAIR_WELCOME, NO_KEY_ID) + client_nonce + server_nonce + confirm
    sealed = gcm_nonce + AESGCM(keys[keyschedule.PAIRING_KEY_WRAP]).encrypt(gcm_nonce, bytes(stiefel_key), aad)
    return _pair(PAIR_WELCOME, client_nonce, server_nonce, confirm, sealed)


def open_pair_welcome(msg, keys, transcript) -> bytes:
    """The stiefel key from an authentic PAIR_WELCOME (the laptop proved it knows the code too)."""
    from cryptography.exceptions import InvalidTag  # pylint: disable=import-outside-toplevel
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # pylint: disable=import-outside-toplevel

    if not hmac.compare_digest(msg.confirm, _confirm(keys, keyschedule.PAIRING_CONFIRM_S2C, transcript)):
        raise AuthenticationFailed("PAIR_WELCOME does not confirm the key: not the laptop that showed this code")
    aad = msg.head[:HEADER.size] + msg.client_nonce + msg.server_nonce + msg.confirm
    try:
        key = AESGCM(keys[keyschedule.PAIRING_KEY_WRAP]).decrypt(msg.sealed_key[:GCM_NONCE_BYTES],
                                                                 msg.sealed_key[GCM_NONCE_BYTES:], aad)
    except InvalidTag:
        raise AuthenticationFailed("PAIR_WELCOME key does not decrypt") from None
    return key


def build_pair_refused(client_nonce, server_nonce, reason, retry_after=0):
    if reason not in REFUSED_REASONS:
        raise MalformedMessage("unknown refusal reason %r" % (reason,))
    return _pair(PAIR_REFUSED, client_nonce, server_nonce or bytes(NONCE_BYTES), reason,
                 max(0, min(int(retry_after), 0xFFFFFFFF)))


def parse_pairing(data, expect=None) -> PairingMessage:
    """Parse a pairing datagram (fixed size per type); raises a ProtocolError subclass for anything else."""
    if not isinstance(data, (bytes, bytearray)):
        raise MalformedMessage("datagram must be bytes")
    data = bytes(data)
    if len(data) > MAX_DATAGRAM:
        raise OversizedMessage("datagram of %d bytes exceeds %d" % (len(data), MAX_DATAGRAM))
    if len(data) < HEADER.size:
        raise TruncatedMessage("datagram of %d bytes is shorter than a header" % len(data))
    magic, version, msg_type, kid = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MalformedMessage("not a stiefel datagram (bad magic)")
    if version != VERSION:
        raise UnsupportedVersion("protocol version %d, this side speaks %d (update the other side)" % (version, VERSION))
    if msg_type not in PAIRING_TYPES:
        raise MalformedMessage("not a pairing message (type %d)" % msg_type)
    if expect is not None and msg_type not in expect:
        raise MalformedMessage("unexpected message type %s" % TYPE_NAMES[msg_type])
    if kid != NO_KEY_ID:
        raise MalformedMessage("%s carries a key id: pairing has no key yet" % TYPE_NAMES[msg_type])
    layout = _PAIR_BODY[msg_type]
    body = data[HEADER.size:]
    if len(body) < layout.size:
        raise TruncatedMessage("%s body of %d bytes, needs %d" % (TYPE_NAMES[msg_type], len(body), layout.size))
    if len(body) > layout.size:
        raise OversizedMessage("%s body of %d bytes, needs %d" % (TYPE_NAMES[msg_type], len(body), layout.size))
    fields = layout.unpack(body)
    head = data
    if msg_type == PAIR_HELLO:
        return PairingMessage(msg_type, fields[0], spake=fields[1], head=head)
    if msg_type == PAIR_CHALLENGE:
        return PairingMessage(msg_type, fields[0], fields[1], spake=fields[2], head=head)
    if msg_type == PAIR_PROOF:
        return PairingMessage(msg_type, fields[0], fields[1], confirm=fields[2], head=head)
    if msg_type == PAIR_WELCOME:
        return PairingMessage(msg_type, fields[0], fields[1], confirm=fields[2], sealed_key=fields[3], head=head)
    if fields[2] not in REFUSED_REASONS:
        raise MalformedMessage("PAIR_REFUSED with unknown reason %d" % fields[2])
    return PairingMessage(msg_type, fields[0], fields[1], reason=fields[2], retry_after=fields[3], head=head)
