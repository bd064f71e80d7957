# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Building the stiefel ramdisk: the logic behind the ``ramdisk_build`` module.

The ramdisk is a Debian root (mmdebstrap) packed whole as an initramfs. The
build is split in cached stages, each keyed by a hash of its inputs, so that a
rerun with unchanged inputs does nothing and a change in the project's Python
files only repacks the small overlay:

``bootstrap``  mmdebstrap the base root               -> work/base/root
``strip``      drop docs, package state, most modules -> work/base/stamp.json
``pack_base``  cpio + zstd of the base root           -> work/base.cpio.zst
``overlay``    /init, the library and the agents      -> work/overlay.cpio.zst
``assemble``   initrd.img = base + overlay archives, vmlinuz, manifest.json

``initrd.img`` is the concatenation of two zstd-compressed newc archives, which
the kernel unpacks one after the other (the stiefel key is appended the same
way, see docs/dev/contracts.md).

Only the standard library and the runtime manifest are used (this runs on
the controller and in the ramdisk build host's system Python).
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

from ansible_collections.stiefel.system.plugins.module_utils import runtime_manifest

FORMAT_VERSION = 1
LIB_DEST = "usr/lib/stiefel"
LIBRARY_DEST = LIB_DEST + "/" + runtime_manifest.MODULE_UTILS_DEST
RUNTIME_DEST = LIB_DEST + "/" + runtime_manifest.RUNTIME_DEST
AGENTS_DEST = LIB_DEST + "/" + runtime_manifest.AGENTS_DIR
BIN_DEST = "usr/local/bin"


class RamdiskBuildError(Exception):
    """A build stage cannot run or failed; the message says why and where the log is."""


# --------------------------------------------------------------------------
# APT sources (the mirror and suite come from the host's configuration)
# --------------------------------------------------------------------------

@dataclass
class SourceEntry:
    types: list = field(default_factory=list)
    uris: list = field(default_factory=list)
    suites: list = field(default_factory=list)
    components: list = field(default_factory=list)
    enabled: bool = True


def parse_deb822_sources(text):
    """Parse a deb822 ``.sources`` file into :class:`SourceEntry` objects.

    Unknown fields are ignored, comment lines dropped, continuation lines
    (starting with whitespace) appended to the previous field. Stanzas missing
    Types/URIs/Suites are skipped.
    """
    entries = []
    stanzas = []
    current = {}
    last = None
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if current:
                stanzas.append(current)
            current, last = {}, None
            continue
        if raw[0] in " \t":
            if last is not None:
                current[last] += " " + raw.strip()
            continue
        key, sep, value = raw.partition(":")
        if not sep:
            continue
        last = key.strip().lower()
        current[last] = value.strip()
    if current:
        stanzas.append(current)
    for st in stanzas:
        types = st.get("types", "").split()
        uris = st.get("uris", "").split()
        suites = st.get("suites", "").split()
        if not (types and uris and suites):
            continue
        enabled = st.get("enabled", "yes").strip().lower() not in ("no", "false", "0")
        entries.append(SourceEntry(types, uris, suites, st.get("components", "").split(), enabled))
    return entries


def parse_one_line_sources(text):
    """Parse one-line-style ``sources.list`` text (``deb [opts] uri suite comp...``)."""
    entries = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        kind = parts[0]
        if kind not in ("deb", "deb-src"):
            continue
        rest = parts[1:]
        if rest and rest[0].startswith("["):
            # options: [ a=b c=d ] possibly split over several words
            while rest and not rest[0].endswith("]"):
                rest = rest[1:]
            rest = rest[1:]
        if len(rest) < 2:
            continue
        entries.append(SourceEntry([kind], [rest[0]], [rest[1]], rest[2:], True))
    return entries


def read_host_sources(etc_apt="/etc/apt"):
    """All APT source entries configured on this host, in APT's reading order."""
    entries = []
    main_list = os.path.join(etc_apt, "sources.list")
    if os.path.isfile(main_list):
        with open(main_list, encoding="utf-8", errors="replace") as f:
            entries += parse_one_line_sources(f.read())
    for path in sorted(glob.glob(os.path.join(etc_apt, "sources.list.d", "*"))):
        if path.endswith(".list"):
            parse = parse_one_line_sources
        elif path.endswith(".sources"):
            parse = parse_deb822_sources
        else:
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            entries += parse(f.read())
    return entries


def _is_derived_suite(suite, base):
    return suite.startswith(base + "-") or suite.startswith(base + "/")


def select_mirrors(entries, mirror="", suite="", components=None):
    """Choose the suite and the mmdebstrap mirror lines.

    Returns ``(mirror_uri, suite, components, lines)``. With ``mirror`` given it
    wins (one line). Otherwise the first enabled ``deb`` entry whose suite is a
    plain release name (no ``-updates``/``-security``) sets mirror and suite, and
    every host entry for that suite and its ``-updates``/``-security`` companions
    becomes a line (so the image gets security fixes). Backports and
    proposed-updates are left out.
    """
    debs = [e for e in entries if e.enabled and "deb" in e.types]
    if mirror:
        if not suite:
            raise RamdiskBuildError("ramdisk_mirror is set, so ramdisk_suite must be set too")
        comps = list(components or ["main"])
        return mirror, suite, comps, ["deb %s %s %s" % (mirror, suite, " ".join(comps))]
    primary = None
    for e in debs:
        for s in e.suites:
            if "-" in s or "/" in s:
                continue
            if suite and s != suite:
                continue
            if any(u.rstrip("/").endswith("-security") for u in e.uris):
                continue
            primary = (e.uris[0], s, e.components or ["main"])
            break
        if primary:
            break
    if primary is None:
        raise RamdiskBuildError(
            "no usable Debian source in the host's APT configuration%s; set ramdisk_mirror and ramdisk_suite"
            % (" for suite %r" % suite if suite else ""))
    base_uri, base_suite, base_comps = primary
    comps = list(components) if components else list(base_comps)
    lines = []
    for e in debs:
        for s in e.suites:
            if s != base_suite and not _is_derived_suite(s, base_suite):
                continue
            if s.endswith("-backports") or s.endswith("-proposed-updates"):
                continue
            for u in e.uris:
                line = "deb %s %s %s" % (u, s, " ".join(comps))
                if line not in lines:
                    lines.append(line)
    return base_uri, base_suite, comps, lines


# --------------------------------------------------------------------------
# Hashes, stamps, manifest
# --------------------------------------------------------------------------

def sha256_file(path, bufsize=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(bufsize)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def canonical_hash(obj):
    """SHA-256 of the canonical JSON form of ``obj``."""
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(data.encode("ascii")).hexdigest()


def read_json(path):
    """The JSON object in ``path``, or None when missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json_atomic(path, data, mode=0o644):
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def stamp_hash(path):
    data = read_json(path)
    return data.get("hash") if data else None


# --------------------------------------------------------------------------
# Overlay file set (the project's files that go into the ramdisk)
# --------------------------------------------------------------------------

def overlay_files(runtime_root, init_path):
    """Map of destination path (relative to /) -> (source path, mode).

    ``/init``, and the runtime manifest's ``ramdisk`` target read from the
    collection tree at ``runtime_root``: the agents and the modules they import.
    """
    files = {}
    if not os.path.isfile(init_path):
        raise RamdiskBuildError("init script %s does not exist" % init_path)
    files["init"] = (init_path, 0o755)
    try:
        entries = runtime_manifest.entries("ramdisk", runtime_root)
    except runtime_manifest.ManifestError as exc:
        raise RamdiskBuildError("cannot list the ramdisk's runtime files: %s" % exc) from exc
    for entry in entries:
        files[LIB_DEST + "/" + entry.dest] = (entry.src, entry.mode)
    return files


def agent_names(files):
    prefix = AGENTS_DEST + "/"
    return sorted(k[len(prefix):] for k in files if k.startswith(prefix))


# --------------------------------------------------------------------------
# Kernel modules
# --------------------------------------------------------------------------

def parse_modules_dep(text):
    """Parse ``modules.dep`` into {module path: [dependency paths]}."""
    deps = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        mod, _sep, rest = line.partition(":")
        mod = mod.strip()
        if not mod:
            continue
        deps[mod] = rest.split()
    return deps


def select_modules(deps, include, exclude):
    """The modules to keep: matching ``include`` and not ``exclude`` (fnmatch on
    the path relative to the module directory), plus everything they need."""
    wanted = set()
    for mod in deps:
        if any(fnmatch.fnmatch(mod, p) for p in include) and not any(fnmatch.fnmatch(mod, p) for p in exclude):
            wanted.add(mod)
    todo = list(wanted)
    while todo:
        mod = todo.pop()
        for dep in deps.get(mod, ()):
            if dep not in wanted:
                wanted.add(dep)
                todo.append(dep)
    return wanted


# --------------------------------------------------------------------------
# newc stream listing (several concatenated archives, as the kernel reads them)
# --------------------------------------------------------------------------

NEWC_MAGICS = (b"070701", b"070702")
NEWC_HEADER = 110


def iter_newc_stream(f, max_name=4096):
    """Yield ``(name, mode, size)`` for every member of the concatenated newc
    archives readable from binary file ``f`` (trailers are skipped, zero padding
    between archives accepted). Raises :class:`RamdiskBuildError` on malformed data.
    """
    pos = 0

    def read_exact(n):
        nonlocal pos
        data = f.read(n)
        if len(data) != n:
            raise RamdiskBuildError("truncated cpio stream at offset %d" % pos)
        pos += n
        return data

    def skip(n):
        nonlocal pos
        while n > 0:
            chunk = f.read(min(n, 1 << 20))
            if not chunk:
                raise RamdiskBuildError("truncated cpio data at offset %d" % pos)
            pos += len(chunk)
            n -= len(chunk)

    while True:
        first = f.read(4)
        if not first:
            return
        if first == b"\0\0\0\0":
            pos += 4
            continue
        pos += len(first)
        if len(first) < 4:
            if first.strip(b"\0"):
                raise RamdiskBuildError("garbage at end of cpio stream at offset %d" % pos)
            return
        header = first + read_exact(NEWC_HEADER - 4)
        if header[:6] not in NEWC_MAGICS:
            raise RamdiskBuildError("bad cpio magic %r at offset %d" % (header[:6], pos - NEWC_HEADER))
        try:
            fields = [int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise RamdiskBuildError("bad cpio header at offset %d" % (pos - NEWC_HEADER)) from None
        if any(not header[6 + 8 * i:14 + 8 * i].isalnum() for i in range(13)):
            raise RamdiskBuildError("bad cpio header at offset %d" % (pos - NEWC_HEADER))
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        if namesize < 1 or namesize > max_name:
            raise RamdiskBuildError("bad cpio name size %d at offset %d" % (namesize, pos))
        raw = read_exact(namesize)
        if raw[-1:] != b"\0":
            raise RamdiskBuildError("cpio name not NUL-terminated at offset %d" % pos)
        name = raw[:-1].decode("utf-8", errors="surrogateescape")
        skip((-(NEWC_HEADER + namesize)) % 4)
        if name == "TRAILER!!!":
            skip(filesize + (-filesize) % 4)
            continue
        skip(filesize + (-filesize) % 4)
        yield name, mode, filesize


# --------------------------------------------------------------------------
# Running the real tools
# --------------------------------------------------------------------------

def run_logged(argv, log_path, cwd=None, env=None):
    """Run ``argv`` with stdout+stderr appended to ``log_path``; raise on failure."""
    with open(log_path, "ab") as log:
        log.write(("\n$ %s\n" % " ".join(argv)).encode())
        log.flush()
        start = time.monotonic()
        rc = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             cwd=cwd, env=env)
        log.write(("# rc=%d after %.1f s\n" % (rc, time.monotonic() - start)).encode())
    if rc != 0:
        raise RamdiskBuildError("%s failed with exit code %d; see %s" % (argv[0], rc, log_path))


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
    tmp = out_path + ".tmp"
    cpio_argv = ["cpio", "--null", "--create", "--format=newc", "--reproducible", "--quiet"]
    if owner_root:
        cpio_argv.append("--owner=0:0")
    zstd_argv = ["zstd", "-q"] + zstd_options(level, long_window) + ["-T0", "-f", "-o", tmp]
    with open(log_path, "ab") as log:
        log.write(("\n$ %s | %s  (%d entries)\n" % (" ".join(cpio_argv), " ".join(zstd_argv), len(names))).encode())
        log.flush()
        start = time.monotonic()
        # cpio reads the NUL-separated name list from a file (no pipe deadlock)
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(out_path), prefix=".names-") as nf:
            nf.write(b"\0".join(os.fsencode(n) for n in names) + b"\0")
            nf.flush()
            nf.seek(0)
            cpio = subprocess.Popen(cpio_argv, cwd=root, stdin=nf, stdout=subprocess.PIPE, stderr=log)
            zstd = subprocess.Popen(zstd_argv, stdin=subprocess.PIPE, stderr=log)
            size = 0
            while True:
                chunk = cpio.stdout.read(1 << 20)
                if not chunk:
                    break
                size += len(chunk)
                zstd.stdin.write(chunk)
            zstd.stdin.close()
            cpio_rc = cpio.wait()
            zstd_rc = zstd.wait()
        log.write(("# cpio rc=%d zstd rc=%d, %d bytes in, %d bytes out, %.1f s\n"
                   % (cpio_rc, zstd_rc, size, os.path.getsize(tmp) if os.path.exists(tmp) else -1,
                      time.monotonic() - start)).encode())
    if cpio_rc != 0 or zstd_rc != 0:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise RamdiskBuildError("packing %s failed (cpio rc %d, zstd rc %d); see %s"
                                % (root, cpio_rc, zstd_rc, log_path))
    os.replace(tmp, out_path)
    return size


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


# --------------------------------------------------------------------------
# Shrinking the root without losing function
# --------------------------------------------------------------------------

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
        run_logged(["as", "--64", "-o", obj, src], log_path)
        run_logged(["ld", "-shared", "-s", "--hash-style=both", "-z", "noexecstack", "-soname", soname,
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
    run_logged(["chroot", root, "/usr/bin/systemd-hwdb", "update", "--usr", "--strict"], log_path,
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
            run_logged(["chroot", root] + argv, log_path, env=env)
        except RamdiskBuildError:
            raise RamdiskBuildError("the stripped root fails the smoke test %r; see %s" % (command, log_path)) from None


def remove_tree(path):
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def dir_size(root):
    total = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


# --------------------------------------------------------------------------
# The staged build
# --------------------------------------------------------------------------

STEPS = ("plan", "bootstrap", "strip", "pack_base", "overlay", "assemble")


class RamdiskBuilder:
    """One build configuration; each ``step_*`` method returns a result dict with
    ``changed`` and ``msg`` and, when ``check`` is true, only says what it would do."""

    def __init__(self, cfg, check=False):
        self.cfg = cfg
        self.check = check
        self.out = os.path.abspath(cfg["output_dir"])
        self.work = os.path.join(self.out, "work")
        self.logs = os.path.join(self.out, "logs")
        self.base_dir = os.path.join(self.work, "base")
        self.root = os.path.join(self.base_dir, "root")
        self.base_archive = os.path.join(self.work, "base.cpio.zst")
        self.overlay_dir = os.path.join(self.work, "overlay")
        self.overlay_archive = os.path.join(self.work, "overlay.cpio.zst")
        if cfg.get("sources_lines"):
            lines = list(cfg["sources_lines"])
            self.mirror, self.suite, self.components = cfg.get("mirror", ""), cfg.get("suite", ""), cfg.get("components") or []
        else:
            self.mirror, self.suite, self.components, lines = select_mirrors(
                read_host_sources(cfg.get("etc_apt", "/etc/apt")), cfg.get("mirror", ""), cfg.get("suite", ""),
                cfg.get("components"))
        self.sources_lines = lines
        self.packages = sorted(set(cfg["packages"]) | set(cfg.get("extra_packages") or []))
        base_inputs = {
            "format": FORMAT_VERSION,
            "role_version": cfg.get("role_version", ""),
            "sources": self.sources_lines,
            "suite": self.suite,
            "variant": cfg["variant"],
            "packages": self.packages,
            "dpkg_excludes": sorted(cfg["dpkg_excludes"]),
            "strip_paths": sorted(cfg["strip_paths"]),
            "modules_include": sorted(cfg["modules_include"]),
            "modules_exclude": sorted(cfg["modules_exclude"]),
            "zstd_level": int(cfg["zstd_level"]),
            "compress_modules": cfg.get("compress_modules", "none"),
            "zstd_long": int(cfg.get("zstd_long") or 0),
            "hwdb_exclude": sorted(cfg.get("hwdb_exclude") or []),
            "icu_data_stub": bool(cfg.get("icu_data_stub")),
            "smoke_commands": list(cfg.get("smoke_commands") or []),
        }
        self.base_hash = canonical_hash(base_inputs)
        self.files = overlay_files(cfg["runtime_root"], cfg["init_path"])
        self.file_hashes = {dest: [sha256_file(src), mode] for dest, (src, mode) in self.files.items()}
        self.input_hash = canonical_hash({"base": self.base_hash, "files": self.file_hashes})

    # -- helpers ---------------------------------------------------------
    @property
    def compression(self):
        return " ".join(["zstd"] + zstd_options(self.cfg["zstd_level"], self.cfg.get("zstd_long") or 0))

    def _log(self, name):
        os.makedirs(self.logs, exist_ok=True)
        path = os.path.join(self.logs, name + ".log")
        with open(path, "w", encoding="utf-8") as f:
            f.write("# stiefel ramdisk build, step %s, %s\n" % (name, time.strftime("%Y-%m-%d %H:%M:%S")))
        return path

    def _result(self, changed, msg, **extra):
        res = {"changed": changed, "msg": msg, "base_hash": self.base_hash, "input_hash": self.input_hash}
        res.update(extra)
        return res

    def plan(self):
        manifest = read_json(os.path.join(self.out, "manifest.json")) or {}
        return self._result(False, "ramdisk inputs hashed", mirror=self.mirror, suite=self.suite,
                            sources=self.sources_lines, packages=self.packages,
                            agents=agent_names(self.files),
                            up_to_date=manifest.get("input_hash") == self.input_hash and self._outputs_ok(manifest),
                            base_up_to_date=stamp_hash(os.path.join(self.base_dir, "stamp.json")) == self.base_hash)

    # -- bootstrap ---------------------------------------------------------
    def bootstrap(self):
        stamp = os.path.join(self.base_dir, "stamp.json")
        marker = os.path.join(self.base_dir, "bootstrap.json")
        if self.base_hash in (stamp_hash(stamp), stamp_hash(marker)) and os.path.isdir(self.root):
            return self._result(False, "base root is up to date")
        if self.check:
            return self._result(True, "would bootstrap the base root with mmdebstrap")
        if os.geteuid() != 0:
            raise RamdiskBuildError("bootstrapping needs root (mmdebstrap --mode=root)")
        log = self._log("bootstrap")
        os.makedirs(self.base_dir, exist_ok=True)
        for p in (stamp, marker):
            if os.path.exists(p):
                os.unlink(p)
        tmp_root = self.root + ".tmp"
        remove_tree(tmp_root)
        argv = ["mmdebstrap", "--mode=root", "--format=directory", "--variant=%s" % self.cfg["variant"],
                "--include=%s" % ",".join(self.packages)]
        argv += ["--dpkgopt=path-exclude=%s" % p for p in self.cfg["dpkg_excludes"]]
        argv += [self.suite, tmp_root] + self.sources_lines
        start = time.monotonic()
        try:
            run_logged(argv, log)
        except BaseException:
            remove_tree(tmp_root)
            raise
        remove_tree(self.root)
        os.replace(tmp_root, self.root)
        write_json_atomic(marker, {"hash": self.base_hash})
        return self._result(True, "bootstrapped the base root in %.0f s" % (time.monotonic() - start),
                            log=log, seconds=round(time.monotonic() - start, 1))

    # -- strip -------------------------------------------------------------
    def strip(self):
        stamp = os.path.join(self.base_dir, "stamp.json")
        if stamp_hash(stamp) == self.base_hash and os.path.isdir(self.root):
            return self._result(False, "base root is stripped and up to date")
        if self.check:
            return self._result(True, "would strip the base root")
        if stamp_hash(os.path.join(self.base_dir, "bootstrap.json")) != self.base_hash:
            raise RamdiskBuildError("the base root is not bootstrapped for these inputs; run the bootstrap step first")
        log = self._log("strip")
        start = time.monotonic()
        root = self.root
        # kernel
        kernels = sorted(glob.glob(os.path.join(root, "boot", "vmlinuz-*")))
        if len(kernels) != 1:
            raise RamdiskBuildError("expected one kernel in %s/boot, found %d" % (root, len(kernels)))
        kver = os.path.basename(kernels[0])[len("vmlinuz-"):]
        shutil.copyfile(kernels[0], os.path.join(self.base_dir, "vmlinuz"))
        # package versions, before the package state goes
        out = subprocess.run(["dpkg-query", "--admindir=%s/var/lib/dpkg" % root, "-W",
                              "-f", "${Package}\t${Version}\n"], check=True, capture_output=True, text=True).stdout
        versions = dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)
        size_before = dir_size(root)
        # kernel modules
        moddir = os.path.join(root, "usr", "lib", "modules", kver)
        with open(os.path.join(moddir, "modules.dep"), encoding="utf-8") as f:
            deps = parse_modules_dep(f.read())
        keep = select_modules(deps, self.cfg["modules_include"], self.cfg["modules_exclude"])
        removed = 0
        for mod in deps:
            if mod not in keep:
                os.unlink(os.path.join(moddir, mod))
                removed += 1
        for dirpath, dirnames, filenames in os.walk(os.path.join(moddir, "kernel"), topdown=False):
            if not os.listdir(dirpath):
                os.rmdir(dirpath)
        with open(log, "a", encoding="utf-8") as f:
            f.write("kernel %s: keeping %d of %d modules\n" % (kver, len(keep), len(deps)))
            for mod in sorted(keep):
                f.write("keep %s\n" % mod)
        if self.cfg.get("compress_modules", "none") == "xz":
            # kmod (libkmod, +XZ) decompresses them in userspace; the initramfs
            # then holds ~100 MB less in RAM and boots faster.
            plain = [os.path.join(moddir, m) for m in sorted(keep) if m.endswith(".ko")]
            jobs = max(1, os.cpu_count() or 1)
            batches = [plain[i::jobs] for i in range(jobs)]
            with open(log, "ab") as f:
                f.write(b"compressing %d modules with xz in %d processes\n" % (len(plain), jobs))
                f.flush()
                procs = [subprocess.Popen(["xz", "--quiet", "--check=crc32", "-6"] + b, stdout=f, stderr=f)
                         for b in batches if b]
                codes = [p.wait() for p in procs]
            if any(codes):
                raise RamdiskBuildError("xz failed compressing kernel modules; see %s" % log)
        run_logged(["depmod", "-b", root, kver], log)
        # before strip_paths removes the hwdb sources
        hwdb_dropped = rebuild_hwdb(root, self.cfg.get("hwdb_exclude") or [], log)
        # files a ramdisk does not need
        for pattern in self.cfg["strip_paths"]:
            for path in glob.glob(os.path.join(root, pattern.lstrip("/"))):
                real = os.path.realpath(path)
                if not real.startswith(os.path.realpath(root) + os.sep):
                    continue
                remove_tree(path)
        icu = replace_icu_data(root, log) if self.cfg.get("icu_data_stub") else None
        missing = missing_libraries(root)
        if missing:
            with open(log, "a", encoding="utf-8") as f:
                f.write("missing libraries: %s\n" % json.dumps(missing, indent=1))
            raise RamdiskBuildError("the stripped root misses shared libraries %s (needed by %s); "
                                    "fix ramdisk_strip_paths; see %s"
                                    % (", ".join(sorted(missing)), ", ".join(sorted({f for v in missing.values() for f in v})[:5]), log))
        smoke_test(root, self.cfg.get("smoke_commands") or [], log)
        size_after = dir_size(root)
        data = {"hash": self.base_hash, "kernel_version": kver, "packages": versions,
                "modules_kept": len(keep), "modules_total": len(deps),
                "root_bytes_before_strip": size_before, "root_bytes": size_after,
                "hwdb_dropped": hwdb_dropped, "icu_data_bytes": list(icu) if icu else None}
        write_json_atomic(stamp, data)
        with open(log, "a", encoding="utf-8") as f:
            f.write("root %d -> %d bytes\n" % (size_before, size_after))
        return self._result(True, "stripped the base root: %d of %d modules kept, %.0f MB -> %.0f MB"
                            % (len(keep), len(deps), size_before / 1e6, size_after / 1e6), log=log,
                            seconds=round(time.monotonic() - start, 1))

    # -- pack base ---------------------------------------------------------
    def pack_base(self):
        meta_path = self.base_archive + ".json"
        if stamp_hash(meta_path) == self.base_hash and os.path.isfile(self.base_archive):
            return self._result(False, "base archive is up to date")
        if self.check:
            return self._result(True, "would pack the base root (cpio + %s)" % self.compression)
        if stamp_hash(os.path.join(self.base_dir, "stamp.json")) != self.base_hash:
            raise RamdiskBuildError("the base root is not stripped for these inputs; run the strip step first")
        log = self._log("pack-base")
        start = time.monotonic()
        if os.path.exists(meta_path):
            os.unlink(meta_path)
        size = pack_tree(self.root, self.base_archive, self.cfg["zstd_level"], log,
                         long_window=self.cfg.get("zstd_long") or 0)
        write_json_atomic(meta_path, {"hash": self.base_hash, "uncompressed_bytes": size,
                                      "compressed_bytes": os.path.getsize(self.base_archive)})
        return self._result(True, "packed the base root: %.1f MB -> %.1f MB"
                            % (size / 1e6, os.path.getsize(self.base_archive) / 1e6), log=log,
                            seconds=round(time.monotonic() - start, 1))

    # -- overlay -----------------------------------------------------------
    def overlay(self):
        meta_path = self.overlay_archive + ".json"
        if stamp_hash(meta_path) == self.input_hash and os.path.isfile(self.overlay_archive):
            return self._result(False, "overlay archive is up to date")
        if self.check:
            return self._result(True, "would pack the overlay (init, library, %d agents)" % len(agent_names(self.files)))
        log = self._log("overlay")
        start = time.monotonic()
        remove_tree(self.overlay_dir)
        os.makedirs(self.overlay_dir)
        for dest, (src, mode) in sorted(self.files.items()):
            target = os.path.join(self.overlay_dir, dest)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(src, target)
            os.chmod(target, mode)
        bindir = os.path.join(self.overlay_dir, BIN_DEST)
        os.makedirs(bindir, exist_ok=True)
        for name in agent_names(self.files):
            os.symlink("/" + AGENTS_DEST + "/" + name, os.path.join(bindir, name))
        keydir = os.path.join(self.overlay_dir, "etc", "stiefel")
        os.makedirs(keydir, exist_ok=True)
        for dirpath, dirnames, _filenames in os.walk(self.overlay_dir):
            for d in dirnames:
                os.chmod(os.path.join(dirpath, d), 0o755)
        os.chmod(keydir, 0o700)
        os.chmod(self.overlay_dir, 0o755)
        if os.path.exists(meta_path):
            os.unlink(meta_path)
        size = pack_tree(self.overlay_dir, self.overlay_archive, self.cfg["zstd_level"], log, owner_root=True,
                         long_window=self.cfg.get("zstd_long") or 0)
        write_json_atomic(meta_path, {"hash": self.input_hash, "uncompressed_bytes": size,
                                      "compressed_bytes": os.path.getsize(self.overlay_archive),
                                      "files": self.file_hashes})
        return self._result(True, "packed the overlay: %d files, %d bytes" % (len(self.files), size), log=log,
                            seconds=round(time.monotonic() - start, 1))

    # -- assemble ----------------------------------------------------------
    def _outputs_ok(self, manifest):
        for name in ("vmlinuz", "initrd.img"):
            info = (manifest.get("files") or {}).get(name) or {}
            path = os.path.join(self.out, name)
            if not os.path.isfile(path) or os.path.getsize(path) != info.get("size"):
                return False
        return True

    def _outputs_match(self, manifest):
        if not self._outputs_ok(manifest):
            return False
        return all(sha256_file(os.path.join(self.out, name)) == manifest["files"][name].get("sha256")
                   for name in ("vmlinuz", "initrd.img"))

    def assemble(self):
        manifest_path = os.path.join(self.out, "manifest.json")
        old = read_json(manifest_path) or {}
        if old.get("input_hash") == self.input_hash and self._outputs_match(old):
            return self._result(False, "ramdisk is up to date", manifest=old)
        if self.check:
            return self._result(True, "would write vmlinuz, initrd.img and manifest.json to %s" % self.out)
        base_meta = read_json(self.base_archive + ".json") or {}
        overlay_meta = read_json(self.overlay_archive + ".json") or {}
        stamp = read_json(os.path.join(self.base_dir, "stamp.json")) or {}
        if base_meta.get("hash") != self.base_hash or stamp.get("hash") != self.base_hash:
            raise RamdiskBuildError("the base archive is not built for these inputs; run the pack_base step first")
        if overlay_meta.get("hash") != self.input_hash:
            raise RamdiskBuildError("the overlay archive is not built for these inputs; run the overlay step first")
        log = self._log("assemble")
        start = time.monotonic()
        initrd = os.path.join(self.out, "initrd.img")
        kernel = os.path.join(self.out, "vmlinuz")
        tmp = initrd + ".tmp"
        archives = 0
        with open(tmp, "wb") as dst:
            for part in (self.base_archive, self.overlay_archive):
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
                archives += os.path.getsize(part)
            # Bootloaders append the key archive right after this file (systemd-boot
            # without padding) and the kernel only finds a cpio on a 4-byte boundary,
            # so the file ends on one. The kernel skips zero padding; the zstd tool
            # does not, so readers take the first initrd_archives_bytes only.
            dst.write(b"\0" * ((4 - archives % 4) % 4))
        os.replace(tmp, initrd)
        shutil.copyfile(os.path.join(self.base_dir, "vmlinuz"), kernel + ".tmp")
        os.replace(kernel + ".tmp", kernel)
        pkgs = stamp.get("packages") or {}
        manifest = {
            "format": FORMAT_VERSION,
            "input_hash": self.input_hash,
            "base_hash": self.base_hash,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "suite": self.suite,
            "mirror": self.mirror,
            "sources": self.sources_lines,
            "kernel_version": stamp.get("kernel_version"),
            "versions": {p: pkgs[p] for p in sorted(pkgs) if p in set(self.packages) or p.startswith("linux-image-")
                         or p in ("python3", "python3.11", "python3-cryptography", "python3-pyroute2")},
            "packages_installed": len(pkgs),
            "modules_kept": stamp.get("modules_kept"),
            "modules_total": stamp.get("modules_total"),
            "agents": agent_names(self.files),
            "overlay_files": self.file_hashes,
            "initrd_parts": [
                {"name": "base", "compressed": base_meta.get("compressed_bytes"),
                 "uncompressed": base_meta.get("uncompressed_bytes")},
                {"name": "overlay", "compressed": overlay_meta.get("compressed_bytes"),
                 "uncompressed": overlay_meta.get("uncompressed_bytes")},
            ],
            "initrd_archives_bytes": archives,
            "initrd_uncompressed_bytes": (base_meta.get("uncompressed_bytes") or 0)
            + (overlay_meta.get("uncompressed_bytes") or 0),
            "compression": self.compression,
            "files": {name: {"size": os.path.getsize(p), "sha256": sha256_file(p)}
                      for name, p in (("vmlinuz", kernel), ("initrd.img", initrd))},
        }
        write_json_atomic(manifest_path, manifest)
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps(manifest["files"], indent=2) + "\n")
        return self._result(True, "wrote the ramdisk: initrd %.1f MB, kernel %.1f MB"
                            % (manifest["files"]["initrd.img"]["size"] / 1e6, manifest["files"]["vmlinuz"]["size"] / 1e6),
                            manifest=manifest, log=log, seconds=round(time.monotonic() - start, 1))

    def run(self, step):
        if step not in STEPS:
            raise RamdiskBuildError("unknown step %r" % step)
        return getattr(self, step)()
