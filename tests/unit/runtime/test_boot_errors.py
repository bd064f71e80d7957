"""Errors on the server's /boot path: a bad /boot is logged and the server serves on."""
from __future__ import annotations

import importlib
import inspect
import io
import json
import pkgutil

import pytest

from ansible_collections.stiefel.system.plugins import module_utils
from ansible_collections.stiefel.system.plugins.module_utils.errors import StiefelError
import stiefel_runtime
from stiefel_runtime import bootfiles, server
from stiefel_runtime.common import Console

KEY = bytes(range(32))


def _boot_with_kernel_link_outside(tmp_path):
    """A /boot whose boot.json names a kernel that is a symlink to a file outside /boot."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "vmlinuz").write_bytes(b"K" * 4096)
    boot = tmp_path / "boot"
    (boot / "stiefel").mkdir(parents=True)
    (boot / "vmlinuz-6.1.0-9-amd64").symlink_to(tmp_path / "outside" / "vmlinuz")
    (boot / "initrd.img-6.1.0-9-amd64").write_bytes(b"I" * 4096)
    config = dict(format="stiefel-boot-config", version=1, kernel="vmlinuz-6.1.0-9-amd64", root="UUID=r",
                  initrd=["initrd.img-6.1.0-9-amd64"], cmdline="root=UUID=r ro")
    (boot / "stiefel" / "boot.json").write_text(json.dumps(config))
    return boot


def test_kernel_symlink_out_of_boot_is_logged_not_raised(tmp_path):
    boot = _boot_with_kernel_link_outside(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    out = io.StringIO()
    agent = server.ServerAgent(KEY, Console("stiefel-server", stream=out), run_dir=str(run_dir),
                               boot_dir=str(boot))
    agent.prepare_boot()
    assert "cannot read the laptop's /boot" in out.getvalue()
    assert "leaves the boot directory" in out.getvalue()
    assert agent.state.source is None  # nothing outside /boot is offered as payload


def _library_modules():
    for package in (module_utils, stiefel_runtime):
        for info in pkgutil.iter_modules(package.__path__):
            if info.name == "__main__":
                continue
            yield importlib.import_module(package.__name__ + "." + info.name)


@pytest.mark.parametrize("module", list(_library_modules()), ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_every_library_exception_is_a_stiefel_error(module):
    own = [obj for _name, obj in inspect.getmembers(module, inspect.isclass)
           if issubclass(obj, BaseException) and obj.__module__ == module.__name__]
    assert [cls.__name__ for cls in own if not issubclass(cls, StiefelError)] == []


def _bls_boot(tmp_path, linux, initrd):
    boot = tmp_path / "boot"
    (boot / "loader" / "entries").mkdir(parents=True)
    (boot / "loader" / "entries" / "debian.conf").write_text(
        "title Debian\nlinux %s\ninitrd %s\noptions root=UUID=x ro\n" % (linux, initrd))
    return boot


def test_bls_entry_through_a_directory_link_out_of_boot_is_not_served(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "vmlinuz").write_bytes(b"K")
    (outside / "initrd.img").write_bytes(b"I")
    boot = _bls_boot(tmp_path, "/evil/vmlinuz", "/evil/initrd.img")
    (boot / "evil").symlink_to(outside)
    with pytest.raises(StiefelError, match="no boot config, BLS entry or grub.cfg entry"):
        bootfiles.find_boot_files(str(boot))


def test_absolute_links_inside_boot_are_followed_as_the_laptop_sees_them(tmp_path):
    boot = _bls_boot(tmp_path, "/vmlinuz", "/initrd.img")
    (boot / "vmlinuz-6.1.0-9-amd64").write_bytes(b"K" * 10)
    (boot / "initrd.img-6.1.0-9-amd64").write_bytes(b"I" * 10)
    (boot / "vmlinuz").symlink_to("/boot/vmlinuz-6.1.0-9-amd64")  # /boot of the laptop, not of this host
    (boot / "initrd.img").symlink_to("initrd.img-6.1.0-9-amd64")
    kernel, initrds, cmdline, source = bootfiles.find_boot_files(str(boot))
    assert kernel == str(boot / "vmlinuz-6.1.0-9-amd64") and initrds == [str(boot / "initrd.img-6.1.0-9-amd64")]
    assert cmdline == "root=UUID=x ro" and source == "BLS entry /boot/loader/entries/debian.conf"
