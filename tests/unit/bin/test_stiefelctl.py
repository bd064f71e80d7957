"""stiefelctl's verbs: help, refusals and exit codes, key rotation."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

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


def test_server_needs_something_to_serve():
    if os.geteuid() != 0:
        pytest.skip("stiefelctl server refuses non-root before reading its options")
    out = ctl("server")
    assert out.returncode == 2 and "--config FILE, or --disk PATH" in out.stderr
    out = ctl("server", "--disk", "/srv/x.img")
    assert out.returncode == 2


def test_server_passes_a_refused_config_on_as_exit_2(tmp_path):
    """The agent refuses before it opens a socket or touches a link; stiefelctl keeps its exit code."""
    if os.geteuid() != 0:
        pytest.skip("stiefelctl server needs root")
    conf = tmp_path / "server.conf"
    conf.write_text("disk = %s\nboot_dir = %s\ncolour = blue\n" % (tmp_path / "d.img", tmp_path))
    out = ctl("server", "--config", str(conf))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "refused: %s: line 3: unknown key 'colour'" % conf in out.stdout
    assert "waiting for a client" not in out.stdout
    # the disk is checked before anything is served: a missing image file
    key = tmp_path / "key"
    keyfile.write_key_atomic(str(key), keyfile.generate_key())
    conf.write_text("disk = %s\nboot_dir = %s\n" % (tmp_path / "d.img", tmp_path))
    out = ctl("server", "--config", str(conf), "--key", str(key))
    assert out.returncode == 1 and "fatal: cannot export %s: it does not exist" % (tmp_path / "d.img") in out.stdout


def test_server_agent_flags(agent_env):
    agent = str(REPO / "agents" / "stiefel-server")
    out = subprocess.run([sys.executable, agent, "--interface", "eth0"], env=agent_env, capture_output=True, text=True, check=False)
    assert out.returncode == 2 and "are for standalone mode" in out.stderr
    out = subprocess.run([sys.executable, agent, "--standalone", "--disk", "/srv/d.img"], env=agent_env, capture_output=True,
                         text=True, check=False)
    assert out.returncode == 2 and "exactly one of boot_dir" in out.stdout


def test_server_agent_check_config(tmp_path, agent_env):
    """The role validates its template with this before the file replaces the old one."""
    agent = str(REPO / "agents" / "stiefel-server")
    conf = tmp_path / "server.conf"
    conf.write_text("disk = /dev/sdb\nboot = UUID=0b8f\ninterfaces = 52-54-00-AB-CD-02\n")
    out = subprocess.run([sys.executable, agent, "--check-config", str(conf)], env=agent_env, capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0 and "interfaces = 52:54:00:ab:cd:02\n" in out.stdout
    conf.write_text("disk = /dev/sdb\nboot = UUID=0b8f\nmtu = 9000\n")
    out = subprocess.run([sys.executable, agent, "--check-config", str(conf)], env=agent_env, capture_output=True, text=True,
                         check=False)
    assert out.returncode == 2 and "mtu needs interfaces" in out.stderr


def _load_ctl():
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("stiefelctl_under_test", CTL)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_newc_archives_finds_each_archive_of_the_ramdisk():
    """test-nspawn unpacks the ramdisk's base and overlay archives one by one (GNU cpio stops at a trailer)."""
    import io

    from ansible_collections.stiefel.system.plugins.module_utils import cpio

    module = _load_ctl()
    first = cpio.write_newc([cpio.CpioEntry.file("bin/base", b"base" * 100, 0o755)])
    second = cpio.write_newc([cpio.CpioEntry.directory("usr"), cpio.CpioEntry.file("usr/agent", b"a", 0o755)])
    stream = first + b"\0" * 8 + second
    spans = module.newc_archives(io.BytesIO(stream), len(stream))
    assert spans == [(0, len(first)), (len(first) + 8, len(second))]
    assert [e.name for e in cpio.read_newc(stream[spans[1][0]:sum(spans[1])])] == ["usr", "usr/agent"]
    for broken in (stream[:-20], stream[:len(first) + 8 + 200], stream + b"junk"):
        with pytest.raises(SystemExit) as info:
            module.newc_archives(io.BytesIO(broken), len(broken))
        assert info.value.code == 1


@given(st.binary(max_size=2048), st.integers(0, 300))
@settings(max_examples=300)
def test_newc_archives_on_hostile_bytes_ends_or_refuses(data, cut):
    """Random or truncated streams: a list of spans, or a clean refusal (exit 1); never a hang or a crash."""
    import io

    from ansible_collections.stiefel.system.plugins.module_utils import cpio

    module = _load_ctl()
    for stream in (data, (cpio.write_newc([cpio.CpioEntry.file("x", data, 0o644)]) + data)[:cut + 110]):
        try:
            spans = module.newc_archives(io.BytesIO(stream), len(stream))
        except SystemExit as exc:
            assert exc.code == 1
        else:
            assert all(0 <= off and 0 < length and off + length <= len(stream) for off, length in spans)
