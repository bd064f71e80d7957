"""Unit tests for plugins/module_utils/blockdev.py against a fake /sys, /proc and /dev."""

from __future__ import annotations

import os
import stat

import pytest
from hypothesis import given, strategies as st

from ansible_collections.stiefel.system.plugins.module_utils import blockdev

MOUNTINFO_ROOT_VDA = "22 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"


class FakeStat:
    def __init__(self, mode, rdev=0, size=0):
        self.st_mode = mode
        self.st_rdev = rdev
        self.st_size = size


class FakeView(blockdev.HostView):
    """Block devices described as a dict; sysfs paths are synthesised like the kernel's."""

    def __init__(self, disks, mountinfo="", swaps="Filename Type Size Used Priority\n", files=None):
        super().__init__(sys_root="/sys", proc_root="/proc")
        self.files = dict(files or {})  # path -> FakeStat for non-block paths
        self.nodes = {}  # /dev/name -> devno
        self.dirs = {}  # sysfs canonical dir -> attributes dict
        self.names = {}  # name -> canonical dir
        self.text = {"/proc/self/mountinfo": mountinfo, "/proc/swaps": swaps}
        for disk, spec in disks.items():
            base = "/sys/devices/virtual/block/%s" % disk
            self._add(disk, base, spec, partition=False)
            for i, part in enumerate(spec.get("parts", []), start=1):
                self._add(part["name"], base + "/" + part["name"], part, partition=True, index=i)

    def _add(self, name, path, spec, partition, index=0):
        devno = spec["devno"]
        attrs = {"dev": "%d:%d\n" % devno, "size": str(spec.get("sectors", 2048)),
                 "ro": "1" if spec.get("ro") else "0", "removable": "1" if spec.get("removable") else "0"}
        if partition:
            attrs["partition"] = str(index)
        self.dirs[path] = attrs
        self.dirs[path]["holders"] = spec.get("holders", [])
        self.dirs[path]["slaves"] = spec.get("slaves", [])
        self.names[name] = path
        self.nodes["/dev/" + name] = devno

    # HostView seams ---------------------------------------------------------------
    def stat(self, path):
        if path in self.nodes:
            major, minor = self.nodes[path]
            return FakeStat(stat.S_IFBLK | 0o600, os.makedev(major, minor))
        if path in self.files:
            return self.files[path]
        raise FileNotFoundError(path)

    def realpath(self, path):
        if path.startswith("/sys/dev/block/"):
            major, minor = (int(x) for x in path.rsplit("/", 1)[1].split(":"))
            for name, devno in self.nodes.items():
                if devno == (major, minor):
                    return self.names[name[5:]]
        if path.startswith("/sys/class/block/"):
            return self.names[path.split("/")[4]]
        return path

    def exists(self, path):
        if path.startswith("/sys/dev/block/"):
            return self.realpath(path) != path
        directory, leaf = os.path.split(path)
        if path in self.dirs:
            return True
        return directory in self.dirs and leaf in self.dirs[directory] and not isinstance(
            self.dirs[directory][leaf], list)

    def isdir(self, path):
        return path in ("/tmp", "/srv") or path in self.dirs

    def listdir(self, path):
        if path.startswith("/sys/class/block/"):
            parts = path.split("/")
            path = "/".join([self.names.get(parts[4], "/nonexistent")] + parts[5:])
        directory, leaf = os.path.split(path)
        if directory in self.dirs and isinstance(self.dirs[directory].get(leaf), list):
            return list(self.dirs[directory][leaf])
        if path in self.dirs:
            return sorted(os.path.basename(d) for d in self.dirs if os.path.dirname(d) == path)
        return []

    def read_text(self, path):
        if path in self.text:
            return self.text[path]
        if path.startswith("/sys/class/block/"):
            parts = path.split("/")
            path = "/".join([self.names[parts[4]]] + parts[5:])
        directory, leaf = os.path.split(path)
        if directory in self.dirs and leaf in self.dirs[directory]:
            value = self.dirs[directory][leaf]
            if not isinstance(value, list):
                return value
        raise FileNotFoundError(path)


def stick_disks(**extra):
    disks = {
        "vda": {"devno": (254, 0), "sectors": 500000000},
        "sdb": {"devno": (8, 16), "sectors": 15633408, "removable": True,
                "parts": [{"name": "sdb1", "devno": (8, 17)}, {"name": "sdb2", "devno": (8, 18)}]},
    }
    disks.update(extra)
    return disks


def test_clean_stick_is_accepted():
    info = blockdev.inspect_target("/dev/sdb", FakeView(stick_disks(), MOUNTINFO_ROOT_VDA))
    assert info.ok, info.refusals
    assert info.kind == "disk" and info.size == 15633408 * 512 and info.removable
    assert info.partitions == ["sdb1", "sdb2"]


def test_partition_is_refused():
    info = blockdev.inspect_target("/dev/sdb1", FakeView(stick_disks(), MOUNTINFO_ROOT_VDA))
    assert info.kind == "partition"
    assert any("is partition sdb1 of disk /dev/sdb" in r for r in info.refusals)


def test_mounted_partition_is_refused():
    mounts = MOUNTINFO_ROOT_VDA + "40 22 8:18 / /media/my\\040stick rw - vfat /dev/sdb2 rw\n"
    info = blockdev.inspect_target("/dev/sdb", FakeView(stick_disks(), mounts))
    assert info.mounted == ["/dev/sdb2 on /media/my stick"]
    assert any("mounted" in r for r in info.refusals)


def test_mounted_whole_disk_is_refused():
    mounts = MOUNTINFO_ROOT_VDA + "40 22 8:16 / /mnt rw - ext4 /dev/sdb rw\n"
    assert not blockdev.inspect_target("/dev/sdb", FakeView(stick_disks(), mounts)).ok


def test_system_disk_is_refused_directly_and_through_device_mapper():
    info = blockdev.inspect_target("/dev/vda", FakeView(stick_disks(), MOUNTINFO_ROOT_VDA))
    assert info.system_mounts == ["/"] and any("holds the running system" in r for r in info.refusals)
    # / on dm-0 (LUKS) on nvme0n1p2; /boot on nvme0n1p1: the nvme disk is refused for both.
    disks = {"nvme0n1": {"devno": (259, 0), "parts": [
        {"name": "nvme0n1p1", "devno": (259, 1)},
        {"name": "nvme0n1p2", "devno": (259, 2), "holders": ["dm-0"]}]},
        "dm-0": {"devno": (253, 0), "slaves": ["nvme0n1p2"]}}
    mounts = ("22 1 253:0 / / rw - ext4 /dev/mapper/root rw\n"
              "30 22 259:1 / /boot rw - ext4 /dev/nvme0n1p1 rw\n")
    info = blockdev.inspect_target("/dev/nvme0n1", FakeView(disks, mounts))
    assert info.system_mounts == ["/", "/boot"]
    assert "dm-0" in info.holders
    assert any("holds the running system (/, /boot" in r for r in info.refusals)


def test_btrfs_style_anonymous_devno_uses_source_node():
    mounts = "22 1 0:31 / / rw - btrfs /dev/sdb1 rw\n"
    info = blockdev.inspect_target("/dev/sdb", FakeView(stick_disks(), mounts))
    assert "/" in info.system_mounts and info.mounted


def test_swap_and_holders_are_refused():
    swaps = "Filename Type Size Used Priority\n/dev/sdb2 partition 1 0 -2\n"
    info = blockdev.inspect_target("/dev/sdb", FakeView(stick_disks(), MOUNTINFO_ROOT_VDA, swaps))
    assert any("swap" in r for r in info.refusals)
    disks = stick_disks()
    disks["sdb"]["parts"][0]["holders"] = ["md0"]
    disks["md0"] = {"devno": (9, 0), "slaves": ["sdb1"]}
    info = blockdev.inspect_target("/dev/sdb", FakeView(disks, MOUNTINFO_ROOT_VDA))
    assert any("/dev/md0" in r for r in info.refusals)


def test_read_only_and_empty_are_refused():
    disks = stick_disks(sdc={"devno": (8, 32), "ro": True}, sdd={"devno": (8, 48), "sectors": 0})
    view = FakeView(disks, MOUNTINFO_ROOT_VDA)
    assert any("read-only" in r for r in blockdev.inspect_target("/dev/sdc", view).refusals)
    assert any("size 0" in r for r in blockdev.inspect_target("/dev/sdd", view).refusals)


@pytest.mark.parametrize("mode,word", [(stat.S_IFCHR, "character device"), (stat.S_IFDIR, "directory"),
                                       (stat.S_IFIFO, "FIFO"), (stat.S_IFSOCK, "socket")])
def test_non_block_non_file_is_refused(mode, word):
    view = FakeView(stick_disks(), MOUNTINFO_ROOT_VDA, files={"/x": FakeStat(mode | 0o644)})
    info = blockdev.inspect_target("/x", view)
    assert info.kind == "other" and word in info.refusals[0]


def test_image_files():
    view = FakeView(stick_disks(), MOUNTINFO_ROOT_VDA,
                    files={"/srv/stick.img": FakeStat(stat.S_IFREG | 0o644, size=1 << 30)})
    info = blockdev.inspect_target("/srv/stick.img", view)
    assert info.ok and info.kind == "file" and info.size == 1 << 30
    assert blockdev.inspect_target("/srv/new.img", view, create_size=1 << 29).ok
    assert "set an image size" in blockdev.inspect_target("/srv/new.img", view).refusals[0]
    assert "parent directory" in blockdev.inspect_target("/nope/new.img", view, create_size=1).refusals[0]
    assert "no such device" in blockdev.inspect_target("/dev/sdz", view, create_size=1 << 30).refusals[0]
    assert "not an absolute path" in blockdev.inspect_target("stick.img", view).refusals[0]


def test_parse_mountinfo_examples():
    text = ("36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
            "37 36 8:1 / /with\\040space rw - vfat /dev/sda1 rw\n"
            "garbage line\n")
    mounts = blockdev.parse_mountinfo(text)
    assert mounts[0] == blockdev.Mount((98, 0), "/mnt/parent", "ext3", "/dev/root")
    assert mounts[1].mountpoint == "/with space"
    assert len(mounts) == 2


@given(st.text(max_size=400))
def test_parse_mountinfo_hostile(text):
    for mount in blockdev.parse_mountinfo(text):
        assert isinstance(mount.devno, tuple) and len(mount.devno) == 2


@given(st.text(max_size=300))
def test_parse_swaps_hostile(text):
    assert all(isinstance(name, str) for name in blockdev.parse_swaps(text))


@given(st.text(max_size=30))
def test_parse_devno_hostile(text):
    try:
        major, minor = blockdev.parse_devno(text)
    except ValueError:
        return
    assert major >= 0 and minor >= 0


def test_real_host_smoke():
    """On this machine: /dev/null is refused; the view reads the real /proc without error."""
    info = blockdev.inspect_target("/dev/null")
    assert not info.ok and info.kind == "other"
    assert blockdev.HostView().mounts()
