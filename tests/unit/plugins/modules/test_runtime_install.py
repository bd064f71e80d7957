"""runtime_install: one module run writes a target's runtime tree, idempotently, and refuses odd input."""

from __future__ import annotations

import base64
import os
import stat

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import runtime_manifest
from ansible_collections.stiefel.system.plugins.modules import runtime_install
from lab import ansible_output


def run_module(capsys, **args):
    return ansible_output.run_module_main(runtime_install, capsys, **args)


def laptop_files():
    files = []
    for entry in runtime_manifest.entries("laptop"):
        item = entry.as_dict()
        with open(entry.src, "rb") as handle:
            item["content"] = base64.b64encode(handle.read()).decode()
        files.append(item)
    return files


def test_check_install_again_and_a_changed_file(tmp_path, capsys):
    root = tmp_path / "lib"
    files = laptop_files()
    result = run_module(capsys, path=str(root), files=files, _ansible_check_mode=True, _ansible_diff=True)
    assert result["changed"] and len(result["changed_files"]) == len(files) == result["files"]
    assert not root.exists()
    assert result["diff"]["before"].startswith("absent ")

    result = run_module(capsys, path=str(root), files=files)
    assert result["changed"] and len(result["changed_files"]) == len(files)
    for item in files:
        target = root / item["dest"]
        assert target.read_bytes() == base64.b64decode(item["content"])
        assert stat.S_IMODE(target.stat().st_mode) == int(item["mode"], 8)

    for check in (True, False):
        result = run_module(capsys, path=str(root), files=files, _ansible_check_mode=check)
        assert not result["changed"] and result["changed_files"] == []

    shim = next(item for item in files if item["dest"].startswith("agents/"))
    (root / shim["dest"]).chmod(0o644)
    other = next(item for item in files if item["dest"].endswith(".py"))
    (root / other["dest"]).write_text("# edited on the target\n")
    result = run_module(capsys, path=str(root), files=files, _ansible_diff=True)
    assert sorted(result["changed_files"]) == sorted([shim["dest"], other["dest"]])
    assert stat.S_IMODE((root / shim["dest"]).stat().st_mode) == 0o755
    assert (root / other["dest"]).read_bytes() == base64.b64decode(other["content"])
    assert other["dest"] in result["diff"]["after"]


def test_a_symlink_in_place_of_a_file_is_replaced_not_followed(tmp_path, capsys):
    root = tmp_path / "lib"
    outside = tmp_path / "outside"
    outside.write_text("keep me\n")
    (root / "agents").mkdir(parents=True)
    os.symlink(str(outside), str(root / "agents" / "tool"))
    item = {"dest": "agents/tool", "mode": "0755", "content": base64.b64encode(b"#!/bin/sh\n").decode()}
    result = run_module(capsys, path=str(root), files=[item])
    assert result["changed_files"] == ["agents/tool"]
    assert not (root / "agents" / "tool").is_symlink()
    assert outside.read_text() == "keep me\n"


@pytest.mark.parametrize("item, message", [
    ({"dest": "../etc/passwd", "mode": "0644", "content": ""}, "must be a plain path"),
    ({"dest": "/etc/passwd", "mode": "0644", "content": ""}, "must be a plain path"),
    ({"dest": "a/./b", "mode": "0644", "content": ""}, "must be a plain path"),
    ({"dest": "", "mode": "0644", "content": ""}, "must be a plain path"),
    ({"dest": "a", "mode": "4755", "content": ""}, "octal mode up to 0777"),
    ({"dest": "a", "mode": "rwx", "content": ""}, "octal mode up to 0777"),
    ({"dest": "a", "mode": "0644", "content": "not base64!"}, "is not base64"),
])
def test_odd_entries_are_refused_and_nothing_is_written(tmp_path, capsys, item, message):
    root = tmp_path / "lib"
    good = {"dest": "good", "mode": "0644", "content": base64.b64encode(b"x").decode()}
    result = run_module(capsys, path=str(root), files=[good, item])
    assert result["rc"] == 1 and result["failed"]
    assert message in result["msg"]
    assert not root.exists()


def test_relative_path_is_refused(capsys):
    result = run_module(capsys, path="lib", files=[])
    assert result["failed"] and "must be absolute" in result["msg"]
