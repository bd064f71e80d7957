# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The stiefel key file: generation, strict parsing and atomic 0600 writes.

File format (v1): one line, ``stiefel-key-v1:`` then 64 lowercase hex
digits (256 bits) then a newline. Nothing else is accepted, so a truncated,
padded or foreign file is reported instead of being half-used.
"""

from __future__ import annotations

import os
import re
import secrets
import stat

from ansible_collections.stiefel.system.plugins.module_utils.errors import KeyFileError
from ansible_collections.stiefel.system.plugins.module_utils.fileio import write_atomic

KEY_BYTES = 32
KEY_PREFIX = "stiefel-key-v1:"
# A valid file is 80 bytes; anything much larger is not a key file and is not
# read whole (a key path pointed at a disk image must not fill memory).
MAX_KEY_FILE_BYTES = 1024

_KEY_LINE = re.compile(r"\Astiefel-key-v1:([0-9a-f]{64})\n\Z")


def generate_key() -> bytes:
    """Return a new random 256-bit stiefel key."""
    return secrets.token_bytes(KEY_BYTES)


def encode_key(key: bytes) -> bytes:
    """Return the file contents for ``key``."""
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise KeyFileError("a stiefel key is exactly %d bytes" % KEY_BYTES)
    return (KEY_PREFIX + bytes(key).hex() + "\n").encode("ascii")


def decode_key(data: bytes) -> bytes:
    """Parse key file contents; raise KeyFileError saying what is wrong."""
    if not isinstance(data, (bytes, bytearray)):
        raise KeyFileError("key file contents must be bytes")
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError("key file is too large (%d bytes) to be a stiefel key" % len(data))
    try:
        text = bytes(data).decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError("key file is not ASCII text") from None
    match = _KEY_LINE.match(text)
    if match is None:
        if not text.startswith(KEY_PREFIX):
            raise KeyFileError("key file does not start with %r (not a v1 stiefel key)" % KEY_PREFIX)
        raise KeyFileError("key file must hold exactly 64 lowercase hex digits after the prefix and one newline")
    return bytes.fromhex(match.group(1))


def read_key(path: str) -> bytes:
    """Read and validate the key file at ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise KeyFileError("key file %s does not exist" % path) from None
    except OSError as exc:
        raise KeyFileError("cannot open key file %s: %s" % (path, exc.strerror)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError("key file %s is not a regular file" % path)
        data = os.read(fd, MAX_KEY_FILE_BYTES + 1)
    finally:
        os.close(fd)
    return decode_key(data)


def key_file_problem(path: str) -> str | None:
    """Return why ``path`` is not a valid key file, or None when it is."""
    try:
        read_key(path)
    except KeyFileError as exc:
        return str(exc)
    return None


def write_key_atomic(path: str, key: bytes, mode: int = 0o600, uid: int = -1, gid: int = -1) -> None:
    """Write ``key`` to ``path`` so no reader ever sees a partial or world-readable file.

    The temporary file is created 0600 in the target directory, filled,
    flushed to disk, given its owner and mode, then renamed over the target;
    the directory is synced so the rename survives a crash.
    """
    write_atomic(path, encode_key(key), mode, uid, gid)
