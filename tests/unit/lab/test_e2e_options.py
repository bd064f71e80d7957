"""lab.e2e's flow options and lab.qemu's network-boot NIC: what the netboot scenario relies on."""

from __future__ import annotations

# pylint: disable=protected-access  # the argv a VM would start with is what is checked

import pytest

from lab import e2e, e2e_netboot
from lab.qemu import VM


@pytest.mark.parametrize("argv", [
    ["create", "--laptop-generator", "dracut"],
    ["converge", "--desktop", "netboot"],
    ["verify", "--laptop-generator", "initramfs-tools", "--desktop", "netboot"],
])
def test_only_the_two_proven_flows_are_accepted(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        e2e.main(argv)
    assert exc.value.code == 2 and "supported:" in capsys.readouterr().err


def test_netboot_flow_dispatches_to_its_own_module(monkeypatch):
    seen = []
    monkeypatch.setattr(e2e_netboot, "destroy", lambda args: seen.append(("netboot", args.step)))
    monkeypatch.setattr(e2e, "destroy", lambda args: seen.append(("stick", args.step)))
    assert e2e.main(["destroy", "--laptop-generator", "dracut", "--desktop", "netboot"]) == 0
    assert e2e.main(["destroy"]) == 0
    assert seen == [("netboot", "destroy"), ("stick", "destroy")]


def test_the_netboot_scenario_has_its_own_namespace_and_macs():
    assert e2e_netboot.SUFFIX != "e2e"
    assert {e2e_netboot.LAPTOP_MAC, e2e_netboot.DESKTOP_MAC}.isdisjoint({e2e.LAPTOP_MAC, e2e.DESKTOP_MAC})


def test_network_boot_nic_skips_the_option_rom(tmp_path):
    vm = VM("desktop", str(tmp_path)).nic("stftap1", "52:54:00:5f:01:02", bootindex=0, romfile="")
    assert vm._extra[-1] == "virtio-net-pci,netdev=n0,mac=52:54:00:5f:01:02,bootindex=0,romfile="
    plain = VM("laptop", str(tmp_path)).nic("stftap0", "52:54:00:5f:01:01")
    assert plain._extra[-1] == "virtio-net-pci,netdev=n0,mac=52:54:00:5f:01:01"
