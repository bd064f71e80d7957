# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Block devices and mounts the server needs: device specs, read-only mounts, LUKS, sector sizes."""

from __future__ import annotations

import glob
import os
import stat
import subprocess
import time

from ansible_collections.stiefel.system.plugins.module_utils import bootconfig
from ansible_collections.stiefel.system.plugins.module_utils.errors import ServerError
from ansible_collections.stiefel.system.plugins.module_utils.tools import run_tool
from stiefel_runtime.common import quiet_log


def logical_block_size(path):
    """The logical sector size of a block device (its partition table uses it); 512 for an image file."""
    try:
        info = os.stat(path)
    except OSError:
        return 512
    if not stat.S_ISBLK(info.st_mode):
        return 512
    sysdir = os.path.realpath("/sys/dev/block/%d:%d" % (os.major(info.st_rdev), os.minor(info.st_rdev)))
    for candidate in (sysdir, os.path.dirname(sysdir)):  # a partition's queue is its disk's
        try:
            with open(os.path.join(candidate, "queue", "logical_block_size")) as handle:
                size = int(handle.read().strip())
        except (OSError, ValueError):
            continue
        if size in (512, 1024, 2048, 4096):
            return size
    return 512


def resolve_device(spec, timeout=30.0, log=quiet_log):
    """``UUID=...``/``LABEL=...``/``PARTUUID=...`` or a path -> a device path (waits for late disks)."""
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        if "=" in spec and not spec.startswith("/"):
            tag = spec.split("=", 1)[0].upper()
            if tag not in ("UUID", "LABEL", "PARTUUID", "PARTLABEL", "PTUUID"):
                raise ServerError("unsupported device spec %r" % spec)
            proc = subprocess.run(["blkid", "-o", "device", "-t", spec], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, check=False)
            found = proc.stdout.decode("utf-8", "replace").split()
            if proc.returncode == 0 and found:
                return found[0]
        elif os.path.exists(spec):
            return spec
        if time.monotonic() >= deadline:
            raise ServerError("device %s not found" % spec)
        if not announced:
            log("waiting up to %ds for device %s" % (timeout, spec))
            announced = True
        time.sleep(0.5)  # block devices have no netlink event we can use without udev


def mount_read_only(device, mountpoint):
    os.makedirs(mountpoint, exist_ok=True)
    run_tool(["mount", "-o", "ro", device, mountpoint])


def boot_dir_of(mountpoint):
    """A mounted /boot partition, or a root filesystem holding boot/."""
    if bootconfig.boot_config_path_in(mountpoint) == os.path.join(mountpoint, bootconfig.BOOT_CONFIG_RELPATH):
        return os.path.join(mountpoint, "boot")
    if not glob.glob(os.path.join(mountpoint, "vmlinuz*")) and os.path.isdir(os.path.join(mountpoint, "boot")):
        return os.path.join(mountpoint, "boot")
    return mountpoint


def luks_open(device, name, passphrase):
    proc = subprocess.run(["cryptsetup", "open", "--type", "luks", "--key-file=-", device, name],
                          input=passphrase, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise ServerError("cryptsetup refused the passphrase (rc=%d)" % proc.returncode)
    return "/dev/mapper/" + name
