"""Build the virtual laptop of the end-to-end scenario.

A real Debian bookworm (mmdebstrap, the host's apt sources) with its own
kernel and initramfs, on a GPT disk image that boots on its own in QEMU:
``firmware="bios"`` GRUB for i386-pc, or ``firmware="uefi"`` the way a Debian
laptop with Secure Boot boots (an ESP with shim as the removable-media loader,
Debian's signed GRUB, a grub.cfg stub that loads the root's /boot/grub/grub.cfg,
and the root's Debian-signed kernel). The project's setup_server.yml is applied to the root
through a chroot connection before the root is packed into the image, so
what boots is what the playbook made.

Steps are separate so molecule's create can run them with progress:
  root      mmdebstrap the root (cached as a tarball keyed by its inputs)
  unpack    unpack it to a working root directory and add the test fixtures
  image     make the disk image from the root: GPT, ext4 root (mkfs.ext4 -d),
            and --firmware bios (BIOS boot partition, GRUB for i386-pc) or
            uefi (ESP: shim, signed GRUB, grub.cfg stub)
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

PACKAGES = [
    "systemd", "systemd-sysv", "udev", "dbus", "linux-image-amd64", "initramfs-tools", "e2fsprogs",
    "kmod", "procps", "iproute2", "python3", "python3-cryptography", "python3-pyroute2", "kexec-tools",
    "nbd-client", "busybox", "zstd", "ca-certificates",
    # the NBD hook's TCP relay (the laptop role installs it too, but this root has no package
    # lists for apt to find it with)
    "socat",
    # pairing (issue 17): the laptop role installs them too, for the same reason they are here
    "python3-spake2", "dnsmasq-base",
    # for tests/integration/test_systemd_units_qemu.py, which boots this same root to run
    # nbd_serve and the standalone unit under a real systemd: one root tarball serves both
    # (SSH for Ansible, nbdkit and nbdinfo, python3-apt for the role's package task, sudo)
    "openssh-server", "nbdkit", "libnbd-bin", "python3-apt", "sudo",
]
# Where the root tarball is cached, below $STIEFEL_CACHE_DIR (shared by e2e and the systemd test).
TARBALL_DIR = "laptop-root"
HOSTNAME = "stiefel-laptop"
ROOT_UUID = "5f1e7a2c-0d3b-4c8e-9a61-2b7c4d5e6f70"
DISK_SIZE = 3 << 30
BIOS_BOOT_TYPE = "21686148-6449-6E6F-744E-656564454649"
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
FIRMWARES = ("bios", "uefi")
ESP_SECTORS = 65536  # 32 MiB: shim and GRUB take 5 MiB
ESP_VOLUME_ID = "5F1E7A2C"
# Where the root partition starts: after a 1 MiB BIOS boot partition, or after the ESP.
ROOT_START = {"bios": 4096, "uefi": 2048 + ESP_SECTORS}
ROOT_START_SECTOR = ROOT_START["bios"]
# The host's Secure Boot chain: shim-signed (Microsoft-signed, carries Debian's CA) and
# grub-efi-amd64-signed (signed by Debian's CA), the same files the stick's build uses. The root's
# kernel is linux-image-amd64's, signed by Debian. No fbx64: it would write boot entries into NVRAM.
SHIM = "/usr/lib/shim/shimx64.efi.signed"
SIGNED_GRUB = "/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"
# Debian's signed GRUB is one image with its modules built in; on removable media its prefix is
# /EFI/debian and it reads EFI/BOOT/grub.cfg (or EFI/debian/grub.cfg) on the ESP. The stub finds
# the root and hands over to the root's own grub.cfg, as grub-install writes it on a Debian laptop.
GRUB_STUB = """search.fs_uuid {uuid} root
set prefix=($root)/boot/grub
configfile $prefix/grub.cfg
"""


def log(msg):
    print("[laptop-disk %s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


def run(argv, **kw):
    log("$ " + " ".join(argv))
    return subprocess.run(argv, check=True, **kw)


def host_apt_sources():
    """The host's apt source files: mmdebstrap pastes a file MIRROR into the chroot."""
    files = []
    if os.path.exists("/etc/apt/sources.list") and any(
        line.strip() and not line.lstrip().startswith("#") for line in open("/etc/apt/sources.list")
    ):
        files.append("/etc/apt/sources.list")
    files += sorted(glob.glob("/etc/apt/sources.list.d/*.sources")) + sorted(glob.glob("/etc/apt/sources.list.d/*.list"))
    if not files:
        raise SystemExit("no apt sources configured on this host")
    return files


def inputs_hash(extra_packages=()):
    """The cache key of the root tarball. Without extras it is exactly the e2e's key."""
    packages = PACKAGES + sorted(extra_packages) if extra_packages else PACKAGES
    digest = hashlib.sha256(json.dumps(packages).encode())
    for path in host_apt_sources():
        digest.update(open(path, "rb").read())
    return digest.hexdigest()[:16]


def build_root_tarball(workdir, extra_packages=()):
    """The root as a tarball in ``workdir`` (older ones there are removed: give another user its own workdir).

    ``extra_packages`` are installed too and are part of the cache key (the e2e and the systemd
    units test share the default list, so they share one tarball).
    """
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    tarball = os.path.join(workdir, "laptop-root-%s.tar" % inputs_hash(extra_packages))
    if os.path.exists(tarball):
        log("root tarball cached: %s" % tarball)
        return tarball
    for old in glob.glob(os.path.join(workdir, "laptop-root-*.tar")):
        os.unlink(old)
    tmp = tarball + ".part"
    started = time.monotonic()
    argv = ["mmdebstrap", "--mode=root", "--variant=minbase", "--format=tar",
            "--include=" + ",".join(PACKAGES + sorted(extra_packages)),
            "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*", "--dpkgopt=path-include=/usr/share/locale/locale.alias",
            "bookworm", tmp] + host_apt_sources()
    run(argv)
    os.replace(tmp, tarball)
    log("root built in %.0f s: %s (%d MiB)" % (time.monotonic() - started, tarball, os.path.getsize(tarball) >> 20))
    return tarball


def unpack_root(tarball, root):
    if os.path.exists(root):
        shutil.rmtree(root)
    os.makedirs(root)
    run(["tar", "-C", root, "--numeric-owner", "-xpf", tarball])
    with open(os.path.join(root, "etc/hostname"), "w") as handle:
        handle.write(HOSTNAME + "\n")
    with open(os.path.join(root, "etc/hosts"), "w") as handle:
        handle.write("127.0.0.1 localhost\n127.0.1.1 %s\n::1 localhost ip6-localhost\n" % HOSTNAME)
    with open(os.path.join(root, "etc/machine-id"), "w") as handle:
        handle.write(uuid.uuid4().hex + "\n")
    with open(os.path.join(root, "etc/fstab"), "w") as handle:
        handle.write("UUID=%s / ext4 errors=remount-ro 0 1\n" % ROOT_UUID)
    # Services that only slow a TCG boot and play no part in the flow. Debian's
    # kexec-tools loads a kexec kernel at boot for its own reboot handling.
    for unit in ("kexec-load.service", "kexec.service", "e2scrub_all.timer", "e2scrub_reap.service",
                 "systemd-binfmt.service", "apt-daily.timer", "apt-daily-upgrade.timer"):
        link = os.path.join(root, "etc/systemd/system", unit)
        if not os.path.lexists(link):
            os.symlink("/dev/null", link)
    # A root without password on the serial console: this is a throw-away test VM.
    run(["chroot", root, "passwd", "-d", "root"], stdout=subprocess.DEVNULL)
    install_probe(root)
    return root


PROBE_SCRIPT = r"""#!/bin/sh
# End-to-end probe: only acts when the laptop OS runs on the desktop (stiefeled).
grep -q 'stiefel.mac=' /proc/cmdline || exit 0
echo "E2E-PROBE machine-id=$(cat /etc/machine-id) hostname=$(hostname) root=$(findmnt -no SOURCE /)" > /dev/ttyS0
head -c 1048576 /dev/urandom > /root/e2e-proof
sync
echo "E2E-PROOF sha256=$(sha256sum /root/e2e-proof | cut -d' ' -f1)" > /dev/ttyS0
echo "E2E-PROBE powering off" > /dev/ttyS0
systemctl --no-block poweroff
"""

PROBE_UNIT = """[Unit]
Description=stiefel end-to-end probe (test fixture)
After=multi-user.target
ConditionKernelCommandLine=stiefel.mac

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/stiefel-e2e-probe

[Install]
WantedBy=multi-user.target
"""


def install_probe(root):
    path = os.path.join(root, "usr/local/sbin/stiefel-e2e-probe")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(PROBE_SCRIPT)
    os.chmod(path, 0o755)
    with open(os.path.join(root, "etc/systemd/system/stiefel-e2e-probe.service"), "w") as handle:
        handle.write(PROBE_UNIT)
    wants = os.path.join(root, "etc/systemd/system/multi-user.target.wants")
    os.makedirs(wants, exist_ok=True)
    link = os.path.join(wants, "stiefel-e2e-probe.service")
    if not os.path.lexists(link):
        os.symlink("/etc/systemd/system/stiefel-e2e-probe.service", link)
    # A marker line when the boot target is reached, read from the serial console.
    with open(os.path.join(root, "etc/systemd/system/stiefel-e2e-target.service"), "w") as handle:
        handle.write("[Unit]\nDescription=boot target marker (test fixture)\nAfter=multi-user.target\n\n"
                     "[Service]\nType=oneshot\nExecStart=/bin/sh -c 'echo \"E2E-TARGET multi-user reached\" > /dev/ttyS0'\n\n"
                     "[Install]\nWantedBy=multi-user.target\n")
    link = os.path.join(wants, "stiefel-e2e-target.service")
    if not os.path.lexists(link):
        os.symlink("/etc/systemd/system/stiefel-e2e-target.service", link)


def kernel_version(root):
    kernels = sorted(glob.glob(os.path.join(root, "boot/vmlinuz-*")))
    if not kernels:
        raise SystemExit("no kernel in %s/boot" % root)
    return os.path.basename(kernels[-1])[len("vmlinuz-"):]


GRUB_CFG = """set timeout=1
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
menuentry 'Debian GNU/Linux (stiefel laptop)' {{
    search --no-floppy --fs-uuid --set=root {uuid}
    linux /boot/vmlinuz-{version} root=UUID={uuid} ro console=ttyS0,115200 {extra}
    initrd /boot/initrd.img-{version}
}}
"""


def esp_image(path, root_uuid=ROOT_UUID):
    """A FAT ESP image file: shim as EFI/BOOT/BOOTX64.EFI, signed GRUB beside it, the grub.cfg stub."""
    for need in (SHIM, SIGNED_GRUB):
        if not os.path.exists(need):
            raise SystemExit("%s missing (Debian packages shim-signed, grub-efi-amd64-signed)" % need)
    if os.path.exists(path):
        os.unlink(path)
    run(["mkfs.fat", "-F", "16", "-n", "EFI", "-i", ESP_VOLUME_ID, "-C", path, str(ESP_SECTORS // 2)],
        stdout=subprocess.DEVNULL)
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    stub = path + ".grub.cfg"
    with open(stub, "w") as handle:
        handle.write(GRUB_STUB.format(uuid=root_uuid))
    try:
        run(["mmd", "-i", path, "::/EFI", "::/EFI/BOOT"], env=env)
        for src, dst in ((SHIM, "EFI/BOOT/BOOTX64.EFI"), (SIGNED_GRUB, "EFI/BOOT/grubx64.efi"),
                         (stub, "EFI/BOOT/grub.cfg")):
            run(["mcopy", "-i", path, src, "::/" + dst], env=env)
    finally:
        os.unlink(stub)
    return path


def sbverify_loaders(image, root, workdir):
    """``sbverify --list`` of what Secure Boot checks on a UEFI laptop disk: shim, GRUB, the root's kernel."""
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    report = []
    for esp_path in ("EFI/BOOT/BOOTX64.EFI", "EFI/BOOT/grubx64.efi", None):
        if esp_path is None:
            path, shown = os.path.join(root, "boot/vmlinuz-%s" % kernel_version(root)), "<root>/boot/vmlinuz"
        else:
            path, shown = os.path.join(workdir, "esp-" + os.path.basename(esp_path)), "<ESP>/" + esp_path
            with open(path, "wb") as handle:
                subprocess.run(["mcopy", "-n", "-i", "%s@@%d" % (image, 2048 * 512), "::/" + esp_path, "-"],
                               check=True, stdout=handle, env=env)
        proc = subprocess.run(["sbverify", "--list", path], capture_output=True, text=True, check=False)
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "gaps between" not in ln]
        report.append("sbverify --list %s:\n  %s" % (shown, "\n  ".join(lines)))
        if esp_path is not None:
            os.unlink(path)
    return "\n".join(report)


def root_start_sector(firmware):
    if firmware not in FIRMWARES:
        raise SystemExit("firmware must be one of %s, not %r" % ("/".join(FIRMWARES), firmware))
    return ROOT_START[firmware]


def make_image(root, image, extra_cmdline="", firmware="bios"):
    start = root_start_sector(firmware)
    version = kernel_version(root)
    if not os.path.exists(os.path.join(root, "boot/initrd.img-%s" % version)):
        raise SystemExit("no initramfs for %s in %s/boot" % (version, root))
    os.makedirs(os.path.join(root, "boot/grub"), exist_ok=True)
    with open(os.path.join(root, "boot/grub/grub.cfg"), "w") as handle:
        handle.write(GRUB_CFG.format(uuid=ROOT_UUID, version=version, extra=extra_cmdline))
    tmp = image + ".part"
    if os.path.exists(tmp):
        os.unlink(tmp)
    with open(tmp, "wb") as handle:
        handle.truncate(DISK_SIZE)
    first = ("start=2048, size=%d, type=%s, name=EFI" % (ESP_SECTORS, ESP_TYPE) if firmware == "uefi"
             else "start=2048, size=2048, type=%s, name=bios" % BIOS_BOOT_TYPE)
    layout = "label: gpt\n%s\nstart=%d, type=%s, name=root\n" % (first, start, LINUX_TYPE)
    run(["sfdisk", "--quiet", tmp], input=layout.encode())
    root_bytes = DISK_SIZE - start * 512 - (1 << 20)  # GPT backup at the end
    run(["mkfs.ext4", "-q", "-F", "-U", ROOT_UUID, "-L", "laptop-root", "-d", root,
         "-E", "offset=%d" % (start * 512), tmp, "%dk" % (root_bytes >> 10)])
    if firmware == "uefi":
        esp = esp_image(image + ".esp")
        try:
            run(["dd", "if=" + esp, "of=" + tmp, "bs=1M", "seek=1", "conv=notrunc,sparse", "status=none"])
        finally:
            os.unlink(esp)
        os.replace(tmp, image)
        log("disk image ready: %s (UEFI: shim + signed GRUB, kernel %s)" % (image, version))
        return image
    loop = subprocess.run(["losetup", "--find", "--show", "--partscan", tmp], check=True,
                          capture_output=True, text=True).stdout.strip()
    if not os.path.exists(loop + "p2"):
        # The kernel's partition scan does not always run for a fresh loop device here.
        subprocess.run(["partx", "-a", loop], check=False, capture_output=True)
    mnt = tempfile.mkdtemp(prefix="stf-laptop-mnt.")
    try:
        run(["mount", loop + "p2", mnt])
        try:
            run(["grub-install", "--target=i386-pc", "--boot-directory=%s/boot" % mnt, "--modules=part_gpt ext2", loop])
        finally:
            run(["umount", mnt])
    finally:
        os.rmdir(mnt)
        subprocess.run(["losetup", "-d", loop], check=False)
    os.replace(tmp, image)
    log("disk image ready: %s (kernel %s)" % (image, version))
    return image


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["root", "unpack", "image"])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--extra-cmdline", default="")
    parser.add_argument("--firmware", choices=FIRMWARES, default="bios")
    args = parser.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    root = os.path.join(args.workdir, "laptop-root")
    if args.step == "root":
        build_root_tarball(args.workdir)
    elif args.step == "unpack":
        unpack_root(build_root_tarball(args.workdir), root)
    else:
        make_image(root, os.path.join(args.workdir, "laptop.img"), args.extra_cmdline, args.firmware)
    return 0


if __name__ == "__main__":
    sys.exit(main())
