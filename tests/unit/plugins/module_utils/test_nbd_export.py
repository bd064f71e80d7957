"""Unit tests for the NBD export settings (plugins/module_utils/nbd_export.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from hypothesis import given, strategies as st

from ansible_collections.stiefel.system.plugins.module_utils import blockdev, nbd_export as ne
from ansible_collections.stiefel.system.plugins.module_utils.errors import StiefelError

NBDINFO_SAMPLE = """{
"protocol": "newstyle-fixed",
"TLS": true,
"structured": true,
"exports": [
\t{
\t"export-name": "stiefel",
\t"content": "data",
\t"uri": "nbds://stiefel@127.0.0.1:20809/stiefel?tls-psk-file=/tmp/psk",
\t"contexts": ["base:allocation"],
\t"is_rotational": false,
\t"is_read_only": false,
\t"can_cache": true,
\t"can_df": true,
\t"can_fast_zero": false,
\t"can_flush": true,
\t"can_fua": true,
\t"can_multi_conn": true,
\t"can_trim": true,
\t"can_zero": true,
\t"export-size": 67108864,
\t"export-size-str": "64M"
\t} ]
}
"""


def settings(**kw):
    base = dict(path="/srv/disk.img", address="127.0.0.1", port=10809)
    base.update(kw)
    return ne.ExportSettings(**base)


# ------------------------------------------------------------ settings and argv

def test_default_argv_is_file_plugin_with_strict_export_name():
    argv = ne.server_argv(settings())
    assert argv[:2] == ["nbdkit", "--foreground"]
    assert argv[argv.index("--ipaddr") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "10809"
    plugin = argv.index("file")
    assert argv[plugin + 1] == "file=/srv/disk.img"
    assert "--filter=exportname" in argv[:plugin]
    assert {"exportname=stiefel", "exportname-strict=true", "exportname-list=explicit"} <= set(argv[plugin:])
    assert "--readonly" not in argv and "--filter=cow" not in argv
    assert not any(a.startswith("--tls") for a in argv)
    assert "--filter=multi-conn" not in argv


def test_read_only_cow_multiconn_tls_argv():
    assert "--readonly" in ne.server_argv(settings(read_only=True))
    argv = ne.server_argv(settings(copy_on_write=True))
    assert argv.index("--filter=exportname") < argv.index("--filter=cow") < argv.index("file")
    argv = ne.server_argv(settings(multi_conn=False))
    assert argv.index("--filter=multi-conn") < argv.index("file")
    assert "multi-conn-mode=disable" in argv
    argv = ne.server_argv(settings(tls_psk_file="/etc/stiefel/nbd.psk"))
    assert "--tls=require" in argv and "--tls-psk=/etc/stiefel/nbd.psk" in argv


def test_daemon_argv_has_pidfile_not_foreground():
    argv = ne.server_argv(settings(), foreground=False, pidfile="/run/stiefel/nbd-x.pid", nbdkit="/usr/bin/nbdkit")
    assert argv[0] == "/usr/bin/nbdkit" and "--foreground" not in argv
    assert argv[argv.index("--pidfile") + 1] == "/run/stiefel/nbd-x.pid"
    assert "-D" in ne.server_argv(settings(), debug_tls=True)


@pytest.mark.parametrize("kw", [
    dict(path="relative.img"), dict(name=""), dict(name="-x"), dict(name="a/b"), dict(name="x" * 65),
    dict(port=0), dict(port=65536), dict(port=True), dict(address="host.example"), dict(address="1.2.3"),
    dict(read_only=True, copy_on_write=True), dict(tls_psk_file="psk"), dict(read_only="yes"),
    dict(threads=0),
])
def test_invalid_settings_are_rejected(kw):
    with pytest.raises(ne.NbdExportError):
        settings(**kw)


def test_tls_environment_forces_aes_gcm():
    s = settings(tls_psk_file="/etc/stiefel/nbd.psk")
    env = ne.server_env(s, "/run/prio.conf", base={"PATH": "/bin", "GNUTLS_SYSTEM_PRIORITY_FILE": "/evil"})
    assert env["GNUTLS_SYSTEM_PRIORITY_FILE"] == "/run/prio.conf" and env["PATH"] == "/bin"
    assert ne.server_env(settings(), None, base={"GNUTLS_SYSTEM_PRIORITY_FILE": "/evil"}) == {}
    assert ne.tls_environment(settings(tls_psk_file="/p", tls_aes_gcm_only=False), None) == {}
    with pytest.raises(ne.NbdExportError):
        ne.tls_environment(s, None)
    assert "tls-disabled-cipher = CHACHA20-POLY1305" in ne.GNUTLS_AES_GCM_ONLY
    disabled = [line for line in ne.GNUTLS_AES_GCM_ONLY.splitlines() if line.startswith("tls-disabled-cipher")]
    assert not [line for line in disabled if "AES-128-GCM" in line or "AES-256-GCM" in line]


def test_export_uri_forms(tmp_path):
    psk = tmp_path / "psk"
    psk.write_text("alice:" + "ab" * 32 + "\n")
    assert ne.export_uri(settings()) == "nbd://127.0.0.1:10809/stiefel"
    assert ne.export_uri(settings(address="::")) == "nbd://localhost:10809/stiefel"
    assert ne.export_uri(settings(address="fe80::1%stiefel0")) == "nbd://[fe80::1%25stiefel0]:10809/stiefel"
    s = settings(tls_psk_file=str(psk))
    assert ne.export_uri(s) == "nbds://127.0.0.1:10809/stiefel"
    assert ne.export_uri(s, for_client=True) == "nbds://alice@127.0.0.1:10809/stiefel?tls-psk-file=%s" % psk
    psk.write_text("no key here\n")
    with pytest.raises(ne.NbdExportError):
        ne.psk_username(str(psk))


def test_tls_session_cipher_from_nbdkit_log():
    log = ("nbdkit: file[1]: debug: TLS handshake completed\n"
           "nbdkit: file[1]: debug: TLS session: (TLS1.3)--(AES-128-GCM)\n"
           "nbdkit: file[2]: debug: TLS session: (TLS1.3)-(PSK)-(CHACHA20-POLY1305)\n")
    assert ne.parse_tls_session_cipher(log) == ["AES-128-GCM", "CHACHA20-POLY1305"]
    assert ne.parse_tls_session_cipher("nothing") == []


# ------------------------------------------------------------ nbdinfo parser

def test_parse_nbdinfo_sample_and_verify():
    info = ne.parse_nbdinfo_json(NBDINFO_SAMPLE)
    assert info == ne.ExportInfo(name="stiefel", size=64 << 20, read_only=False, can_flush=True, can_fua=True,
                                 can_multi_conn=True, tls=True)
    s = settings(tls_psk_file="/p")
    assert ne.verify_export(s, info, 64 << 20) == []
    problems = ne.verify_export(settings(read_only=True, multi_conn=False), info, 1)
    assert any(p.startswith("read_only") for p in problems)
    assert any(p.startswith("can_multi_conn") for p in problems)
    assert any(p.startswith("tls") for p in problems)
    assert any(p.startswith("size") for p in problems)
    assert ne.parse_nbdinfo_json(NBDINFO_SAMPLE.encode(), export_name="stiefel").size == 64 << 20
    with pytest.raises(ne.NbdInfoError):
        ne.parse_nbdinfo_json(NBDINFO_SAMPLE, export_name="other")


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("exports"),
    lambda d: d.__setitem__("exports", []),
    lambda d: d.__setitem__("exports", ["x"]),
    lambda d: d["exports"][0].pop("can_fua"),
    lambda d: d["exports"][0].__setitem__("can_flush", 1),
    lambda d: d["exports"][0].__setitem__("export-size", -1),
    lambda d: d["exports"][0].__setitem__("export-size", True),
    lambda d: d["exports"][0].__setitem__("export-size", "64M"),
    lambda d: d["exports"][0].__setitem__("export-name", 7),
    lambda d: d.__setitem__("TLS", "yes"),
])
def test_nbdinfo_bad_fields(mutate):
    doc = json.loads(NBDINFO_SAMPLE)
    mutate(doc)
    with pytest.raises(ne.NbdInfoError):
        ne.parse_nbdinfo_json(json.dumps(doc))


@given(st.one_of(st.binary(max_size=2048), st.text(max_size=2048)))
def test_nbdinfo_parser_hostile_bytes(data):
    try:
        ne.parse_nbdinfo_json(data)
    except ne.NbdInfoError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=30)
flag_keys = ["export-name", "is_read_only", "can_flush", "can_fua", "can_multi_conn", "export-size"]


@given(st.dictionaries(st.sampled_from(flag_keys + ["x"]), json_values), json_values)
def test_nbdinfo_parser_hostile_json(entry, tls):
    text = json.dumps({"TLS": tls, "exports": [entry]})
    try:
        info = ne.parse_nbdinfo_json(text)
    except ne.NbdInfoError:
        return
    assert isinstance(info.size, int) and info.size >= 0
    assert all(isinstance(getattr(info, f), bool) for f in ("read_only", "can_flush", "can_fua", "can_multi_conn"))


def test_nbdinfo_huge_or_deep_input():
    with pytest.raises(ne.NbdInfoError):
        ne.parse_nbdinfo_json(b" " * (ne.NBDINFO_MAX + 1))
    with pytest.raises(ne.NbdInfoError):
        ne.parse_nbdinfo_json("[" * 100000 + "]" * 100000)


def test_probe_export_uses_nbdinfo_seam():
    calls = []

    def fake_run(argv, **kw):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, NBDINFO_SAMPLE.encode(), b"")

    info = ne.probe_export("nbd://x/stiefel", run=fake_run)
    # --no-content: without file(1) nbdinfo 1.14 prints garbage as "content" (seen under systemd in QEMU)
    assert calls == [["nbdinfo", "--json", "--no-content", "nbd://x/stiefel"]] and info.can_fua

    def failing(argv, **kw):
        return subprocess.CompletedProcess(argv, 1, b"", b"nbdinfo: connection refused")

    with pytest.raises(ne.NbdExportError, match="connection refused"):
        ne.probe_export("nbd://x/stiefel", run=failing)


# ------------------------------------------------------------ state file

names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z")
paths = st.from_regex(r"\A(/[A-Za-z0-9._ -]{1,12}){1,4}\Z")
addresses = st.one_of(st.ip_addresses().map(str), st.just("fe80::1%stiefel0"))


@st.composite
def export_settings(draw):
    ro = draw(st.booleans())
    return ne.ExportSettings(
        path=draw(paths), name=draw(names), address=draw(addresses), port=draw(st.integers(1, 65535)),
        read_only=ro, copy_on_write=False if ro else draw(st.booleans()), multi_conn=draw(st.booleans()),
        tls_psk_file=draw(st.none() | paths), tls_aes_gcm_only=draw(st.booleans()),
        threads=draw(st.integers(1, 1024)))


@given(export_settings())
def test_state_roundtrip_and_argv_invariants(s):
    argv = ne.server_argv(s, foreground=False, pidfile="/run/stiefel/nbd-%s.pid" % s.name)
    got, got_argv = ne.parse_state(ne.state_to_json(s, argv))
    assert got == s and got_argv == argv
    assert argv.count("file") == 1 and argv[argv.index("file") + 1] == "file=" + s.path
    assert ("--readonly" in argv) == s.read_only
    assert ("--tls=require" in argv) == bool(s.tls_psk_file)
    assert ("--filter=cow" in argv) == s.copy_on_write
    assert ne.expected_flags(s)["can_fua"] == (not s.read_only)
    unit = ne.render_systemd_unit(s, "/run/x.pid", "/etc/p.conf" if s.tls_psk_file else None)
    assert "ExecStart=/usr/bin/nbdkit " in unit and ("GNUTLS_SYSTEM_PRIORITY_FILE" in unit) == bool(
        s.tls_psk_file and s.tls_aes_gcm_only)


@given(st.one_of(st.binary(max_size=1024), st.text(max_size=1024)))
def test_state_parser_hostile_bytes(data):
    with pytest.raises(ne.StateFileError):
        ne.parse_state(data)


@given(st.dictionaries(st.sampled_from(["version", "kind", "settings", "argv", "extra"]), json_values),
       st.dictionaries(st.sampled_from(["path", "name", "port", "address", "read_only", "evil"]), json_values))
def test_state_parser_hostile_json(doc, settings_doc):
    doc = dict(doc)
    if "settings" in doc:
        doc["settings"] = settings_doc
    try:
        s, argv = ne.parse_state(json.dumps(doc))
    except ne.StateFileError as exc:
        assert isinstance(exc, StiefelError)
        return
    assert isinstance(s, ne.ExportSettings) and all(isinstance(a, str) for a in argv)


def test_state_parser_specific_errors():
    good = json.loads(ne.state_to_json(settings(), ["nbdkit"]))
    for key, value, match in [("kind", "other", "not a stiefel"), ("version", 2, "version"),
                              ("argv", [], "argv"), ("argv", [1], "argv")]:
        doc = dict(good, **{key: value})
        with pytest.raises(ne.StateFileError, match=match):
            ne.parse_state(json.dumps(doc))
    doc = dict(good, settings=dict(good["settings"], port=0))
    with pytest.raises(ne.StateFileError, match="settings"):
        ne.parse_state(json.dumps(doc))
    doc = dict(good, settings=dict(good["settings"], surprise=1))
    with pytest.raises(ne.StateFileError, match="unknown"):
        ne.parse_state(json.dumps(doc))


def test_read_state_absent_or_garbage(tmp_path):
    assert ne.read_state(str(tmp_path / "none.json")) is None
    (tmp_path / "bad.json").write_bytes(b"\xff\x00garbage")
    assert ne.read_state(str(tmp_path / "bad.json")) is None


# ------------------------------------------------------------ pidfile helpers

def test_pidfile_and_cmdline_matching(tmp_path):
    pf = tmp_path / "x.pid"
    for text in ("", "abc", "-1", "1", "99999999999", "12 13"):
        pf.write_text(text)
        assert ne.read_pidfile(str(pf)) is None
    pf.write_text("%d\n" % os.getpid())
    assert ne.read_pidfile(str(pf)) == os.getpid()
    me = ne.process_argv(os.getpid())
    assert ne.pid_matches(os.getpid(), me)
    assert not ne.pid_matches(os.getpid(), me + ["extra"])
    assert not ne.pid_matches(None, me)


def test_stop_pid_terminates_a_process():
    proc = subprocess.Popen(["sleep", "30"])
    try:
        ne.stop_pid(proc.pid, timeout=5)
        assert proc.wait(timeout=5) is not None
    finally:
        if proc.poll() is None:
            proc.kill()


def test_atomic_write(tmp_path):
    target = tmp_path / "f"
    assert ne.atomic_write(str(target), "a", 0o600)
    assert oct(target.stat().st_mode & 0o777) == "0o600"
    assert not ne.atomic_write(str(target), "a", 0o600)
    assert ne.atomic_write(str(target), "a", 0o644)
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


# ------------------------------------------------------------ systemd unit

def test_systemd_unit_content_and_quoting():
    s = settings(path="/srv/my disk.img", tls_psk_file="/etc/stiefel/nbd.psk")
    unit = ne.render_systemd_unit(s, "/run/stiefel-nbd-stiefel.pid", "/etc/stiefel/nbd/gnutls.conf")
    assert "Type=forking" in unit and "PIDFile=/run/stiefel-nbd-stiefel.pid" in unit
    assert '"file=/srv/my disk.img"' in unit
    assert "Environment=GNUTLS_SYSTEM_PRIORITY_FILE=/etc/stiefel/nbd/gnutls.conf" in unit
    assert "WantedBy=multi-user.target" in unit
    assert ne.unit_name("stiefel") == "stiefel-nbd-stiefel.service"
    assert ne._systemd_quote("50%") == '"50%%"'


@pytest.mark.skipif(not shutil.which("systemd-analyze") or not os.path.exists("/usr/bin/nbdkit"),
                    reason="needs systemd-analyze and nbdkit")
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * 4096)
    s = settings(path=str(img), tls_psk_file="/etc/stiefel/nbd.psk")
    unit = tmp_path / ne.unit_name("stiefel")
    unit.write_text(ne.render_systemd_unit(s, "/run/stiefel-nbd-stiefel.pid", "/etc/stiefel/gnutls.conf"))
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                          check=False, timeout=60)
    # Offline (PID 1 is not systemd) systemd-analyze still parses the unit; it must not complain about it.
    bad = [line for line in (proc.stdout + proc.stderr).splitlines() if unit.name in line]
    assert not bad, proc.stdout + proc.stderr


# ------------------------------------------------------------ in-use checks

def test_device_users_plain_file_without_loops(tmp_path):
    img = tmp_path / "x.img"
    img.write_bytes(b"\0" * 1024)
    (tmp_path / "sys" / "block").mkdir(parents=True)
    view = blockdev.HostView(sys_root=str(tmp_path / "sys"))
    assert blockdev.device_users(str(img), view=view) == []
    with pytest.raises(ne.NbdExportError, match="not a block device"):
        blockdev.device_users("/dev/null")
    with pytest.raises(ne.NbdExportError, match="does not exist"):
        blockdev.device_users(str(tmp_path / "missing"))


def test_image_file_attached_to_a_mounted_loop_is_refused(tmp_path):
    img = tmp_path / "x.img"
    img.write_bytes(b"\0" * 1024)
    sys_root = tmp_path / "sys"
    (sys_root / "block" / "loop7" / "loop").mkdir(parents=True)
    (sys_root / "block" / "loop7" / "loop" / "backing_file").write_text(str(img) + "\n")

    class View(blockdev.HostView):
        def __init__(self):
            super().__init__(sys_root=str(sys_root))

    # the fake loop7 has no /dev node, so inspect_target sees it as missing: nothing mounted
    assert blockdev.loops_backed_by(str(img), View()) == ["/dev/loop7"]


def test_root_disk_is_refused():
    root = next((m for m in blockdev.parse_mountinfo(open("/proc/self/mountinfo").read()) if m.mountpoint == "/"),
                None)
    if root is None or not root.source.startswith("/dev/") or not os.path.exists(root.source):
        pytest.skip("root filesystem is not on a visible block device")
    with pytest.raises(blockdev.DeviceInUse, match="running system"):
        blockdev.check_exportable(root.source)
    with pytest.raises(blockdev.DeviceInUse, match="running system"):
        blockdev.check_exportable(root.source, writable_export=False)
