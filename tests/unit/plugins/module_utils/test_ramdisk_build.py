"""Unit tests for plugins/module_utils/ramdisk_build.py (APT sources, module
selection, input hashes, the multi-archive newc lister, stage skipping)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess

import pytest
from hypothesis import given, strategies as st

from ansible_collections.stiefel.system.plugins.module_utils import cpio
from ansible_collections.stiefel.system.plugins.module_utils import ramdisk_build as rb
from ansible_collections.stiefel.system.plugins.module_utils import ramdisk_apt, ramdisk_modules, ramdisk_pack, ramdisk_strip

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main

Enabled: no
Types: deb
URIs: http://disabled.invalid/debian
Suites: trixie
Components: main
"""

ONE_LINE = """\
# comment
deb [arch=amd64 signed-by=/x.gpg] http://mirror.example/debian bookworm main contrib
deb-src http://mirror.example/debian bookworm main
deb http://security.example/debian-security bookworm-security main # trailing
garbage line
deb http://short.example
"""


def test_deb822_parse():
    entries = ramdisk_apt.parse_deb822_sources(DEB822)
    assert len(entries) == 4
    assert entries[0].uris == ["http://deb.debian.org/debian"]
    assert entries[0].suites == ["bookworm", "bookworm-updates", "bookworm-backports"]
    assert entries[2].types == ["deb-src"]
    assert entries[3].enabled is False


def test_select_from_deb822_uses_main_suite_with_updates_and_security():
    uri, suite, comps, lines = ramdisk_apt.select_mirrors(ramdisk_apt.parse_deb822_sources(DEB822))
    assert (uri, suite, comps) == ("http://deb.debian.org/debian", "bookworm", ["main"])
    assert lines == [
        "deb http://deb.debian.org/debian bookworm main",
        "deb http://deb.debian.org/debian bookworm-updates main",
        "deb http://deb.debian.org/debian-security bookworm-security main",
    ]


def test_one_line_parse_and_select():
    entries = ramdisk_apt.parse_one_line_sources(ONE_LINE)
    assert [e.uris[0] for e in entries] == [
        "http://mirror.example/debian", "http://mirror.example/debian", "http://security.example/debian-security"]
    uri, suite, comps, lines = ramdisk_apt.select_mirrors(entries, components=["main"])
    assert uri == "http://mirror.example/debian" and suite == "bookworm"
    assert lines == ["deb http://mirror.example/debian bookworm main",
                     "deb http://security.example/debian-security bookworm-security main"]


def test_override_and_errors():
    assert ramdisk_apt.select_mirrors([], mirror="http://m/debian", suite="bookworm")[3] == ["deb http://m/debian bookworm main"]
    with pytest.raises(rb.RamdiskBuildError):
        ramdisk_apt.select_mirrors([], mirror="http://m/debian")
    with pytest.raises(rb.RamdiskBuildError):
        ramdisk_apt.select_mirrors([])
    with pytest.raises(rb.RamdiskBuildError):
        ramdisk_apt.select_mirrors(ramdisk_apt.parse_deb822_sources(DEB822), suite="sid")


def test_read_host_sources(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(ONE_LINE)
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822)
    (tmp_path / "sources.list.d" / "ignored.save").write_text("deb http://x y z\n")
    entries = ramdisk_apt.read_host_sources(str(tmp_path))
    assert len(entries) == 3 + 4
    assert ramdisk_apt.select_mirrors(entries)[0] == "http://mirror.example/debian"


@given(st.text(max_size=2000))
def test_source_parsers_never_crash(text):
    for entry in ramdisk_apt.parse_deb822_sources(text) + ramdisk_apt.parse_one_line_sources(text):
        assert entry.uris and entry.suites
    try:
        ramdisk_apt.select_mirrors(ramdisk_apt.parse_deb822_sources(text) + ramdisk_apt.parse_one_line_sources(text))
    except rb.RamdiskBuildError:
        pass


MODULES_DEP = """\
kernel/drivers/net/usb/r8152.ko: kernel/drivers/net/mii.ko kernel/lib/libphy.ko
kernel/drivers/net/mii.ko:
kernel/drivers/net/wireless/iwlwifi.ko: kernel/net/wireless/cfg80211.ko
kernel/net/wireless/cfg80211.ko: kernel/net/rfkill/rfkill.ko
kernel/net/rfkill/rfkill.ko:
kernel/lib/libphy.ko:
kernel/sound/snd.ko: kernel/lib/libphy.ko
not a line
"""


def test_select_modules_with_dependencies():
    deps = ramdisk_modules.parse_modules_dep(MODULES_DEP)
    assert len(deps) == 7
    keep = ramdisk_modules.select_modules(deps, ["kernel/drivers/net/*"], ["kernel/drivers/net/wireless/*"])
    assert keep == {"kernel/drivers/net/usb/r8152.ko", "kernel/drivers/net/mii.ko", "kernel/lib/libphy.ko"}
    # a kept module's dependency is kept even when excluded
    keep = ramdisk_modules.select_modules(deps, ["kernel/drivers/*"], ["kernel/net/*"])
    assert "kernel/net/wireless/cfg80211.ko" in keep and "kernel/net/rfkill/rfkill.ko" in keep
    assert "kernel/sound/snd.ko" not in keep


@given(st.text(max_size=1000))
def test_modules_dep_parser_never_crashes(text):
    deps = ramdisk_modules.parse_modules_dep(text)
    assert ramdisk_modules.select_modules(deps, ["*"], []) >= set(deps)


def test_canonical_hash_is_order_independent():
    assert rb.canonical_hash({"a": 1, "b": [1, 2]}) == rb.canonical_hash({"b": [1, 2], "a": 1})
    assert rb.canonical_hash({"a": 1}) != rb.canonical_hash({"a": 2})


def test_iter_newc_stream_reads_concatenated_archives():
    one = cpio.write_newc([cpio.CpioEntry.directory("usr"), cpio.CpioEntry.file("usr/a", b"hello", 0o755)])
    two = cpio.write_newc([cpio.CpioEntry.file("init", b"#!/bin/sh\n" * 100, 0o755)])
    members = list(cpio.iter_newc_stream(io.BytesIO(one + b"\0" * 8 + two)))
    assert [(n, s) for n, _m, s in members] == [("usr", 0), ("usr/a", 5), ("init", 1000)]
    assert members[2][1] & 0o777 == 0o755


def test_iter_newc_stream_refuses_garbage():
    one = cpio.write_newc([cpio.CpioEntry.file("a", b"x")])
    with pytest.raises(cpio.CpioError):
        list(cpio.iter_newc_stream(io.BytesIO(one + b"garbage garbage")))
    with pytest.raises(cpio.CpioError):
        list(cpio.iter_newc_stream(io.BytesIO(one[:-200])))


@given(st.binary(max_size=600), st.integers(min_value=0, max_value=600))
def test_iter_newc_stream_hostile_bytes(data, cut):
    valid = cpio.write_newc([cpio.CpioEntry.file("f", b"abc")])
    for blob in (data, valid[:cut] + data, valid + data):
        try:
            for name, _mode, size in cpio.iter_newc_stream(io.BytesIO(blob)):
                assert isinstance(name, str) and size >= 0
        except cpio.CpioError:
            pass


AGENTS = ("autokexec", "client", "server")


def _config(tmp_path):
    """A tree laid out like the collection: the ramdisk's agents, one library module the client imports."""
    root = tmp_path / "root"
    lib = root / "plugins" / "module_utils"
    lib.mkdir(parents=True)
    (lib / "keyfile.py").write_text("X = 1\n")
    (lib / "usb_image.py").write_text("X = 'controller only'\n")
    (lib / "notes.txt").write_text("not python\n")
    runtime = root / "stiefel_runtime"
    runtime.mkdir()
    for name in ("__init__", "__main__") + AGENTS:
        (runtime / (name + ".py")).write_text("")
    (runtime / "client.py").write_text("from ansible_collections.stiefel.system.plugins.module_utils import keyfile\n")
    (root / "agents").mkdir()
    for name in AGENTS:
        (root / "agents" / ("stiefel-" + name)).write_text("#!/usr/bin/python3\n")
    init = tmp_path / "init"
    init.write_text("#!/bin/sh\n")
    return {
        "output_dir": str(tmp_path / "out"), "mirror": "http://m/debian", "suite": "bookworm", "components": [],
        "variant": "essential", "packages": ["python3"], "extra_packages": [], "dpkg_excludes": [],
        "strip_paths": [], "modules_include": ["kernel/drivers/net/*"], "modules_exclude": [], "zstd_level": 3,
        "runtime_root": str(root), "init_path": str(init), "role_version": "1",
    }


def test_overlay_files_and_hashes(tmp_path):
    cfg = _config(tmp_path)
    b = rb.RamdiskBuilder(cfg)
    assert sorted(b.files) == sorted(
        ["init", rb.LIBRARY_DEST + "/keyfile.py"]
        + [rb.RUNTIME_DEST + "/%s.py" % name for name in ("__init__", "__main__") + AGENTS]
        + [rb.AGENTS_DEST + "/stiefel-" + name for name in AGENTS])  # no usb_image.py: nothing imports it
    before = (b.base_hash, b.input_hash)
    (tmp_path / "root" / "plugins" / "module_utils" / "keyfile.py").write_text("X = 2\n")
    b2 = rb.RamdiskBuilder(cfg)
    assert b2.base_hash == before[0] and b2.input_hash != before[1]  # library change: overlay only
    cfg["packages"] = ["python3", "kmod"]
    assert rb.RamdiskBuilder(cfg).base_hash != before[0]


def test_check_mode_reports_and_builds_nothing(tmp_path):
    b = rb.RamdiskBuilder(_config(tmp_path), check=True)
    plan = b.plan()
    assert plan["changed"] is False and plan["up_to_date"] is False
    for step in rb.STEPS[1:]:
        assert b.run(step)["changed"] is True
    assert not os.path.exists(tmp_path / "out")


def test_overlay_and_assemble_skip_when_up_to_date(tmp_path):
    cfg = _config(tmp_path)
    b = rb.RamdiskBuilder(cfg)
    out = tmp_path / "out"
    # pretend the base stages ran: stamps for this base hash and a base archive
    (out / "work" / "base").mkdir(parents=True)
    rb.write_json_atomic(str(out / "work" / "base" / "stamp.json"), {"hash": b.base_hash, "kernel_version": "6.1"})
    (out / "work" / "base" / "vmlinuz").write_bytes(b"kernel")
    (out / "work" / "base.cpio.zst").write_bytes(b"base")
    rb.write_json_atomic(str(out / "work" / "base.cpio.zst.json"), {"hash": b.base_hash})
    (out / "work" / "overlay.cpio.zst").write_bytes(b"overlay")
    rb.write_json_atomic(str(out / "work" / "overlay.cpio.zst.json"), {"hash": b.input_hash})
    assert b.overlay()["changed"] is False
    res = b.assemble()
    assert res["changed"] is True
    # the archives back to back, padded to a 4-byte boundary (the key archive follows it)
    assert (out / "initrd.img").read_bytes() == b"baseoverlay\0"
    assert res["manifest"]["initrd_archives_bytes"] == len(b"baseoverlay")
    assert res["manifest"]["files"]["vmlinuz"]["size"] == 6
    assert rb.RamdiskBuilder(cfg).assemble()["changed"] is False
    assert rb.RamdiskBuilder(cfg).plan()["up_to_date"] is True
    (out / "initrd.img").write_bytes(b"tampered!!!")
    assert rb.RamdiskBuilder(cfg, check=True).assemble()["changed"] is True


def test_assemble_refuses_stale_parts(tmp_path):
    b = rb.RamdiskBuilder(_config(tmp_path))
    with pytest.raises(rb.RamdiskBuildError, match="pack_base"):
        b.assemble()


def test_tree_names_keeps_symlinked_directories(tmp_path):
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "usr" / "bin" / "sh").write_text("x")
    (tmp_path / "bin").symlink_to("usr/bin")
    (tmp_path / "usr" / "lib").symlink_to("bin")
    names = ramdisk_pack.tree_names(str(tmp_path))
    assert sorted(names) == ["bin", "usr", "usr/bin", "usr/bin/sh", "usr/lib"]
    assert names.index("usr") < names.index("usr/bin") < names.index("usr/bin/sh")


# ---------------------------------------------------------------- shrinking


def test_zstd_options():
    assert ramdisk_pack.zstd_options(12) == ["-12"]
    assert ramdisk_pack.zstd_options(12, 27) == ["-12", "--long=27"]
    assert ramdisk_pack.zstd_options(22, 0) == ["--ultra", "-22"]


def test_new_strip_inputs_change_the_base_hash(tmp_path):
    cfg = _config(tmp_path)
    base = rb.RamdiskBuilder(cfg).base_hash
    for key, value in (("zstd_long", 27), ("hwdb_exclude", ["20-OUI.hwdb"]), ("icu_data_stub", True),
                       ("smoke_commands", ["kexec --version"])):
        assert rb.RamdiskBuilder(dict(cfg, **{key: value})).base_hash != base, key
    assert rb.RamdiskBuilder(dict(cfg, hwdb_exclude=["b", "a"])).base_hash == \
        rb.RamdiskBuilder(dict(cfg, hwdb_exclude=["a", "b"])).base_hash
    assert rb.RamdiskBuilder(dict(cfg, zstd_long=27)).compression == "zstd -3 --long=27"


def test_icu_stub_assembly_refuses_odd_symbols():
    text = ramdisk_strip.icu_data_stub_assembly("icudt72_dat")
    assert "icudt72_dat:" in text and '.ascii "ToCP"' in text
    for bad in ("", "main", "icudt", "icudt72_dat; .globl x", "icudt72_dat\n.text", "../icudt", "icudt\u00e9"):
        with pytest.raises(rb.RamdiskBuildError):
            ramdisk_strip.icu_data_stub_assembly(bad)


@given(st.text(max_size=40))
def test_icu_stub_assembly_never_emits_foreign_text(symbol):
    try:
        text = ramdisk_strip.icu_data_stub_assembly(symbol)
    except rb.RamdiskBuildError:
        return
    assert symbol.startswith("icudt") and symbol.isascii() and all(c.isalnum() or c == "_" for c in symbol)
    assert "\n" not in symbol and text.count(symbol) == 5


needs_binutils = pytest.mark.skipif(not all(shutil.which(t) for t in ("as", "ld", "readelf")),
                                    reason="needs binutils (as, ld, readelf)")


def _fake_icu_data(root, size):
    """A libicudata.so.72.1 with a ``size``-byte icudt72_dat, like Debian's."""
    libdir = root / "usr" / "lib" / "x86_64-linux-gnu"
    libdir.mkdir(parents=True)
    src = root / "big.s"
    src.write_text(".section .rodata\n.globl icudt72_dat\n.type icudt72_dat, @object\nicudt72_dat:\n"
                   ".zero %d\n.size icudt72_dat, .-icudt72_dat\n.section .note.GNU-stack,\"\",@progbits\n" % size)
    subprocess.run(["as", "--64", "-o", str(root / "big.o"), str(src)], check=True)
    lib = libdir / "libicudata.so.72.1"
    subprocess.run(["ld", "-shared", "-soname", "libicudata.so.72", "-o", str(lib), str(root / "big.o")], check=True)
    (libdir / "libicudata.so.72").symlink_to("libicudata.so.72.1")
    for p in (src, root / "big.o"):
        p.unlink()
    return lib


@needs_binutils
def test_replace_icu_data_keeps_soname_and_symbol(tmp_path):
    root = tmp_path / "root"
    lib = _fake_icu_data(root, 200000)
    log = tmp_path / "strip.log"
    before, after = ramdisk_strip.replace_icu_data(str(root), str(log))
    assert before > 200000 and after == lib.stat().st_size and after < 16384
    assert ramdisk_strip.find_icu_data_library(str(root)) == (str(lib), "libicudata.so.72", "icudt72_dat")
    syms = subprocess.run(["readelf", "--dyn-syms", "-W", str(lib)], capture_output=True, text=True,
                          check=True).stdout
    assert [line.split()[2] for line in syms.splitlines() if line.endswith(" icudt72_dat")] == ["48"]
    # ICU_Data_Header: headerSize 32, magic 0xda27, UDataInfo size 20, "ToCP"
    data = subprocess.run(["readelf", "-x", ".rodata", str(lib)], capture_output=True, text=True, check=True).stdout
    assert "2000da27 14000000 00000200 546f4350" in data
    assert ramdisk_strip.missing_libraries(str(root)) == {}
    assert ramdisk_strip.replace_icu_data(str(root), str(log)) is None  # already a stub: nothing to do
    assert "stub data" in log.read_text()


def test_replace_icu_data_without_icu(tmp_path):
    (tmp_path / "usr" / "lib" / "x86_64-linux-gnu").mkdir(parents=True)
    assert ramdisk_strip.replace_icu_data(str(tmp_path), str(tmp_path / "log")) is None


def test_rebuild_hwdb_only_when_asked(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ramdisk_strip, "run_tool", lambda argv, log, **kw: calls.append(argv))
    hwdb = tmp_path / ramdisk_strip.HWDB_DIR
    assert ramdisk_strip.rebuild_hwdb(str(tmp_path), ["20-OUI.hwdb"], "log") == []  # no sources: nothing to do
    hwdb.mkdir(parents=True)
    for name in ("20-OUI.hwdb", "20-pci-vendor-model.hwdb", "60-keyboard.hwdb"):
        (hwdb / name).write_text("x\n")
    assert ramdisk_strip.rebuild_hwdb(str(tmp_path), [], "log") == [] and not calls
    assert ramdisk_strip.rebuild_hwdb(str(tmp_path), ["20-*vendor*", "20-OUI.hwdb"], str(tmp_path / "log")) == \
        ["20-OUI.hwdb", "20-pci-vendor-model.hwdb"]
    assert sorted(p.name for p in hwdb.iterdir()) == ["60-keyboard.hwdb"]
    assert calls == [["chroot", str(tmp_path), "/usr/bin/systemd-hwdb", "update", "--usr", "--strict"]]


def test_smoke_test_runs_each_command_in_the_root(tmp_path, monkeypatch):
    calls = []

    def fake(argv, log, **kw):
        calls.append((argv, kw["env"]["PYTHONDONTWRITEBYTECODE"]))
        if argv[2] == "false":
            raise rb.RamdiskBuildError("false failed")

    monkeypatch.setattr(ramdisk_strip, "run_tool", fake)
    ramdisk_strip.smoke_test("/r", ["kexec --version", "", 'python3 -c "import ssl, json"'], "log")
    assert calls == [(["chroot", "/r", "kexec", "--version"], "1"),
                     (["chroot", "/r", "python3", "-c", "import ssl, json"], "1")]
    with pytest.raises(rb.RamdiskBuildError, match="smoke test 'false'"):
        ramdisk_strip.smoke_test("/r", ["true", "false", "never"], "log")
    assert calls[-1][0][2] == "false"
