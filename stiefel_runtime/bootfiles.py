# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the laptop boots, read from its /boot: the boot config, or BLS entries and grub.cfg as fallbacks,
and the payload manifest built from them once."""

from __future__ import annotations

import os
import shutil

from ansible_collections.stiefel.system.plugins.module_utils import bootconfig
from ansible_collections.stiefel.system.plugins.module_utils.errors import ServerError
from stiefel_runtime import payload
from stiefel_runtime.common import quiet_log


def find_boot_files(boot_dir, log=quiet_log):
    """``(kernel_path, [initrd paths], cmdline, source)`` of what the laptop boots.

    ``boot_dir`` is the content of the laptop's /boot (a separate /boot
    partition's root, or a root filesystem's ``boot/``).
    """
    config_path = bootconfig.boot_config_path_in(boot_dir)
    if config_path is not None:
        try:
            config = bootconfig.load_boot_config(config_path)
        except bootconfig.BootConfigError as exc:
            log("boot config %s is invalid (%s); trying the bootloader's configuration" % (config_path, exc))
        else:
            base = os.path.dirname(os.path.dirname(config_path))  # the dir holding stiefel/boot.json
            kernel = bootconfig.resolve_boot_path(base, config["kernel"])
            initrds = [bootconfig.resolve_boot_path(base, p) for p in config["initrd"]]
            for path in [kernel] + initrds:
                if not os.path.isfile(path):
                    raise ServerError("boot config names %s, which does not exist" % path)
            return kernel, initrds, config["cmdline"], "boot config " + config_path
    for base, conf, entry in bootconfig.find_bls_entries(boot_dir, boot_only=True):
        kernel = bootconfig.locate_boot_file(boot_dir, base, entry.get("linux"))
        initrds = [bootconfig.locate_boot_file(boot_dir, base, p) for p in entry.get("initrd", [])]
        if kernel and initrds and all(initrds):
            return kernel, initrds, " ".join(bootconfig.clean_cmdline(entry.get("options", ""))), "BLS entry " + conf
    grub_cfg, entries = bootconfig.find_grub_entries(boot_dir, boot_only=True)
    for entry in entries:
        kernel = bootconfig.locate_boot_file(boot_dir, "/boot", entry.get("linux"))
        initrds = [bootconfig.locate_boot_file(boot_dir, "/boot", p) for p in entry.get("initrd", [])]
        if kernel and initrds and all(initrds):
            return kernel, initrds, " ".join(bootconfig.clean_cmdline(entry.get("args", ""))), "grub entry " + grub_cfg
    raise ServerError("no boot config, BLS entry or grub.cfg entry with a kernel and initrd in %s" % boot_dir)


class BootSource(object):
    """The payload files and their manifest, prepared once per /boot."""

    def __init__(self, boot_dir, run_dir, log=quiet_log):
        self.boot_dir = boot_dir
        self.run_dir = run_dir
        self.log = log
        self.manifest = None
        self.paths = None

    def prepare(self, copy=False, extra_cmdline=""):
        """Find the files and build the manifest; ``copy`` puts them in run_dir (so /boot can be unmounted).

        ``extra_cmdline`` carries what only the server knows to the laptop's
        NBD-root hook (the exported disk's logical block size).
        """
        kernel, initrds, cmdline, source = find_boot_files(self.boot_dir, self.log)
        if extra_cmdline:
            cmdline = (cmdline + " " + extra_cmdline).strip()
        if copy:
            copied = os.path.join(self.run_dir, "laptop-vmlinuz")
            shutil.copyfile(kernel, copied)
            kernel = copied
        if len(initrds) == 1 and not copy:
            initrd = initrds[0]
        else:
            initrd = os.path.join(self.run_dir, "laptop-initrd.img")
            with open(initrd, "wb") as out:
                for part in initrds:
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
        self.manifest = payload.build_manifest(kernel, initrd, cmdline)
        self.paths = {"kernel": kernel, "initrd": initrd}
        self.log("payload from %s: kernel %s (%d bytes), initrd %s (%d bytes), cmdline %r" % (
            source, kernel, self.manifest.files["kernel"][0], initrd, self.manifest.files["initrd"][0], cmdline))
        return self.manifest
