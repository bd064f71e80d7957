# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Minimal "newc" cpio archives (the format the Linux kernel unpacks as initramfs).

Writer and strict reader. The stiefel key reaches a running ramdisk as a small
newc archive appended as an extra initrd (see docs/dev/contracts.md), so the
writer is deterministic (fixed mtime, inode numbers in order, owner root) and
the reader refuses anything malformed with :class:`CpioError`.
"""

from __future__ import annotations

import io
import stat
from dataclasses import dataclass

from ansible_collections.stiefel.system.plugins.module_utils.errors import StiefelError

MAGIC_NEWC = b"070701"
MAGIC_CRC = b"070702"
HEADER_LEN = 110
TRAILER = "TRAILER!!!"
# Upper bounds for the reader, so hostile input cannot make it allocate much.
MAX_NAME = 4096
MAX_ENTRIES = 100000


class CpioError(StiefelError, ValueError):
    """A cpio archive is malformed or an entry cannot be represented."""


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. ``mode`` includes the file type bits."""

    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    nlink: int = 0  # 0 means: 2 for directories, 1 otherwise

    @classmethod
    def file(cls, name, data, perm=0o644, **kw):
        return cls(name=name, mode=stat.S_IFREG | perm, data=data, **kw)

    @classmethod
    def directory(cls, name, perm=0o755, **kw):
        return cls(name=name, mode=stat.S_IFDIR | perm, **kw)

    @property
    def is_dir(self):
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self):
        return stat.S_ISREG(self.mode)

    @property
    def perm(self):
        return stat.S_IMODE(self.mode)


def _pad4(n):
    return (4 - n % 4) % 4


def _hex8(value, what):
    if not 0 <= value <= 0xFFFFFFFF:
        raise CpioError("%s %r does not fit a newc header field" % (what, value))
    return b"%08X" % value


def _header(ino, entry, namesize, filesize):
    nlink = entry.nlink or (2 if entry.is_dir else 1)
    fields = (
        (ino, "inode"), (entry.mode, "mode"), (entry.uid, "uid"), (entry.gid, "gid"),
        (nlink, "nlink"), (entry.mtime, "mtime"), (filesize, "file size"),
        (0, "devmajor"), (0, "devminor"), (0, "rdevmajor"), (0, "rdevminor"),
        (namesize, "name size"), (0, "check"),
    )
    return MAGIC_NEWC + b"".join(_hex8(v, w) for v, w in fields)


def _check_name(name):
    if not name or name.startswith("/") or "\0" in name:
        raise CpioError("invalid member name %r (relative, non-empty, no NUL)" % (name,))
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise CpioError("invalid member name %r (no empty, '.' or '..' components)" % (name,))


def write_newc(entries):
    """Return the bytes of a newc archive holding ``entries`` (then the trailer)."""
    out = bytearray()
    ino = 0
    for entry in list(entries) + [CpioEntry(name=TRAILER, mode=0, nlink=1)]:
        if entry.name != TRAILER:
            _check_name(entry.name)
            if not (entry.is_dir or entry.is_file):
                raise CpioError("%s: only regular files and directories are supported" % entry.name)
            if entry.is_dir and entry.data:
                raise CpioError("%s: a directory cannot carry data" % entry.name)
            ino += 1
            this_ino = ino
        else:
            this_ino = 0
        name = entry.name.encode("utf-8") + b"\0"
        data = bytes(entry.data)
        out += _header(this_ino, entry, len(name), len(data))
        out += name + b"\0" * _pad4(HEADER_LEN + len(name))
        out += data + b"\0" * _pad4(len(data))
    return bytes(out)


def _parse_hex(field, what, offset):
    try:
        text = field.decode("ascii")
    except UnicodeDecodeError:
        raise CpioError("non-ASCII %s field at offset %d" % (what, offset)) from None
    if len(text) != 8 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise CpioError("bad %s field %r at offset %d" % (what, text, offset))
    return int(text, 16)


_FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize",
           "devmajor", "devminor", "rdevmajor", "rdevminor", "namesize", "check")


def _read_exact(f, n, offset, what):
    data = f.read(n)
    if len(data) != n:
        raise CpioError("truncated %s at offset %d" % (what, offset))
    return data


def _skip(f, n, offset, what):
    while n > 0:
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            raise CpioError("truncated %s at offset %d" % (what, offset))
        n -= len(chunk)


def _members(f, max_name=MAX_NAME, keep_data=False):
    """Yield ``(offset, fields, name, data, end)`` of every member, trailers included, of the
    concatenated newc archives readable from the binary file ``f`` (as the kernel reads an initrd:
    zero padding between archives is skipped). ``data`` is None unless ``keep_data``; ``end`` is the
    offset after the member's padding. Reads ``f`` once, front to back, so a pipe will do.
    """
    pos = 0
    while True:
        first = f.read(4)
        if not first:
            return
        if first == b"\0\0\0\0":
            pos += 4
            continue
        if len(first) < 4:
            if first.strip(b"\0"):
                raise CpioError("garbage at end of cpio stream at offset %d" % pos)
            return
        header = first + _read_exact(f, HEADER_LEN - 4, pos, "header")
        magic = header[:6]
        if magic not in (MAGIC_NEWC, MAGIC_CRC):
            raise CpioError("bad magic %r at offset %d" % (magic, pos))
        vals = {}
        for i, what in enumerate(_FIELDS):
            vals[what] = _parse_hex(header[6 + 8 * i:14 + 8 * i], what, pos + 6 + 8 * i)
        namesize = vals["namesize"]
        if namesize < 2 or namesize > max_name:
            raise CpioError("bad name size %d at offset %d" % (namesize, pos))
        name_start = pos + HEADER_LEN
        raw_name = _read_exact(f, namesize, name_start, "name")
        if raw_name[-1:] != b"\0" or b"\0" in raw_name[:-1]:
            raise CpioError("name at offset %d is not NUL-terminated" % name_start)
        try:
            name = raw_name[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise CpioError("name at offset %d is not UTF-8" % name_start) from None
        name_pad = _pad4(HEADER_LEN + namesize)
        _skip(f, name_pad, name_start, "name")
        data_start = name_start + namesize + name_pad
        filesize = vals["filesize"]
        what = "data for %r (%d bytes declared)" % (name[:64], filesize)
        data = None
        if keep_data:
            data = _read_exact(f, filesize, data_start, what)
        else:
            _skip(f, filesize, data_start, what)
        _skip(f, _pad4(filesize), data_start, what)
        end = data_start + filesize + _pad4(filesize)
        yield pos, vals, name, data, end
        pos = end


def read_newc(data, max_entries=MAX_ENTRIES):
    """Parse one newc archive (up to and including its trailer).

    Returns the list of entries (trailer excluded). Trailing zero padding after
    the trailer is accepted; anything else is a :class:`CpioError`.
    """
    data = bytes(data)
    expected = 0
    entries = []
    for offset, vals, name, body, end in _members(io.BytesIO(data), keep_data=True):
        if offset != expected:
            raise CpioError("bad magic %r at offset %d" % (data[expected:expected + 6], expected))
        if name == TRAILER:
            if data[end:].strip(b"\0"):
                raise CpioError("garbage after trailer at offset %d" % end)
            return entries
        if len(entries) >= max_entries:
            raise CpioError("more than %d entries" % max_entries)
        entries.append(CpioEntry(name=name, mode=vals["mode"], data=body, uid=vals["uid"], gid=vals["gid"],
                                 mtime=vals["mtime"], nlink=vals["nlink"]))
        expected = end
    raise CpioError("truncated header at offset %d (no trailer)" % expected)


def iter_newc_stream(f, max_name=MAX_NAME):
    """Yield ``(name, mode, size)`` of every member of the concatenated newc archives readable from the
    binary file ``f`` (a ramdisk: base, overlay, key), trailers left out; a :class:`CpioError` for
    malformed data."""
    for _offset, vals, name, _data, _end in _members(f, max_name):
        if name != TRAILER:
            yield name, vals["mode"], vals["filesize"]


def newc_archive_spans(f):
    """``(offset, length)`` of each archive (up to and including its trailer) in a stream of several,
    zero padding between them allowed; a :class:`CpioError` when the stream does not end on a trailer."""
    spans = []
    start = None
    for offset, _vals, name, _data, end in _members(f):
        if start is None:
            start = offset
        if name == TRAILER:
            spans.append((start, end - start))
            start = None
    if start is not None:
        raise CpioError("the cpio stream ends without a trailer")
    return spans


def key_archive(key_text, path="etc/stiefel/key"):
    """The extra initrd that puts the stiefel key at ``/<path>``, mode 0600, owner root."""
    if isinstance(key_text, str):
        key_text = key_text.encode("ascii")
    entries = []
    parts = path.split("/")
    for i in range(1, len(parts)):
        entries.append(CpioEntry.directory("/".join(parts[:i]), 0o755))
    entries.append(CpioEntry.file(path, key_text, 0o600))
    return write_newc(entries)
