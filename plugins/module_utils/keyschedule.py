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

PURPOSES = frozenset(
    (DISCOVERY, AUTOKEXEC, PAYLOAD_SERVER_TO_CLIENT, PAYLOAD_CLIENT_TO_SERVER, PASSPHRASE, NBD_PSK, KEY_ID)
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
