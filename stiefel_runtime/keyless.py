# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Is an initrd free of stiefel secrets? The check network boot makes before it serves one (issue 17).

A network-booted desktop pairs by code; the client ramdisk it is sent must carry no key. The stick
appends the key as a second, uncompressed newc archive (``etc/stiefel/key``, mode 0600,
:func:`plugins.module_utils.cpio.key_archive`) after the zstd-compressed ramdisk, so a key-bearing
initrd is the easy mistake: serving the stick's initrd instead of the ramdisk's.

The initrd is read the way the kernel unpacks it: a sequence of segments, each an uncompressed newc
archive or a run of zstd frames (the ramdisk role's output), zero padding between them. Every member
name of every segment is checked, the compressed ones included (``zstd -dc`` of each compressed run,
piped through the name walker: about a second for the real ramdisk, measured in the unit test's
docstring); a regular file's first bytes are checked too, so a key under another name is found.
Anything that is neither newc nor zstd (gzip, xz, random bytes) is refused: what cannot be read
cannot be shown to be keyless.
"""

from __future__ import annotations

import os
import stat
import subprocess
import threading

from ansible_collections.stiefel.system.plugins.module_utils import cpio
from ansible_collections.stiefel.system.plugins.module_utils.errors import StiefelError
from ansible_collections.stiefel.system.plugins.module_utils.keyfile import KEY_PREFIX

# The two secrets a ramdisk can be given (docs/dev/contracts.md): the stiefel key and the NBD PSK.
SECRET_NAMES = ("etc/stiefel/key", "etc/stiefel/nbd.psk")
SECRET_PREFIXES = (KEY_PREFIX.encode("ascii"), b"stiefel:")
_PEEK = max(len(p) for p in SECRET_PREFIXES)
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_SKIPPABLE = 0x184D2A50  # zstd skippable frames: 0x184D2A50-0x184D2A5F
_NEWC = (cpio.MAGIC_NEWC, cpio.MAGIC_CRC)


class InitrdSecretError(StiefelError):
    """The initrd holds a stiefel secret, or cannot be read well enough to show it holds none."""


def _read(f, n, pos, what):
    data = f.read(n)
    if len(data) != n:
        raise InitrdSecretError("initrd truncated in %s at offset %d" % (what, pos))
    return data


def _secret(name, head):
    # the kernel opens the name as a path: "./etc/stiefel/key", "etc//stiefel/./key" are the key too
    name = os.path.normpath("/" + name).lstrip("/")
    if name in SECRET_NAMES:
        return "holds %s" % name
    if head and head.startswith(SECRET_PREFIXES):
        return "holds a stiefel secret as %s" % name[:80]
    return None


def _walk_archive(f, pos):
    """Check one newc archive from ``pos`` to its trailer (``f`` read front to back); its end offset."""
    while True:
        header = _read(f, cpio.HEADER_LEN, pos, "a cpio header")
        if header[:6] not in _NEWC:
            raise InitrdSecretError("initrd has no cpio header at offset %d" % pos)
        try:
            mode = int(header[14:22], 16)
            filesize = int(header[54:62], 16)
            namesize = int(header[94:102], 16)
        except ValueError:
            raise InitrdSecretError("initrd has a malformed cpio header at offset %d" % pos) from None
        if not 2 <= namesize <= cpio.MAX_NAME:
            raise InitrdSecretError("initrd has a bad cpio name size at offset %d" % pos)
        raw = _read(f, namesize + (-(cpio.HEADER_LEN + namesize) % 4), pos, "a cpio name")
        name = raw[:namesize - 1].decode("utf-8", "replace")
        pos += cpio.HEADER_LEN + len(raw)
        head = b""
        if stat.S_ISREG(mode) and filesize:
            head = _read(f, min(_PEEK, filesize), pos, "cpio data")
        _skip(f, filesize - len(head) + (-filesize % 4), pos)
        pos += filesize + (-filesize % 4)
        found = _secret(name, head)
        if found:
            raise InitrdSecretError(found)
        if name == cpio.TRAILER:
            return pos


def _skip(f, n, pos):
    if n and f.seekable():
        # the file itself: seek over the data (a ramdisk's archives are mostly data)
        if f.seek(n, os.SEEK_CUR) > os.fstat(f.fileno()).st_size:
            raise InitrdSecretError("initrd truncated in cpio data at offset %d" % pos)
        return
    while n > 0:
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            raise InitrdSecretError("initrd truncated in cpio data at offset %d" % pos)
        n -= len(chunk)


def _walk_stream(f):
    """Check every archive of a decompressed stream (archives and zero padding to its end)."""
    pos = 0
    while True:
        first = f.read(4)
        if not first:
            return
        if not first.strip(b"\0"):
            pos += len(first)
            continue
        rest = _read(f, 2, pos, "a cpio header") if len(first) == 4 else b""
        if (first + rest)[:6] not in _NEWC:
            raise InitrdSecretError("decompressed initrd has no cpio header at offset %d" % pos)
        pos = _walk_archive(_Prefixed(first + rest, f), pos)


class _Prefixed(object):
    """A stream with a few bytes already read put back in front of it (a pipe cannot seek back)."""

    def __init__(self, head, f):
        self.head, self.f = head, f

    def read(self, n):
        if self.head:
            out, self.head = self.head[:n], self.head[n:]
            return out + (self.f.read(n - len(out)) if len(out) < n else b"")
        return self.f.read(n)

    @staticmethod
    def seekable():
        return False


def _frame_end(f, pos):
    """The offset after the zstd frame at ``pos`` (headers and block sizes read, nothing decompressed)."""
    f.seek(pos)
    magic = int.from_bytes(_read(f, 4, pos, "a zstd frame"), "little")
    if magic & 0xFFFFFFF0 == _SKIPPABLE:
        return pos + 8 + int.from_bytes(_read(f, 4, pos, "a zstd frame"), "little")
    fhd = _read(f, 1, pos, "a zstd frame")[0]
    single = (fhd >> 5) & 1
    fcs = (1 if single else 0, 2, 4, 8)[fhd >> 6]
    header = 1 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + fcs
    end = pos + 4 + header
    size = os.fstat(f.fileno()).st_size
    while True:
        f.seek(end)
        block = int.from_bytes(_read(f, 3, end, "a zstd block header"), "little")
        kind, length = (block >> 1) & 3, block >> 3
        if kind == 3:
            raise InitrdSecretError("initrd has a reserved zstd block type at offset %d" % end)
        end += 3 + (1 if kind == 1 else length)
        if end > size:
            raise InitrdSecretError("initrd truncated in a zstd frame at offset %d" % pos)
        if block & 1:
            return end + (4 if fhd & 4 else 0)


def _check_zstd(path, start, end, zstd="zstd"):
    """Decompress bytes ``start``-``end`` of ``path`` and walk every archive in them."""
    errors = []
    with subprocess.Popen([zstd, "-dcq"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL) as proc:

        def feed():
            try:
                with open(path, "rb") as src:
                    src.seek(start)
                    left = end - start
                    while left > 0:
                        chunk = src.read(min(left, 1 << 20))
                        if not chunk:
                            break
                        proc.stdin.write(chunk)
                        left -= len(chunk)
            except (BrokenPipeError, OSError) as exc:
                errors.append(exc)
            finally:
                try:
                    proc.stdin.close()
                except OSError:
                    pass

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        try:
            _walk_stream(proc.stdout)
        finally:
            proc.stdout.close()
            feeder.join()
            proc.wait()
    if proc.returncode != 0:
        raise InitrdSecretError("initrd's zstd data at offset %d does not decompress (zstd rc %d)"
                                % (start, proc.returncode))


def check_keyless(path, zstd="zstd"):
    """Raise :class:`InitrdSecretError` unless the initrd at ``path`` is readable and holds no stiefel secret.

    Returns the segments seen, ``[(kind, offset, length)]`` with kind ``newc`` or ``zstd``.
    """
    segments = []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        pos = 0
        while pos < size:
            f.seek(pos)
            head = f.read(6)
            if not head.strip(b"\0"):
                pos += len(head)
                continue
            skip = len(head) - len(head.lstrip(b"\0"))
            if skip:
                pos += skip
                continue
            if head in _NEWC:
                f.seek(pos)
                end = _walk_archive(f, pos)
                segments.append(("newc", pos, end - pos))
            elif head[:4] == ZSTD_MAGIC or int.from_bytes(head[:4], "little") & 0xFFFFFFF0 == _SKIPPABLE:
                end = _frame_end(f, pos)
                # a run of frames is one stream to the kernel: decompress them together
                while end < size:
                    f.seek(end)
                    if f.read(4) != ZSTD_MAGIC:
                        break
                    end = _frame_end(f, end)
                _check_zstd(path, pos, end, zstd)
                segments.append(("zstd", pos, end - pos))
            else:
                raise InitrdSecretError("initrd has data at offset %d that is neither a newc archive nor zstd "
                                        "(cannot show it holds no key)" % pos)
            pos = end
    if not segments:
        raise InitrdSecretError("initrd is empty")
    return segments
