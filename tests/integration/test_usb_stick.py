# -*- coding: utf-8 -*-
"""Integration tests for the USB stick writer (issue 5), with the real tools.

* flash_usb.yml writes a stick into an image file; the partition table (sfdisk),
  the ESP files (mtools), the key archive and the BIOS boot code are checked.
* The image boots in QEMU (TCG) with OVMF (UEFI) and with SeaBIOS (legacy):
  - always with a fixture payload (Debian's kernel + a busybox initrd whose /init
    reports what it sees: the key file's mode/owner/hash, the command line);
  - with the real stiefel ramdisk when $STIEFEL_CACHE_DIR/ramdisk/ exists, until
    its markers (skipped with a reason otherwise).
* Every refusal (mounted partition, partition, /dev/null, directory, the disk
  holding /, no confirmation, check mode) runs against loop devices and leaves
  the device byte-for-byte unchanged.

Run as root: .venv/bin/python -m pytest -m integration tests/integration/test_usb_stick.py
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
import uuid

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import blockdev, cpio
from ansible_collections.stiefel.system.plugins.module_utils.fileio import sha256_file as sha256_path
from lab.ansible_output import recap_changed

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CACHE = os.environ.get("STIEFEL_CACHE_DIR") or os.path.join(REPO, ".cache")
USB_CACHE = os.path.join(CACHE, "usb")
FIXTURE = os.path.join(USB_CACHE, "fixture")
RAMDISK = os.path.join(CACHE, "ramdisk")
PLAYBOOK = os.path.join(REPO, "playbooks", "flash_usb.yml")
ANSIBLE = os.path.join(REPO, ".venv", "bin", "ansible-playbook")
OVMF_CODE = "/usr/share/OVMF/OVMF_CODE.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS.fd"
FIXTURE_MARK = "stiefel-usb-fixture:"
BOOT_TIMEOUT = 240

if os.geteuid() != 0:
    pytest.skip("integration tests run as root (loop devices, mounts)", allow_module_level=True)


# --------------------------------------------------------------------------- helpers
def new_key():
    return ("stiefel-key-v1:%s\n" % secrets.token_hex(32)).encode()


def write_key(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(text)


def fixture_kernel():
    """A Debian 12 kernel (vmlinuz from linux-image-*-amd64, fetched once with apt-get download)."""
    found = sorted(glob.glob(os.path.join(FIXTURE, "boot", "vmlinuz-*")))
    if found:
        return found[-1]
    os.makedirs(FIXTURE, exist_ok=True)
    deps = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True,
                          text=True, check=True).stdout
    pkg = [line.split(":", 1)[1].strip() for line in deps.splitlines()
           if line.strip().startswith("Depends:") and "linux-image-" in line][0]
    print("fixture: apt-get download %s" % pkg)
    subprocess.run(["apt-get", "download", pkg], cwd=FIXTURE, check=True, capture_output=True)
    deb = glob.glob(os.path.join(FIXTURE, pkg + "_*.deb"))[0]
    tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", deb], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", FIXTURE, "--wildcards", "./boot/vmlinuz-*"], stdin=tar.stdout, check=True)
    tar.wait()
    os.unlink(deb)
    return sorted(glob.glob(os.path.join(FIXTURE, "boot", "vmlinuz-*")))[-1]


FIXTURE_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev
mount -t proc proc /proc
mount -t devtmpfs dev /dev 2>/dev/null
M=stiefel-usb-fixture:
echo "$M init started"
if [ -f /etc/stiefel/key ]; then
  echo "$M key mode=$(stat -c %a /etc/stiefel/key) owner=$(stat -c %u:%g /etc/stiefel/key) sha256=$(sha256sum /etc/stiefel/key | cut -d' ' -f1)"
else
  echo "$M key missing"
fi
if grep -q stiefel-key /proc/cmdline; then echo "$M key on cmdline"; fi
echo "$M cmdline=$(cat /proc/cmdline)"
echo "$M done"
poweroff -f
"""


def fixture_initrd():
    """A busybox initrd (uncompressed newc, written with our cpio module) whose /init reports the key."""
    path = os.path.join(FIXTURE, "initrd-fixture.img")
    entries = [cpio.CpioEntry.directory(d) for d in ("bin", "lib", "lib64", "lib/x86_64-linux-gnu",
                                                     "etc", "proc", "sys", "dev")]
    with open("/usr/bin/busybox", "rb") as handle:
        entries.append(cpio.CpioEntry.file("bin/busybox", handle.read(), 0o755))
    for lib in ("/lib/x86_64-linux-gnu/libc.so.6", "/lib/x86_64-linux-gnu/libresolv.so.2",
                "/lib/x86_64-linux-gnu/libm.so.6"):
        if os.path.exists(lib):
            with open(lib, "rb") as handle:
                entries.append(cpio.CpioEntry.file(lib.lstrip("/"), handle.read(), 0o755))
    with open("/lib64/ld-linux-x86-64.so.2", "rb") as handle:
        entries.append(cpio.CpioEntry.file("lib64/ld-linux-x86-64.so.2", handle.read(), 0o755))
    entries.append(cpio.CpioEntry.file("init", FIXTURE_INIT.encode(), 0o755))
    os.makedirs(FIXTURE, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(cpio.write_newc(entries))
    return path


def run_playbook(extra, check=False, expect_rc=0):
    argv = [ANSIBLE, PLAYBOOK]
    for key, value in extra.items():
        argv += ["-e", "%s=%s" % (key, value)]
    if check:
        argv.append("--check")
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, ANSIBLE_FORCE_COLOR="0", ANSIBLE_NOCOLOR="1"), check=False)
    print("flash_usb.yml device=%s confirm=%s%s: rc=%d in %.1fs"
          % (extra.get("device"), extra.get("confirm", "(none)"), " --check" if check else "",
             proc.returncode, time.monotonic() - start))
    out = proc.stdout + proc.stderr
    if expect_rc is not None and (proc.returncode == 0) != (expect_rc == 0):
        print(out)
        raise AssertionError("ansible-playbook rc=%d (expected %s)" % (proc.returncode, expect_rc))
    return proc.returncode, out


def qemu_boot(image, firmware, markers, logdir, timeout=BOOT_TIMEOUT):
    """Boot ``image`` as a USB stick (xHCI + usb-storage), TCG only, until every marker is on the serial log.

    Returns (seconds to the last marker, serial log text). The QEMU process is killed by its PID.
    """
    tag = "%s-%d" % (firmware, os.getpid())
    log = os.path.join(logdir, "serial-%s.log" % tag)
    overlay = os.path.join(logdir, "stick-%s.qcow2" % tag)
    # Boot from a throwaway overlay so the stick image itself stays byte-for-byte as written.
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", os.path.abspath(image), overlay], check=True)
    argv = ["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-m", "1024", "-smp", "1",
            "-display", "none", "-no-reboot", "-serial", "file:" + log, "-monitor", "none",
            "-nic", "none",
            "-device", "qemu-xhci,id=xhci",
            "-drive", "if=none,id=stick,format=qcow2,file=" + overlay,
            "-device", "usb-storage,bus=xhci.0,drive=stick,bootindex=1"]
    if firmware == "ovmf":
        vars_copy = os.path.join(logdir, "OVMF_VARS-%s.fd" % tag)
        shutil.copyfile(OVMF_VARS, vars_copy)
        argv += ["-drive", "if=pflash,format=raw,unit=0,readonly=on,file=" + OVMF_CODE,
                 "-drive", "if=pflash,format=raw,unit=1,file=" + vars_copy]
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    text = ""
    try:
        while True:
            if os.path.exists(log):
                with open(log, "rb") as handle:
                    text = handle.read().decode("utf-8", "replace")
            if all(m in text for m in markers):
                return time.monotonic() - start, text
            if "Kernel panic" in text:
                raise AssertionError("QEMU (%s): kernel panic before %s; serial tail:\n%s"
                                     % (firmware, markers, text[-4000:]))
            if proc.poll() is not None:
                raise AssertionError("QEMU (%s) exited rc=%s before %s; stderr: %s\nserial:\n%s"
                                     % (firmware, proc.returncode, markers,
                                        proc.stderr.read().decode(errors="replace"), text[-4000:]))
            if time.monotonic() - start > timeout:
                raise AssertionError("QEMU (%s): no %s within %ds; serial tail:\n%s"
                                     % (firmware, markers, timeout, text[-4000:]))
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        for path in (overlay,):
            if os.path.exists(path):
                os.unlink(path)


def mtools_env():
    return dict(os.environ, MTOOLS_SKIP_CHECK="1")


def esp_read(image, path):
    return subprocess.run(["mcopy", "-n", "-i", "%s@@1048576" % image, "::/" + path, "-"],
                          capture_output=True, check=True, env=mtools_env()).stdout


def device_sha(path):
    start = time.monotonic()
    digest = sha256_path(path)
    print("sha256 %s = %s... (%.1fs)" % (path, digest[:16], time.monotonic() - start))
    return digest


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def workdir():
    path = os.path.join(USB_CACHE, "test-%d" % os.getpid())
    os.makedirs(path, mode=0o700, exist_ok=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def payload(workdir):
    start = time.monotonic()
    key = new_key()
    key_path = os.path.join(workdir, "key")
    write_key(key_path, key)
    data = {"kernel": fixture_kernel(), "initrd": fixture_initrd(), "key_path": key_path, "key": key}
    print("fixture payload ready in %.1fs: kernel %d bytes, initrd %d bytes"
          % (time.monotonic() - start, os.path.getsize(data["kernel"]), os.path.getsize(data["initrd"])))
    return data


def stick_vars(payload, image, workdir, size="400M", esp=128, confirm=True):
    extra = {"device": image, "usb_stick_kernel": payload["kernel"], "usb_stick_initrd": payload["initrd"],
             "usb_stick_key_path": payload["key_path"], "usb_stick_esp_size_mib": esp,
             "usb_stick_work_dir": os.path.join(workdir, "build")}
    if size:
        extra["image_size"] = size
    if confirm:
        extra["confirm"] = image
    return extra


@pytest.fixture(scope="module")
def stick(payload, workdir):
    """A stick written by flash_usb.yml into a new 400 MiB image file."""
    image = os.path.join(workdir, "stick.img")
    start = time.monotonic()
    _rc, out = run_playbook(stick_vars(payload, image, workdir))
    print("flash_usb.yml wrote %s (%d bytes, %d allocated) in %.1fs"
          % (image, os.path.getsize(image), os.stat(image).st_blocks * 512, time.monotonic() - start))
    assert "written and verified" in out
    for pct in range(10, 101, 10):
        assert "(item=%d %%)" % pct in out, "progress %d %% not shown" % pct
    return image


class LoopDisk:
    """A sparse file with a GPT and one ext4 partition, attached as a loop device (detached on exit)."""

    def __init__(self, workdir, size_mib=200):
        self.file = os.path.join(workdir, "loop-%s.img" % uuid.uuid4().hex[:8])
        with open(self.file, "wb") as handle:
            handle.truncate(size_mib << 20)
        subprocess.run(["sfdisk", "-q", self.file], input=b"label: gpt\nstart=2048, type=L\n", check=True)
        self.dev = subprocess.run(["losetup", "-f", "--show", "-P", self.file], capture_output=True,
                                  text=True, check=True).stdout.strip()
        # This kernel has no GPT parser: add the partition explicitly (BLKPG).
        subprocess.run(["partx", "-a", self.dev], check=False, capture_output=True)
        self.part = self.dev + "p1"
        if os.path.exists(self.part):
            subprocess.run(["mkfs.ext4", "-q", "-F", self.part], check=True)
        self.mountpoint = None

    def mount(self, workdir):
        self.mountpoint = os.path.join(workdir, "mnt-%s" % os.path.basename(self.dev))
        os.makedirs(self.mountpoint, exist_ok=True)
        subprocess.run(["mount", self.part, self.mountpoint], check=True)

    def close(self):
        if self.mountpoint:
            subprocess.run(["umount", self.mountpoint], check=False)
            os.rmdir(self.mountpoint)
            self.mountpoint = None
        subprocess.run(["losetup", "-d", self.dev], check=False)
        os.unlink(self.file)


@pytest.fixture
def loopdisk(workdir):
    disk = LoopDisk(workdir)
    try:
        yield disk
    finally:
        disk.close()


# --------------------------------------------------------------------------- the image
def test_image_layout(stick, payload):
    table = json.loads(subprocess.run(["sfdisk", "--json", stick], capture_output=True, check=True,
                                      text=True).stdout)["partitiontable"]
    assert table["label"] == "gpt"
    assert table["lastlba"] == os.path.getsize(stick) // 512 - 34  # backup GPT at the very end
    (part,) = table["partitions"]
    assert part["type"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
    assert part["start"] == 2048 and part["size"] == 128 * 2048
    assert "LegacyBIOSBootable" in part["attrs"]
    # Protective MBR with syslinux's GPT boot code.
    with open(stick, "rb") as handle:
        mbr = handle.read(512)
    with open("/usr/lib/syslinux/mbr/gptmbr.bin", "rb") as handle:
        assert mbr[:440] == handle.read(440)
    assert mbr[0x1C2] == 0xEE and mbr[510:] == b"\x55\xaa"


def test_esp_files(stick, payload):
    """The default stick: shim + Debian's signed GRUB (Secure Boot on or off), no fallback loader."""
    for esp_path, host_path in (("EFI/BOOT/BOOTX64.EFI", "/usr/lib/shim/shimx64.efi.signed"),
                                ("EFI/BOOT/grubx64.efi", "/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"),
                                ("EFI/BOOT/mmx64.efi", "/usr/lib/shim/mmx64.efi.signed")):
        with open(host_path, "rb") as handle:
            assert esp_read(stick, esp_path) == handle.read(), esp_path
    with open(payload["kernel"], "rb") as handle:
        assert esp_read(stick, "stiefel/vmlinuz") == handle.read()
    with open(payload["initrd"], "rb") as handle:
        assert esp_read(stick, "stiefel/initrd.img") == handle.read()
    grub_cfg = esp_read(stick, "EFI/BOOT/grub.cfg").decode()
    assert "  initrd /stiefel/initrd.img /stiefel/key.cpio\n" in grub_cfg
    assert "linux  /stiefel/vmlinuz console=tty0 console=ttyS0,115200 stiefel.role=client" in grub_cfg
    sysl = esp_read(stick, "syslinux/syslinux.cfg").decode()
    assert "initrd=/stiefel/initrd.img,/stiefel/key.cpio" in sysl
    secret = payload["key"].strip().split(b":")[1]
    listing = subprocess.run(["mdir", "-a", "-/", "-b", "-i", stick + "@@1048576", "::/"], capture_output=True,
                             check=True, text=True, env=mtools_env()).stdout
    assert "::/syslinux/ldlinux.sys" in listing and "::/syslinux/ldlinux.c32" in listing
    assert "fbx64" not in listing.lower() and "::/loader/" not in listing
    for path in listing.split():
        if path.startswith("::/") and not path.endswith("/") and "key.cpio" not in path:
            data = esp_read(stick, path[3:]) if "." in os.path.basename(path) or "vmlinuz" in path else b""
            assert secret not in data, "key found in %s" % path
    manifest = json.loads(esp_read(stick, "stiefel/manifest.json"))
    assert manifest["format"] == "stiefel-usb-v1" and "stiefel/key.cpio" not in manifest["files"]


def test_key_archive(stick, payload, workdir):
    raw = esp_read(stick, "stiefel/key.cpio")
    entries = {e.name: e for e in cpio.read_newc(raw)}
    key = entries["etc/stiefel/key"]
    assert key.data == payload["key"] and key.perm == 0o600 and key.is_file
    assert key.uid == 0 and key.gid == 0
    # The real cpio tool agrees.
    listing = subprocess.run(["cpio", "-itv", "--quiet"], input=raw, capture_output=True, check=True).stdout.decode()
    assert any(line.startswith("-rw-------") and line.endswith("etc/stiefel/key")
               for line in listing.splitlines()), listing


def test_second_run_and_check_mode_change_nothing(stick, payload, workdir):
    before = device_sha(stick)
    _rc, out = run_playbook(stick_vars(payload, stick, workdir))
    assert recap_changed(out) == 0 and "already holds this stick" in out
    _rc, out = run_playbook(stick_vars(payload, stick, workdir), check=True)
    assert recap_changed(out) == 0
    assert device_sha(stick) == before


def test_check_mode_new_key_prints_plan_touches_nothing(stick, payload, workdir):
    before = device_sha(stick)
    other = dict(payload, key_path=os.path.join(workdir, "key2"))
    write_key(other["key_path"], new_key())
    _rc, out = run_playbook(stick_vars(other, stick, workdir), check=True)
    assert "will be overwritten: key differs" in out
    assert "layout: GPT, ESP 128 MiB" in out and "/stiefel/key.cpio" in out
    assert device_sha(stick) == before


# --------------------------------------------------------------------------- booting it
@pytest.mark.parametrize("firmware", ["seabios", "ovmf"])
def test_boot_fixture_payload(stick, payload, workdir, firmware):
    secs, log = qemu_boot(stick, firmware, [FIXTURE_MARK + " done"], workdir)
    print("%s: fixture /init reported after %.1fs (QEMU TCG, USB stick on xHCI)" % (firmware, secs))
    lines = [line.strip() for line in log.splitlines() if FIXTURE_MARK in line]
    print("\n".join(lines))
    expected = hashlib.sha256(payload["key"]).hexdigest()
    assert "%s key mode=600 owner=0:0 sha256=%s" % (FIXTURE_MARK, expected) in log
    assert "key on cmdline" not in log
    cmdline = [line for line in lines if "cmdline=" in line][0]
    assert "console=ttyS0,115200 stiefel.role=client" in cmdline
    assert payload["key"].strip().decode() not in log


def _real_ramdisk_or_skip():
    kernel, initrd = os.path.join(RAMDISK, "vmlinuz"), os.path.join(RAMDISK, "initrd.img")
    if not (os.path.isfile(kernel) and os.path.isfile(initrd)):
        pytest.skip("no stiefel ramdisk in %s yet (build it with playbooks/build_image.yml)" % RAMDISK)
    return kernel, initrd


@pytest.fixture(scope="module")
def real_stick(payload, workdir):
    kernel, initrd = _real_ramdisk_or_skip()
    size = os.path.getsize(kernel) + os.path.getsize(initrd)
    esp = max(128, (size * 3 // 2 >> 20) + 64)
    image = os.path.join(workdir, "real-stick.img")
    real = dict(payload, kernel=kernel, initrd=initrd)
    run_playbook(stick_vars(real, image, workdir, size="%dM" % (esp + 64), esp=esp))
    print("real stick: %s, %d MiB image, ESP %d MiB, kernel+initrd %d MiB"
          % (image, os.path.getsize(image) >> 20, esp, size >> 20))
    return image


@pytest.mark.parametrize("firmware", ["seabios", "ovmf"])
def test_boot_real_ramdisk(real_stick, firmware, workdir):
    """The real ramdisk to its client, in one boot per firmware (OVMF: shim + GRUB with Secure Boot off)."""
    markers = ["stiefel-ramdisk: starting role=client", "stiefel-client: discovery started"]
    secs, log = qemu_boot(real_stick, firmware, markers, workdir)
    print("%s: '%s' after %.1fs" % (firmware, markers[-1], secs))
    assert "Secure boot enabled" not in log


# --------------------------------------------------------------------------- block devices and refusals
def test_writes_whole_loop_device(payload, workdir):
    disk = LoopDisk(workdir, size_mib=300)
    try:
        _rc, out = run_playbook(stick_vars(payload, disk.dev, workdir, size=None))
        assert "written and verified" in out
        table = json.loads(subprocess.run(["sfdisk", "--json", disk.dev], capture_output=True, check=True,
                                          text=True).stdout)["partitiontable"]
        assert table["label"] == "gpt" and table["lastlba"] == (300 << 11) - 34
        assert esp_read(disk.dev, "stiefel/key.cpio") == cpio.key_archive(payload["key"])
        _rc, out = run_playbook(stick_vars(payload, disk.dev, workdir, size=None))
        assert recap_changed(out) == 0
    finally:
        disk.close()


def _refused(extra, reason, device, check=False):
    before = device_sha(device) if device else None
    rc, out = run_playbook(extra, check=check, expect_rc=None)
    assert rc != 0, out
    assert reason in out, out
    if device:
        assert device_sha(device) == before, "%s changed although the write was refused" % device
    return out


def test_refuses_mounted_partition(payload, workdir, loopdisk):
    loopdisk.mount(workdir)
    _refused(stick_vars(payload, loopdisk.dev, workdir, size=None), "is in use: mounted", loopdisk.dev)


def test_module_itself_refuses_mounted_disk(payload, workdir, loopdisk):
    """The writer module re-checks on its own (not only the role's usb_target step)."""
    loopdisk.mount(workdir)
    before = device_sha(loopdisk.dev)
    args = ("target=%s confirm=%s kernel=%s initrd=%s key_path=%s work_dir=%s"
            % (loopdisk.dev, loopdisk.dev, payload["kernel"], payload["initrd"], payload["key_path"],
               os.path.join(workdir, "build")))
    proc = subprocess.run([os.path.join(REPO, ".venv/bin/ansible"), "localhost", "-m", "stiefel.system.usb_stick",
                           "-a", args], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "is in use: mounted" in proc.stdout, proc.stdout
    assert device_sha(loopdisk.dev) == before


def test_refuses_partition(payload, workdir, loopdisk):
    _refused(stick_vars(payload, loopdisk.part, workdir, size=None), "is partition", loopdisk.dev)


def test_refuses_char_device(payload, workdir):
    _refused(stick_vars(payload, "/dev/null", workdir, size=None), "is a character device", None)


def test_refuses_directory(payload, workdir):
    path = os.path.join(workdir, "a-directory")
    os.makedirs(path, exist_ok=True)
    _refused(stick_vars(payload, path, workdir, size=None), "is a directory", None)


def test_refuses_missing_device_node(payload, workdir):
    _refused(stick_vars(payload, "/dev/stf-no-such-disk", workdir, size="1G"), "refusing to create a file there",
             None)
    assert not os.path.exists("/dev/stf-no-such-disk")


def test_refuses_system_disk(payload, workdir):
    """The disk holding / (found from /proc/self/mountinfo). Not hashed: it is live and hundreds of GiB."""
    root = [m for m in blockdev.parse_mountinfo(open("/proc/self/mountinfo").read()) if m.mountpoint == "/"][-1]
    sysdir = os.path.realpath("/sys/dev/block/%d:%d" % root.devno)
    if not os.path.exists(sysdir) or "/block/" not in sysdir:
        pytest.skip("/ is not on a block device here (%s)" % root.source)
    if os.path.exists(os.path.join(sysdir, "partition")):
        sysdir = os.path.dirname(sysdir)
    disk = "/dev/" + os.path.basename(sysdir)
    out = _refused(stick_vars(payload, disk, workdir, size=None), "holds the running system", None)
    print("refused %s: %s" % (disk, [line for line in out.splitlines() if "holds the running" in line][0][:200]))


def test_refuses_without_confirmation(payload, workdir, loopdisk):
    _refused(stick_vars(payload, loopdisk.dev, workdir, size=None, confirm=False),
             "Confirm by adding -e confirm=%s" % loopdisk.dev, loopdisk.dev)
    wrong = stick_vars(payload, loopdisk.dev, workdir, size=None)
    wrong["confirm"] = "/dev/sdz"
    _refused(wrong, "Confirm by adding", loopdisk.dev)


def test_check_mode_touches_nothing(payload, workdir, loopdisk):
    before = device_sha(loopdisk.dev)
    _rc, out = run_playbook(stick_vars(payload, loopdisk.dev, workdir, size=None), check=True)
    assert "will be overwritten" in out and "bytes to write" in out
    assert device_sha(loopdisk.dev) == before
    missing = os.path.join(workdir, "not-created.img")
    run_playbook(stick_vars(payload, missing, workdir, size="1G"), check=True)
    assert not os.path.exists(missing)
