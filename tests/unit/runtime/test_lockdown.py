"""Unit tests for stiefel_runtime.lockdown: lockdown state, the PE/COFF signature table, the refusal text.

The laptop's side is here too: ``autokexec.check_kexec`` (``stiefel-autokexec --check-kexec`` and the
check at agent start) asks the same question about the stiefel server kernel, in the laptop's words.

The signed images are the real ones from shim-signed and grub-efi-amd64-signed (skipped without
them); kexec is the subprocess seam (a fake ``run`` records argv and answers as the kernel would,
with the strerror texts measured under lockdown in QEMU: issue 15).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stiefel_runtime import autokexec, lockdown

SIGNED_GRUB = "/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"
SIGNED_SHIM = "/usr/lib/shim/shimx64.efi.signed"
UNSIGNED_SHIM = "/usr/lib/shim/shimx64.efi"
needs_images = pytest.mark.skipif(not all(os.path.exists(p) for p in (SIGNED_GRUB, SIGNED_SHIM, UNSIGNED_SHIM)),
                                  reason="shim-signed / grub-efi-amd64-signed not installed")


def minimal_pe(cert_blobs=(), magic=0x20B, count=16, cert_type=2):
    """A PE/COFF header with an optional header and a certificate table holding ``cert_blobs``."""
    opt_size = (112 if magic == 0x20B else 96) + count * 8
    pe = 0x40
    head = bytearray(b"MZ" + b"\0" * 0x3A + struct.pack("<I", pe))
    head += b"PE\0\0" + struct.pack("<HHIIIHH", 0x8664, 0, 0, 0, 0, opt_size, 0)
    opt = bytearray(opt_size)
    struct.pack_into("<H", opt, 0, magic)
    struct.pack_into("<I", opt, opt_size - count * 8 - 4, count)
    body = bytes(head + opt)
    table = b""
    for blob in cert_blobs:
        entry = struct.pack("<IHH", 8 + len(blob), 0x200, cert_type) + blob
        table += entry + b"\0" * ((8 - len(entry) % 8) % 8)
    if table and count > lockdown.CERT_TABLE_INDEX:
        dirs = len(head) + opt_size - count * 8
        body = bytearray(body)
        struct.pack_into("<II", body, dirs + lockdown.CERT_TABLE_INDEX * 8, len(body), len(table))
        body = bytes(body)
    return body + table


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


# --------------------------------------------------------------------------- sysfs
@pytest.mark.parametrize("text,state", [("[none] integrity confidentiality\n", "none"),
                                        ("none [integrity] confidentiality\n", "integrity"),
                                        ("none integrity [confidentiality]\n", "confidentiality"),
                                        ("garbage\n", None), ("]x[", None), ("", None)])
def test_lockdown_state(tmp_path, text, state):
    assert lockdown.lockdown_state(write(tmp_path, "lockdown", text.encode())) == state


def test_lockdown_state_missing_file(tmp_path):
    assert lockdown.lockdown_state(str(tmp_path / "absent")) is None


@pytest.mark.parametrize("data,value", [(b"\x06\0\0\0\x01", True), (b"\x06\0\0\0\x00", False), (b"\x06\0", None)])
def test_secure_boot_variable(tmp_path, data, value):
    assert lockdown.secure_boot_enabled(write(tmp_path, "SecureBoot", data)) is value


# --------------------------------------------------------------------------- PE/COFF signature table
@needs_images
def test_signers_of_debian_and_microsoft_images():
    assert lockdown.kernel_signers(SIGNED_GRUB) == [("Debian Secure Boot Signer 2022 - grub2", "Debian Secure Boot CA")]
    shim = lockdown.kernel_signers(SIGNED_SHIM)
    assert shim[0] == ("Microsoft Windows UEFI Driver Publisher", "Microsoft Corporation UEFI CA 2011")
    assert len(shim) == 2 and shim[1][1] == "Microsoft UEFI CA 2023"


@needs_images
def test_unsigned_and_stripped_images_have_no_signature(tmp_path):
    assert lockdown.kernel_signers(UNSIGNED_SHIM) == []
    if shutil.which("sbattach"):
        stripped = str(tmp_path / "stripped.efi")
        shutil.copyfile(SIGNED_GRUB, stripped)
        subprocess.run(["sbattach", "--remove", stripped], check=True, capture_output=True)
        assert lockdown.kernel_signers(stripped) == []


def test_synthetic_tables():
    assert lockdown.pe_signatures(minimal_pe()) == []
    assert lockdown.pe_signatures(minimal_pe([b"abc", b"defghijk"])) == [b"abc", b"defghijk"]
    assert lockdown.pe_signatures(minimal_pe([b"abc"], magic=0x10B)) == [b"abc"]
    assert lockdown.pe_signatures(minimal_pe([b"abc"], cert_type=1)) == []
    assert lockdown.pe_signatures(minimal_pe([b"abc"], count=3)) == []


@pytest.mark.parametrize("data", [b"", b"MZ", b"ELF", b"MZ" + b"\0" * 58 + b"\xff\xff\xff\x7f",
                                  minimal_pe(magic=0x999)])
def test_not_pe(data):
    with pytest.raises(lockdown.PEError):
        lockdown.pe_signatures(data)


def test_certificate_table_past_the_end():
    data = bytearray(minimal_pe([b"x" * 40]))
    with pytest.raises(lockdown.PEError):
        lockdown.pe_signatures(bytes(data[:-10]))


def test_garbage_pkcs7_is_a_pe_error():
    with pytest.raises(lockdown.PEError):
        lockdown.signer_of(b"\x30\x03\x02\x01\x00")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_pe_parser_on_random_bytes(data):
    try:
        found = lockdown.pe_signatures(b"MZ" + data)
    except lockdown.PEError:
        return
    assert all(isinstance(blob, bytes) for blob in found)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=4), st.integers(0, 2000), st.binary(min_size=1, max_size=8))
def test_pe_parser_on_mutated_headers(blobs, where, junk):
    """A well-formed image with a few bytes overwritten anywhere: a PEError or blobs, nothing else."""
    data = bytearray(minimal_pe(blobs))
    where %= len(data)
    data[where:where + len(junk)] = junk
    try:
        found = lockdown.pe_signatures(bytes(data))
    except lockdown.PEError:
        return
    assert len(found) <= lockdown.MAX_SIGNATURES


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_pkcs7_reader_on_hostile_blobs(blob):
    try:
        subject, issuer = lockdown.signer_of(blob)
    except lockdown.PEError:
        return
    assert isinstance(subject, str) and isinstance(issuer, str)


# --------------------------------------------------------------------------- check_kernel
class FakeKexec:
    """Answers ``kexec -s -l`` like a locked-down kernel would; records every argv."""

    def __init__(self, load_rc=0, load_output=b""):
        self.calls = []
        self.load_rc, self.load_output = load_rc, load_output

    def __call__(self, argv, **_kwargs):
        self.calls.append(list(argv))
        if argv[1:3] == ["-s", "-l"]:
            return types.SimpleNamespace(returncode=self.load_rc, stdout=self.load_output)
        if argv[1:] == ["-u"] or argv[1:3] in (["-c", "-l"], ["-l"]):  # kexec_load's, refused under lockdown
            return types.SimpleNamespace(returncode=1, stdout=b"kexec_load failed: Operation not permitted\n")
        return types.SimpleNamespace(returncode=0, stdout=b"")


@pytest.fixture
def locked(tmp_path):
    return {"lockdown_path": write(tmp_path, "lockdown", b"none [integrity] confidentiality\n"),
            "secure_boot_path": write(tmp_path, "SecureBoot", b"\x06\0\0\0\x01"), "mounts": ()}


def test_no_lockdown_checks_nothing(tmp_path):
    run = FakeKexec()
    lockdown.check_kernel(str(tmp_path / "absent-kernel"), run=run, mounts=(),
                          lockdown_path=write(tmp_path, "l", b"[none] integrity confidentiality\n"))
    lockdown.check_kernel(str(tmp_path / "absent-kernel"), run=run, lockdown_path=str(tmp_path / "nothing"),
                          mounts=())
    assert run.calls == []


@needs_images
def test_mounts_securityfs_and_efivarfs_when_missing(tmp_path):
    """The ramdisk mounts neither; lockdown then goes unseen and kexec gives its errno (measured in QEMU)."""
    security, efivars = tmp_path / "security", tmp_path / "efivars"
    security.mkdir()
    efivars.mkdir()
    lockfile, sbvar = security / "lockdown", efivars / "SecureBoot"
    mounted = []

    def run(argv, **kwargs):
        if argv[0] == "mount":  # what mounting makes appear
            mounted.append(argv)
            (lockfile if argv[2] == "securityfs" else sbvar).write_bytes(
                b"none [integrity] confidentiality\n" if argv[2] == "securityfs" else b"\x06\0\0\0\x01")
            return types.SimpleNamespace(returncode=0, stdout=b"")
        return FakeKexec()(argv, **kwargs)

    mounts = (("securityfs", str(security), str(lockfile), ()), ("efivarfs", str(efivars), str(sbvar), ("-o", "ro")))
    with pytest.raises(lockdown.LockdownRefusal, match="Secure Boot is on, and the laptop's kernel carries no"):
        lockdown.check_kernel(UNSIGNED_SHIM, run=run, lockdown_path=str(lockfile), secure_boot_path=str(sbvar),
                              mounts=mounts)
    assert mounted == [["mount", "-t", "securityfs", "securityfs", str(security)],
                       ["mount", "-t", "efivarfs", "-o", "ro", "efivarfs", str(efivars)]]
    mounted.clear()
    with pytest.raises(lockdown.LockdownRefusal):
        lockdown.check_kernel(UNSIGNED_SHIM, run=run, lockdown_path=str(lockfile), secure_boot_path=str(sbvar),
                              mounts=mounts)
    assert mounted == []


@needs_images
def test_unsigned_kernel_refused_without_trying(locked):
    run = FakeKexec()
    with pytest.raises(lockdown.LockdownRefusal) as exc:
        lockdown.check_kernel(UNSIGNED_SHIM, run=run, **locked)
    msg = str(exc.value)
    assert msg.startswith("This desktop cannot start the laptop's kernel: Secure Boot is on, and the laptop's "
                          "kernel carries no signature.")
    assert "mokutil --import" in msg and "turn Secure Boot off" in msg
    assert run.calls == []


def test_not_an_efi_image_refused(locked, tmp_path):
    with pytest.raises(lockdown.LockdownRefusal, match="not a signed EFI image"):
        lockdown.check_kernel(write(tmp_path, "k", b"\x7fELF" + b"\0" * 100), run=FakeKexec(), **locked)


@needs_images
def test_untrusted_signer_names_the_key(locked):
    run = FakeKexec(1, b"kexec_file_load failed: Required key not available\n")
    with pytest.raises(lockdown.LockdownRefusal) as exc:
        lockdown.check_kernel(SIGNED_SHIM, run=run, **locked)
    msg = str(exc.value)
    assert "it does not trust the key that signed the laptop's kernel" in msg
    assert "signed by 'Microsoft Windows UEFI Driver Publisher' (issued by 'Microsoft Corporation UEFI CA 2011')" in msg
    assert "enroll the 'Microsoft Corporation UEFI CA 2011' certificate" in msg
    assert run.calls == [["kexec", "-s", "-l", SIGNED_SHIM]]


@needs_images
@pytest.mark.parametrize("output,reason", [(b"No data available", "carries no signature"),
                                           (b"Key was rejected by service", "does not match its contents"),
                                           (b"something new", "kexec_file_load refused the laptop's kernel "
                                                              "(something new)")])
def test_other_kexec_refusals(locked, output, reason):
    with pytest.raises(lockdown.LockdownRefusal, match=reason.replace("(", r"\(").replace(")", r"\)")):
        lockdown.check_kernel(SIGNED_GRUB, run=FakeKexec(1, output), **locked)


@needs_images
def test_trusted_kernel_is_loaded_then_unloaded_with_s(locked):
    run = FakeKexec()
    lines = []
    lockdown.check_kernel(SIGNED_GRUB, run=run, log=lines.append, **locked)
    # plain `kexec -u` is refused under lockdown: the unload must be `-s -u`
    assert run.calls == [["kexec", "-s", "-l", SIGNED_GRUB], ["kexec", "-s", "-u"]]
    assert any("signed by Debian Secure Boot Signer 2022 - grub2 (Debian Secure Boot CA)" in ln for ln in lines)


@needs_images
def test_dry_run_never_calls_kexec(locked):
    run = FakeKexec()
    lockdown.check_kernel(SIGNED_GRUB, run=run, dry_run=True, **locked)
    assert run.calls == []


# --------------------------------------------------------------------------- the laptop's check (autokexec)
CMDLINE = "stiefel.role=server stiefel.disk=/dev/vda stiefel.boot=/dev/vda console=ttyS0"


def server_config(kernel, tmp_path):
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"070701")
    return {"ramdisk_kernel": kernel, "ramdisk_initrd": str(initrd), "server_cmdline": CMDLINE}


def sysfs_files(tmp_path, state="none [integrity] confidentiality\n", secure_boot=b"\x06\0\0\0\x01"):
    (tmp_path / "lockdown").write_text(state)
    (tmp_path / "SecureBoot").write_bytes(secure_boot)
    return {"lockdown_path": str(tmp_path / "lockdown"), "secure_boot_path": str(tmp_path / "SecureBoot"),
            "mounts": ()}


def laptop_check(kernel, tmp_path, run, state="none [integrity] confidentiality\n", **kw):
    lines = []
    ok = autokexec.check_kexec(server_config(kernel, tmp_path), lines.append, run=run, **dict(sysfs_files(tmp_path, state), **kw))
    return ok, lines


@needs_images
def test_accepted_loads_server_kernel_and_initrd_then_unloads_with_s(tmp_path):
    run = FakeKexec()
    ok, lines = laptop_check(SIGNED_GRUB, tmp_path, run)
    assert ok
    assert run.calls == [["kexec", "-s", "-l", "--initrd=" + str(tmp_path / "initrd.img"), "--command-line=" + CMDLINE,
                          SIGNED_GRUB], ["kexec", "-s", "-u"]]
    assert lines[-1] == ("kexec check: accepted: lockdown integrity, Secure Boot on, the stiefel server kernel "
                         "(signed by Debian Secure Boot Signer 2022 - grub2 (Debian Secure Boot CA)) loads with "
                         "kexec -s -l")


def test_not_locked_down_needs_no_trial(tmp_path):
    run = FakeKexec()
    ok, lines = laptop_check(str(tmp_path / "absent"), tmp_path, run, state="[none] integrity confidentiality\n")
    assert ok and run.calls == []
    assert lines == ["kexec check: this kernel is not locked down (lockdown: none): no signature needed"]


@needs_images
@pytest.mark.parametrize("output,reason", [
    (b"kexec_file_load failed: No data available\n", "the stiefel server kernel carries no signature"),
    (b"kexec_file_load failed: Required key not available\n",
     "it does not trust the key that signed the stiefel server kernel"),
    (b"kexec_file_load failed: Key was rejected by service\n",
     "the stiefel server kernel's signature does not match its contents"),
    (b"kexec_file_load failed: Operation not permitted\n", "it refuses to load any kernel in this lockdown state"),
])
def test_refusals_say_which_key_and_what_to_do(tmp_path, output, reason):
    run = FakeKexec(1, output)
    ok, lines = laptop_check(SIGNED_SHIM, tmp_path, run)
    assert not ok
    msg = lines[-1]
    assert msg.startswith("kexec check: REFUSED: This laptop cannot start the stiefel server kernel: Secure Boot is "
                          "on, and %s." % reason)
    assert ("The stiefel server kernel is signed by 'Microsoft Windows UEFI Driver Publisher' (issued by "
            "'Microsoft Corporation UEFI CA 2011'); this laptop's running kernel does not trust that key.") in msg
    assert "enroll the 'Microsoft Corporation UEFI CA 2011' certificate on this laptop with 'mokutil --import" in msg
    assert "turn Secure Boot off in this laptop's firmware setup" in msg
    # never a kexec_load attempt, nor its unload, under lockdown
    assert [argv[1:3] for argv in run.calls] == [["-s", "-l"]]


@needs_images
def test_unsigned_server_kernel_refused_without_trying(tmp_path):
    run = FakeKexec()
    ok, lines = laptop_check(UNSIGNED_SHIM, tmp_path, run)
    assert not ok and run.calls == []
    assert lines[-1].startswith("kexec check: REFUSED: This laptop cannot start the stiefel server kernel: Secure "
                                "Boot is on, and the stiefel server kernel carries no signature.")
    assert "Debian's (linux-image-amd64)" in lines[-1]


def test_missing_server_kernel_is_a_refusal(tmp_path):
    ok, lines = laptop_check(str(tmp_path / "absent"), tmp_path, FakeKexec())
    assert not ok and lines[-1].startswith("kexec check: REFUSED: cannot check the stiefel server kernel")


def test_dry_run_never_calls_kexec(tmp_path):
    run = FakeKexec()
    ok, _lines = laptop_check(SIGNED_GRUB, tmp_path, run, dry_run=True)
    assert ok and run.calls == []


@needs_images
def test_check_kexec_verb_exit_codes(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "autokexec.json"
    doc = {"format": "stiefel-autokexec-config", "version": 1, "key_path": "/etc/stiefel/key",
           "ramdisk_kernel": SIGNED_SHIM, "ramdisk_initrd": str(tmp_path / "initrd.img"), "server_cmdline": CMDLINE,
           "trigger_macs": []}
    cfg.write_text(json.dumps(doc))
    fake = FakeKexec(1, b"kexec_file_load failed: Required key not available\n")
    real = lockdown.check_kernel

    def locked_check(kernel, **kw):
        return real(kernel, **dict(kw, run=fake, **sysfs_files(tmp_path)))

    monkeypatch.setattr(lockdown, "check_kernel", locked_check)
    assert autokexec.main(["--config", str(cfg), "--check-kexec"]) == 1
    assert "kexec check: REFUSED: This laptop cannot start the stiefel server kernel" in capsys.readouterr().out
    fake.load_rc = 0
    assert autokexec.main(["--config", str(cfg), "--check-kexec"]) == 0
    assert "kexec check: accepted: lockdown integrity, Secure Boot on" in capsys.readouterr().out


class BusyThenKexec(FakeKexec):
    """``kexec -s -l`` gets EBUSY (another load holds the kexec lock) ``busy`` times, then loads."""

    def __init__(self, busy):
        super().__init__()
        self.busy = busy

    def __call__(self, argv, **kwargs):
        if argv[1:3] == ["-s", "-l"] and self.busy:
            self.busy -= 1
            self.calls.append(list(argv))
            return types.SimpleNamespace(returncode=1, stdout=b"kexec_file_load failed: Device or resource busy\n")
        return super().__call__(argv, **kwargs)


@needs_images
def test_busy_kexec_lock_is_waited_out_not_called_untrusted(locked):
    """Seen on the Secure Boot laptop: a second check beside the agent's own got EBUSY, then was told the key was untrusted."""
    run, slept, lines = BusyThenKexec(2), [], []
    found = lockdown.check_kernel(SIGNED_SHIM, run=run, log=lines.append, sleep=slept.append, **locked)
    assert found.startswith("accepted:")
    assert slept == [lockdown.BUSY_DELAY] * 2
    assert sum("EBUSY" in line for line in lines) == 2
    assert run.calls.count(["kexec", "-s", "-l", SIGNED_SHIM]) == 3


@needs_images
def test_a_kexec_lock_busy_throughout_is_not_a_refusal(locked):
    run, slept = BusyThenKexec(lockdown.BUSY_TRIES), []
    with pytest.raises(lockdown.KexecBusy, match="kept the kernel busy") as exc:
        lockdown.check_kernel(SIGNED_SHIM, run=run, sleep=slept.append, **locked)
    assert not isinstance(exc.value, lockdown.LockdownRefusal) and "trust" not in str(exc.value)
    assert len(slept) == lockdown.BUSY_TRIES - 1


@needs_images
def test_laptop_check_says_not_checked_when_the_kexec_lock_stays_busy(tmp_path):
    ok, lines = laptop_check(SIGNED_SHIM, tmp_path, BusyThenKexec(lockdown.BUSY_TRIES), sleep=lambda _s: None)
    assert not ok
    assert any(line.startswith("kexec check: NOT CHECKED: another kexec load") for line in lines), lines
    assert not any("REFUSED" in line for line in lines)
