"""stiefelctl's verbs with the real tools (root): test-nspawn, create-usbdrive on an image file, test-qemu.

* ``test-nspawn`` unpacks a ramdisk and runs a command in its root with a
  private mount and PID namespace (the documented stand-in for
  systemd-nspawn on a host without systemd): always with a small busybox
  ramdisk laid out like the real one (zstd newc cpio, zero padding,
  manifest.json), and with the real ramdisk from the ``built`` fixture
  (tests/integration/conftest.py, shared with test_ramdisk_image: the cached
  build; nothing is built twice).
* ``create-usbdrive`` writes the client stick into a new image file through
  flash_usb.yml; the stick's layout itself is test_usb_stick's subject, here:
  the files on the ESP are ours, a second run and ``--check`` change nothing.
* ``test-qemu``: refusals without a ramdisk or with bad arguments, and the
  real ramdisk booted as a server under TCG until its ready marker.
* ``server`` is exercised against the real client in test_standalone_server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import cpio, keyfile
from ansible_collections.stiefel.system.plugins.module_utils.fileio import sha256_file as _sha
from lab.qemu import marker_initrd

pytestmark = pytest.mark.integration

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CTL = os.path.join(REPO, "bin", "stiefelctl")

if os.geteuid() != 0:
    pytest.skip("stiefelctl's test-nspawn, create-usbdrive and test-qemu need root", allow_module_level=True)


def ctl(*args, cache=None, timeout=900):
    env = dict(os.environ, PATH="%s:%s" % (os.path.dirname(sys.executable), os.environ.get("PATH", "")),
               ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0")
    if cache is not None:
        env["STIEFEL_CACHE_DIR"] = cache
    proc = subprocess.run([sys.executable, CTL, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env=env, timeout=timeout, check=False)
    print("stiefelctl %s: rc=%d\n%s%s" % (" ".join(args), proc.returncode, proc.stdout[-3000:], proc.stderr[-2000:]))
    return proc


@pytest.fixture
def small_cache():
    """A cache dir whose ramdisk/ is a busybox root packed like the real one: zstd newc, zero padding to a
    4-byte boundary and beyond it (as for the key archive), manifest.json with initrd_archives_bytes."""
    cache = tempfile.mkdtemp(prefix="stf-ctl-")
    out = os.path.join(cache, "ramdisk")
    os.makedirs(out)
    plain = os.path.join(cache, "root.cpio")
    marker_initrd(plain)
    extra = cpio.write_newc([cpio.CpioEntry.directory("etc/stiefel"),
                             cpio.CpioEntry.file("etc/stiefel/ramdisk-id", b"small-test-ramdisk\n", 0o644)])
    with open(plain, "ab") as handle:
        handle.write(extra)
    packed = subprocess.run(["zstd", "-q", "-c", plain], capture_output=True, check=True).stdout
    with open(os.path.join(out, "initrd.img"), "wb") as handle:
        handle.write(packed + b"\0" * (4 - len(packed) % 4 if len(packed) % 4 else 0) + b"\0" * 4096)
    with open(os.path.join(out, "vmlinuz"), "wb") as handle:
        handle.write(os.urandom(1024 * 1024))
    with open(os.path.join(out, "manifest.json"), "w") as handle:
        json.dump({"initrd_archives_bytes": len(packed)}, handle)
    yield cache
    shutil.rmtree(cache, ignore_errors=True)


def _mounts():
    with open("/proc/self/mountinfo") as handle:
        return handle.read()


# --------------------------------------------------------------------------- test-nspawn

def test_nspawn_runs_a_command_in_the_ramdisk_root(small_cache):
    proc = ctl("test-nspawn", "/bin/busybox", "sh", "-c",
               "echo pid=$$; /bin/busybox cat /etc/stiefel/ramdisk-id; /bin/busybox ls /proc | /bin/busybox grep -c '^[0-9]'",
               cache=small_cache)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    root = [l for l in lines if l.startswith("stiefelctl: ramdisk root unpacked in ")][0].split()[5].rstrip(";")
    assert "pid=1" in lines  # a PID namespace of its own, the shell is its init
    assert "small-test-ramdisk" in lines
    assert 1 <= int(lines[-1]) <= 3  # its own /proc: the pipeline's processes (sh, ls, grep), none of the host's
    assert not os.path.exists(root)  # unpacked root removed afterwards
    assert root not in _mounts()  # its /proc mount went with the namespace


def test_nspawn_passes_the_command_exit_code_and_refuses_without_a_ramdisk(small_cache):
    assert ctl("test-nspawn", "/bin/busybox", "false", cache=small_cache).returncode == 1
    empty = tempfile.mkdtemp(prefix="stf-ctl-empty-")
    try:
        proc = ctl("test-nspawn", cache=empty)
        assert proc.returncode == 3 and "run 'stiefelctl update' first" in proc.stderr
    finally:
        shutil.rmtree(empty)


def test_nspawn_opens_the_real_ramdisk(built):
    proc = ctl("test-nspawn", "/usr/bin/python3", "-c",
               "import os, cryptography, pyroute2; print('agents', sorted(os.listdir('/usr/lib/stiefel/agents')))")
    assert proc.returncode == 0, proc.stderr
    assert "agents ['stiefel-autokexec', 'stiefel-client', 'stiefel-server']" in proc.stdout


# --------------------------------------------------------------------------- create-usbdrive

def _esp(image, path):
    return subprocess.run(["mcopy", "-n", "-i", "%s@@1048576" % image, "::/" + path, "-"], capture_output=True,
                          check=True, env=dict(os.environ, MTOOLS_SKIP_CHECK="1")).stdout


def test_create_usbdrive_on_an_image_file(small_cache):
    key_path = os.path.join(small_cache, "key")
    key = keyfile.generate_key()
    keyfile.write_key_atomic(key_path, key)
    image = os.path.join(small_cache, "stick.img")
    proc = ctl("create-usbdrive", "--uefi-loader", "systemd-boot", image, "--yes", "--image-size", "300M", "--key", key_path, cache=small_cache)
    assert proc.returncode == 0, proc.stdout[-3000:]
    table = json.loads(subprocess.run(["sfdisk", "--json", image], capture_output=True, check=True,
                                      text=True).stdout)["partitiontable"]
    assert table["label"] == "gpt" and table["partitions"][0]["start"] == 2048
    ramdisk = os.path.join(small_cache, "ramdisk")
    assert _esp(image, "stiefel/vmlinuz") == open(os.path.join(ramdisk, "vmlinuz"), "rb").read()
    assert _esp(image, "stiefel/initrd.img") == open(os.path.join(ramdisk, "initrd.img"), "rb").read()
    (entry,) = [e for e in cpio.read_newc(_esp(image, "stiefel/key.cpio")) if e.is_file]
    assert keyfile.decode_key(entry.data) == key
    assert key.hex() not in proc.stdout + proc.stderr
    written = _sha(image)
    proc = ctl("create-usbdrive", "--uefi-loader", "systemd-boot", image, "--yes", "--key", key_path, cache=small_cache)
    assert proc.returncode == 0 and "changed=0" in proc.stdout and _sha(image) == written
    proc = ctl("create-usbdrive", "--uefi-loader", "systemd-boot", image, "--yes", "--check", "--key", key_path, cache=small_cache)
    assert proc.returncode == 0 and _sha(image) == written


def test_create_usbdrive_refuses_a_missing_target_without_a_size(small_cache):
    key_path = os.path.join(small_cache, "key")
    keyfile.write_key_atomic(key_path, keyfile.generate_key())
    target = os.path.join(small_cache, "absent.img")
    proc = ctl("create-usbdrive", "--uefi-loader", "systemd-boot", target, "--yes", "--key", key_path, cache=small_cache)
    assert proc.returncode == 1 and not os.path.exists(target)


# --------------------------------------------------------------------------- test-qemu

def test_test_qemu_refusals(small_cache):
    empty = tempfile.mkdtemp(prefix="stf-ctl-empty-")
    try:
        proc = ctl("test-qemu", "server", cache=empty)
        assert proc.returncode == 3 and "run 'stiefelctl update' first" in proc.stderr
    finally:
        shutil.rmtree(empty)
    assert ctl("test-qemu", "laptop", cache=small_cache).returncode == 2
    proc = ctl("test-qemu", "server", "--until", "(unclosed", cache=small_cache)
    assert proc.returncode == 2 and "--until is not a regular expression" in proc.stderr
    assert ctl("test-qemu", "server", "--timeout", "-1", cache=small_cache).returncode == 2
    bad_key = os.path.join(small_cache, "bad-key")
    with open(bad_key, "w") as handle:
        handle.write("not a key\n")
    proc = ctl("test-qemu", "client", "--key", bad_key, cache=small_cache)
    assert proc.returncode == 2 and "cannot use the key" in proc.stderr
    assert "ctl%d" % os.getpid() not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                       text=True, check=False).stdout


def test_test_qemu_boots_the_ramdisk_as_a_server(built):
    proc = ctl("test-qemu", "server", "--until", "stiefel-server: ready", "--timeout", "300", timeout=420)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "'stiefel-server: ready' seen after" in proc.stdout
