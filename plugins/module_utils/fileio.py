# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Writing files so that no reader sees half of one, and hashing files too large to read whole.

Standard library only: the runtime on the targets uses it as well as the modules.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile

_CHUNK = 1 << 20


def _fsync_dir(directory):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path, mode=0o600, uid=-1, gid=-1):
    """A binary file object that replaces ``path`` when the block ends without an exception.

    It is a temporary file of a name no other writer has, made 0600 in the target directory (a key is never
    readable by others, not even half-written, and two writers never share one). At the end it is synced, given
    its owner and ``mode`` and renamed over ``path``, and the directory is synced so the rename survives a crash;
    a reader that has ``path`` open keeps the whole old file. After an exception the temporary file is removed
    and ``path`` is untouched. ``handle.name`` is the temporary file's path, for reading back what was written
    before the rename (afterwards ``path`` may already be another writer's).
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".%s." % os.path.basename(path)[:32], dir=directory)
    try:
        # opened by name so that handle.name is the temporary file (a hash of it before the rename)
        with open(tmp, "wb") as handle:
            os.close(fd)
            fd = handle.fileno()
            os.fchmod(fd, 0o600)
            yield handle
            handle.flush()
            os.fsync(fd)
            if uid != -1 or gid != -1:
                os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(directory)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def write_atomic(path, data, mode=0o600, uid=-1, gid=-1):
    """Replace ``path`` with ``data`` (bytes, or text written as UTF-8), as :func:`replacing` does."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with replacing(path, mode, uid, gid) as handle:
        handle.write(data)


def copy_atomic(src, path, mode=0o644):
    """Replace ``path`` with a copy of the file ``src``, as :func:`replacing` does."""
    with open(src, "rb") as source, replacing(path, mode) as handle:
        shutil.copyfileobj(source, handle, _CHUNK)


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
