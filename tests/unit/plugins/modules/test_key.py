from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.stiefel.system.plugins.module_utils import keyfile, keyschedule
from ansible_collections.stiefel.system.plugins.modules import key as key_module

REPO = Path(__file__).resolve().parents[4]


def run_module(capsys, **args):
    with patch_module_args(args):
        with pytest.raises(SystemExit) as exc:
            key_module.main()
    out = capsys.readouterr().out
    result = json.loads(out)
    result["rc"] = exc.value.code
    return result, out


def test_check_real_idempotent_idempotent_check(tmp_path, capsys):
    path = tmp_path / "key"
    result, _unused = run_module(capsys, path=str(path), _ansible_check_mode=True)
    assert result["changed"] and result["action"] == "created" and not path.exists()
    assert result["pairing_code"] is None  # no key yet, so no code to show

    result, out = run_module(capsys, path=str(path))
    assert result["changed"] and result["action"] == "created"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    key = keyfile.read_key(str(path))
    assert result["key_id"] == keyschedule.key_id_hex(key)
    assert result["pairing_code"] == keyschedule.pairing_code(key)
    assert key.hex() not in out
    before = path.read_bytes()

    for check in (False, True):
        result, out = run_module(capsys, path=str(path), _ansible_check_mode=check)
        assert not result["changed"] and result["action"] == "kept"
        assert result["pairing_code"] == keyschedule.pairing_code(key)
        assert key.hex() not in out
    assert path.read_bytes() == before


def test_rotate_replaces_the_key(tmp_path, capsys):
    path = tmp_path / "key"
    keyfile.write_key_atomic(str(path), keyfile.generate_key())
    old = path.read_bytes()
    result, _unused = run_module(capsys, path=str(path), state="rotated", _ansible_check_mode=True)
    assert result["changed"] and path.read_bytes() == old
    result, _unused = run_module(capsys, path=str(path), force=True)
    assert result["changed"] and result["action"] == "rotated" and path.read_bytes() != old
    assert result["previous_key_id"] != result["key_id"]
    assert result["pairing_code"] == keyschedule.pairing_code(keyfile.read_key(str(path)))


def test_invalid_file_is_replaced_with_warning(tmp_path, capsys):
    path = tmp_path / "key"
    path.write_bytes(b"stiefel-key-v1:deadbeef\n")
    result, _unused = run_module(capsys, path=str(path), _ansible_diff=True)
    assert result["changed"] and result["action"] == "replaced_invalid"
    assert any("64 lowercase hex" in str(w) for w in result["warnings"])
    assert "deadbeef" not in json.dumps(result["diff"])
    keyfile.read_key(str(path))


def test_wider_mode_is_refused(tmp_path, capsys):
    result, _unused = run_module(capsys, path=str(tmp_path / "key"), mode="0644")
    assert result["failed"] and "group or others" in result["msg"]
    assert not (tmp_path / "key").exists()


def test_fixes_mode_of_a_valid_key(tmp_path, capsys):
    path = tmp_path / "key"
    keyfile.write_key_atomic(str(path), keyfile.generate_key(), mode=0o640)
    result, _unused = run_module(capsys, path=str(path))
    assert result["changed"] and result["action"] == "kept"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_missing_directory_is_a_clear_error(tmp_path, capsys):
    result, _unused = run_module(capsys, path=str(tmp_path / "nope" / "key"))
    assert result["failed"] and "does not exist" in result["msg"]


def test_missing_directory_in_check_mode_reports_a_change(tmp_path, capsys):
    result, _unused = run_module(capsys, path=str(tmp_path / "nope" / "key"), _ansible_check_mode=True)
    assert result["changed"] and result["action"] == "created"
    assert not (tmp_path / "nope").exists()


def test_through_ansible_cli(tmp_path):
    """The issue's acceptance run: ansible localhost -m stiefel.system.key."""
    path = tmp_path / "key"
    ansible = str(Path(sys.executable).parent / "ansible")

    def cli(*extra):
        proc = subprocess.run(
            [ansible, "localhost", "-m", "stiefel.system.key", "-a", "path=%s" % path, *extra],
            cwd=REPO, capture_output=True, text=True, check=False,
        )
        return proc

    first = cli("--check")
    assert first.returncode == 0 and "CHANGED" in first.stdout and not path.exists()
    second = cli()
    assert second.returncode == 0 and "CHANGED" in second.stdout
    data = path.read_bytes()
    third = cli()
    assert third.returncode == 0 and "SUCCESS" in third.stdout and "CHANGED" not in third.stdout
    assert path.read_bytes() == data
    secret = keyfile.read_key(str(path)).hex()
    for proc in (first, second, third):
        assert secret not in proc.stdout + proc.stderr
