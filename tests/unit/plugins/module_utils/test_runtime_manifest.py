"""The runtime manifest: what each target gets of the collection, from the real tree and from a fake one."""

from __future__ import annotations

import os
import stat

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import runtime_manifest as rm

CONTROLLER_ONLY = ("ramdisk_build.py", "ramdisk_apt.py", "ramdisk_modules.py", "ramdisk_pack.py", "ramdisk_strip.py",
                   "usb_image.py", "runtime_manifest.py")


def _names(entries):
    return {entry.dest.rsplit("/", 1)[-1] for entry in entries}


@pytest.mark.parametrize("target", sorted(rm.TARGETS))
def test_no_target_gets_controller_code(target):
    entries = rm.entries(target)
    dests = [entry.dest for entry in entries]
    assert len(dests) == len(set(dests))
    assert not _names(entries) & set(CONTROLLER_ONLY)
    assert not any(entry.src.split(os.sep)[-2] == "modules" for entry in entries)
    for entry in entries:
        assert os.path.isfile(entry.src)
        assert entry.mode == (0o755 if entry.dest.startswith("agents/") else 0o644)
        assert entry.dest.startswith(("agents/", rm.RUNTIME_DEST + "/", rm.MODULE_UTILS_DEST + "/"))


def test_each_target_gets_its_agents_and_what_they_import():
    laptop = _names(rm.entries("laptop"))
    standalone = _names(rm.entries("standalone"))
    ramdisk = _names(rm.entries("ramdisk"))
    assert "stiefel-autokexec" in laptop and "stiefel-server" not in laptop
    assert {"autokexec.py", "messages.py", "keyschedule.py", "netlink.py", "kexec.py"} <= laptop
    assert "server.py" not in laptop and "payload.py" not in laptop
    assert "stiefel-server" in standalone and "stiefel-autokexec" not in standalone
    assert {"server.py", "payload.py", "nbd_export.py", "blockdev.py", "bootfiles.py"} <= standalone
    assert "client.py" not in standalone
    assert {"whendone.py", "powerwatch.py"} <= laptop  # tools, not agents: the laptop's OS runs them on the desktop
    assert (laptop - {"whendone.py", "powerwatch.py"}) | standalone <= ramdisk
    assert {"stiefel-client", "client.py"} <= ramdisk


def test_closure_follows_both_import_forms(tmp_path):
    (tmp_path / "stiefel_runtime").mkdir()
    (tmp_path / "plugins" / "module_utils").mkdir(parents=True)
    (tmp_path / "agents").mkdir()
    (tmp_path / "stiefel_runtime" / "__init__.py").write_text("")
    (tmp_path / "stiefel_runtime" / "__main__.py").write_text("import importlib\n")
    (tmp_path / "stiefel_runtime" / "server.py").write_text(
        "import os\nfrom stiefel_runtime import helper\n"
        "from ansible_collections.stiefel.system.plugins.module_utils.errors import StiefelError\n")
    (tmp_path / "stiefel_runtime" / "helper.py").write_text(
        "def f():\n    from ansible_collections.stiefel.system.plugins.module_utils import keyfile\n")
    for name in ("errors", "keyfile", "unused"):
        (tmp_path / "plugins" / "module_utils" / (name + ".py")).write_text("")
    (tmp_path / "agents" / "stiefel-server").write_text("#!/usr/bin/python3\n")
    dests = [entry.dest for entry in rm.entries("standalone", str(tmp_path))]
    assert dests == ["agents/stiefel-server",
                     rm.MODULE_UTILS_DEST + "/errors.py", rm.MODULE_UTILS_DEST + "/keyfile.py",
                     "python/stiefel_runtime/__init__.py", "python/stiefel_runtime/__main__.py",
                     "python/stiefel_runtime/helper.py", "python/stiefel_runtime/server.py"]
    assert rm.directories(rm.entries("standalone", str(tmp_path))) == [
        "agents", "python", "python/ansible_collections", "python/stiefel_runtime",
        "python/ansible_collections/stiefel", "python/ansible_collections/stiefel/system",
        "python/ansible_collections/stiefel/system/plugins", rm.MODULE_UTILS_DEST]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(rm.ManifestError, match="unknown target 'desktop'"):
        rm.entries("desktop")
    with pytest.raises(rm.ManifestError, match="stiefel_runtime/__init__.py is not in the collection"):
        rm.entries("laptop", str(tmp_path))
    (tmp_path / "stiefel_runtime").mkdir()
    for name in ("__init__", "__main__", "autokexec", "whendone", "powerwatch"):
        (tmp_path / "stiefel_runtime" / (name + ".py")).write_text("")
    with pytest.raises(rm.ManifestError, match="agent shim .*stiefel-autokexec is missing"):
        rm.entries("laptop", str(tmp_path))
    (tmp_path / "agents").mkdir()
    (tmp_path / "agents" / "stiefel-autokexec").write_text("")
    (tmp_path / "stiefel_runtime" / "autokexec.py").write_text("def broken(:\n")
    with pytest.raises(rm.ManifestError, match="cannot read .*autokexec.py"):
        rm.entries("laptop", str(tmp_path))
    assert isinstance(rm.ManifestError("x"), rm.StiefelError)


def test_shims_are_executable_in_the_tree():
    for entry in rm.entries("ramdisk"):
        if entry.dest.startswith("agents/"):
            assert os.stat(entry.src).st_mode & stat.S_IXUSR, entry.src
