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

The parts live beside this builder: ``ramdisk_apt`` (the host's APT sources),
``ramdisk_modules`` (which kernel modules stay), ``ramdisk_pack`` (cpio + zstd)
and ``ramdisk_strip`` (shrinking the root and proving it still works).

Only the standard library and the runtime manifest are used (this runs on
the controller and in the ramdisk build host's system Python).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import stat
import subprocess
import time

from ansible_collections.stiefel.system.plugins.module_utils import runtime_manifest
from ansible_collections.stiefel.system.plugins.module_utils.errors import RamdiskBuildError
from ansible_collections.stiefel.system.plugins.module_utils.fileio import (
    copy_atomic,
    hash_file,
    replacing,
    sha256_file,
    write_atomic,
)
from ansible_collections.stiefel.system.plugins.module_utils.ramdisk_apt import read_host_sources, select_mirrors
from ansible_collections.stiefel.system.plugins.module_utils.ramdisk_modules import parse_modules_dep, select_modules
from ansible_collections.stiefel.system.plugins.module_utils.ramdisk_pack import pack_tree, zstd_options
from ansible_collections.stiefel.system.plugins.module_utils.ramdisk_strip import (
    missing_libraries,
    rebuild_hwdb,
    replace_icu_data,
    smoke_test,
)
from ansible_collections.stiefel.system.plugins.module_utils.tools import run_tool

FORMAT_VERSION = 1
LIB_DEST = "usr/lib/stiefel"
LIBRARY_DEST = LIB_DEST + "/" + runtime_manifest.MODULE_UTILS_DEST
RUNTIME_DEST = LIB_DEST + "/" + runtime_manifest.RUNTIME_DEST
AGENTS_DEST = LIB_DEST + "/" + runtime_manifest.AGENTS_DIR
BIN_DEST = "usr/local/bin"


# --------------------------------------------------------------------------
# Hashes, stamps, manifest
# --------------------------------------------------------------------------

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


def _file_entry(path):
    size, digest = hash_file(path)
    return {"size": size, "sha256": digest}


def write_json_atomic(path, data, mode=0o644):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n", mode)


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
# Small file-tree helpers of the build
# --------------------------------------------------------------------------

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
            run_tool(argv, log)
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
        copy_atomic(kernels[0], os.path.join(self.base_dir, "vmlinuz"))
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
        run_tool(["depmod", "-b", root, kver], log)
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
    def _archive_is_current(self, archive, input_hash):
        return stamp_hash(archive + ".json") == input_hash and os.path.isfile(archive)

    def _pack_and_stamp(self, root, archive, input_hash, log, owner_root=False, **stamp):
        """Pack ``root`` into ``archive`` and stamp it (``archive``.json) with ``input_hash`` and its sizes."""
        meta_path = archive + ".json"
        if os.path.exists(meta_path):  # no stamp names an archive while it is being replaced
            os.unlink(meta_path)
        size = pack_tree(root, archive, self.cfg["zstd_level"], log, owner_root=owner_root,
                         long_window=self.cfg.get("zstd_long") or 0)
        write_json_atomic(meta_path, dict(stamp, hash=input_hash, uncompressed_bytes=size,
                                          compressed_bytes=os.path.getsize(archive)))
        return size

    def pack_base(self):
        if self._archive_is_current(self.base_archive, self.base_hash):
            return self._result(False, "base archive is up to date")
        if self.check:
            return self._result(True, "would pack the base root (cpio + %s)" % self.compression)
        if stamp_hash(os.path.join(self.base_dir, "stamp.json")) != self.base_hash:
            raise RamdiskBuildError("the base root is not stripped for these inputs; run the strip step first")
        log = self._log("pack-base")
        start = time.monotonic()
        size = self._pack_and_stamp(self.root, self.base_archive, self.base_hash, log)
        return self._result(True, "packed the base root: %.1f MB -> %.1f MB"
                            % (size / 1e6, os.path.getsize(self.base_archive) / 1e6), log=log,
                            seconds=round(time.monotonic() - start, 1))

    # -- overlay -----------------------------------------------------------
    def overlay(self):
        if self._archive_is_current(self.overlay_archive, self.input_hash):
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
        size = self._pack_and_stamp(self.overlay_dir, self.overlay_archive, self.input_hash, log, owner_root=True,
                                    files=self.file_hashes)
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
        archives = 0
        # Each output is a temporary file of its own until it is whole and renamed over the old one: a second
        # build into the same cache, or a reader copying the previous initrd, never sees half of either.
        with replacing(initrd, 0o644) as dst:
            for part in (self.base_archive, self.overlay_archive):
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
                archives += os.path.getsize(part)
            # Bootloaders append the key archive right after this file (systemd-boot
            # without padding) and the kernel only finds a cpio on a 4-byte boundary,
            # so the file ends on one. The kernel skips zero padding; the zstd tool
            # does not, so readers take the first initrd_archives_bytes only.
            dst.write(b"\0" * ((4 - archives % 4) % 4))
            dst.flush()
            # hashed under its own name: once renamed, another build may already have replaced it
            files = {"initrd.img": _file_entry(dst.name)}
        with open(os.path.join(self.base_dir, "vmlinuz"), "rb") as src, replacing(kernel, 0o644) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            files["vmlinuz"] = _file_entry(dst.name)
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
            "files": files,
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
