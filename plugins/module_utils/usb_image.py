# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Build the stiefel client USB stick as an image, write it to a target, verify it.

Layout (GPT, 512-byte sectors)::

    LBA 0          protective MBR, boot code = syslinux gptmbr.bin, PMBR active flag
    LBA 1-33       primary GPT
    1 MiB ..       partition 1: EFI system partition, FAT32, label STIEFEL,
                   GPT attribute LegacyBIOSBootable (gptmbr.bin chains to it)
    end-33 .. end  backup GPT (the image is laid out for the exact target size)

ESP contents (uefi_loader "shim", the default: boots with Secure Boot on and off)::

    EFI/BOOT/BOOTX64.EFI        shim (shim-signed: Microsoft-signed, carries Debian's CA)
    EFI/BOOT/grubx64.efi        GRUB (grub-efi-amd64-signed: signed by Debian's CA)
    EFI/BOOT/mmx64.efi          MokManager (shim-signed), so a pending mokutil enrollment can finish
    EFI/BOOT/grub.cfg           linux + one initrd line with two files + options
    (no fbx64.efi: the fallback loader would write boot entries into the desktop's NVRAM)

  or (uefi_loader "systemd-boot": unsigned, for kernels without a Debian signature)::

    EFI/BOOT/BOOTX64.EFI        systemd-boot (UEFI)
    loader/loader.conf          default entry, no timeout, editor off
    loader/entries/stiefel.conf linux + two initrd lines + options

  and for both::

    syslinux/ldlinux.sys,.c32   syslinux (legacy BIOS), installed by `syslinux --install`
    syslinux/syslinux.cfg       LINUX + initrd=<ramdisk>,<key.cpio> + APPEND
    stiefel/vmlinuz             the stiefel ramdisk kernel
    stiefel/initrd.img          the stiefel ramdisk initrd
    stiefel/key.cpio            newc archive holding etc/stiefel/key (0600, root)
    stiefel/manifest.json       what was written (SHA-256 of every file but the key)

The image is built sparse in a work directory (the cache) with the real tools
(sfdisk, mkfs.fat --offset, mtools, syslinux's mtools installer), then only the
laid-out regions are copied to the target (start .. end of ESP, and the backup
GPT), synced, the caches dropped, and read back to compare SHA-256.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import ssl
import struct
import subprocess
import tempfile
import time
import uuid

from ansible_collections.stiefel.system.plugins.module_utils.cpio import key_archive
from ansible_collections.stiefel.system.plugins.module_utils.errors import KeyFileError, StiefelError
from ansible_collections.stiefel.system.plugins.module_utils.fileio import sha256_file
from ansible_collections.stiefel.system.plugins.module_utils.keyfile import decode_key
from ansible_collections.stiefel.system.plugins.module_utils.tools import ToolError, run_tool

FORMAT = "stiefel-usb-v1"
SECTOR = 512
MIB = 1024 * 1024
ESP_START = MIB
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
GPT_BACKUP_SECTORS = 33
MIN_ESP_MIB = 64
ESP_LABEL = "STIEFEL"
BASE_CMDLINE = "console=tty0 console=ttyS0,115200 stiefel.role=client"

SYSTEMD_BOOT_CANDIDATES = ("/usr/lib/systemd/boot/efi/systemd-bootx64.efi",)
SHIM_CANDIDATES = ("/usr/lib/shim/shimx64.efi.signed",)
MOKMANAGER_CANDIDATES = ("/usr/lib/shim/mmx64.efi.signed",)
SIGNED_GRUB_CANDIDATES = ("/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed",)
UEFI_LOADERS = ("shim", "systemd-boot")
# The UEFI CAs of Microsoft's third-party (UEFI CA) program that firmware db lists carry; shim is
# signed by them. Their certificates are not on a Debian machine, so shim is checked by issuer name
# (the firmware checks the rest; the Secure Boot QEMU test proves it with Microsoft's keys enrolled).
MICROSOFT_UEFI_CAS = ("Microsoft Corporation UEFI CA 2011", "Microsoft UEFI CA 2023")
GPTMBR_CANDIDATES = ("/usr/lib/syslinux/mbr/gptmbr.bin", "/usr/lib/SYSLINUX/gptmbr.bin")
BLKFLSBUF = 0x1261
BLKRRPART = 0x125F
CHUNK = 4 * MIB


class StickError(StiefelError):
    """A stick cannot be built, written or verified; the message says why."""


def parse_size(value):
    """'2G', '512M', '1048576' -> bytes (binary units). 0 / empty -> 0."""
    if value in (None, "", 0):
        return 0
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", str(value), re.IGNORECASE)
    if not match:
        raise StickError("bad size %r (use e.g. 512M, 2G or a byte count)" % (value,))
    unit = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[match.group(2).upper()]
    return int(match.group(1)) * unit


def check_key(text):
    """Raise StickError unless ``text`` (bytes) is a valid stiefel key file (never echoes it)."""
    try:
        decode_key(text)
    except KeyFileError as exc:
        raise StickError("invalid stiefel key: %s" % exc) from None


def find_first(candidates, what):
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise StickError("%s not found (looked at %s); install the Debian package" % (what, ", ".join(candidates)))


def run(argv, stdin=None, env_extra=None):
    """Run a tool in the C locale, mtools' drive checks off; return stdout bytes; StickError with its stderr."""
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1", LC_ALL="C")
    env.update(env_extra or {})
    try:
        return run_tool(argv, stdin=stdin, env=env)
    except ToolError as exc:
        raise StickError(str(exc)) from None  # the modules report every stick failure the same way


class StickSpec:
    """What goes on the stick. ``key_text`` is secret: never log or return it."""

    def __init__(self, kernel, initrd, key_text, extra_cmdline="", esp_size_mib=256, target_size=0,
                 uefi_loader="shim"):
        self.kernel = kernel
        self.initrd = initrd
        self.key_text = key_text
        self.extra_cmdline = (extra_cmdline or "").strip()
        self.esp_size_mib = int(esp_size_mib)
        self.target_size = int(target_size) // SECTOR * SECTOR
        self.uefi_loader = uefi_loader
        self.signatures = {}

    @property
    def cmdline(self):
        return (BASE_CMDLINE + " " + self.extra_cmdline).strip()

    @property
    def esp_size(self):
        return self.esp_size_mib * MIB

    @property
    def esp_end(self):
        return ESP_START + self.esp_size

    @property
    def min_target_size(self):
        return self.esp_end + MIB

    def regions(self):
        """Byte ranges of the target that the layout defines: (offset, length)."""
        backup = GPT_BACKUP_SECTORS * SECTOR
        return [(0, self.esp_end), (self.target_size - backup, backup)]

    def validate(self):
        for what, path in (("kernel", self.kernel), ("initrd", self.initrd)):
            if not os.path.isfile(path):
                raise StickError("%s %s does not exist (build the ramdisk first: playbooks/build_image.yml)"
                                 % (what, path))
        check_key(self.key_text)
        if "\n" in self.extra_cmdline or "stiefel-key" in self.extra_cmdline:
            raise StickError("extra command line must be one line and must not carry the key")
        if self.esp_size_mib < MIN_ESP_MIB:
            raise StickError("ESP size %d MiB is below the minimum of %d MiB" % (self.esp_size_mib, MIN_ESP_MIB))
        payload = os.path.getsize(self.kernel) + os.path.getsize(self.initrd) + 2 * MIB
        if payload > self.esp_size * 0.95:
            raise StickError("kernel + initrd (%d MiB) do not fit a %d MiB ESP; raise the ESP size"
                             % (payload // MIB + 1, self.esp_size_mib))
        if self.target_size < self.min_target_size:
            raise StickError("target is %d MiB, the stick layout needs at least %d MiB"
                             % (self.target_size // MIB, self.min_target_size // MIB))
        if self.uefi_loader not in UEFI_LOADERS:
            raise StickError("uefi_loader %r is not one of %s" % (self.uefi_loader, ", ".join(UEFI_LOADERS)))
        if self.uefi_loader == "shim":
            self.signatures = check_secure_boot_chain(self.secure_boot_files())

    # ESP contents -------------------------------------------------------
    def loader_conf(self):
        return "default stiefel.conf\ntimeout 0\neditor no\nconsole-mode keep\n"

    def systemd_boot_entry(self):
        return ("title   stiefel client\n"
                "linux   /stiefel/vmlinuz\n"
                "initrd  /stiefel/initrd.img\n"
                "initrd  /stiefel/key.cpio\n"
                "options %s\n" % self.cmdline)

    def grub_cfg(self):
        # One initrd command with two files: GRUB concatenates them, as the kernel expects.
        return ("set timeout=0\n"
                "set default=0\n"
                'menuentry "stiefel client" {\n'
                "  linux  /stiefel/vmlinuz %s\n"
                "  initrd /stiefel/initrd.img /stiefel/key.cpio\n"
                "}\n" % self.cmdline)

    def secure_boot_files(self):
        """{role: host path} of what Secure Boot firmware, shim and GRUB check on this stick."""
        return {"shim": find_first(SHIM_CANDIDATES, "shim (shim-signed)"),
                "mokmanager": find_first(MOKMANAGER_CANDIDATES, "MokManager (shim-signed)"),
                "grub": find_first(SIGNED_GRUB_CANDIDATES, "signed GRUB (grub-efi-amd64-signed)"),
                "kernel": self.kernel}

    def uefi_files(self):
        if self.uefi_loader == "shim":
            signed = self.secure_boot_files()
            return [
                ("EFI/BOOT/BOOTX64.EFI", ("file", signed["shim"]), False),
                ("EFI/BOOT/grubx64.efi", ("file", signed["grub"]), False),
                ("EFI/BOOT/mmx64.efi", ("file", signed["mokmanager"]), False),
                ("EFI/BOOT/grub.cfg", ("data", self.grub_cfg().encode()), False),
            ]
        return [
            ("EFI/BOOT/BOOTX64.EFI", ("file", find_first(SYSTEMD_BOOT_CANDIDATES, "systemd-boot")), False),
            ("loader/loader.conf", ("data", self.loader_conf().encode()), False),
            ("loader/entries/stiefel.conf", ("data", self.systemd_boot_entry().encode()), False),
        ]

    def esp_directories(self):
        uefi = ["EFI", "EFI/BOOT"] + (["loader", "loader/entries"] if self.uefi_loader == "systemd-boot" else [])
        return uefi + ["syslinux", "stiefel"]

    def uefi_description(self):
        if self.uefi_loader == "shim":
            return "shim + GRUB (signed, Secure Boot on or off)"
        return "systemd-boot (unsigned, Secure Boot off only)"

    def syslinux_cfg(self):
        return ("SERIAL 0 115200\n"
                "DEFAULT stiefel\n"
                "PROMPT 0\n"
                "TIMEOUT 0\n"
                "LABEL stiefel\n"
                "  LINUX /stiefel/vmlinuz\n"
                "  APPEND initrd=/stiefel/initrd.img,/stiefel/key.cpio %s\n" % self.cmdline)

    def key_cpio(self):
        return key_archive(self.key_text)

    def esp_files(self):
        """[(esp path, bytes or host file path, secret?)] in copy order (manifest excluded)."""
        return self.uefi_files() + [
            ("syslinux/syslinux.cfg", ("data", self.syslinux_cfg().encode()), False),
            ("stiefel/vmlinuz", ("file", self.kernel), False),
            ("stiefel/initrd.img", ("file", self.initrd), False),
            ("stiefel/key.cpio", ("data", self.key_cpio()), True),
        ]

    def manifest(self):
        files = {}
        for path, (kind, src), secret in self.esp_files():
            if secret:
                continue
            files[path] = sha256_file(src) if kind == "file" else hashlib.sha256(src).hexdigest()
        return {
            "format": FORMAT,
            "target_size": self.target_size,
            "esp_start": ESP_START,
            "esp_size": self.esp_size,
            "cmdline": self.cmdline,
            "bootloaders": {"uefi": self.uefi_loader, "bios": "syslinux gptmbr.bin"},
            "files": files,
        }

    def manifest_bytes(self):
        return (json.dumps(self.manifest(), indent=1, sort_keys=True) + "\n").encode()

    def plan(self):
        """A printable plan (no secrets)."""
        files = []
        for path, (kind, src), secret in self.esp_files():
            size = os.path.getsize(src) if kind == "file" else len(src)
            files.append({"path": "/" + path, "size": size,
                          "source": src if kind == "file" else ("generated, secret" if secret else "generated")})
        return {
            "target_size": self.target_size,
            "partition_table": "gpt",
            "partitions": [{"number": 1, "type": "EFI system (LegacyBIOSBootable)", "start": ESP_START,
                            "size": self.esp_size, "filesystem": "vfat FAT32 label %s" % ESP_LABEL}],
            "bootloaders": {"uefi": self.uefi_description(),
                            "bios": "syslinux (gptmbr.bin in the protective MBR, ldlinux on the ESP)"},
            "cmdline": self.cmdline,
            "files": files,
            "secure_boot": self.signatures,
            "secure_boot_summary": secure_boot_summary(self.signatures),
            "bytes_to_write": sum(length for _offset, length in self.regions()),
        }


# Secure Boot chain ---------------------------------------------------------
def sbverify_list(path):
    """``sbverify --list`` of a PE/COFF image: its signatures' issuers and certificates (text)."""
    return run(["sbverify", "--list", path]).decode("utf-8", "replace")


def parse_sbverify_list(text):
    """{'signed': bool, 'issuers': [...], 'signers': [...]} from ``sbverify --list`` output.

    'signers' are the subjects of the certificates the signatures carry, leaf first.
    """
    issuers, signers = [], []
    section = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("image signature issuers"):
            section = "issuers"
        elif stripped.startswith("image signature certificates"):
            section = "certificates"
        elif stripped.startswith("- subject:") and section == "certificates":
            signers.append(_common_name(stripped.split(":", 1)[1]))
        elif stripped.startswith("- ") and section == "issuers":
            issuers.append(_common_name(stripped[2:]))
    signed = bool(re.search(r"^signature \d+", text, re.MULTILINE)) and "No signature table" not in text
    return {"signed": signed, "issuers": issuers, "signers": signers}


def _common_name(dn):
    match = re.search(r"/CN=([^/]+)", dn.strip())
    return match.group(1).strip() if match else dn.strip()


def shim_vendor_cert_pem(shim, workdir):
    """The CA certificate shim trusts besides the firmware's db (its .vendor_cert section), as a PEM file.

    The section starts with a table of four little-endian uint32 (authorized size, deauthorized
    size, authorized offset, deauthorized offset); Debian's shim carries one DER certificate there.
    """
    section = os.path.join(workdir, "vendor_cert.bin")
    run(["objcopy", "--dump-section", ".vendor_cert=" + section, shim, os.path.join(workdir, "shim.copy")])
    if not os.path.exists(section):  # objcopy only warns about a missing section
        raise StickError("%s has no .vendor_cert section (not a shim?)" % shim)
    with open(section, "rb") as handle:
        data = handle.read()
    if len(data) < 16:
        raise StickError("%s has no usable .vendor_cert section" % shim)
    size, _dsize, offset, _doffset = struct.unpack_from("<4I", data)
    der = data[offset:offset + size]
    if not der.startswith(b"\x30") or offset + size > len(data):
        raise StickError("%s: .vendor_cert holds no DER certificate" % shim)
    pem = os.path.join(workdir, "vendor_cert.pem")
    with open(pem, "w", encoding="ascii") as handle:
        handle.write(ssl.DER_cert_to_PEM_cert(der))
    return pem


def verifies_against(path, pem):
    """True if a signature of ``path`` chains to the certificate in ``pem`` (``sbverify --cert``)."""
    proc = subprocess.run(["sbverify", "--cert", pem, path], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          check=False)
    return proc.returncode == 0


UNSIGNED_KERNEL_HELP = ("Use the signed kernel of Debian's linux-image-amd64 (the ramdisk build's vmlinuz), "
                        "or build a stick that boots only with Secure Boot off (uefi_loader: systemd-boot)")


def check_secure_boot_chain(files):
    """Check shim, MokManager, GRUB and the kernel the way Secure Boot will, before anything is written.

    ``files`` is {"shim", "mokmanager", "grub", "kernel": host path}. Returns {role: {path, signed,
    signers, issuers, verified_by}}; raises StickError, saying what to do, when the chain would not boot.
    """
    report = {}
    for role, path in files.items():
        try:
            listing = sbverify_list(path)
        except StickError as exc:
            raise StickError("the %s %s is not a PE/COFF (EFI) image Secure Boot can check (%s). %s"
                             % (role, path, exc, UNSIGNED_KERNEL_HELP)) from None
        report[role] = dict(parse_sbverify_list(listing), path=path)
    shim = report["shim"]
    microsoft = sorted(set(shim["issuers"]) & set(MICROSOFT_UEFI_CAS))
    if not shim["signed"] or not microsoft:
        raise StickError("shim %s is not signed by Microsoft's UEFI CA (issuers: %s); reinstall shim-signed"
                         % (files["shim"], ", ".join(shim["issuers"]) or "none"))
    shim["verified_by"] = "issuer name " + " / ".join(microsoft)
    with tempfile.TemporaryDirectory(prefix="stiefel-sb-") as tmp:
        pem = shim_vendor_cert_pem(files["shim"], tmp)
        subject = run(["openssl", "x509", "-noout", "-subject", "-nameopt", "compat", "-in", pem]).decode()
        vendor = _common_name(subject.split("=", 1)[-1])
        for role in ("mokmanager", "grub", "kernel"):
            entry = report[role]
            if not entry["signed"]:
                raise StickError("the %s %s is not signed (sbverify --list: no signature table), so Secure "
                                 "Boot would refuse it. %s" % (role, entry["path"], UNSIGNED_KERNEL_HELP))
            if not verifies_against(entry["path"], pem):
                raise StickError("the %s %s is signed by %s, which does not chain to %s (the only key this "
                                 "stick's shim trusts besides the firmware's), so Secure Boot would refuse it. "
                                 "%s" % (role, entry["path"], ", ".join(entry["signers"]) or "an unknown key",
                                         vendor, UNSIGNED_KERNEL_HELP))
            entry["verified_by"] = vendor + " (shim's vendor certificate)"
    return report


def secure_boot_summary(report):
    """One printable line per checked file: who signed it and what that was verified against."""
    if not report:
        return ["not checked (systemd-boot, boots with Secure Boot off only)"]
    return ["%s signed by %s, verified by %s" % (role, (entry["signers"] or ["nobody"])[0], entry["verified_by"])
            for role, entry in report.items()]


def fat32_cluster_sectors(sectors):
    """Largest cluster (1..8 sectors) that still gives FAT32 its minimum of 65525 clusters.

    mkfs.fat's default (4 KiB) makes an ESP under ~260 MiB a FAT32 volume with too few
    clusters, which other FAT drivers (mtools, some firmware) then read as FAT16.
    """
    spc = 8
    while spc > 1 and sectors // spc < 66000:
        spc //= 2
    return spc


def _mtools_target(image, offset=ESP_START):
    return "%s@@%d" % (image, offset)


def build_image(spec, image, log=None):
    """Create the sparse stick image ``image`` of ``spec.target_size`` bytes. Returns its regions' SHA-256."""
    log = log or (lambda text: None)
    spec.validate()
    gptmbr = find_first(GPTMBR_CANDIDATES, "syslinux gptmbr.bin")
    if os.path.exists(image):
        os.unlink(image)
    with open(image, "wb") as handle:
        handle.truncate(spec.target_size)
    esp_sectors = spec.esp_size // SECTOR
    log("partitioning (GPT, ESP %d MiB)" % spec.esp_size_mib)
    script = ("label: gpt\nlabel-id: %s\nfirst-lba: 2048\n"
              'start=2048, size=%d, type=%s, uuid=%s, name="stiefel-esp", attrs="LegacyBIOSBootable"\n'
              % (str(uuid.uuid4()).upper(), esp_sectors, ESP_TYPE, str(uuid.uuid4()).upper()))
    run(["sfdisk", "--no-reread", "--no-tell-kernel", "--quiet", image], stdin=script.encode())
    log("formatting ESP (FAT32)")
    volid = "%08x" % int.from_bytes(os.urandom(4), "big")
    run(["mkfs.fat", "-F", "32", "-s", str(fat32_cluster_sectors(esp_sectors)), "-n", ESP_LABEL,
         "-i", volid, "-h", str(ESP_START // SECTOR),
         "--offset=%d" % (ESP_START // SECTOR), image, str(spec.esp_size // 1024)])
    target = _mtools_target(image)
    for directory in spec.esp_directories():
        run(["mmd", "-i", target, "::/" + directory])
    log("installing syslinux (legacy BIOS)")
    run(["syslinux", "--offset", str(ESP_START), "--directory", "/syslinux", "--install", image])
    with tempfile.TemporaryDirectory(prefix="stiefel-usb-") as tmp:
        os.chmod(tmp, 0o700)
        files = spec.esp_files() + [("stiefel/manifest.json", ("data", spec.manifest_bytes()), False)]
        for path, (kind, src), _secret in files:
            log("copying /%s" % path)
            if kind == "data":
                staged = os.path.join(tmp, os.path.basename(path))
                fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(src)
                src = staged
            run(["mcopy", "-o", "-i", target, src, "::/" + path])
    log("writing BIOS boot code (gptmbr.bin) to the protective MBR")
    with open(gptmbr, "rb") as handle:
        code = handle.read(440)
    with open(image, "r+b") as handle:
        handle.seek(0)
        handle.write(code)
        handle.seek(0x1BE)
        handle.write(b"\x80")  # PMBR active: some BIOSes only boot "active" disks
    return region_hashes(image, spec.regions())


def region_hashes(path, regions):
    return [sha256_file(path, off, length) for off, length in regions]


def read_esp_file(target, path):
    """Bytes of ``/path`` on the target's ESP (via mtools, no mount), or None."""
    try:
        return run(["mcopy", "-n", "-i", _mtools_target(target), "::/" + path, "-"])
    except StickError:
        return None


def target_matches(spec, target):
    """(True, "") if ``target`` already holds exactly this stick; else (False, reason)."""
    try:
        size = _size_of(target)
    except OSError as exc:
        return False, "cannot read target: %s" % exc
    if size // SECTOR * SECTOR != spec.target_size:
        return False, "target size differs"
    raw = read_esp_file(target, "stiefel/manifest.json")
    if raw is None:
        return False, "no stiefel manifest on the target"
    try:
        found = json.loads(raw.decode("utf-8"))
    except ValueError:
        return False, "unreadable manifest on the target"
    expected = spec.manifest()
    if not isinstance(found, dict):
        return False, "unreadable manifest on the target"
    if found != expected:
        keys = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
        return False, "manifest differs (%s)" % ", ".join(keys)
    if read_esp_file(target, "stiefel/key.cpio") != spec.key_cpio():
        return False, "key differs"
    for path, digest in expected["files"].items():
        data = read_esp_file(target, path)
        if data is None or hashlib.sha256(data).hexdigest() != digest:
            return False, "/%s differs" % path
    with open(target, "rb") as handle:
        mbr = handle.read(SECTOR)
    with open(find_first(GPTMBR_CANDIDATES, "syslinux gptmbr.bin"), "rb") as handle:
        if mbr[:440] != handle.read(440) or mbr[510:512] != b"\x55\xaa":
            return False, "BIOS boot code differs"
    return True, ""


def _size_of(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _drop_cache(fd, is_block):
    if is_block:
        try:
            fcntl.ioctl(fd, BLKFLSBUF)
        except OSError:
            pass
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def write_image(image, target, regions, is_block, create_size=0, progress=None):
    """Copy ``regions`` of ``image`` to ``target``, fsync, drop caches. Reports percent via ``progress``."""
    total = sum(length for _offset, length in regions)
    done = 0
    if is_block:
        # O_EXCL on a block device fails with EBUSY if the kernel has it claimed (mounted, in use).
        flags = os.O_WRONLY | os.O_EXCL
    else:
        flags = os.O_WRONLY | os.O_CREAT
    try:
        fd = os.open(target, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise StickError("%s is busy (in use by the kernel); refusing to write" % target) from None
        raise StickError("cannot open %s for writing: %s" % (target, exc.strerror)) from None
    try:
        if not is_block and create_size and os.fstat(fd).st_size < create_size:
            os.ftruncate(fd, create_size)
        last = -1
        with open(image, "rb") as src:
            for offset, length in regions:
                src.seek(offset)
                pos = offset
                end = offset + length
                while pos < end:
                    chunk = src.read(min(CHUNK, end - pos))
                    if not chunk:
                        raise StickError("image %s is shorter than expected" % image)
                    view = memoryview(chunk)
                    while view:
                        written = os.pwrite(fd, view, pos)
                        pos += written
                        done += written
                        view = view[written:]
                    pct = done * 100 // total
                    if progress and pct != last:
                        progress(pct, done, total)
                        last = pct
        os.fsync(fd)
        _drop_cache(fd, is_block)
        if is_block:
            try:
                fcntl.ioctl(fd, BLKRRPART)  # let the kernel see the new partition table
            except OSError:
                pass
    finally:
        os.close(fd)
    return total


def verify_target(target, regions, expected, is_block):
    """Read the regions back from the target (caches dropped first) and compare SHA-256."""
    fd = os.open(target, os.O_RDONLY)
    try:
        _drop_cache(fd, is_block)
    finally:
        os.close(fd)
    found = region_hashes(target, regions)
    if found != expected:
        raise StickError("read-back verification failed on %s: wrote %s, read %s" % (target, expected, found))
    return found


def timed(stages, name):
    """Context helper: ``with timed(stages, 'build'):`` records seconds per stage."""

    class _Timer:
        def __enter__(self):
            self.start = time.monotonic()

        def __exit__(self, *exc):
            stages[name] = round(time.monotonic() - self.start, 2)
            return False

    return _Timer()


def remove_quietly(path):
    try:
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
