# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Packing a root into a zstd-compressed newc archive with GNU cpio and zstd."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time

from ansible_collections.stiefel.system.plugins.module_utils.errors import RamdiskBuildError
from ansible_collections.stiefel.system.plugins.module_utils.fileio import replacing


def tree_names(root):
    """Relative paths of everything under ``root`` (parents before children, sorted)."""
    names = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        if rel != ".":
            names.append(rel)
        for name in sorted(filenames):
            names.append(name if rel == "." else os.path.join(rel, name))
        # symlinks to directories (bin -> usr/bin) are in dirnames but not walked
        for name in [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            names.append(name if rel == "." else os.path.join(rel, name))
            dirnames.remove(name)
    return names


def zstd_options(level, long_window=0):
    """The zstd compression options for ``level`` and a long-distance window of
    2**long_window bytes (0: zstd's default window for the level)."""
    opts = ["-%d" % int(level)]
    if int(level) > 19:
        opts.insert(0, "--ultra")
    if int(long_window):
        opts.append("--long=%d" % int(long_window))
    return opts


def pack_tree(root, out_path, level, log_path, owner_root=False, long_window=0):
    """Pack ``root`` into a zstd-compressed newc archive at ``out_path`` (atomic).

    Returns the uncompressed size in bytes.
    """
    names = tree_names(root)
    cpio_argv = ["cpio", "--null", "--create", "--format=newc", "--reproducible", "--quiet"]
    if owner_root:
        cpio_argv.append("--owner=0:0")
    zstd_argv = ["zstd", "-q"] + zstd_options(level, long_window) + ["-T0", "-c"]
    # A temporary file of its own until it is whole: another build into the same cache, or a reader of the
    # previous archive, never sees a part of this one.
    with open(log_path, "ab") as log, replacing(out_path, 0o644) as out:
        command = "%s | %s > %s" % (" ".join(cpio_argv), " ".join(zstd_argv), out.name)
        log.write(("\n$ %s  (%d entries)\n" % (command, len(names))).encode())
        log.flush()
        start = time.monotonic()
        # cpio reads the NUL-separated name list from a file (no pipe deadlock)
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(out_path), prefix=".names-") as nf:
            nf.write(b"\0".join(os.fsencode(n) for n in names) + b"\0")
            nf.flush()
            nf.seek(0)
            cpio = subprocess.Popen(cpio_argv, cwd=root, stdin=nf, stdout=subprocess.PIPE, stderr=log)
            zstd = subprocess.Popen(zstd_argv, stdin=subprocess.PIPE, stdout=out, stderr=log)
            size = 0
            try:
                while True:
                    chunk = cpio.stdout.read(1 << 20)
                    if not chunk:
                        break
                    size += len(chunk)
                    zstd.stdin.write(chunk)
            except BrokenPipeError:
                # zstd ended early (its return code and the log say why); cpio, no longer read, ends too
                pass
            cpio.stdout.close()
            with contextlib.suppress(BrokenPipeError):
                zstd.stdin.close()
            cpio_rc = cpio.wait()
            zstd_rc = zstd.wait()
        log.write(("# cpio rc=%d zstd rc=%d, %d bytes in, %d bytes out, %.1f s\n"
                   % (cpio_rc, zstd_rc, size, os.fstat(out.fileno()).st_size, time.monotonic() - start)).encode())
        if cpio_rc != 0 or zstd_rc != 0:
            raise RamdiskBuildError("packing %s failed (cpio rc %d, zstd rc %d); see %s"
                                    % (root, cpio_rc, zstd_rc, log_path))
    return size
