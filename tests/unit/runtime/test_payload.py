from __future__ import annotations

import io
import os
import struct

import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from stiefel_runtime import payload as p
from ansible_collections.stiefel.system.plugins.module_utils.errors import (
    AuthenticationFailed,
    MalformedMessage,
    OversizedMessage,
    PayloadVerificationFailed,
    ProtocolError,
    ReplayedMessage,
    StiefelError,
    TruncatedMessage,
)

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))
CN = b"c" * 16
SN = b"s" * 16
CHUNK = 4096


@pytest.fixture
def files(tmp_path):
    kernel = tmp_path / "vmlinuz"
    initrd = tmp_path / "initrd.img"
    kernel.write_bytes(os.urandom(3 * CHUNK + 17))
    initrd.write_bytes(os.urandom(5 * CHUNK - 3))
    return {"kernel": str(kernel), "initrd": str(initrd)}


def make_stream(files, key=KEY, cn=CN, sn=SN, cmdline="root=UUID=1234 ro quiet"):
    manifest = p.build_manifest(files["kernel"], files["initrd"], cmdline)
    return manifest, b"".join(p.iter_payload(key, cn, sn, manifest, files, chunk_size=CHUNK))


def records(stream):
    """Split a stream into header and raw records (length prefix included)."""
    header, rest = stream[: p.STREAM_HEADER.size], stream[p.STREAM_HEADER.size:]
    out = []
    while rest:
        (length,) = struct.unpack(">I", rest[:4])
        out.append(rest[: 4 + length])
        rest = rest[4 + length:]
    return header, out


def receive(data, tmp_path, key=KEY, cn=CN):
    dest = tmp_path / "out"
    dest.mkdir(exist_ok=True)
    return p.receive_payload(io.BytesIO(data).read, key, cn, str(dest)), dest


def test_roundtrip(files, tmp_path):
    manifest, stream = make_stream(files)
    seen = []
    dest = tmp_path / "out"
    dest.mkdir()
    got = p.receive_payload(io.BytesIO(stream).read, KEY, CN, str(dest), progress=lambda d, t: seen.append((d, t)))
    assert got.cmdline == manifest.cmdline and got.files == manifest.files
    for name in p.FILE_NAMES:
        assert (dest / name).read_bytes() == open(files[name], "rb").read()
    assert seen[-1][0] == seen[-1][1] == manifest.total_size


def test_wrong_key_and_other_challenge(files, tmp_path):
    stream = make_stream(files)[1]
    with pytest.raises(AuthenticationFailed):
        receive(stream, tmp_path, key=OTHER)
    with pytest.raises(ReplayedMessage):
        receive(stream, tmp_path, cn=b"d" * 16)
    assert not any((tmp_path / "out").iterdir())  # partial files removed


def test_truncation_at_every_record_boundary(files, tmp_path):
    stream = make_stream(files)[1]
    header, recs = records(stream)
    for n in range(len(recs)):
        with pytest.raises(TruncatedMessage):
            receive(header + b"".join(recs[:n]), tmp_path)


def test_reorder_drop_duplicate(files, tmp_path):
    stream = make_stream(files)[1]
    header, recs = records(stream)
    swapped = recs[:]
    swapped[1], swapped[2] = swapped[2], swapped[1]
    dropped = recs[:1] + recs[2:]
    duplicated = recs[:2] + recs[1:]
    for bad in (swapped, dropped, duplicated):
        with pytest.raises(AuthenticationFailed):
            receive(header + b"".join(bad), tmp_path)


def test_data_after_final_record(files, tmp_path):
    stream = make_stream(files)[1]
    with pytest.raises(MalformedMessage):
        receive(stream + b"x", tmp_path)


def test_oversized_record_and_chunk(files, tmp_path):
    stream = make_stream(files)[1]
    header = records(stream)[0]
    with pytest.raises(OversizedMessage):
        receive(header + struct.pack(">I", CHUNK + 17) + b"\x00" * 10, tmp_path)
    bad_header = bytearray(header)
    bad_header[6:10] = struct.pack(">I", p.MAX_CHUNK + 1)
    with pytest.raises(OversizedMessage):
        receive(bytes(bad_header), tmp_path)


def test_manifest_mismatch_is_detected(files, tmp_path):
    manifest = p.build_manifest(files["kernel"], files["initrd"], "ro")
    with open(files["initrd"], "r+b") as handle:
        handle.write(b"tampered")
    stream = b"".join(p.iter_payload(KEY, CN, SN, manifest, files, chunk_size=CHUNK))
    with pytest.raises(PayloadVerificationFailed):
        receive(stream, tmp_path)


@pytest.mark.parametrize("chunk", [p.MIN_CHUNK, p.DEFAULT_CHUNK, 1 << 20, p.MAX_CHUNK])
def test_any_record_size_in_range_is_received(tmp_path, chunk):
    # The record size is the sender's choice, carried in the header: a receiver takes a stream
    # sealed with the old 1 MiB default as well as with today's default or the limits.
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(os.urandom(chunk + 5))
    initrd.write_bytes(os.urandom(2 * chunk - 7))
    paths = {"kernel": str(kernel), "initrd": str(initrd)}
    manifest = p.build_manifest(paths["kernel"], paths["initrd"], "ro")
    stream = b"".join(p.iter_payload(KEY, CN, SN, manifest, paths, chunk_size=chunk))
    assert p.STREAM_HEADER.unpack_from(stream)[3] == chunk
    got, dest = receive(stream, tmp_path)
    assert got.files == manifest.files
    for name in p.FILE_NAMES:
        assert (dest / name).read_bytes() == open(paths[name], "rb").read()


def test_receiver_memory_is_one_record(files, tmp_path):
    # The reader never asks for more than one record at a time.
    stream = make_stream(files)[1]
    biggest = []
    source = io.BytesIO(stream)

    def read(n):
        biggest.append(n)
        return source.read(n)

    dest = tmp_path / "out"
    dest.mkdir()
    p.receive_payload(read, KEY, CN, str(dest))
    assert max(biggest) <= CHUNK + p.TAG_BYTES


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=50)
@given(data=st.binary(max_size=3000))
def test_random_streams_raise_protocol_errors(tmp_path, data):
    with pytest.raises(ProtocolError):
        receive(data, tmp_path)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=50)
@given(flip=st.integers(min_value=0), bit=st.integers(0, 7))
def test_any_bit_flip_is_detected(tmp_path, files, flip, bit):
    stream = make_stream(files)[1]
    bad = bytearray(stream)
    bad[flip % len(bad)] ^= 1 << bit
    with pytest.raises(ProtocolError):
        receive(bytes(bad), tmp_path)


@pytest.mark.parametrize(
    "doc",
    [
        b"not json",
        b"[]",
        b'{"version":1}',
        b'{"version":2,"cmdline":"","files":[]}',
        b'{"version":1,"cmdline":"x","files":[{"name":"initrd","size":1,"sha256":"' + b"0" * 64 + b'"}]}',
        b'{"version":1,"cmdline":"x","files":[{"name":"kernel","size":-1,"sha256":"' + b"0" * 64
        + b'"},{"name":"initrd","size":1,"sha256":"' + b"0" * 64 + b'"}]}',
        b'{"version":1,"cmdline":"x","files":[{"name":"kernel","size":true,"sha256":"' + b"0" * 64
        + b'"},{"name":"initrd","size":1,"sha256":"' + b"0" * 64 + b'"}]}',
        b'{"version":1,"cmdline":"' + b"x" * 5000 + b'","files":[]}',
        b"\xff\xfe",
    ],
)
def test_hostile_manifests(doc):
    with pytest.raises(ProtocolError):
        p.Manifest.from_json(doc)


def test_oversized_manifest():
    with pytest.raises(OversizedMessage):
        p.Manifest.from_json(b" " * (p.MAX_MANIFEST + 1))


@given(st.binary(max_size=200))
def test_manifest_random_bytes(doc):
    with pytest.raises(ProtocolError):
        p.Manifest.from_json(doc)


def test_passphrase_roundtrip_and_hostile():
    blob = p.seal_passphrase(KEY, CN, SN, b"correct horse")
    assert p.open_passphrase(KEY, CN, SN, blob) == b"correct horse"
    with pytest.raises(AuthenticationFailed):
        p.open_passphrase(OTHER, CN, SN, blob)
    with pytest.raises(AuthenticationFailed):
        p.open_passphrase(KEY, CN, b"t" * 16, blob)  # replay into another session
    with pytest.raises(TruncatedMessage):
        p.open_passphrase(KEY, CN, SN, blob[:20])
    with pytest.raises(OversizedMessage):
        p.open_passphrase(KEY, CN, SN, blob + b"x" * 2000)
    with pytest.raises(StiefelError):
        p.seal_passphrase(KEY, CN, SN, b"")


@given(st.binary(max_size=2000))
def test_passphrase_random_bytes(blob):
    with pytest.raises(ProtocolError):
        p.open_passphrase(KEY, CN, SN, blob)
