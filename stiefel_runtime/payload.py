# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The boot payload: an authenticated manifest and an AES-256-GCM chunk stream.

Stream layout (v1, big-endian)::

    header: "STFP" | version u8 | reserved u8 | chunk_size u32 | client_nonce 16 | server_nonce 16
    record: length u32 | AES-256-GCM(ciphertext + 16-byte tag)      (repeated)

Record ``i`` uses nonce ``00 00 00 | final u8 | i u64`` and associated data
``header | i u64 | final u8``; the key is the session key derived from the
stiefel key and both nonces. Reordering, dropping, duplicating or
truncating records, flipping the final flag, or replaying a stream made for
another challenge all fail authentication or raise TruncatedMessage.

The plaintext is ``manifest_length u32 | manifest JSON | kernel | initrd``;
the manifest carries the cmdline and each file's size and SHA-256, so the
receiver checks the files it wrote against one authenticated statement.
Memory use is one record, whatever the payload size.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import struct
import traceback

from ansible_collections.stiefel.system.plugins.module_utils import keyschedule
from ansible_collections.stiefel.system.plugins.module_utils.errors import (
    AuthenticationFailed,
    MalformedMessage,
    OversizedMessage,
    PayloadVerificationFailed,
    ReplayedMessage,
    StiefelError,
    TruncatedMessage,
    UnsupportedVersion,
)
from ansible_collections.stiefel.system.plugins.module_utils.fileio import hash_file

try:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    HAS_CRYPTOGRAPHY = True
    CRYPTOGRAPHY_IMPORT_ERROR = None
except ImportError:
    HAS_CRYPTOGRAPHY = False
    CRYPTOGRAPHY_IMPORT_ERROR = traceback.format_exc()

STREAM_MAGIC = b"STFP"
STREAM_VERSION = 1
STREAM_HEADER = struct.Struct(">4sBBI16s16s")
RECORD_LENGTH = struct.Struct(">I")
TAG_BYTES = 16
# 256 KiB records: the first record's read+seal and the last one's open+hash+write are latency the
# line cannot hide (about 1 ms each per MiB here), and the receiver holds a record or two at a time.
DEFAULT_CHUNK = 256 << 10
MAX_CHUNK = 4 << 20
MIN_CHUNK = 4096

MANIFEST_VERSION = 1
MAX_MANIFEST = 64 * 1024
MAX_CMDLINE = 4096
MAX_FILE_SIZE = 4 << 30
FILE_NAMES = ("kernel", "initrd")

PASSPHRASE_MAGIC = b"STFK"
PASSPHRASE_VERSION = 1
MAX_PASSPHRASE = 1024
_PASSPHRASE_HEAD = struct.Struct(">4sB12s")


def _require_cryptography():
    if not HAS_CRYPTOGRAPHY:
        raise StiefelError("the Python 'cryptography' package is required:\n%s" % CRYPTOGRAPHY_IMPORT_ERROR)


class Manifest(object):
    """What the payload holds: the cmdline and each file's size and SHA-256."""

    def __init__(self, cmdline: str, files: dict):
        self.cmdline = cmdline
        self.files = files  # name -> (size, sha256 hex)

    def to_json(self) -> bytes:
        doc = {
            "version": MANIFEST_VERSION,
            "cmdline": self.cmdline,
            "files": [{"name": n, "size": self.files[n][0], "sha256": self.files[n][1]} for n in FILE_NAMES],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @property
    def total_size(self) -> int:
        return sum(size for size, _digest in self.files.values())

    @classmethod
    def from_json(cls, data: bytes) -> "Manifest":
        if len(data) > MAX_MANIFEST:
            raise OversizedMessage("manifest of %d bytes exceeds %d" % (len(data), MAX_MANIFEST))
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise MalformedMessage("manifest is not JSON") from None
        if not isinstance(doc, dict) or set(doc) != {"version", "cmdline", "files"}:
            raise MalformedMessage("manifest must have exactly version, cmdline and files")
        if doc["version"] != MANIFEST_VERSION or isinstance(doc["version"], bool):
            raise UnsupportedVersion("manifest version %r" % (doc["version"],))
        cmdline = doc["cmdline"]
        if not isinstance(cmdline, str) or len(cmdline.encode("utf-8")) > MAX_CMDLINE or "\x00" in cmdline:
            raise MalformedMessage("manifest cmdline must be a string of at most %d bytes" % MAX_CMDLINE)
        entries = doc["files"]
        if not isinstance(entries, list) or len(entries) != len(FILE_NAMES):
            raise MalformedMessage("manifest must list exactly %s" % ", ".join(FILE_NAMES))
        files = {}
        for want, entry in zip(FILE_NAMES, entries):
            if not isinstance(entry, dict) or set(entry) != {"name", "size", "sha256"} or entry["name"] != want:
                raise MalformedMessage("manifest file entries must be %s in order" % ", ".join(FILE_NAMES))
            size, digest = entry["size"], entry["sha256"]
            if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_FILE_SIZE:
                raise MalformedMessage("manifest size of %s out of range" % want)
            if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise MalformedMessage("manifest sha256 of %s is not 64 lowercase hex digits" % want)
            files[want] = (size, digest)
        return cls(cmdline, files)


def build_manifest(kernel_path: str, initrd_path: str, cmdline: str) -> Manifest:
    files = {"kernel": hash_file(kernel_path), "initrd": hash_file(initrd_path)}
    manifest = Manifest(cmdline, files)
    Manifest.from_json(manifest.to_json())  # the sender obeys the same limits
    return manifest


def _nonce(seq: int, final: bool) -> bytes:
    return b"\x00\x00\x00" + (b"\x01" if final else b"\x00") + struct.pack(">Q", seq)


def _aad(header: bytes, seq: int, final: bool) -> bytes:
    return header + struct.pack(">Q", seq) + (b"\x01" if final else b"\x00")


class StreamEncryptor(object):
    """Seals a byte stream into records for one session."""

    def __init__(self, key: bytes, client_nonce: bytes, server_nonce: bytes, chunk_size: int = DEFAULT_CHUNK):
        _require_cryptography()
        if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
            raise StiefelError("chunk size must be between %d and %d" % (MIN_CHUNK, MAX_CHUNK))
        self.chunk_size = chunk_size
        self.header = STREAM_HEADER.pack(STREAM_MAGIC, STREAM_VERSION, 0, chunk_size, client_nonce, server_nonce)
        self._aead = AESGCM(keyschedule.session_key(key, keyschedule.PAYLOAD_SERVER_TO_CLIENT, client_nonce, server_nonce))
        self._seq = 0
        self._done = False

    def seal(self, chunk: bytes, final: bool = False) -> bytes:
        if self._done:
            raise StiefelError("stream already finished")
        if len(chunk) > self.chunk_size or (not chunk and not final):
            raise StiefelError("record plaintext must be 1..chunk_size bytes (0 only for the final record)")
        sealed = self._aead.encrypt(_nonce(self._seq, final), bytes(chunk), _aad(self.header, self._seq, final))
        self._seq += 1
        self._done = final
        return RECORD_LENGTH.pack(len(sealed)) + sealed


def _read_exact(read, count: int, what: str) -> bytes:
    parts = []
    remaining = count
    while remaining:
        block = read(remaining)
        if not block:
            raise TruncatedMessage("stream ended inside %s (%d of %d bytes)" % (what, count - remaining, count))
        parts.append(block)
        remaining -= len(block)
    return b"".join(parts)


class StreamDecryptor(object):
    """Opens the records of one session's stream, in order, until the final one."""

    def __init__(self, key: bytes, client_nonce: bytes):
        _require_cryptography()
        self._key = key
        self._client_nonce = client_nonce
        self.server_nonce = None
        self.chunk_size = None
        self._header = None

    def read_header(self, read) -> None:
        raw = _read_exact(read, STREAM_HEADER.size, "the stream header")
        magic, version, reserved, chunk_size, client_nonce, server_nonce = STREAM_HEADER.unpack(raw)
        if magic != STREAM_MAGIC:
            raise MalformedMessage("not a stiefel payload stream (bad magic)")
        if version != STREAM_VERSION:
            raise UnsupportedVersion("payload stream version %d, this side speaks %d" % (version, STREAM_VERSION))
        if reserved != 0:
            raise MalformedMessage("reserved header byte is set")
        if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
            raise OversizedMessage("chunk size %d outside %d..%d" % (chunk_size, MIN_CHUNK, MAX_CHUNK))
        if not hmac.compare_digest(client_nonce, self._client_nonce):
            raise ReplayedMessage("payload stream was made for another challenge")
        self._header = raw
        self.chunk_size = chunk_size
        self.server_nonce = server_nonce
        self._aead = AESGCM(
            keyschedule.session_key(self._key, keyschedule.PAYLOAD_SERVER_TO_CLIENT, client_nonce, server_nonce)
        )

    def records(self, read):
        """Yield each record's plaintext; return after the final record."""
        if self._header is None:
            self.read_header(read)
        seq = 0
        while True:
            (length,) = RECORD_LENGTH.unpack(_read_exact(read, RECORD_LENGTH.size, "a record length"))
            if length < TAG_BYTES:
                raise MalformedMessage("record shorter than its tag")
            if length > self.chunk_size + TAG_BYTES:
                raise OversizedMessage("record of %d bytes exceeds chunk size %d" % (length, self.chunk_size))
            sealed = _read_exact(read, length, "a record")
            plain, final = self._open(seq, sealed)
            if not plain and not final:
                raise MalformedMessage("empty record before the final one")
            yield plain
            if final:
                if read(1):
                    raise MalformedMessage("data after the final record")
                return
            seq += 1

    def _open(self, seq, sealed):
        # The final flag is not sent in clear: try the common case first.
        for final in (False, True):
            try:
                return self._aead.decrypt(_nonce(seq, final), sealed, _aad(self._header, seq, final)), final
            except InvalidTag:
                continue
        raise AuthenticationFailed("record %d failed authentication (forged, reordered or wrong key)" % seq)


def iter_payload(key: bytes, client_nonce: bytes, server_nonce: bytes, manifest: Manifest, paths: dict,
                 chunk_size: int = DEFAULT_CHUNK):
    """Yield the encrypted stream for ``manifest``; ``paths`` maps kernel/initrd to files."""
    enc = StreamEncryptor(key, client_nonce, server_nonce, chunk_size)
    yield enc.header
    manifest_json = manifest.to_json()
    pending = struct.pack(">I", len(manifest_json)) + manifest_json
    for name in FILE_NAMES:
        with open(paths[name], "rb") as handle:
            while True:
                want = chunk_size - len(pending)
                block = handle.read(want)
                if not block:
                    break
                pending += block
                if len(pending) == chunk_size:
                    yield enc.seal(pending)
                    pending = b""
    while len(pending) > chunk_size:
        yield enc.seal(pending[:chunk_size])
        pending = pending[chunk_size:]
    yield enc.seal(pending, final=True)


def receive_payload(read, key: bytes, client_nonce: bytes, dest_dir: str, progress=None,
                    on_manifest=None) -> Manifest:
    """Read a stream with ``read(n)``, write kernel and initrd into ``dest_dir``, verify, return the manifest.

    On any error the partial files are removed and a ProtocolError is raised.
    ``progress(done_bytes, total_bytes)`` is called after each record; ``on_manifest(manifest)`` once the
    authenticated manifest is read, before any file is written (an exception it raises ends the transfer there).
    """
    dec = StreamDecryptor(key, client_nonce)
    written = []
    try:
        manifest = _receive(dec, read, dest_dir, written, progress, on_manifest)
    except BaseException:
        for path in written:
            try:
                os.unlink(path)
            except OSError:
                pass
        raise
    return manifest


def _receive(dec, read, dest_dir, written, progress, on_manifest):
    manifest = None
    buf = b""
    names = list(FILE_NAMES)
    current = None
    remaining = 0
    digest = None
    done = 0
    for plain in dec.records(read):
        buf += plain
        if manifest is None:
            if len(buf) < 4:
                continue
            (length,) = struct.unpack(">I", buf[:4])
            if length > MAX_MANIFEST:
                raise OversizedMessage("manifest of %d bytes exceeds %d" % (length, MAX_MANIFEST))
            if len(buf) < 4 + length:
                continue
            manifest = Manifest.from_json(buf[4:4 + length])
            if on_manifest is not None:
                on_manifest(manifest)
            buf = buf[4 + length:]
        while buf:
            if current is None:
                if not names:
                    raise PayloadVerificationFailed("payload carries more bytes than its manifest lists")
                name = names.pop(0)
                path = os.path.join(dest_dir, name)
                current = open(path, "wb")
                written.append(path)
                remaining, expected = manifest.files[name]
                digest = hashlib.sha256()
            take = buf[:remaining]
            current.write(take)
            digest.update(take)
            remaining -= len(take)
            done += len(take)
            buf = buf[len(take):]
            if remaining == 0:
                current.close()
                current = None
                if digest.hexdigest() != expected:
                    raise PayloadVerificationFailed("%s does not match its SHA-256 in the manifest" % name)
        if progress is not None and manifest is not None:
            progress(done, manifest.total_size)
    if current is not None:
        current.close()
    if manifest is None:
        raise TruncatedMessage("stream ended before the manifest was complete")
    if names or current is not None:
        raise PayloadVerificationFailed("payload ended before all files in the manifest were received")
    return manifest


def seal_passphrase(key: bytes, client_nonce: bytes, server_nonce: bytes, passphrase: bytes) -> bytes:
    """Encrypt a LUKS passphrase for the server of this session only."""
    _require_cryptography()
    if not isinstance(passphrase, bytes) or not 0 < len(passphrase) <= MAX_PASSPHRASE:
        raise StiefelError("passphrase must be 1..%d bytes" % MAX_PASSPHRASE)
    nonce = secrets.token_bytes(12)
    head = _PASSPHRASE_HEAD.pack(PASSPHRASE_MAGIC, PASSPHRASE_VERSION, nonce)
    aead = AESGCM(keyschedule.session_key(key, keyschedule.PASSPHRASE, client_nonce, server_nonce))
    return head + aead.encrypt(nonce, passphrase, head + client_nonce + server_nonce)


def open_passphrase(key: bytes, client_nonce: bytes, server_nonce: bytes, blob: bytes) -> bytes:
    """Decrypt a sealed passphrase; raise a ProtocolError for anything else."""
    _require_cryptography()
    if not isinstance(blob, (bytes, bytearray)):
        raise MalformedMessage("sealed passphrase must be bytes")
    blob = bytes(blob)
    if len(blob) > _PASSPHRASE_HEAD.size + MAX_PASSPHRASE + TAG_BYTES:
        raise OversizedMessage("sealed passphrase too large")
    if len(blob) < _PASSPHRASE_HEAD.size + TAG_BYTES + 1:
        raise TruncatedMessage("sealed passphrase too short")
    magic, version, nonce = _PASSPHRASE_HEAD.unpack_from(blob)
    if magic != PASSPHRASE_MAGIC:
        raise MalformedMessage("not a sealed stiefel passphrase")
    if version != PASSPHRASE_VERSION:
        raise UnsupportedVersion("sealed passphrase version %d" % version)
    head = blob[:_PASSPHRASE_HEAD.size]
    aead = AESGCM(keyschedule.session_key(key, keyschedule.PASSPHRASE, client_nonce, server_nonce))
    try:
        return aead.decrypt(nonce, blob[_PASSPHRASE_HEAD.size:], head + client_nonce + server_nonce)
    except InvalidTag:
        raise AuthenticationFailed("sealed passphrase failed authentication") from None
