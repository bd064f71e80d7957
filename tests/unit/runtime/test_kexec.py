from __future__ import annotations

import os
import subprocess

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import cpio
from stiefel_runtime import kexec, lockdown


class Recorder(object):
    def __init__(self, rcs):
        self.rcs = list(rcs)
        self.calls = []

    def __call__(self, argv, **kwargs):
        self.calls.append(argv)
        return subprocess.CompletedProcess(argv, self.rcs.pop(0), stdout=b"boom" if self.calls else b"")


def _files(tmp_path):
    kernel = tmp_path / "vmlinuz"
    initrd = tmp_path / "initrd"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    return str(kernel), str(initrd)


def test_file_load_first(tmp_path):
    kernel, initrd = _files(tmp_path)
    run = Recorder([0])
    argv = kexec.load(kernel, initrd, "console=ttyS0 a=b", run=run, log=lambda s: None)
    assert run.calls == [["kexec", "-s", "-l", "--initrd=" + initrd, "--command-line=console=ttyS0 a=b", kernel]]
    assert argv[:3] == ["kexec", "-s", "-l"]


@pytest.fixture(autouse=True)
def not_locked_down(tmp_path, monkeypatch):
    """This host's own kernel may be locked down; each test says which state it means."""
    state = tmp_path / "lockdown"
    state.write_text("[none] integrity confidentiality\n")
    monkeypatch.setattr(lockdown, "LOCKDOWN_PATH", str(state))
    return state


def test_no_kexec_load_fallback_under_lockdown(tmp_path, not_locked_down):
    not_locked_down.write_text("none [integrity] confidentiality\n")
    kernel, initrd = _files(tmp_path)
    run = Recorder([1, 0])
    lines = []
    with pytest.raises(kexec.KexecError, match="could not load"):
        kexec.load(kernel, initrd, "x", run=run, log=lines.append)
    assert [c[:3] for c in run.calls] == [["kexec", "-s", "-l"]]
    assert "locked down" in lines[-1]


def test_falls_back_to_kexec_load(tmp_path):
    kernel, initrd = _files(tmp_path)
    run = Recorder([1, 0])
    argv = kexec.load(kernel, initrd, "x", run=run, log=lambda s: None)
    assert [c[:3] for c in run.calls] == [["kexec", "-s", "-l"], ["kexec", "-c", "-l"]]
    assert argv[1] == "-c"


def test_both_fail(tmp_path):
    kernel, initrd = _files(tmp_path)
    with pytest.raises(kexec.KexecError, match="could not load"):
        kexec.load(kernel, initrd, "x", run=Recorder([1, 1]), log=lambda s: None)


def test_execute_only_returns_in_dry_run():
    lines = []
    kexec.execute(run=None, log=lines.append, dry_run=True)
    assert lines == ["dry-run: would run: kexec -e"]
    with pytest.raises(kexec.KexecError, match="returned"):
        kexec.execute(run=Recorder([1]), log=lines.append)


def test_dry_run_never_runs(tmp_path):
    lines = []
    kexec.load_and_execute("/nonexistent/k", "/nonexistent/i", "a b", run=None, log=lines.append, dry_run=True)
    assert lines[0].startswith("dry-run: would run: kexec -s -l --initrd=/nonexistent/i '--command-line=a b'")


@pytest.mark.parametrize("cmdline", ["a\nb", "a\0b", "x" * 5000])
def test_bad_cmdline(cmdline):
    with pytest.raises(kexec.KexecError):
        kexec.load_argvs("/k", None, cmdline)


def test_missing_kernel(tmp_path):
    with pytest.raises(kexec.KexecError, match="does not exist"):
        kexec.load(str(tmp_path / "nope"), None, "", run=Recorder([0]), log=lambda s: None)


def test_concat_aligns_appended_cpio(tmp_path):
    part = tmp_path / "initrd"
    part.write_bytes(b"\x28\xb5\x2f\xfd" + b"z" * 7)  # 11 bytes, like an unaligned compressed initrd
    extra = cpio.key_archive("stiefel-key-v1:" + "ab" * 32 + "\n")
    out = tmp_path / "out"
    size = kexec.concat_files(str(out), [str(part)], extra)
    data = out.read_bytes()
    assert size == len(data) == 12 + len(extra)
    assert data[:11] == part.read_bytes() and data[11:12] == b"\0"
    assert cpio.read_newc(data[12:])[-1].name == "etc/stiefel/key"
    assert os.stat(out).st_mode & 0o777 == 0o600


def test_concat_aligns_every_part(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.write_bytes(b"a" * 5)
    second.write_bytes(b"070701")
    out = tmp_path / "out"
    kexec.concat_files(str(out), [str(first), str(second)], b"070701x")
    assert out.read_bytes() == b"a" * 5 + b"\0" * 3 + b"070701" + b"\0" * 2 + b"070701x"
