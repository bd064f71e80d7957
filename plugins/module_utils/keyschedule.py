# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Per-purpose subkeys of the stiefel key (HKDF-SHA256, RFC 5869).

The shared key itself is never used directly and nothing derived from it
by a plain hash is ever sent. Every use has its own subkey; per-session keys
(payload stream, passphrase, NBD TLS-PSK) also mix in both peers' fresh
nonces, so they differ every session and are never stored. HKDF is built
on the standard library's ``hmac`` so key handling needs no third-party
package (the ramdisk and the key module share this code).
"""

from __future__ import annotations

import hashlib
import hmac

from ansible_collections.stiefel.system.plugins.module_utils.errors import StiefelError

PROTOCOL_VERSION = 1
HKDF_SALT = b"stiefel.system key schedule v1"
KEY_ID_BYTES = 8
NONCE_BYTES = 16

DISCOVERY = "discovery"
AUTOKEXEC = "autokexec"
PAYLOAD_SERVER_TO_CLIENT = "payload s2c"
PAYLOAD_CLIENT_TO_SERVER = "payload c2s"
PASSPHRASE = "passphrase"
NBD_PSK = "nbd psk"
KEY_ID = "key id"
PAIRING_CODE = "pairing code"

PURPOSES = frozenset(
    (DISCOVERY, AUTOKEXEC, PAYLOAD_SERVER_TO_CLIENT, PAYLOAD_CLIENT_TO_SERVER, PASSPHRASE, NBD_PSK, KEY_ID,
     PAIRING_CODE)
)
SESSION_PURPOSES = frozenset((PAYLOAD_SERVER_TO_CLIENT, PAYLOAD_CLIENT_TO_SERVER, PASSPHRASE, NBD_PSK))


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 HKDF with SHA-256."""
    if length > 255 * 32:
        raise ValueError("HKDF-SHA256 output is limited to 8160 bytes")
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes((counter,)), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def subkey(key: bytes, purpose: str, context: bytes = b"", length: int = 32) -> bytes:
    """Derive the subkey for ``purpose`` (one of PURPOSES), bound to ``context``."""
    if purpose not in PURPOSES:
        raise StiefelError("unknown key purpose %r" % (purpose,))
    if len(key) != 32:
        raise StiefelError("the stiefel key is 32 bytes")
    info = b"stiefel/v%d/%s\x00" % (PROTOCOL_VERSION, purpose.encode("ascii")) + context
    return hkdf_sha256(key, HKDF_SALT, info, length)


def key_id(key: bytes) -> bytes:
    """The short public identifier of a key: 8 bytes of its own subkey."""
    return subkey(key, KEY_ID, length=KEY_ID_BYTES)


def key_id_hex(key: bytes) -> str:
    return key_id(key).hex()


def session_context(client_nonce: bytes, server_nonce: bytes) -> bytes:
    if len(client_nonce) != NONCE_BYTES or len(server_nonce) != NONCE_BYTES:
        raise StiefelError("session nonces are %d bytes each" % NONCE_BYTES)
    return b"session\x00" + client_nonce + server_nonce


def session_key(key: bytes, purpose: str, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """A key for one session only: it changes whenever either nonce does."""
    if purpose not in SESSION_PURPOSES:
        raise StiefelError("%r is not a per-session purpose" % (purpose,))
    return subkey(key, purpose, session_context(client_nonce, server_nonce))


def nbd_psk_line(key: bytes, client_nonce: bytes, server_nonce: bytes, username: str = "stiefel") -> str:
    """The session's TLS-PSK in nbdkit/GnuTLS psk-file format (``user:hex``)."""
    return "%s:%s" % (username, session_key(key, NBD_PSK, client_nonce, server_nonce).hex())


# Pairing (issue 17): the code a person types on a network-booted desktop. Derived from the key, so
# reset-key renews it and nothing beside the key file needs keeping secret. 8 decimal digits: with the
# lockout after 5 wrong codes, online guessing is hopeless; SPAKE2 leaves nothing to test offline.
PAIRING_CODE_DIGITS = 8
PAIRING_CONFIRM_C2S = "pairing confirm c2s"
PAIRING_CONFIRM_S2C = "pairing confirm s2c"
PAIRING_KEY_WRAP = "pairing key wrap"


def pairing_code(key: bytes) -> str:
    """The laptop's pairing code, ``NNNN-NNNN`` (never logged, never sent)."""
    value = int.from_bytes(subkey(key, PAIRING_CODE, length=16), "big") % 10 ** PAIRING_CODE_DIGITS
    digits = "%0*d" % (PAIRING_CODE_DIGITS, value)
    return "%s-%s" % (digits[:4], digits[4:])


def normalize_pairing_code(text) -> bytes:
    """What SPAKE2 gets as password: the digits a person typed, dashes and spaces dropped."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    digits = "".join(ch for ch in text if ch.isdigit() and ch.isascii())
    if len(digits) != PAIRING_CODE_DIGITS:
        raise StiefelError("a pairing code has %d digits" % PAIRING_CODE_DIGITS)
    return digits.encode("ascii")


def pairing_keys(spake_key: bytes, transcript: bytes) -> dict:
    """Confirmation keys (each direction) and the key-wrapping key of one pairing, bound to its transcript."""
    digest = hashlib.sha256(transcript).digest()
    return {purpose: hkdf_sha256(spake_key, HKDF_SALT,
                                 b"stiefel/v%d/%s\x00" % (PROTOCOL_VERSION, purpose.encode("ascii")) + digest)
            for purpose in (PAIRING_CONFIRM_C2S, PAIRING_CONFIRM_S2C, PAIRING_KEY_WRAP)}
