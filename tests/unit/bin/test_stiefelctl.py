"""stiefelctl's verbs: help, refusals and exit codes, key rotation."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import keyfile

REPO = Path(__file__).resolve().parents[3]
CTL = str(REPO / "bin" / "stiefelctl")
VERBS = ["update", "create-usbdrive", "server", "test-qemu", "test-nspawn", "reset-key"]


def ctl(*args):
    env = dict(os.environ, PATH="%s:%s" % (Path(sys.executable).parent, os.environ.get("PATH", "")))
    return subprocess.run([sys.executable, CTL, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env=env, check=False)


def test_top_level_help_lists_every_verb():
    out = ctl("--help")
    assert out.returncode == 0
    for verb in VERBS:
        assert verb in out.stdout


@pytest.mark.parametrize("verb", VERBS)
def test_each_verb_has_help(verb):
    out = ctl(verb, "--help")
    assert out.returncode == 0 and "usage: stiefelctl %s" % verb in out.stdout


def test_usage_errors_exit_2():
    assert ctl().returncode == 2
    assert ctl("frobnicate").returncode == 2
    assert ctl("test-qemu", "desktop").returncode == 2


def test_destructive_verbs_need_confirmation_without_a_terminal(tmp_path):
    target = tmp_path / "stick.img"
    out = ctl("create-usbdrive", str(target))
    assert out.returncode == 2 and "--yes" in out.stderr and not target.exists()
    key = tmp_path / "key"
    keyfile.write_key_atomic(str(key), keyfile.generate_key())
    before = key.read_bytes()
    out = ctl("reset-key", "--path", str(key))
    assert out.returncode == 2 and key.read_bytes() == before


def test_reset_key_rotates_and_check_does_not(tmp_path):
    key = tmp_path / "key"
    keyfile.write_key_atomic(str(key), keyfile.generate_key())
    before = key.read_bytes()
    out = ctl("reset-key", "--path", str(key), "--yes", "--check")
    assert out.returncode == 0 and key.read_bytes() == before
    out = ctl("reset-key", "--path", str(key), "--yes")
    assert out.returncode == 0, out.stderr
    assert key.read_bytes() != before
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert keyfile.read_key(str(key)).hex() not in out.stdout + out.stderr
