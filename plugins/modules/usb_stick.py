#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: usb_stick
short_description: Write the stiefel client USB stick (UEFI with Secure Boot, legacy BIOS) to a device or image file
version_added: "0.1.0"
description:
  - Lays out a GPT disk with one EFI system partition (FAT32, GPT attribute LegacyBIOSBootable)
    holding the UEFI loader (see I(uefi_loader)) and syslinux (C(gptmbr.bin) in the
    protective MBR) for legacy BIOS, the stiefel kernel and initrd, the client command line, and
    the key as C(/stiefel/key.cpio), loaded as a second initrd so the running client has it as
    C(/etc/stiefel/key) (mode 0600, root) and never on a command line.
  - With I(uefi_loader=shim) (the default) the stick boots with Secure Boot on and off - Debian's
    shim (signed by Microsoft) as C(EFI/BOOT/BOOTX64.EFI), Debian's signed GRUB as
    C(EFI/BOOT/grubx64.efi) with C(EFI/BOOT/grub.cfg), and MokManager. No fallback loader
    (C(fbx64.efi)), so the stick never adds boot entries to the computer's firmware. Before anything is
    written the module checks the signatures with C(sbverify) - shim by Microsoft's UEFI CA, GRUB,
    MokManager and the kernel against the CA certificate in shim (Debian's) - and fails, saying
    what to do, for an unsigned kernel or one signed by another key.
  - The stick is built as a sparse image in I(work_dir) for the exact size of the target, then its
    laid-out regions are copied to the target, synced, and read back to compare SHA-256.
  - B(Destroys the target.) Refuses the targets listed in the notes and needs I(confirm) set to the
    target path.
  - Idempotent, a target that already holds exactly this stick (same manifest, key, files and boot
    code) is left alone. Check mode reports the plan and touches nothing.
options:
  target:
    description: Whole-disk block device (for example C(/dev/sdb)) or image file.
    type: path
    required: true
  confirm:
    description: Must be exactly I(target), to confirm that its contents may be destroyed.
    type: str
    default: ""
  kernel:
    description: The stiefel ramdisk kernel.
    type: path
    required: true
  initrd:
    description: The stiefel ramdisk initrd.
    type: path
    required: true
  key_path:
    description: The stiefel key file (C(stiefel-key-v1:<64 hex>)). Its content is never returned or logged.
    type: path
    required: true
  extra_cmdline:
    description: Appended to C(console=tty0 console=ttyS0,115200 stiefel.role=client).
    type: str
    default: ""
  uefi_loader:
    description:
      - C(shim) - shim + signed GRUB, boots with Secure Boot on or off; needs a kernel signed by Debian
        (the ramdisk's kernel from C(linux-image-amd64) is).
      - C(systemd-boot) - unsigned systemd-boot, boots only with Secure Boot off; for a kernel without
        Debian's signature (a self-built one).
    type: str
    choices: [shim, systemd-boot]
    default: shim
  esp_size_mib:
    description: Size of the EFI system partition in MiB (at least 64).
    type: int
    default: 256
  image_size:
    description: Size of the image file to create when I(target) does not exist (for example C(1G)).
    type: str
    default: ""
  work_dir:
    description: Directory where the image is built (the cache, for example C($STIEFEL_CACHE_DIR/usb)).
    type: path
    required: true
  progress_file:
    description:
      - File to which the module appends C(stage <name>) and C(progress <percent>) lines while it
        works (percent in steps of 10), so a caller running it with C(async) can show progress.
    type: path
  keep_image:
    description: Keep the built image in I(work_dir) after writing it.
    type: bool
    default: false
  force:
    description: Write even if the target already holds this exact stick.
    type: bool
    default: false
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - stiefel.system.write_target
requirements:
  - sfdisk, mkfs.fat (dosfstools), mtools, syslinux on the host that writes the stick
  - for I(uefi_loader=shim) shim-signed, grub-efi-amd64-signed, sbsigntool, binutils (objcopy) and openssl
  - for I(uefi_loader=systemd-boot) systemd-boot-efi
author:
  - stiefel.system developers (@stiefel-system)
"""

EXAMPLES = r"""
- name: Write the stick
  stiefel.system.usb_stick:
    target: /dev/sdb
    confirm: /dev/sdb
    kernel: /var/cache/stiefel/ramdisk/vmlinuz
    initrd: /var/cache/stiefel/ramdisk/initrd.img
    key_path: /etc/stiefel/key
    work_dir: /var/cache/stiefel/usb

- name: Write a 1 GiB image file instead
  stiefel.system.usb_stick:
    target: /var/tmp/stick.img
    confirm: /var/tmp/stick.img
    image_size: 1G
    kernel: /var/cache/stiefel/ramdisk/vmlinuz
    initrd: /var/cache/stiefel/ramdisk/initrd.img
    key_path: /etc/stiefel/key
    work_dir: /var/cache/stiefel/usb
"""

RETURN = r"""
target:
  description: The target as inspected (see M(stiefel.system.usb_target)).
  returned: always
  type: dict
plan:
  description:
    - Layout, bootloaders, command line and ESP files (sizes, sources; no secrets).
    - C(secure_boot) holds, for shim, MokManager, GRUB and the kernel, their signers and issuers as
      C(sbverify --list) shows them and what each was verified against (empty for C(systemd-boot)).
  returned: when the inputs are valid
  type: dict
reason:
  description: Why the stick is (or would be) written, or why nothing changed.
  returned: always
  type: str
sha256:
  description: SHA-256 of each written region (start of disk to end of ESP; backup GPT), as read back.
  returned: when written
  type: list
  elements: str
bytes_written:
  description: Bytes copied to the target.
  returned: when written
  type: int
stages:
  description: Seconds spent per stage (build, write, verify).
  returned: when written
  type: dict
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.stiefel.system.plugins.module_utils.blockdev import inspect_target
from ansible_collections.stiefel.system.plugins.module_utils.usb_image import (
    StickError, StickSpec, build_image, parse_size, remove_quietly, target_matches, timed,
    verify_target, write_image)


class Progress:
    def __init__(self, path):
        self.path = path
        self.last = -10
        if path:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write("stage start\n")

    def _line(self, text):
        if self.path:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(text + "\n")

    def stage(self, name):
        self._line("stage " + name)

    def percent(self, pct, done, total):
        while pct >= self.last + 10:
            self.last += 10
            if self.last > 0:
                self._line("progress %d" % self.last)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            target=dict(type="path", required=True),
            confirm=dict(type="str", default=""),
            kernel=dict(type="path", required=True),
            initrd=dict(type="path", required=True),
            key_path=dict(type="path", required=True, no_log=False),
            extra_cmdline=dict(type="str", default=""),
            uefi_loader=dict(type="str", default="shim", choices=["shim", "systemd-boot"]),
            esp_size_mib=dict(type="int", default=256),
            image_size=dict(type="str", default=""),
            work_dir=dict(type="path", required=True),
            progress_file=dict(type="path"),
            keep_image=dict(type="bool", default=False),
            force=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    p = module.params
    target = p["target"]
    progress = Progress(None if module.check_mode else p["progress_file"])
    result = dict(changed=False, reason="")

    def fail(msg):
        progress.stage("failed")
        module.fail_json(msg=msg, **result)

    try:
        create_size = parse_size(p["image_size"])
    except StickError as exc:
        fail(str(exc))
    create_size = (create_size + (1 << 20) - 1) // (1 << 20) * (1 << 20)

    info = inspect_target(target, create_size=create_size)
    result["target"] = info.as_dict()
    if info.refusals:
        fail("refusing to write the stick to %s: %s" % (target, " | ".join(info.refusals)))

    try:
        with open(p["key_path"], "rb") as handle:
            key_text = handle.read(4096)
    except OSError as exc:
        fail("cannot read the key file %s: %s" % (p["key_path"], exc.strerror))
    spec = StickSpec(p["kernel"], p["initrd"], key_text, p["extra_cmdline"], p["esp_size_mib"], info.size,
                     uefi_loader=p["uefi_loader"])
    try:
        spec.validate()
        result["plan"] = spec.plan()
    except StickError as exc:
        fail(str(exc))

    confirmed = p["confirm"] in (target, info.resolved) and p["confirm"] != ""
    if info.kind != "missing":
        same, why = target_matches(spec, info.resolved)
        if same and not p["force"]:
            result["reason"] = "%s already holds this stick" % target
            progress.stage("done")
            module.exit_json(**result)
        result["reason"] = "%s will be overwritten: %s" % (target, why)
    else:
        result["reason"] = "%s will be created (%d bytes)" % (target, info.size)

    if not confirmed:
        msg = ("confirmation missing: this destroys everything on %s (%s, %d MiB%s). "
               "Set confirm (usb_stick_confirm) to exactly %s to proceed"
               % (target, info.kind, info.size >> 20, ", " + info.model if info.model else "", target))
        if module.check_mode:
            module.warn(msg)
        else:
            fail(msg)

    result["changed"] = True
    if module.check_mode:
        module.exit_json(**result)

    stages = {}
    image = os.path.join(p["work_dir"], "stick-build.img")
    try:
        os.makedirs(p["work_dir"], mode=0o700, exist_ok=True)
        progress.stage("build")
        with timed(stages, "build"):
            expected = build_image(spec, image, log=lambda text: progress.stage("build: " + text))
        # Re-check right before the destructive step: mounts can change while we build.
        again = inspect_target(target, create_size=create_size)
        if again.refusals:
            raise StickError("target changed while building: " + " | ".join(again.refusals))
        progress.stage("write")
        is_block = again.kind == "disk"
        with timed(stages, "write"):
            written = write_image(image, again.resolved, spec.regions(), is_block,
                                  create_size=create_size, progress=progress.percent)
        progress.stage("verify")
        with timed(stages, "verify"):
            found = verify_target(again.resolved, spec.regions(), expected, is_block)
    except (StickError, OSError) as exc:
        fail("writing the stick to %s failed: %s" % (target, exc))
    finally:
        if not p["keep_image"]:
            remove_quietly(image)
    progress.stage("done")
    result.update(sha256=found, bytes_written=written, stages=stages,
                  target=inspect_target(target).as_dict())
    result["reason"] += "; written and verified"
    module.exit_json(**result)


if __name__ == "__main__":
    main()
