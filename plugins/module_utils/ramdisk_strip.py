# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Shrinking the ramdisk's root without losing function, and the checks that prove it still works."""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import shlex
import shutil
import subprocess
import tempfile

from ansible_collections.stiefel.system.plugins.module_utils.errors import RamdiskBuildError, StiefelError
from ansible_collections.stiefel.system.plugins.module_utils.tools import run_tool


def parse_readelf_dynamic(text):
    """Parse ``readelf -d`` output for several files into {file: (soname, [needed])}."""
    result = {}
    current = None
    for line in text.splitlines():
        if line.startswith("File: "):
            current = line[6:].strip()
            result[current] = (None, [])
            continue
        if current is None or "(" not in line or "[" not in line:
            continue
        tag = line.split("(", 1)[1].split(")", 1)[0]
        value = line.rsplit("[", 1)[1].rstrip().rstrip("]")
        soname, needed = result[current]
        if tag == "NEEDED":
            needed.append(value)
        elif tag == "SONAME":
            result[current] = (value, needed)
    return result


def _is_elf(path):
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def missing_libraries(root, lib_dirs=("usr/lib/x86_64-linux-gnu", "usr/lib", "usr/lib64"),
                      skip=("usr/lib/modules",)):
    """ELF files under ``root`` whose DT_NEEDED libraries are not in ``lib_dirs``.

    Returns {library: [files needing it]} (empty when everything resolves).
    """
    available = set()
    for d in lib_dirs:
        full = os.path.join(root, d)
        if os.path.isdir(full):
            available.update(os.listdir(full))
    elves = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, "usr")):
        rel = os.path.relpath(dirpath, root)
        if any(rel == s or rel.startswith(s + "/") for s in skip):
            dirnames[:] = []
            continue
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p) and _is_elf(p):
                elves.append(p)
    missing = {}
    for i in range(0, len(elves), 200):
        batch = elves[i:i + 200]
        # check=False: readelf exits non-zero when one file of the batch is odd,
        # yet still prints the sections of the others
        out = subprocess.run(["readelf", "-d", "-W"] + batch, capture_output=True, text=True,
                             check=False).stdout
        for path, (_soname, needed) in parse_readelf_dynamic(out).items():
            for lib in needed:
                if lib not in available:
                    missing.setdefault(lib, []).append(os.path.relpath(path, root))
    return missing


ICU_DATA_SYMBOL_PREFIX = "icudt"


def icu_data_stub_assembly(symbol):
    """GNU assembler source of ICU's own "stubdata" library: ``symbol`` (e.g.
    ``icudt72_dat``) is an empty ICU common-data package (the ``ICU_Data_Header``
    of icu4c/source/stubdata/stubdata.cpp: 32-byte header, magic 0xda27, format
    "ToCP" 1.0, no entries). ICU then finds no built-in data and every lookup
    fails cleanly with U_FILE_ACCESS_ERROR."""
    if not re.fullmatch(ICU_DATA_SYMBOL_PREFIX + "[0-9A-Za-z_]+", symbol):
        raise RamdiskBuildError("unexpected ICU data symbol %r" % symbol)
    return "\n".join([
        "    .section .rodata",
        "    .globl %s" % symbol,
        "    .type %s, @object" % symbol,
        "    .balign 16",
        "%s:" % symbol,
        "    .short 32",                # MappedData.headerSize
        "    .byte 0xda, 0x27",         # MappedData.magic1, magic2
        "    .short 20, 0",             # UDataInfo.size, reserved
        "    .byte 0, 0, 2, 0",         # little endian, ASCII family, sizeof(UChar), reserved
        '    .ascii "ToCP"',            # data format: table of contents
        "    .byte 1, 0, 0, 0",         # format version
        "    .byte 0, 0, 0, 0",         # data version
        "    .zero 8",                  # padding
        "    .long 0, 0",               # count (no entries), reserved
        "    .long 0, 0",               # one empty TOC entry, as ICU's stub has
        "    .size %s, .-%s" % (symbol, symbol),
        '    .section .note.GNU-stack,"",@progbits',
        "",
    ])


def find_icu_data_library(root, lib_dir="usr/lib/x86_64-linux-gnu"):
    """``(path, soname, symbol)`` of the ICU data library in ``root``, or None."""
    paths = sorted(p for p in glob.glob(os.path.join(root, lib_dir, "libicudata.so.*"))
                   if not os.path.islink(p))
    if not paths:
        return None
    if len(paths) > 1:
        raise RamdiskBuildError("more than one ICU data library: %s" % ", ".join(paths))
    path = paths[0]
    dyn = subprocess.run(["readelf", "-d", "-W", path], capture_output=True, text=True, check=False).stdout
    soname = (parse_readelf_dynamic("File: %s\n%s" % (path, dyn)).get(path) or (None, []))[0]
    syms = subprocess.run(["readelf", "--dyn-syms", "-W", path], capture_output=True, text=True, check=False).stdout
    symbols = [f[7] for f in (line.split() for line in syms.splitlines())
               if len(f) >= 8 and f[3] == "OBJECT" and f[6] != "UND" and f[7].startswith(ICU_DATA_SYMBOL_PREFIX)]
    if not soname or len(symbols) != 1:
        raise RamdiskBuildError("cannot read the SONAME and data symbol of %s (%r, %r)" % (path, soname, symbols))
    return path, soname, symbols[0]


def replace_icu_data(root, log_path):
    """Replace the ICU data library (~30 MB, ~10 MB compressed) by ICU's empty
    stub data, built with the binutils that already check the libraries.

    Returns ``(bytes before, bytes after)``, or None when there is no ICU data
    library or it is already a stub.
    """
    found = find_icu_data_library(root)
    if not found:
        return None
    path, soname, symbol = found
    before = os.path.getsize(path)
    if before < 65536:
        return None
    with tempfile.TemporaryDirectory(prefix="icustub-") as tmp:
        src, obj, lib = (os.path.join(tmp, n) for n in ("stub.s", "stub.o", "stub.so"))
        with open(src, "w", encoding="ascii") as f:
            f.write(icu_data_stub_assembly(symbol))
        run_tool(["as", "--64", "-o", obj, src], log_path)
        run_tool(["ld", "-shared", "-s", "--hash-style=both", "-z", "noexecstack", "-soname", soname,
                  "-o", lib, obj], log_path)
        os.chmod(lib, 0o644)
        shutil.move(lib, path + ".stub")
    os.replace(path + ".stub", path)
    with open(log_path, "a", encoding="utf-8") as f:
        f.write("ICU data %s (%s, %s): %d -> %d bytes (stub data)\n"
                % (os.path.relpath(path, root), soname, symbol, before, os.path.getsize(path)))
    return before, os.path.getsize(path)


HWDB_DIR = "usr/lib/udev/hwdb.d"


def rebuild_hwdb(root, exclude, log_path):
    """Recompile the root's udev hwdb.bin from its hwdb.d sources minus the
    files matching ``exclude`` (fnmatch on the file name), with the root's own
    systemd-hwdb (chroot: the build host needs no udev). Returns the names left
    out."""
    src_dir = os.path.join(root, HWDB_DIR)
    if not exclude or not os.path.isdir(src_dir):
        return []
    dropped = sorted(n for n in os.listdir(src_dir) if any(fnmatch.fnmatch(n, p) for p in exclude))
    for name in dropped:
        os.unlink(os.path.join(src_dir, name))
    run_tool(["chroot", root, "/usr/bin/systemd-hwdb", "update", "--usr", "--strict"], log_path,
             env={"PATH": "/usr/sbin:/usr/bin", "LC_ALL": "C"})
    with open(log_path, "a", encoding="utf-8") as f:
        f.write("hwdb.bin rebuilt without %s\n" % ", ".join(dropped))
    return dropped


def smoke_test(root, commands, log_path):
    """Run each command (a shell-free argv string) in ``root`` with chroot; the
    first failure raises. Proves the stripped programs still load their
    libraries and plugins, which the DT_NEEDED check alone cannot (dlopen)."""
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C",
           "HOME": "/root", "PYTHONDONTWRITEBYTECODE": "1"}
    for command in commands:
        argv = shlex.split(command)
        if not argv:
            continue
        try:
            run_tool(["chroot", root] + argv, log_path, env=env)
        except StiefelError:
            raise RamdiskBuildError("the stripped root fails the smoke test %r; see %s" % (command, log_path)) from None
