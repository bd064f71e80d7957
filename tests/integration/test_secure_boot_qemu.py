"""Secure Boot (issue 15): the stick boots the real ramdisk with Secure Boot on, and the locked-down client
refuses a laptop kernel without a signature, clearly, while the server keeps serving.

* flash_usb.yml refuses to build a Secure Boot stick from a kernel whose signature was removed
  (``sbattach --remove``), with the message saying what to do; nothing is written.
* One Secure Boot boot (CI cost: TCG with SMM is slow; the plain-UEFI and BIOS boots of the same
  shim + GRUB stick are in test_usb_stick.py): VM "desktop" on q35 with SMM, OVMF_CODE_4M.secboot.fd
  and a copy of OVMF_VARS_4M.ms.fd (Microsoft's keys enrolled, Secure Boot on) boots the stick from
  USB (shim -> Debian's signed GRUB -> the ramdisk's Debian-signed kernel, the key a separate initrd).
  Its console must show ``secureboot: Secure boot enabled``, ``Kernel is locked down from EFI Secure
  Boot`` and the client's ``discovery started``. VM "server" (plain, direct kernel boot) serves a
  laptop /boot whose kernel is the ramdisk kernel with its signature removed; the desktop must fetch
  and verify it, refuse it with the lockdown message (not a kexec error), discover again and find
  the server still serving the same kernel, which it then does not fetch again ("still refusing").

The sbverify output of the stick's loaders and kernel is printed. Run as root (taps, loop-free image
files): .venv/bin/python -m pytest -s -m integration tests/integration/test_secure_boot_qemu.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import keyfile
from lab import ansible_output
from lab.qemu import (VM, Timeline, checkout_overlay, laptop_boot_image, ramdisk_fixups, ramdisk_with_key,
                      secure_boot_missing)
from stiefel_runtime import kexec

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLASH = os.path.join(REPO, "playbooks", "flash_usb.yml")
TOOLS = ("sbverify", "sbattach", "mcopy", "mkfs.ext4")
REFUSAL = ("This desktop cannot start the laptop's kernel: Secure Boot is on, and the laptop's kernel carries "
           "no signature.")

pytestmark = [pytest.mark.integration, pytest.mark.qemu_lab("secure-boot", tools=TOOLS)]


def sbverify_list(path):
    proc = subprocess.run(["sbverify", "--list", path], capture_output=True, text=True, check=False)
    return proc.stdout + "".join(line + "\n" for line in proc.stderr.splitlines() if "gaps between" not in line)


def stripped_copy(kernel, path):
    shutil.copyfile(kernel, path)
    subprocess.run(["sbattach", "--remove", path], check=True, capture_output=True)
    assert "No signature table present" in sbverify_list(path)
    return path


def flash(workdir, kernel, initrd, key_path, image, esp_mib):
    return ansible_output.run_playbook(
        FLASH, "-e", "device=" + image, "-e", "confirm=" + image, "-e", "image_size=%dM" % (esp_mib + 64),
        "-e", "usb_stick_kernel=" + kernel, "-e", "usb_stick_initrd=" + initrd,
        "-e", "usb_stick_key_path=" + key_path, "-e", "usb_stick_esp_size_mib=%d" % esp_mib,
        "-e", "usb_stick_work_dir=" + os.path.join(workdir, "build"))


def write_key(path, key):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(keyfile.encode_key(key))
    return path


def esp_file(image, path, out):
    with open(out, "wb") as handle:
        subprocess.run(["mcopy", "-n", "-i", image + "@@1048576", "::/" + path, "-"], check=True, stdout=handle,
                       env=dict(os.environ, MTOOLS_SKIP_CHECK="1"))
    return out


def test_unsigned_kernel_refused_at_build(qemu_lab, ramdisk_pair):
    workdir, _link, _vms = qemu_lab
    kernel, ramdisk = ramdisk_pair
    stripped = stripped_copy(kernel, os.path.join(workdir, "vmlinuz-unsigned"))
    image = os.path.join(workdir, "refused.img")
    run = flash(workdir, stripped, ramdisk, write_key(os.path.join(workdir, "key"), keyfile.generate_key()),
                image, 256)
    print("flash_usb.yml with an unsigned kernel: rc=%d in %.1f s" % (run.returncode, run.seconds))
    out = run.stdout + run.stderr
    assert run.returncode != 0
    message = [line for line in out.splitlines() if "is not signed" in line]
    assert message, out[-3000:]
    print(message[0].strip()[:600])
    assert "kernel %s is not signed" % stripped in out and "Secure Boot would refuse it" in out
    assert "linux-image-amd64" in out and "uefi_loader: systemd-boot" in out
    assert not os.path.exists(image)


def test_secure_boot_stick_and_lockdown_refusal(qemu_lab, ramdisk_pair):
    workdir, link, vms = qemu_lab
    if secure_boot_missing():
        pytest.skip(secure_boot_missing())
    kernel, ramdisk = ramdisk_pair
    listing = sbverify_list(kernel)
    print("sbverify --list %s (the ramdisk kernel):\n%s" % (kernel, listing))
    assert "Debian Secure Boot CA" in listing

    key = keyfile.generate_key()
    key_path = write_key(os.path.join(workdir, "key"), key)
    # The stick carries this checkout's agents over the cached image, as the server's initrd does.
    stick_initrd = os.path.join(workdir, "stick-initrd.img")
    kexec.concat_files(stick_initrd, [ramdisk] + ramdisk_fixups(ramdisk, workdir) + [checkout_overlay(workdir)])
    esp_mib = max(128, ((os.path.getsize(kernel) + os.path.getsize(stick_initrd)) * 3 // 2 >> 20) + 64)
    image = os.path.join(workdir, "stick.img")
    run = flash(workdir, kernel, stick_initrd, key_path, image, esp_mib)
    print("flash_usb.yml (Secure Boot stick, ESP %d MiB): rc=%d in %.1f s" % (esp_mib, run.returncode, run.seconds))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    plan = [line.strip() for line in run.stdout.splitlines() if "Secure Boot:" in line or "UEFI:" in line]
    print("\n".join(plan))
    for esp_path in ("EFI/BOOT/BOOTX64.EFI", "EFI/BOOT/grubx64.efi", "EFI/BOOT/mmx64.efi", "stiefel/vmlinuz"):
        out = esp_file(image, esp_path, os.path.join(workdir, os.path.basename(esp_path)))
        print("sbverify --list <stick>/%s:\n%s" % (esp_path, sbverify_list(out)))

    laptop_disk = laptop_boot_image(workdir, stripped_copy(kernel, os.path.join(workdir, "laptop-vmlinuz")))
    server_initrd = ramdisk_with_key(workdir, ramdisk, key)
    t0 = time.monotonic()
    server = VM("server", workdir, memory=1024, netns=link.netns)
    server.disk(laptop_disk).nic(link.taps[0], "52:54:00:5b:ef:01")
    server.kernel(kernel, server_initrd, "console=ttyS0 stiefel.role=server stiefel.disk=/dev/vda stiefel.boot=/dev/vda")
    vms.append(server.start())
    desktop = VM("desktop", workdir, memory=1024, netns=link.netns, secure_boot=True)
    desktop.disk(image, usb=True).nic(link.taps[1], "52:54:00:5b:ef:02")
    vms.append(desktop.start())

    timeline = Timeline(t0, fail_patterns=Timeline.FAIL_PATTERNS + (r"kexec could not load",))
    timeline.mark(desktop, r"secureboot: Secure boot enabled", 600)
    timeline.mark(desktop, r"Kernel is locked down from EFI Secure Boot[^\n]*", 120)
    timeline.mark(desktop, r"stiefel-client: discovery started", 300)
    timeline.mark(server, r"stiefel-server: ready", 300)
    timeline.mark(desktop, r"stiefel-client: payload verified", 180)
    refusal = timeline.mark(desktop, r"boot from \S+ failed: This desktop cannot start[^\n]*", 60).group(0)
    print("refusal on the desktop's console:\n  " + refusal)
    assert REFUSAL in refusal and "mokutil --import" in refusal and "turn Secure Boot off" in refusal
    assert refusal.endswith("discovering again")
    # The server keeps serving: the desktop finds it again, opens a session and, seeing in the manifest
    # the kernel it refused (same SHA-256), stops there and says so once, instead of fetching ~11 MB again.
    again = desktop.position()
    timeline.mark(desktop, r"still refusing the laptop's kernel \(same as before\); retrying in \d+ s", 120,
                  start=again)
    assert desktop.find(r"stiefel-client: payload verified", start=again) is None
    timeline.show()
    assert server.proc.poll() is None and desktop.proc.poll() is None
    assert desktop.find(r"stiefel-client: kexec\b") is None
