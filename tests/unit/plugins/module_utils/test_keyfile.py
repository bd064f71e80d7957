from __future__ import annotations

import os
import stat

import pytest
from hypothesis import given, strategies as st

from ansible_collections.stiefel.system.plugins.module_utils import keyfile
from ansible_collections.stiefel.system.plugins.module_utils.errors import KeyFileError


def test_roundtrip_and_format():
    key = keyfile.generate_key()
    data = keyfile.encode_key(key)
    assert data.startswith(b"stiefel-key-v1:") and data.endswith(b"\n") and len(data) == 80
    assert keyfile.decode_key(data) == key


def test_keys_are_random():
    assert len({keyfile.generate_key() for _unused in range(64)}) == 64


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "does not start"),
        (b"stiefel-key-v1:" + b"ab" * 31 + b"\n", "64 lowercase hex"),  # truncated
        (b"stiefel-key-v1:" + b"ab" * 32, "64 lowercase hex"),  # no newline
        (b"stiefel-key-v1:" + b"AB" * 32 + b"\n", "64 lowercase hex"),  # upper case
        (b"stiefel-key-v1:" + b"ab" * 32 + b"\n\n", "64 lowercase hex"),  # trailing data
        (b"stiefel-key-v2:" + b"ab" * 32 + b"\n", "does not start"),
        (b"\xff\xfe", "not ASCII"),
        (b"x" * 5000, "too large"),
    ],
)
def test_invalid_contents_are_named(data, reason):
    with pytest.raises(KeyFileError, match=reason):
        keyfile.decode_key(data)


@given(st.binary(max_size=2048))
def test_random_bytes_never_crash(data):
    try:
        key = keyfile.decode_key(data)
    except KeyFileError:
        return
    assert keyfile.encode_key(key) == data


def test_write_is_0600_and_atomic(tmp_path):
    path = tmp_path / "key"
    key = keyfile.generate_key()
    keyfile.write_key_atomic(str(path), key)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert keyfile.read_key(str(path)) == key
    assert os.listdir(tmp_path) == ["key"]  # no temporary file left behind


def test_read_refuses_non_regular_and_missing(tmp_path):
    with pytest.raises(KeyFileError, match="does not exist"):
        keyfile.read_key(str(tmp_path / "nope"))
    with pytest.raises(KeyFileError, match="not a regular file|cannot open"):
        keyfile.read_key(str(tmp_path))
    link = tmp_path / "link"
    target = tmp_path / "target"
    keyfile.write_key_atomic(str(target), keyfile.generate_key())
    link.symlink_to(target)
    with pytest.raises(KeyFileError, match="cannot open"):
        keyfile.read_key(str(link))


def test_large_file_is_not_read_whole(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as handle:
        handle.truncate(64 << 20)
    with pytest.raises(KeyFileError, match="too large"):
        keyfile.read_key(str(path))
    assert keyfile.key_file_problem(str(path))
