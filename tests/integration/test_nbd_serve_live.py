"""Integration tests for the NBD export: real nbdkit on 127.0.0.1, real libnbd clients.

The module runs through ``ansible localhost -m stiefel.system.nbd_serve`` (the
pidfile supervisor; PID 1 here is not systemd). Data goes through the export
with nbdcopy and python3-libnbd (Debian's python3, where the bindings live),
flags are read with nbdinfo, and the TLS cipher is read from nbdkit's own
session log. Every test stops what it started (by PID) and detaches loops.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import blockdev, nbd_export as ne
from lab import ansible_output

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not all(shutil.which(t) for t in ("nbdkit", "nbdinfo", "nbdcopy")),
                       reason="needs nbdkit, nbdinfo and nbdcopy (Debian: nbdkit libnbd-bin)"),
]

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"  # python3-libnbd lives in Debian's dist-packages
MiB = 1 << 20


@pytest.fixture(autouse=True)
def _timing(request):
    start = time.monotonic()
    yield
    print("\n[%s took %.1fs]" % (request.node.name, time.monotonic() - start))


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def work(tmp_path):
    """An image with random content, a state dir, and cleanup of any nbdkit left by pidfile."""
    img = tmp_path / "disk.img"
    img.write_bytes(secrets.token_bytes(8 * MiB))
    state = tmp_path / "state"
    yield img, state
    for pidfile in state.glob("*.pid") if state.exists() else []:
        pid = ne.read_pidfile(str(pidfile))
        argv = ne.process_argv(pid) if pid else None
        if argv and str(pidfile) in argv:
            ne.stop_pid(pid)


def ansible(args, check=False):
    argv = [ansible_output.ansible_bin("ansible"), "localhost", "-m", "stiefel.system.nbd_serve", "-a", json.dumps(args)]
    if check:
        argv.append("--check")
    env = dict(os.environ, **ansible_output.NO_COLOR)
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120, env=env, check=False)
    return ansible_output.module_result(proc.stdout, proc.returncode, proc.stderr)


def nbdinfo(uri):
    return ne.parse_nbdinfo_json(subprocess.run(["nbdinfo", "--json", uri], capture_output=True, check=True,
                                                timeout=30).stdout)


def alive(pid):
    return pid is not None and ne.is_running(pid)  # PID 1 here may leave zombies unreaped


def test_module_lifecycle_flags_and_data(work):
    img, state = work
    port = free_port()
    args = dict(name="itest", path=str(img), address="127.0.0.1", port=port, supervisor="pidfile",
                state_dir=str(state))
    uri = "nbd://127.0.0.1:%d/itest" % port

    result = ansible(args, check=True)
    assert result["changed"] and result["_rc"] == 0 and "pid" not in result
    assert not state.exists()

    result = ansible(args)
    assert result["changed"] and result["uri"] == uri, result
    pid = result["pid"]
    assert alive(pid)
    assert result["export"] == dict(size=8 * MiB, read_only=False, can_flush=True, can_fua=True,
                                    can_multi_conn=True, tls=False)
    info = nbdinfo(uri)
    assert (info.can_flush, info.can_fua, info.can_multi_conn, info.read_only) == (True, True, True, False)
    # the export name is strict
    wrong = subprocess.run(["nbdinfo", "nbd://127.0.0.1:%d/other" % port], capture_output=True, timeout=30,
                           check=False)
    assert wrong.returncode != 0

    # read the export back with 4 connections, then write new data through it
    out = img.parent / "copy.img"
    subprocess.run(["nbdcopy", "-C", "4", uri, str(out)], check=True, timeout=60)
    assert out.read_bytes() == img.read_bytes()
    new = secrets.token_bytes(8 * MiB)
    out.write_bytes(new)
    subprocess.run(["nbdcopy", "-C", "4", "--flush", str(out), uri], check=True, timeout=60)
    assert img.read_bytes() == new

    for check in (False, True):  # idempotent, and idempotent in check mode
        result = ansible(args, check=check)
        assert not result["changed"], result
    assert ansible(args)["pid"] == pid and alive(pid)

    # a settings change restarts the server
    ro_args = dict(args, read_only=True, multi_conn=False)
    assert ansible(ro_args, check=True)["changed"] and alive(pid)
    result = ansible(ro_args)
    assert result["changed"] and result["pid"] != pid and not alive(pid)
    info = nbdinfo(uri)
    assert (info.read_only, info.can_flush, info.can_fua, info.can_multi_conn) == (True, True, False, False)
    write = subprocess.run(["nbdcopy", str(out), uri], capture_output=True, timeout=60, check=False)
    assert write.returncode != 0
    pid = result["pid"]

    stop = dict(name="itest", state="stopped", supervisor="pidfile", state_dir=str(state))
    assert ansible(stop, check=True)["changed"] and alive(pid)
    assert ansible(stop)["changed"] and not alive(pid)
    assert not ansible(stop)["changed"]
    assert not list(state.glob("nbd-itest.*"))


def test_fua_write_and_flush_with_libnbd(work):
    """A FUA write and a flush from python3-libnbd reach the image file."""
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("Debian python3 with python3-libnbd is missing")
    img, state = work
    s = ne.ExportSettings(path=str(img), name="fua", address="127.0.0.1", port=free_port())
    proc = ne.spawn_foreground(s, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        script = (
            "import nbd, sys\n"
            "h = nbd.NBD(); h.set_export_name('fua')\n"
            "for _ in range(100):\n"
            "    try:\n"
            "        h.connect_uri(sys.argv[1]); break\n"
            "    except nbd.Error:\n"
            "        import time; time.sleep(0.05); h = nbd.NBD()\n"
            "assert h.can_fua() and h.can_flush() and h.can_multi_conn()\n"
            "h.pwrite(b'stiefel!' * 512, 4096, nbd.CMD_FLAG_FUA)\n"
            "h.flush()\n"
            "print(h.pread(8, 4096).decode())\n"
            "h.shutdown()\n")
        out = subprocess.run([SYSTEM_PYTHON, "-c", script, ne.export_uri(s)], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        assert out.strip() == "stiefel!"
        assert img.read_bytes()[4096:8192] == b"stiefel!" * 512
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_copy_on_write_leaves_the_image_unchanged(work):
    img, state = work
    before = img.read_bytes()
    s = ne.ExportSettings(path=str(img), name="cow", address="127.0.0.1", port=free_port(), copy_on_write=True)
    proc = ne.spawn_foreground(s, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        uri = ne.export_uri(s)
        info = _wait_probe(uri)
        assert ne.verify_export(s, info, len(before)) == []
        src = img.parent / "zeros.img"
        src.write_bytes(b"\0" * len(before))
        subprocess.run(["nbdcopy", "--flush", str(src), uri], check=True, timeout=60)
        back = img.parent / "back.img"
        subprocess.run(["nbdcopy", uri, str(back)], check=True, timeout=60)
        assert back.read_bytes() == src.read_bytes()  # the client sees its writes
        assert img.read_bytes() == before  # the image does not
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _wait_probe(uri, env=None):
    last = None
    for _attempt in range(100):
        try:
            return ne.probe_export(uri, env=env)
        except ne.NbdExportError as exc:
            last = exc
            time.sleep(0.05)
    raise AssertionError("export never came up: %s" % last)


def _tls_session(tmp_path, img, aes_gcm_only):
    psk = tmp_path / "nbd.psk"
    psk.write_text("stiefel:%s\n" % secrets.token_hex(32))
    psk.chmod(0o600)
    s = ne.ExportSettings(path=str(img), name="tls", address="127.0.0.1", port=free_port(),
                          tls_psk_file=str(psk), tls_aes_gcm_only=aes_gcm_only)
    prio = ne.write_gnutls_priority_file(str(tmp_path / "gnutls.conf")) if aes_gcm_only else None
    log = tmp_path / ("nbdkit-%s.log" % aes_gcm_only)
    with open(log, "wb") as handle:
        proc = ne.spawn_foreground(s, prio, debug_tls=True, stdout=handle, stderr=handle)
    try:
        info = _wait_probe(ne.export_uri(s, for_client=True))
        assert info.tls and ne.verify_export(s, info, img.stat().st_size) == []
        plain = subprocess.run(["nbdinfo", "nbd://127.0.0.1:%d/tls" % s.port], capture_output=True, timeout=30,
                               check=False)
        assert plain.returncode != 0  # plaintext is refused
        data = img.parent / ("tls-%s.img" % aes_gcm_only)
        subprocess.run(["nbdcopy", ne.export_uri(s, for_client=True), str(data)], check=True, timeout=60)
        assert data.read_bytes() == img.read_bytes()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return ne.parse_tls_session_cipher(log.read_text(errors="replace"))


def test_tls_psk_negotiates_aes_gcm_only(work, tmp_path):
    img, state = work
    ciphers = _tls_session(tmp_path, img, aes_gcm_only=True)
    assert ciphers and set(ciphers) <= ne.AES_GCM_CIPHERS, ciphers
    # control: without the override GnuTLS on Debian 12 would pick another suite (ChaCha20)
    default = _tls_session(tmp_path, img, aes_gcm_only=False)
    print("\nTLS-PSK ciphers: forced %s, GnuTLS default %s" % (sorted(set(ciphers)), sorted(set(default))))
    assert default


def test_module_tls_export(work, tmp_path):
    img, state = work
    psk = tmp_path / "m.psk"
    psk.write_text("stiefel:%s\n" % secrets.token_hex(32))
    psk.chmod(0o600)
    args = dict(name="tlsmod", path=str(img), address="127.0.0.1", port=free_port(), supervisor="pidfile",
                state_dir=str(state), tls_psk_file=str(psk))
    result = ansible(args)
    assert result["changed"] and result["export"]["tls"] and result["uri"].startswith("nbds://")
    assert secrets and psk.read_text().split(":")[1].strip() not in json.dumps(result)
    assert (state / "nbd-tlsmod.gnutls.conf").read_text() == ne.GNUTLS_AES_GCM_ONLY
    env = open("/proc/%d/environ" % result["pid"], "rb").read().split(b"\0")
    assert ("GNUTLS_SYSTEM_PRIORITY_FILE=%s" % (state / "nbd-tlsmod.gnutls.conf")).encode() in env
    assert not ansible(args)["changed"]
    assert ansible(dict(name="tlsmod", state="stopped", supervisor="pidfile", state_dir=str(state)))["changed"]


@pytest.fixture
def mounted_loop(tmp_path):
    """A small ext4 image attached to a loop device and mounted read-write."""
    if os.geteuid() != 0:
        pytest.skip("needs root for losetup and mount")
    img = tmp_path / "ext4.img"
    img.write_bytes(b"\0" * (16 * MiB))
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, timeout=60)
    loop = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()
    mnt = tempfile.mkdtemp(prefix="stf-nbd-mnt-")
    mounted = False
    try:
        subprocess.run(["mount", loop, mnt], check=True, timeout=30)
        mounted = True
        yield img, loop, mnt
    finally:
        if mounted:
            subprocess.run(["umount", mnt], check=False, timeout=30)
        subprocess.run(["losetup", "-d", loop], check=False, timeout=30)
        os.rmdir(mnt)


def test_mounted_device_is_refused(mounted_loop, tmp_path):
    img, loop, mnt = mounted_loop
    state = tmp_path / "state"
    for path in (loop, str(img)):
        args = dict(name="mounted", path=path, address="127.0.0.1", port=free_port(), supervisor="pidfile",
                    state_dir=str(state))
        for check in (True, False):
            result = ansible(args, check=check)
            assert result.get("failed") and result["_rc"] != 0, result
            assert "refusing to export" in result["msg"] and mnt in result["msg"], result["msg"]
        with pytest.raises(blockdev.DeviceInUse):
            blockdev.check_exportable(path, writable_export=False)
    assert not state.exists()
