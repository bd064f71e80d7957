# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Inspect a write target (block device or image file) and decide whether it is safe to overwrite.

Everything is read from ``/proc`` and ``/sys`` through a :class:`HostView`, so unit
tests can point it at a fake tree. :func:`inspect_target` returns a
:class:`TargetInfo` whose ``refusals`` list says, one sentence each, why the
target must not be written. An empty list means the target may be destroyed
(given the caller's explicit confirmation, which is not checked here).

Refused: a partition instead of a whole disk; anything that is neither a block
device nor a regular file (character devices, directories, sockets...); a disk
that is mounted, has a mounted partition, or feeds something mounted or used as
swap (device-mapper, md, loop holders); the disk holding the running system's
``/``, ``/boot`` or ``/boot/efi``; a read-only or empty device; a missing path
unless an image file may be created there (not under /dev, /proc, /sys).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

from ansible_collections.stiefel.system.plugins.module_utils.errors import DeviceInUse, NbdExportError

SYSTEM_MOUNTPOINTS = ("/", "/boot", "/boot/efi")
# A missing path under these is a typo for a device, never a new image file.
NO_CREATE_PREFIXES = ("/dev/", "/proc/", "/sys/", "/run/udev/")


def _unescape_mount(text):
    # mountinfo escapes space, tab, newline and backslash as \ooo (octal).
    out = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 3 < len(text) and text[i + 1:i + 4].isdigit():
            try:
                out.append(chr(int(text[i + 1:i + 4], 8)))
                i += 4
                continue
            except ValueError:
                pass
        out.append(text[i])
        i += 1
    return "".join(out)


@dataclass(frozen=True)
class Mount:
    devno: tuple  # (major, minor) from mountinfo field 3
    mountpoint: str
    fstype: str
    source: str


def parse_mountinfo(text):
    """Parse /proc/self/mountinfo. Malformed lines are skipped (the kernel writes this file)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) < 10 or "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        if len(fields) < sep + 3:
            continue
        majmin = fields[2].split(":")
        try:
            devno = (int(majmin[0]), int(majmin[1]))
        except (ValueError, IndexError):
            continue
        if len(majmin) != 2 or devno[0] < 0 or devno[1] < 0:
            continue
        mounts.append(Mount(devno=devno, mountpoint=_unescape_mount(fields[4]),
                            fstype=fields[sep + 1], source=_unescape_mount(fields[sep + 2])))
    return mounts


def parse_swaps(text):
    """Parse /proc/swaps: the list of swap file/device names."""
    names = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if parts:
            names.append(_unescape_mount(parts[0]))
    return names


def parse_devno(text):
    """Parse a sysfs ``dev`` file ("8:0\\n")."""
    parts = text.strip().split(":")
    if len(parts) != 2:
        raise ValueError("bad device number %r" % (text,))
    major, minor = int(parts[0]), int(parts[1])
    if major < 0 or minor < 0:
        raise ValueError("bad device number %r" % (text,))
    return (major, minor)


class HostView:
    """The seam between the checks and the running system (override in tests)."""

    def __init__(self, sys_root="/sys", proc_root="/proc"):
        self.sys_root = sys_root
        self.proc_root = proc_root

    # Filesystem access -------------------------------------------------
    def stat(self, path):
        return os.stat(path)

    def realpath(self, path):
        return os.path.realpath(path)

    def read_text(self, path):
        with open(path, "r", encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def exists(self, path):
        return os.path.exists(path)

    def listdir(self, path):
        try:
            return sorted(os.listdir(path))
        except OSError:
            return []

    def isdir(self, path):
        return os.path.isdir(path)

    # Derived views -----------------------------------------------------
    def mounts(self):
        return parse_mountinfo(self.read_text(os.path.join(self.proc_root, "self/mountinfo")))

    def swaps(self):
        try:
            return parse_swaps(self.read_text(os.path.join(self.proc_root, "swaps")))
        except OSError:
            return []

    def sysfs_dir(self, devno):
        """Canonical sysfs directory of a block device number, or None."""
        link = os.path.join(self.sys_root, "dev/block/%d:%d" % devno)
        if not self.exists(link):
            return None
        return self.realpath(link)

    def sysfs_attr(self, sysdir, name, default=None):
        try:
            return self.read_text(os.path.join(sysdir, name)).strip()
        except OSError:
            return default

    def devno_of_name(self, name):
        """Device number of a block device by its kernel name (sda1, dm-0)."""
        try:
            return parse_devno(self.read_text(os.path.join(self.sys_root, "class/block", name, "dev")))
        except (OSError, ValueError):
            return None

    def rdev_of_path(self, path):
        """(major, minor) if ``path`` is a block device node, else None."""
        try:
            st = self.stat(path)
        except OSError:
            return None
        if not stat.S_ISBLK(st.st_mode):
            return None
        return (os.major(st.st_rdev), os.minor(st.st_rdev))


@dataclass
class TargetInfo:
    path: str
    resolved: str = ""
    kind: str = "missing"  # disk | partition | file | missing | other
    size: int = 0
    devno: tuple = None
    name: str = ""
    model: str = ""
    removable: bool = False
    read_only: bool = False
    partitions: list = field(default_factory=list)
    holders: list = field(default_factory=list)
    mounted: list = field(default_factory=list)  # "<device> on <mountpoint>"
    swap: list = field(default_factory=list)
    system_mounts: list = field(default_factory=list)  # system mountpoints on this disk
    refusals: list = field(default_factory=list)

    @property
    def ok(self):
        return not self.refusals

    def as_dict(self):
        return {
            "path": self.path, "resolved": self.resolved, "kind": self.kind, "size": self.size,
            "devno": "%d:%d" % self.devno if self.devno else "", "name": self.name,
            "model": self.model, "removable": self.removable, "read_only": self.read_only,
            "partitions": list(self.partitions), "holders": list(self.holders),
            "mounted": list(self.mounted), "swap": list(self.swap),
            "system_mounts": list(self.system_mounts), "refusals": list(self.refusals),
            "ok": self.ok,
        }


def _whole_disk_dir(view, sysdir):
    """For a partition's sysfs dir, the disk's dir; a disk's dir is returned as is."""
    if view.exists(os.path.join(sysdir, "partition")):
        return os.path.dirname(sysdir)
    return sysdir


def _partitions(view, disk_dir):
    parts = []
    for name in view.listdir(disk_dir):
        sub = os.path.join(disk_dir, name)
        if view.exists(os.path.join(sub, "partition")):
            parts.append(name)
    return parts


def _holders_closure(view, names):
    """Kernel names of everything stacked on top of ``names`` (dm, md, ...), transitively."""
    seen = []
    todo = list(names)
    while todo:
        name = todo.pop()
        for holder in view.listdir(os.path.join(view.sys_root, "class/block", name, "holders")):
            if holder not in seen:
                seen.append(holder)
                todo.append(holder)
    return seen


def _underlying_disks(view, devno, depth=0):
    """Whole-disk sysfs names below a device number (through partitions, dm/md slaves)."""
    sysdir = view.sysfs_dir(devno)
    if sysdir is None or depth > 16:
        return set()
    disks = set()
    slaves = view.listdir(os.path.join(sysdir, "slaves"))
    if slaves:
        for slave in slaves:
            sub = view.devno_of_name(slave)
            if sub is not None:
                disks |= _underlying_disks(view, sub, depth + 1)
        return disks
    disks.add(os.path.basename(_whole_disk_dir(view, sysdir)))
    return disks


def _mount_devnos(view, mount):
    """Device numbers a mount uses: mountinfo's own, plus its source node's (btrfs etc.)."""
    devnos = {mount.devno}
    if mount.source.startswith("/"):
        rdev = view.rdev_of_path(mount.source)
        if rdev is not None:
            devnos.add(rdev)
    return devnos


def _inspect_block(view, info, st):
    info.devno = (os.major(st.st_rdev), os.minor(st.st_rdev))
    sysdir = view.sysfs_dir(info.devno)
    if sysdir is None:
        info.kind = "other"
        info.refusals.append("%s: block device %d:%d is unknown to sysfs; cannot check it is safe"
                             % (info.path, info.devno[0], info.devno[1]))
        return
    info.name = os.path.basename(sysdir)
    if view.exists(os.path.join(sysdir, "partition")):
        info.kind = "partition"
        disk = os.path.basename(os.path.dirname(sysdir))
        info.refusals.append("%s is partition %s of disk /dev/%s; give the whole disk (/dev/%s)"
                             % (info.path, info.name, disk, disk))
    else:
        info.kind = "disk"
    sectors = view.sysfs_attr(sysdir, "size", "0")
    try:
        info.size = int(sectors) * 512
    except ValueError:
        info.size = 0
    info.read_only = view.sysfs_attr(sysdir, "ro", "0") == "1"
    info.removable = view.sysfs_attr(sysdir, "removable", "0") == "1"
    info.model = (view.sysfs_attr(sysdir, "device/model", "") or "").strip()

    disk_dir = _whole_disk_dir(view, sysdir)
    disk_name = os.path.basename(disk_dir)
    info.partitions = _partitions(view, disk_dir) if info.kind == "disk" else []
    members = [disk_name] + _partitions(view, disk_dir)
    info.holders = _holders_closure(view, members)
    tree = {}
    for name in members + info.holders:
        devno = view.devno_of_name(name)
        if devno is not None:
            tree[devno] = name
    tree.setdefault(info.devno, info.name)

    for mount in view.mounts():
        hit = _mount_devnos(view, mount) & set(tree)
        if hit:
            info.mounted.append("/dev/%s on %s" % (tree[sorted(hit)[0]], mount.mountpoint))
        if mount.mountpoint in SYSTEM_MOUNTPOINTS:
            for devno in _mount_devnos(view, mount):
                if disk_name in _underlying_disks(view, devno):
                    if mount.mountpoint not in info.system_mounts:
                        info.system_mounts.append(mount.mountpoint)
    for swap in view.swaps():
        rdev = view.rdev_of_path(swap)
        if rdev is not None and rdev in tree:
            info.swap.append(swap)

    if info.system_mounts:
        info.refusals.append("%s holds the running system (%s is on /dev/%s)"
                             % (info.path, ", ".join(info.system_mounts), disk_name))
    if info.mounted:
        info.refusals.append("%s is in use: mounted (%s); unmount it first"
                             % (info.path, "; ".join(info.mounted)))
    if info.swap:
        info.refusals.append("%s is in use as swap (%s); swapoff first" % (info.path, ", ".join(info.swap)))
    elif info.holders and not info.mounted:
        info.refusals.append("%s is in use by %s (device-mapper/RAID/loop on top of it); release it first"
                             % (info.path, ", ".join("/dev/" + h for h in info.holders)))
    if info.read_only:
        info.refusals.append("%s is read-only (write-protect switch or ro flag)" % info.path)
    if info.kind == "disk" and info.size == 0:
        info.refusals.append("%s has size 0 (no medium?)" % info.path)


def inspect_target(path, view=None, create_size=0):
    """Inspect ``path`` as a stick target. ``create_size`` > 0 allows creating a missing image file."""
    view = view or HostView()
    info = TargetInfo(path=path)
    if not path or not path.startswith("/"):
        info.kind = "other"
        info.refusals.append("target %r is not an absolute path" % (path,))
        return info
    info.resolved = view.realpath(path)
    try:
        st = view.stat(info.resolved)
    except FileNotFoundError:
        info.kind = "missing"
        if any(info.resolved.startswith(p) for p in NO_CREATE_PREFIXES):
            info.refusals.append("%s does not exist (no such device); refusing to create a file there"
                                 % path)
        elif create_size <= 0:
            info.refusals.append("%s does not exist; set an image size to create an image file there" % path)
        elif not view.isdir(os.path.dirname(info.resolved)):
            info.refusals.append("%s: parent directory does not exist" % path)
        else:
            info.size = create_size
        return info
    except OSError as exc:
        info.kind = "other"
        info.refusals.append("%s cannot be inspected: %s" % (path, exc.strerror or exc))
        return info

    if stat.S_ISBLK(st.st_mode):
        _inspect_block(view, info, st)
    elif stat.S_ISREG(st.st_mode):
        info.kind = "file"
        info.size = st.st_size
        if any(info.resolved.startswith(p) for p in NO_CREATE_PREFIXES):
            info.refusals.append("%s is a regular file under a system directory; refusing" % path)
    else:
        info.kind = "other"
        what = ("a directory" if stat.S_ISDIR(st.st_mode)
                else "a character device" if stat.S_ISCHR(st.st_mode)
                else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        info.refusals.append("%s is %s, neither a block device nor a regular image file" % (path, what))
    return info


# ---------------------------------------------------------------------------
# Exporting a device or image over NBD (nbd_serve, the server agents)
# ---------------------------------------------------------------------------
# The mount / swap / holder inspection above is shared with the USB writer;
# here only what differs for serving: partitions may be exported, a
# read-only export is fine on a read-only device, an image file counts as the
# loop devices backed by it, and the kernel's exclusive-open check is added.

def loops_backed_by(path: str, view: HostView | None = None) -> list:
    """``/dev/loopN`` devices whose backing file is ``path``."""
    view = view or HostView()
    real = view.realpath(path)
    result = []
    for name in view.listdir(os.path.join(view.sys_root, "block")):
        if not name.startswith("loop"):
            continue
        backing = view.sysfs_attr(os.path.join(view.sys_root, "block", name), "loop/backing_file")
        if backing and view.realpath(backing) == real:
            result.append("/dev/" + name)
    return result


def _block_reasons(info, writable_export: bool) -> list:
    reasons = []
    if info.system_mounts:
        reasons.append("%s holds the running system (%s)" % (info.path, ", ".join(info.system_mounts)))
    for entry in info.mounted:
        reasons.append("%s is mounted (%s)" % (info.path, entry))
    for entry in info.swap:
        reasons.append("%s is in use as swap (%s)" % (info.path, entry))
    if info.holders and not info.mounted:
        reasons.append("%s is in use by %s (device-mapper/RAID/loop on top of it)"
                       % (info.path, ", ".join("/dev/" + h for h in info.holders)))
    if writable_export and info.read_only:
        reasons.append("%s is a read-only device; export it with read_only" % info.path)
    return reasons


def device_users(path: str, *, writable_export: bool = True, view: HostView | None = None) -> list:
    """Reasons why exporting ``path`` would be unsafe on this host (empty: safe).

    A block device is refused if it, its disk's partitions, or anything stacked
    on them (holders) is mounted or used as swap, or if it holds the running
    system; an image file is refused if a loop device backed by it is.
    """
    view = view or HostView()
    info = inspect_target(path, view=view)
    if info.kind == "missing":
        raise NbdExportError("cannot export %s: it does not exist" % path)
    if info.kind == "other":
        raise NbdExportError("cannot export %s: not a block device or regular file (%s)"
                             % (path, "; ".join(info.refusals)))
    if info.kind == "file":
        reasons = []
        for loop in loops_backed_by(info.resolved, view):
            sub = inspect_target(loop, view=view)
            reasons += ["%s is attached as %s: %s" % (path, loop, r)
                        for r in _block_reasons(sub, writable_export=False)]
        return reasons
    reasons = _block_reasons(info, writable_export)
    real_host = type(view) is HostView  # pylint: disable=unidiomatic-typecheck
    if not reasons and writable_export and real_host and _busy(info.resolved):
        reasons.append("%s is busy (claimed exclusively by the kernel)" % path)
    return reasons


def _busy(dev: str) -> bool:
    """True if the kernel refuses an exclusive open (mounted, swap, holder, ...)."""
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_EXCL)
    except OSError as exc:
        return exc.errno == errno.EBUSY
    os.close(fd)
    return False


def check_exportable(path: str, writable_export: bool = True) -> None:
    """Raise :class:`DeviceInUse` with every reason if ``path`` must not be exported."""
    reasons = device_users(path, writable_export=writable_export)
    if reasons:
        raise DeviceInUse("refusing to export %s: %s" % (path, "; ".join(reasons)))
