"""keyless: the initrd network boot serves holds no stiefel key, checked the way the kernel unpacks it.

Real archives built here: newc from the library's writer (the stick's key archive is the same function),
zstd from the zstd command the ramdisk role packs with. On the real ramdisk (.cache/ramdisk/initrd.img)
the whole check, decompression included, is timed by test_netboot_netns.py's VM test.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import cpio
from ansible_collections.stiefel.system.plugins.module_utils.keyfile import encode_key
from stiefel_runtime import keyless

needs_zstd = pytest.mark.skipif(shutil.which("zstd") is None, reason="needs zstd")
KEY = encode_key(b"\x42" * 32)


def _base():
    return cpio.write_newc([cpio.CpioEntry.directory("bin"), cpio.CpioEntry.file("init", b"#!/bin/sh\n", 0o755),
                            cpio.CpioEntry.file("etc/stiefel/ramdisk.json", b"{}")])


def _zstd(data, *options):
    return subprocess.run(["zstd", "-q", "-c"] + list(options), input=data, stdout=subprocess.PIPE,
                          check=True).stdout


def _write(tmp_path, *parts):
    path = tmp_path / "initrd.img"
    path.write_bytes(b"".join(parts))
    return str(path)


def test_plain_and_concatenated_newc_without_a_key_pass(tmp_path):
    other = cpio.write_newc([cpio.CpioEntry.file("etc/stiefel/return-cmdline", b"root=/dev/sda1\n")])
    assert [kind for kind, _o, _l in keyless.check_keyless(_write(tmp_path, _base()))] == ["newc"]
    segments = keyless.check_keyless(_write(tmp_path, _base(), b"\0" * 512, other))
    assert [kind for kind, _o, _l in segments] == ["newc", "newc"]


def test_the_sticks_appended_key_archive_is_refused(tmp_path):
    with pytest.raises(keyless.InitrdSecretError, match="holds etc/stiefel/key"):
        keyless.check_keyless(_write(tmp_path, _base(), cpio.key_archive(KEY)))


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs GNU cpio")
@pytest.mark.parametrize("name", ["./etc/stiefel/key", "etc//stiefel/./key", "./etc/stiefel/nbd.psk"])
def test_secret_names_in_any_spelling_are_refused(tmp_path, name):
    # GNU cpio writes the names it is given (the library's writer refuses "./" and empty components)
    tree = tmp_path / "tree"
    (tree / "etc" / "stiefel").mkdir(parents=True)
    (tree / "etc" / "stiefel" / os.path.basename(name)).write_bytes(b"x")
    archive = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc"], input=("./etc\n%s\n" % name).encode(),
                             cwd=tree, stdout=subprocess.PIPE, check=True).stdout
    with pytest.raises(keyless.InitrdSecretError, match="holds etc/stiefel/"):
        keyless.check_keyless(_write(tmp_path, _base(), archive))


def test_a_key_under_another_name_is_found_by_its_content(tmp_path):
    archive = cpio.write_newc([cpio.CpioEntry.file("boot/innocent", KEY, 0o600)])
    with pytest.raises(keyless.InitrdSecretError, match="secret as boot/innocent"):
        keyless.check_keyless(_write(tmp_path, _base(), archive))


@needs_zstd
def test_zstd_ramdisk_plus_padding_passes_and_a_key_inside_zstd_is_found(tmp_path):
    # the ramdisk role's shape: two zstd frames (base, overlay), zero padding for the appended archives' alignment
    good = _write(tmp_path, _zstd(_base()), _zstd(_base(), "-19"), b"\0" * 3)
    assert [kind for kind, _o, _l in keyless.check_keyless(good)] == ["zstd"]
    inner = _zstd(_base() + cpio.key_archive(KEY))
    with pytest.raises(keyless.InitrdSecretError, match="holds etc/stiefel/key"):
        keyless.check_keyless(_write(tmp_path, _zstd(_base()), inner))
    # and the stick's layout: zstd ramdisk, then the key uncompressed
    with pytest.raises(keyless.InitrdSecretError, match="holds etc/stiefel/key"):
        keyless.check_keyless(_write(tmp_path, _zstd(_base()), b"\0" * 4, cpio.key_archive(KEY)))


@needs_zstd
def test_a_large_zstd_archive_with_many_blocks_is_walked(tmp_path):
    big = cpio.write_newc([cpio.CpioEntry.file("usr/lib/blob%d" % i, os.urandom(200_000)) for i in range(8)]
                          + [cpio.CpioEntry.file("etc/stiefel/key", KEY, 0o600)])
    with pytest.raises(keyless.InitrdSecretError, match="holds etc/stiefel/key"):
        keyless.check_keyless(_write(tmp_path, _zstd(big, "--no-check")))


@pytest.mark.parametrize("data", [
    b"\x1f\x8b\x08\0" + os.urandom(200),  # gzip: not inspected, so not served
    os.urandom(4096),
    b"070701" + b"zz" * 52,  # a header with non-hex fields
    b"",
])
def test_unreadable_initrds_are_refused(tmp_path, data):
    with pytest.raises(keyless.InitrdSecretError):
        keyless.check_keyless(_write(tmp_path, data))


def test_truncated_archives_are_refused(tmp_path):
    whole = _base() + cpio.key_archive(KEY)
    for cut in (len(_base()) + 50, len(_base()) + 200, len(whole) - 30):
        with pytest.raises(keyless.InitrdSecretError):
            keyless.check_keyless(_write(tmp_path, whole[:cut]))
    with pytest.raises(keyless.InitrdSecretError, match="truncated"):
        keyless.check_keyless(_write(tmp_path, _base()[:-20]))


@needs_zstd
def test_truncated_or_corrupt_zstd_is_refused(tmp_path):
    frame = _zstd(_base() * 20)
    with pytest.raises(keyless.InitrdSecretError):
        keyless.check_keyless(_write(tmp_path, frame[:len(frame) // 2]))
    corrupt = bytearray(frame)
    corrupt[len(corrupt) // 2] ^= 0xFF
    with pytest.raises(keyless.InitrdSecretError):
        keyless.check_keyless(_write(tmp_path, bytes(corrupt)))
    with pytest.raises(keyless.InitrdSecretError):
        keyless.check_keyless(_write(tmp_path, keyless.ZSTD_MAGIC + os.urandom(300)))
