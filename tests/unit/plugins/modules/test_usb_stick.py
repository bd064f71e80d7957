"""Unit tests for the usb_stick and usb_target modules (and the usb_image helpers they use).

The stick builds use the real tools (sfdisk, mkfs.fat, mtools, syslinux) on a small image file in
tmp_path with a dummy kernel/initrd; they take about a second. Skipped if the tools are missing.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.stiefel.system.plugins.module_utils import usb_image
from ansible_collections.stiefel.system.plugins.modules import usb_stick, usb_target

KEY = b"stiefel-key-v1:" + b"5a" * 32 + b"\n"
TOOLS = ("sfdisk", "mkfs.fat", "mcopy", "mmd", "syslinux")
needs_tools = pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS) or not os.path.exists(
    usb_image.SYSTEMD_BOOT_CANDIDATES[0]), reason="stick tools (sfdisk, dosfstools, mtools, syslinux, "
                                                  "systemd-boot-efi) not installed")


def run_module(module, args, capsys, check_mode=False):
    if check_mode:
        args = dict(args, _ansible_check_mode=True)
    with patch_module_args(args):
        with pytest.raises(SystemExit) as exc:
            module.main()
    out = capsys.readouterr().out
    return exc.value.code, json.loads(out), out


@pytest.fixture
def inputs(tmp_path):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"K" * 300000)
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"I" * 500000)
    key = tmp_path / "key"
    key.write_bytes(KEY)
    key.chmod(0o600)
    return {"kernel": str(kernel), "initrd": str(initrd), "key_path": str(key),
            "work_dir": str(tmp_path / "work"), "esp_size_mib": 64, "uefi_loader": "systemd-boot"}


# --------------------------------------------------------------------------- usb_target
def test_usb_target_refuses_dev_null(capsys):
    rc, result, _unused = run_module(usb_target, {"path": "/dev/null"}, capsys)
    assert rc == 1 and result["failed"]
    assert "character device" in result["msg"] and result["target"]["kind"] == "other"


def test_usb_target_reports_without_failing(capsys, tmp_path):
    rc, result, _unused = run_module(usb_target, {"path": str(tmp_path), "fail_on_refusal": False}, capsys)
    assert rc == 0 and not result["changed"] and "directory" in result["target"]["refusals"][0]


def test_usb_target_accepts_new_image(capsys, tmp_path):
    rc, result, _unused = run_module(usb_target, {"path": str(tmp_path / "s.img"), "create_size": "1G"}, capsys)
    assert rc == 0 and result["target"]["ok"] and result["target"]["size"] == 1 << 30
    assert not (tmp_path / "s.img").exists()


def test_usb_target_bad_size(capsys, tmp_path):
    rc, result, _unused = run_module(usb_target, {"path": str(tmp_path / "s.img"), "create_size": "lots"}, capsys)
    assert rc == 1 and "bad size" in result["msg"]


# --------------------------------------------------------------------------- usb_stick
def test_check_mode_plans_and_touches_nothing(capsys, tmp_path, inputs):
    target = str(tmp_path / "stick.img")
    args = dict(inputs, target=target, image_size="100M")
    rc, result, out = run_module(usb_stick, args, capsys, check_mode=True)
    assert rc == 0 and result["changed"]
    assert "confirmation missing" in json.dumps(result.get("warnings", []))
    assert result["plan"]["partitions"][0]["size"] == 64 << 20
    assert not os.path.exists(target) and not os.path.exists(inputs["work_dir"])
    assert KEY.decode().strip() not in out


def test_missing_confirmation_fails(capsys, tmp_path, inputs):
    target = str(tmp_path / "stick.img")
    rc, result, _unused = run_module(usb_stick, dict(inputs, target=target, image_size="100M", confirm="/dev/sda"),
                                     capsys)
    assert rc == 1 and "confirmation missing" in result["msg"] and not os.path.exists(target)


@pytest.mark.parametrize("bad", [b"", b"stiefel-key-v1:" + b"AB" * 32 + b"\n", KEY.strip(), b"x" * 5000])
def test_invalid_key_fails_without_echo(capsys, tmp_path, inputs, bad):
    with open(inputs["key_path"], "wb") as handle:
        handle.write(bad)
    target = str(tmp_path / "stick.img")
    rc, result, out = run_module(usb_stick, dict(inputs, target=target, confirm=target, image_size="100M"),
                                 capsys)
    assert rc == 1 and "invalid stiefel key" in result["msg"]
    for secret in ("ABABABAB", "5a5a5a5a", "xxxxxxxx"):
        assert secret not in out


def test_target_too_small(capsys, tmp_path, inputs):
    target = str(tmp_path / "stick.img")
    rc, result, _unused = run_module(usb_stick, dict(inputs, target=target, confirm=target, image_size="32M"), capsys)
    assert rc == 1 and "needs at least 66 MiB" in result["msg"]


@needs_tools
def test_write_then_idempotent_then_rewrite_on_new_key(capsys, tmp_path, inputs):
    target = str(tmp_path / "stick.img")
    progress = str(tmp_path / "progress")
    args = dict(inputs, target=target, confirm=target, image_size="100M", progress_file=progress)
    rc, result, out = run_module(usb_stick, args, capsys)
    assert rc == 0 and result["changed"], result
    assert os.path.getsize(target) == 100 << 20
    assert result["bytes_written"] == (65 << 20) + 33 * 512
    assert len(result["sha256"]) == 2 and set(result["stages"]) == {"build", "write", "verify"}
    lines = open(progress).read().splitlines()
    assert lines[0] == "stage start" and lines[-1] == "stage done"
    assert [ln for ln in lines if ln.startswith("progress")] == ["progress %d" % p for p in range(10, 101, 10)]
    assert KEY.decode().strip() not in out
    assert not os.path.exists(os.path.join(inputs["work_dir"], "stick-build.img"))
    assert usb_image.read_esp_file(target, "stiefel/key.cpio") == usb_image.key_archive(KEY)

    rc, result, _unused = run_module(usb_stick, args, capsys)
    assert rc == 0 and not result["changed"] and "already holds" in result["reason"]
    rc, result, _unused = run_module(usb_stick, args, capsys, check_mode=True)
    assert rc == 0 and not result["changed"]

    with open(inputs["key_path"], "wb") as handle:
        handle.write(b"stiefel-key-v1:" + b"c3" * 32 + b"\n")
    rc, result, _unused = run_module(usb_stick, args, capsys, check_mode=True)
    assert rc == 0 and result["changed"] and "key differs" in result["reason"]
    rc, result, _unused = run_module(usb_stick, args, capsys)
    assert rc == 0 and result["changed"]
    rc, result, _unused = run_module(usb_stick, args, capsys)
    assert not result["changed"]


# --------------------------------------------------------------------------- usb_image helpers
@pytest.mark.parametrize("text,value", [("", 0), ("1G", 1 << 30), ("512M", 512 << 20), ("2GiB", 2 << 30),
                                        ("4096", 4096), (" 3 k ", 3072), (7, 7)])
def test_parse_size(text, value):
    assert usb_image.parse_size(text) == value


@pytest.mark.parametrize("text", ["1.5G", "-1", "G", "1X", "1 G B"])
def test_parse_size_rejects(text):
    with pytest.raises(usb_image.StickError):
        usb_image.parse_size(text)


def test_fat32_cluster_size_keeps_fat32_valid():
    for mib in (64, 128, 256, 300, 512, 1024, 4096):
        sectors = mib << 11
        spc = usb_image.fat32_cluster_sectors(sectors)
        assert sectors // spc >= 65525 and spc in (1, 2, 4, 8)


def test_boot_configs_carry_cmdline_not_key(inputs):
    spec = usb_image.StickSpec(inputs["kernel"], inputs["initrd"], KEY, "stiefel.debug", 64, 100 << 20)
    entry, sysl = spec.systemd_boot_entry(), spec.syslinux_cfg()
    assert "options console=tty0 console=ttyS0,115200 stiefel.role=client stiefel.debug\n" in entry
    assert entry.count("initrd ") == 2
    assert "initrd=/stiefel/initrd.img,/stiefel/key.cpio console=tty0" in sysl
    for text in (entry, sysl, spec.loader_conf(), json.dumps(spec.manifest()), json.dumps(spec.plan())):
        assert "5a5a5a" not in text
    assert spec.regions() == [(0, 65 << 20), ((100 << 20) - 33 * 512, 33 * 512)]
    with pytest.raises(usb_image.StickError):
        usb_image.StickSpec(inputs["kernel"], inputs["initrd"], KEY, "a\nb", 64, 100 << 20).validate()
