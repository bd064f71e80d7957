"""Unit tests for plugins/module_utils/cpio.py (newc writer and strict reader)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import given, strategies as st

from ansible_collections.stiefel.system.plugins.module_utils import cpio

KEY = b"stiefel-key-v1:" + b"ab" * 32 + b"\n"


def test_key_archive_round_trip():
    entries = cpio.read_newc(cpio.key_archive(KEY))
    assert [e.name for e in entries] == ["etc", "etc/stiefel", "etc/stiefel/key"]
    key = entries[-1]
    assert key.is_file and key.perm == 0o600 and key.uid == 0 and key.gid == 0 and key.data == KEY
    assert all(e.is_dir and e.perm == 0o755 for e in entries[:2])


def test_key_archive_is_deterministic_and_aligned():
    one, two = cpio.key_archive(KEY), cpio.key_archive(KEY.decode())
    assert one == two
    assert len(one) % 4 == 0


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
def test_gnu_cpio_reads_it():
    out = subprocess.run(["cpio", "-itv", "--quiet"], input=cpio.key_archive(KEY), capture_output=True,
                         check=True).stdout.decode()
    assert "-rw-------" in out and out.rstrip().endswith("etc/stiefel/key")


@pytest.mark.parametrize("name", ["", "/abs", "a/../b", "a//b", "./a", "a\0b"])
def test_writer_rejects_bad_names(name):
    with pytest.raises(cpio.CpioError):
        cpio.write_newc([cpio.CpioEntry.file(name, b"x")])


def test_writer_rejects_symlinks_and_dir_data():
    with pytest.raises(cpio.CpioError):
        cpio.write_newc([cpio.CpioEntry(name="l", mode=0o120777, data=b"target")])
    with pytest.raises(cpio.CpioError):
        cpio.write_newc([cpio.CpioEntry(name="d", mode=0o040755, data=b"x")])


def test_reader_rejects_truncation_and_garbage():
    data = cpio.key_archive(KEY)
    for cut in (0, 5, 110, 200, len(data) - 130):
        with pytest.raises(cpio.CpioError):
            cpio.read_newc(data[:cut])
    assert cpio.read_newc(data + b"\0" * 512)  # zero padding after the trailer is fine
    with pytest.raises(cpio.CpioError):
        cpio.read_newc(data + b"junk")


names = st.lists(st.text(alphabet="abcdefghij_-.0123456789", min_size=1, max_size=20)
                 .filter(lambda n: n not in (".", "..")), min_size=1, max_size=3).map("/".join)


@given(st.lists(st.tuples(names, st.binary(max_size=300), st.integers(0, 0o777)), max_size=8))
def test_round_trip_property(items):
    entries = [cpio.CpioEntry.file(name, data, perm) for name, data, perm in items]
    parsed = cpio.read_newc(cpio.write_newc(entries))
    assert [(e.name, e.data, e.perm) for e in parsed] == list(items)


@given(st.binary(max_size=2000))
def test_reader_hostile_bytes_only_raise_cpio_error(data):
    try:
        cpio.read_newc(data)
    except cpio.CpioError:
        pass


@given(st.integers(0, 600), st.binary(min_size=1, max_size=8))
def test_reader_corrupted_archive(position, junk):
    data = bytearray(cpio.key_archive(KEY))
    position %= len(data)
    data[position:position + len(junk)] = junk
    try:
        entries = cpio.read_newc(bytes(data))
    except cpio.CpioError:
        return
    assert all(isinstance(e, cpio.CpioEntry) for e in entries)
