"""A laptop whose /boot is LUKS-encrypted, served by the stiefel ramdisk in QEMU (TCG) and unlocked by a person at the client.

VM "server" boots the ramdisk with ``stiefel.role=server`` and a GPT disk whose
first partition is a LUKS2 container (pbkdf2, so unlocking is quick under TCG)
holding the laptop's /boot: the ramdisk's own vmlinuz, the busybox marker
initrd and ``stiefel/boot.json``. The command line names the container the way
the laptop role does (``stiefel.luksboot=UUID=<luks uuid>``,
``stiefel.boot=/dev/mapper/<name>``). VM "client" boots the ramdisk with
``stiefel.role=client``; its OFFER says /boot is locked and the client asks on
its console. The test types on that serial console like a person would: first
a wrong passphrase (the server refuses it, says so on its console and keeps
serving), then the right one; the server opens the container with cryptsetup,
reads /boot, closes it again and serves the payload; the client verifies it and
kexecs into the served kernel, whose marker appears on the client's console.

The container is made offline on this host, which has no device-mapper:
mkfs.ext4 -d fills a file system smaller than its image, and ``cryptsetup
reencrypt --encrypt --reduce-device-size`` encrypts it in place.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import keyfile
from lab.qemu import VM, RamdiskUnavailable, Timeline, laptop_boot_tree, ramdisk_files, ramdisk_with_key

pytestmark = [pytest.mark.integration, pytest.mark.qemu_lab("luks-qemu", tools=("cryptsetup", "sfdisk"))]

PASSPHRASE = "correct horse battery staple"
WRONG = "Tr0ub4dor&3"
MAPPING = "boot_crypt"  # the laptop's own name for the opened container (its fstab's /dev/mapper/<name>)
PROMPT = r"Passphrase for the laptop's encrypted /boot: "
MIB = 1 << 20
BOOT_PART_START = 1 * MIB
BOOT_PART_SIZE = 64 * MIB
LUKS_HEADER = 16 * MIB  # room reencrypt takes from the end of the file system for the LUKS2 header
DISK_SIZE = 128 * MIB
# What the server needs to open the container, besides the dm-crypt modules (kept under kernel/drivers/md).
RAMDISK_NEEDS = ("usr/sbin/cryptsetup", "usr/sbin/blkid")


def luks_boot_image(workdir, boot, passphrase):
    """``boot`` as an ext4 file system in a LUKS2 container image; returns (path, LUKS UUID)."""
    image = os.path.join(workdir, "boot-luks.img")
    with open(image, "wb") as handle:
        handle.truncate(BOOT_PART_SIZE)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "stiefel-boot", "-d", boot, image,
                    "%dK" % ((BOOT_PART_SIZE - LUKS_HEADER) // 1024)], check=True)
    key_path = os.path.join(workdir, "passphrase")
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(passphrase)  # no newline: --key-file takes the file's bytes as they are
    subprocess.run(["cryptsetup", "reencrypt", "--encrypt", "--type", "luks2", "--reduce-device-size",
                    "%dM" % (LUKS_HEADER // MIB), "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
                    "--batch-mode", "--key-file", key_path, image], check=True, capture_output=True)
    os.unlink(key_path)
    uuid = subprocess.run(["cryptsetup", "luksUUID", image], check=True, capture_output=True,
                          text=True).stdout.strip()
    return image, uuid


def passphrase_opens(image, passphrase):
    """Whether ``passphrase`` opens the container (checked offline: no device-mapper needed)."""
    proc = subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-file=-", image],
                          input=passphrase.encode(), capture_output=True, check=False)
    return proc.returncode == 0


def laptop_disk(workdir, kernel, passphrase):
    """A GPT laptop disk: partition 1 the LUKS /boot, partition 2 a root placeholder. Returns (path, uuid)."""
    boot_image, uuid = luks_boot_image(workdir, laptop_boot_tree(workdir, kernel), passphrase)
    disk = os.path.join(workdir, "laptop.img")
    with open(disk, "wb") as handle:
        handle.truncate(DISK_SIZE)
    layout = ("label: gpt\n"
              "start=%d, size=%d, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=boot\n"
              "type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root\n") % (BOOT_PART_START // 512, BOOT_PART_SIZE // 512)
    subprocess.run(["sfdisk", "--quiet", disk], input=layout, text=True, check=True)
    subprocess.run(["dd", "if=%s" % boot_image, "of=%s" % disk, "bs=1M", "seek=%d" % (BOOT_PART_START // MIB),
                    "conv=notrunc", "status=none"], check=True)
    os.unlink(boot_image)
    return disk, uuid


def test_client_unlocks_luks_boot_and_kexecs(qemu_lab):
    workdir, link, vms = qemu_lab
    try:
        kernel, ramdisk = ramdisk_files(require=RAMDISK_NEEDS)
    except RamdiskUnavailable as exc:
        pytest.skip(str(exc))
    initrd = ramdisk_with_key(workdir, ramdisk, keyfile.generate_key())
    made = time.monotonic()
    disk, luks_uuid = laptop_disk(workdir, kernel, PASSPHRASE)
    print("[luks] laptop disk with a LUKS2 /boot (UUID %s) made in %.1f s" % (luks_uuid, time.monotonic() - made))
    # the container is what the server will get: the right passphrase opens it, the wrong one does not
    with open(disk, "rb") as src, open(os.path.join(workdir, "part1.img"), "wb") as dst:
        src.seek(BOOT_PART_START)
        dst.write(src.read(BOOT_PART_SIZE))
    assert passphrase_opens(os.path.join(workdir, "part1.img"), PASSPHRASE)
    assert not passphrase_opens(os.path.join(workdir, "part1.img"), WRONG)
    os.unlink(os.path.join(workdir, "part1.img"))

    t0 = time.monotonic()
    server = VM("server", workdir, memory=1024, netns=link.netns)
    server.disk(disk).nic(link.taps[0], "52:54:00:57:ef:11")
    server.kernel(kernel, initrd, "console=ttyS0 stiefel.role=server stiefel.disk=/dev/vda "
                  "stiefel.boot=/dev/mapper/%s stiefel.luksboot=UUID=%s" % (MAPPING, luks_uuid))
    vms.append(server.start())
    client = VM("client", workdir, memory=1024, netns=link.netns, serial_input=True)
    client.nic(link.taps[1], "52:54:00:57:ef:12")
    client.kernel(kernel, initrd, "console=ttyS0 stiefel.role=client")
    vms.append(client.start())

    timeline = Timeline(t0)
    mark = timeline.mark

    def answer_prompt(text, start):
        mark(client, PROMPT, 60, start=start, partial=True)
        # The prompt is written after echo went off and type-ahead was flushed, so typing now is kept.
        client.send(text + "\r")

    mark(server, r"stiefel-server: ready", 240)
    mark(server, r"/boot is LUKS-encrypted: waiting for the client to send the passphrase", 10)
    mark(client, r"stiefel-client: discovery started", 240)
    mark(client, r"server fe80::\S+: http \d+, nbd \d+, export '\w+', /boot locked", 120)

    before = client.position()
    answer_prompt(WRONG, before)
    refused_at = server.position()
    mark(server, r"dropped input from http fe80::\S+: POST /unlock/\S+ -> 403 unlock failed: "
         r"cryptsetup refused the passphrase", 120)
    mark(client, r"unlock refused \(403 unlock failed: cryptsetup refused the passphrase.*\); try again", 60, start=before)

    retry = client.position()
    answer_prompt(PASSPHRASE, retry)
    mark(server, r"client fe80::\S+: /boot unlocked", 120, start=refused_at)
    mark(client, r"stiefel-client: .*/boot unlocked", 60, start=retry)
    mark(server, r"client fe80::\S+: payload sent", 120)
    mark(client, r"stiefel-client: payload verified", 120)
    mark(client, r"stiefel-client: kexec", 60)
    timeline.served_kernel_booted(client, "52:54:00:57:ef:12")
    timeline.show()
    # one refusal on each side, and the passphrases never appear on a console (no echo, never logged)
    client_text = "\n".join(text for _stamp, text in client.lines)
    server_text = "\n".join(text for _stamp, text in server.lines)
    assert client_text.count("unlock refused") == 1
    assert server_text.count("cryptsetup refused the passphrase") == 1
    for secret in (PASSPHRASE, WRONG):
        assert secret not in client_text and secret not in server_text
    # the server is still up and serving after the refusal and the payload
    assert server.proc.poll() is None
