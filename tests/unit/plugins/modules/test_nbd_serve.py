"""Unit tests for the nbd_serve module (systemctl and nbdkit faked at their seams)."""

from __future__ import annotations

import os

import pytest
from ansible.module_utils.basic import AnsibleModule

from ansible_collections.stiefel.system.plugins.module_utils import blockdev, nbd_export as ne
from ansible_collections.stiefel.system.plugins.modules import nbd_serve
from lab import ansible_output


class FakeSystemctl:
    """Records systemctl calls; is-active / is-enabled answer from its state."""

    def __init__(self, active=False, enabled=False):
        self.active = active
        self.enabled = enabled
        self.calls = []

    def __call__(self, module, args, **kwargs):
        argv = list(args)
        if not argv[0].endswith("systemctl"):
            raise AssertionError("unexpected command %r" % argv)
        verb = argv[1]
        self.calls.append(verb)
        if verb == "is-active":
            return (0 if self.active else 3), "", ""
        if verb == "is-enabled":
            return (0 if self.enabled else 1), "", ""
        if verb in ("start", "restart"):
            self.active = True
        if verb == "stop":
            self.active = False
        if verb == "enable":
            self.enabled = True
        if verb == "disable":
            self.enabled = False
        return 0, "", ""


@pytest.fixture
def env(tmp_path, monkeypatch):
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * 65536)
    fake = FakeSystemctl()

    def run_command(self, args, **kwargs):
        return fake(self, args, **kwargs)

    monkeypatch.setattr(AnsibleModule, "run_command", run_command)
    real_bin = AnsibleModule.get_bin_path

    def get_bin_path(self, name, required=False, opt_dirs=None):
        if name == "systemctl":
            return "/bin/systemctl"
        return real_bin(self, name, required=required, opt_dirs=opt_dirs)

    monkeypatch.setattr(AnsibleModule, "get_bin_path", get_bin_path)
    base = dict(path=str(img), address="127.0.0.1", port=10999, supervisor="systemd",
                state_dir=str(tmp_path / "state"), unit_dir=str(tmp_path / "units"), verify=False)
    (tmp_path / "units").mkdir()
    return base, fake, tmp_path


def run(capsys, **args):
    return ansible_output.run_module_main(nbd_serve, capsys, **args)


def test_systemd_check_real_idempotent(env, capsys):
    base, fake, tmp = env
    unit = tmp / "units" / "stiefel-nbd-stiefel.service"
    result = run(capsys, _ansible_check_mode=True, **base)
    assert result["changed"] and not unit.exists() and "start" not in fake.calls
    assert result["uri"] == "nbd://127.0.0.1:10999/stiefel"

    result = run(capsys, **base)
    assert result["changed"] and unit.exists() and result["unit_file"] == str(unit)
    assert fake.calls[-3:] == ["daemon-reload", "enable", "start"]
    text = unit.read_text()
    assert "--port 10999" in text and "file=%s" % base["path"] in text
    assert ne.read_state(result["state_file"])[0].port == 10999

    for check in (False, True):
        fake.calls.clear()
        result = run(capsys, _ansible_check_mode=check, **base)
        assert not result["changed"], result
        assert fake.calls == ["is-active", "is-enabled"]


def test_systemd_settings_change_restarts(env, capsys):
    base, fake, tmp = env
    run(capsys, **base)
    fake.calls.clear()
    result = run(capsys, **dict(base, read_only=True))
    assert result["changed"] and "restart" in fake.calls
    assert "--readonly" in (tmp / "units" / "stiefel-nbd-stiefel.service").read_text()


def test_systemd_tls_writes_priority_file(env, capsys):
    base, fake, tmp = env
    psk = tmp / "nbd.psk"
    psk.write_text("stiefel:" + "00" * 32 + "\n")
    psk.chmod(0o600)
    result = run(capsys, tls_psk_file=str(psk), **base)
    assert result["changed"] and result["uri"].startswith("nbds://")
    prio = tmp / "state" / "nbd-stiefel.gnutls.conf"
    assert prio.read_text() == ne.GNUTLS_AES_GCM_ONLY
    assert "GNUTLS_SYSTEM_PRIORITY_FILE=%s" % prio in (tmp / "units" / "stiefel-nbd-stiefel.service").read_text()
    psk.chmod(0o644)
    result = run(capsys, tls_psk_file=str(psk), **base)
    assert result["failed"] and "group or others" in result["msg"]


def test_systemd_stop(env, capsys):
    base, fake, tmp = env
    run(capsys, **base)
    stop = dict(base, state="stopped")
    stop.pop("path")
    result = run(capsys, _ansible_check_mode=True, **stop)
    assert result["changed"] and (tmp / "units" / "stiefel-nbd-stiefel.service").exists()
    result = run(capsys, **stop)
    assert result["changed"] and "stop" in fake.calls and "disable" in fake.calls
    assert not (tmp / "units" / "stiefel-nbd-stiefel.service").exists()
    result = run(capsys, **stop)
    assert not result["changed"]


def test_refuses_device_in_use(env, capsys, monkeypatch):
    base, fake, tmp = env

    def refuse(path, writable_export=True):
        raise blockdev.DeviceInUse("refusing to export %s: /dev/vda is mounted read-write on /" % path)

    monkeypatch.setattr(nbd_serve, "check_exportable", refuse)
    result = run(capsys, **base)
    assert result["failed"] and "mounted read-write on /" in result["msg"]
    assert fake.calls == []


@pytest.mark.parametrize("bad, match", [
    (dict(name="../etc"), "export name"),
    (dict(port=0), "port"),
    (dict(address="not-an-ip"), "address"),
    (dict(path="/nonexistent/disk.img"), "does not exist"),
    (dict(read_only=True, copy_on_write=True), "mutually exclusive"),
])
def test_invalid_parameters_fail_clearly(env, capsys, bad, match):
    base, fake, tmp = env
    result = run(capsys, **dict(base, **bad))
    assert result["failed"] and match in result["msg"], result["msg"]


def test_pidfile_check_mode_does_nothing(env, capsys):
    base, fake, tmp = env
    args = dict(base, supervisor="pidfile")
    result = run(capsys, _ansible_check_mode=True, **args)
    assert result["changed"] and result["supervisor"] == "pidfile"
    assert not os.path.exists(base["state_dir"])
    assert result["argv"][0].endswith("nbdkit")


def test_resolve_supervisor(tmp_path):
    assert nbd_serve.resolve_supervisor("auto", str(tmp_path / "none")) == "pidfile"
    assert nbd_serve.resolve_supervisor("auto", str(tmp_path)) == "systemd"
    assert nbd_serve.resolve_supervisor("pidfile", str(tmp_path)) == "pidfile"
