from __future__ import annotations

import os
import pathlib
import stat

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import fileio
from ansible_collections.stiefel.system.plugins.module_utils.errors import RamdiskBuildError
from ansible_collections.stiefel.system.plugins.module_utils.ramdisk_pack import pack_tree


def test_replacing_keeps_a_reader_whole_and_two_writers_apart(tmp_path):
    path = tmp_path / "initrd.img"
    path.write_bytes(b"old" * 1000)
    with open(path, "rb") as reader:
        with fileio.replacing(str(path), 0o644) as first, fileio.replacing(str(path), 0o644) as second:
            assert first.name != second.name and os.path.dirname(first.name) == str(tmp_path)
            first.write(b"first" * 1000)
            second.write(b"second" * 1000)
            first.flush()
            assert pathlib.Path(first.name).read_bytes() == b"first" * 1000  # what a caller hashes before the rename
            assert path.read_bytes() == b"old" * 1000  # nothing is seen before the block ends
        # the reader that had the old file open still reads all of it
        assert reader.read() == b"old" * 1000
    # each writer renamed a whole file of its own; the last one stands
    assert path.read_bytes() == b"first" * 1000
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["initrd.img"]


def test_replacing_leaves_the_old_file_after_an_exception(tmp_path):
    path = tmp_path / "vmlinuz"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with fileio.replacing(str(path)) as handle:
            handle.write(b"half")
            raise RuntimeError("the build failed")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["vmlinuz"]


def test_copy_atomic_and_write_atomic(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 * (1 << 20) + 5))
    fileio.copy_atomic(str(src), str(tmp_path / "copy"))
    assert (tmp_path / "copy").read_bytes() == src.read_bytes()
    assert stat.S_IMODE(os.stat(tmp_path / "copy").st_mode) == 0o644
    fileio.write_atomic(str(tmp_path / "key"), "secret\n")
    assert (tmp_path / "key").read_text() == "secret\n"
    assert stat.S_IMODE(os.stat(tmp_path / "key").st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["copy", "key", "src"]


def test_pack_tree_replaces_the_archive_only_when_whole(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("stiefel\n")
    out = tmp_path / "work"
    out.mkdir()
    archive = out / "overlay.cpio.zst"
    log = str(tmp_path / "log")
    size = pack_tree(str(root), str(archive), 3, log)
    first = archive.read_bytes()
    assert size > 0 and first.startswith(b"\x28\xb5\x2f\xfd")  # a zstd frame
    # a failing pack (zstd refuses a 2**99 window and ends while cpio still has more than a pipe holds) is an
    # error that names both tools, and leaves the previous archive and no temporary file behind
    (root / "etc" / "large").write_bytes(os.urandom(4 << 20))
    with pytest.raises(RamdiskBuildError, match=r"cpio rc -?\d+, zstd rc [1-9]"):
        pack_tree(str(root), str(archive), 3, log, long_window=99)
    assert archive.read_bytes() == first
    assert os.listdir(out) == ["overlay.cpio.zst"]
