from __future__ import annotations

import hashlib

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import keyschedule as ks
from ansible_collections.stiefel.system.plugins.module_utils.errors import StiefelError

KEY = bytes(range(32))
CN = b"c" * 16
SN = b"s" * 16


def test_hkdf_matches_rfc5869_case_1():
    ikm = bytes.fromhex("0b" * 22)
    salt = bytes.fromhex("000102030405060708090a0b0c")
    info = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
    okm = ks.hkdf_sha256(ikm, salt, info, 42)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_hkdf_matches_cryptography():
    hkdf_mod = pytest.importorskip("cryptography.hazmat.primitives.kdf.hkdf")
    hashes = pytest.importorskip("cryptography.hazmat.primitives.hashes")
    ref = hkdf_mod.HKDF(algorithm=hashes.SHA256(), length=80, salt=b"salt", info=b"info").derive(b"ikm")
    assert ks.hkdf_sha256(b"ikm", b"salt", b"info", 80) == ref


def test_every_purpose_has_its_own_key():
    keys = {ks.subkey(KEY, p) for p in ks.PURPOSES}
    assert len(keys) == len(ks.PURPOSES)
    assert KEY not in keys


def test_key_id_is_not_a_plain_hash():
    kid = ks.key_id(KEY)
    assert len(kid) == 8
    for algo in ("sha256", "sha1", "md5", "sha512", "blake2b"):
        assert hashlib.new(algo, KEY).digest()[:8] != kid


def test_session_keys_depend_on_both_nonces():
    base = ks.session_key(KEY, ks.PAYLOAD_SERVER_TO_CLIENT, CN, SN)
    assert base != ks.session_key(KEY, ks.PAYLOAD_SERVER_TO_CLIENT, b"d" * 16, SN)
    assert base != ks.session_key(KEY, ks.PAYLOAD_SERVER_TO_CLIENT, CN, b"t" * 16)
    assert base != ks.session_key(KEY, ks.PAYLOAD_CLIENT_TO_SERVER, CN, SN)


def test_refusals():
    with pytest.raises(StiefelError):
        ks.subkey(KEY, "made up")
    with pytest.raises(StiefelError):
        ks.subkey(b"short", ks.DISCOVERY)
    with pytest.raises(StiefelError):
        ks.session_key(KEY, ks.DISCOVERY, CN, SN)
    with pytest.raises(StiefelError):
        ks.session_key(KEY, ks.NBD_PSK, b"x", SN)


def test_nbd_psk_line_format():
    line = ks.nbd_psk_line(KEY, CN, SN)
    user, hexkey = line.split(":")
    assert user == "stiefel" and len(bytes.fromhex(hexkey)) == 32
