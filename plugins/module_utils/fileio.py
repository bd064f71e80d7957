# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Writing files so that no reader sees half of one, and hashing files too large to read whole.

Standard library only: the runtime on the targets uses it as well as the modules.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

_CHUNK = 1 << 20


def _fsync_dir(directory):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, data, mode=0o600, uid=-1, gid=-1):
    """Replace ``path`` with ``data`` (bytes, or text written as UTF-8).

    The temporary file is made 0600 in the target directory (a key is never
    readable by others, not even half-written), synced, given its owner and
    ``mode`` and renamed over ``path``; the directory is synced so the rename
    survives a crash.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".%s." % os.path.basename(path)[:32], dir=directory)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        if uid != -1 or gid != -1:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(directory)
    finally:
        if fd != -1:
            os.close(fd)
        if tmp is not None:
            os.unlink(tmp)


def hash_file(path, start=0, length=None):
    """``(bytes read, hex SHA-256)`` of ``path`` (or of ``length`` bytes from ``start``), read in 1 MiB pieces.

    The size comes from the same read as the digest, so a file that changes
    meanwhile cannot pair one version's size with another's digest.
    """
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        if start:
            handle.seek(start)
        while length is None or size < length:
            chunk = handle.read(_CHUNK if length is None else min(_CHUNK, length - size))
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def sha256_file(path, start=0, length=None):
    """Hex SHA-256 of ``path`` (or of ``length`` bytes from ``start``)."""
    return hash_file(path, start, length)[1]
