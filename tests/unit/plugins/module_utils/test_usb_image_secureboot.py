"""Unit tests for the Secure Boot stick (usb_image: shim + signed GRUB, signature checks).

The signature checks run the real sbverify/sbattach/sbsign/objcopy/openssl on the real signed
loaders from shim-signed and grub-efi-amd64-signed. A Debian-signed EFI binary stands in for the
kernel (GRUB's CD image gcdx64.efi.signed: same CA as the kernel, a few hundred KiB instead of a
kernel download); the integration tests use the real ramdisk kernel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ansible_collections.stiefel.system.plugins.module_utils import usb_image

KEY = b"stiefel-key-v1:" + b"6b" * 32 + b"\n"
SIGNED_STANDIN = "/usr/lib/grub/x86_64-efi-signed/gcdx64.efi.signed"
TOOLS = ("sbverify", "sbattach", "sbsign", "objcopy", "openssl", "sfdisk", "mkfs.fat", "mcopy", "syslinux")
needs_signed = pytest.mark.skipif(
    any(shutil.which(t) is None for t in TOOLS)
    or not all(os.path.exists(p) for p in (usb_image.SHIM_CANDIDATES[0], usb_image.SIGNED_GRUB_CANDIDATES[0],
                                           usb_image.MOKMANAGER_CANDIDATES[0], SIGNED_STANDIN)),
    reason="shim-signed, grub-efi-amd64-signed, sbsigntool or the stick tools not installed")

SHIM_LISTING = """signature 1
image signature issuers:
 - /C=US/ST=Washington/L=Redmond/O=Microsoft Corporation/CN=Microsoft Corporation UEFI CA 2011
image signature certificates:
 - subject: /C=US/ST=Washington/L=Redmond/O=Microsoft Corporation/CN=Microsoft Windows UEFI Driver Publisher
   issuer:  /C=US/ST=Washington/L=Redmond/O=Microsoft Corporation/CN=Microsoft Corporation UEFI CA 2011
signature 2
image signature issuers:
 - /C=US/O=Microsoft Corporation/CN=Microsoft UEFI CA 2023
image signature certificates:
 - subject: /C=US/O=Microsoft Corporation/CN=Microsoft UEFI CA 2023 signer
   issuer:  /C=US/O=Microsoft Corporation/CN=Microsoft UEFI CA 2023
"""


def test_parse_sbverify_list_two_signatures():
    found = usb_image.parse_sbverify_list(SHIM_LISTING)
    assert found["signed"]
    assert found["issuers"] == ["Microsoft Corporation UEFI CA 2011", "Microsoft UEFI CA 2023"]
    assert found["signers"] == ["Microsoft Windows UEFI Driver Publisher", "Microsoft UEFI CA 2023 signer"]


def test_parse_sbverify_list_unsigned():
    assert usb_image.parse_sbverify_list("No signature table present\n") == {
        "signed": False, "issuers": [], "signers": []}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["signature 1", "image signature issuers:", "image signature certificates:",
                                 " - subject: ", " - /CN=", "   issuer: /CN=x", "No signature table present",
                                 "/CN=", "- ", ""]) | st.text(), max_size=12).map(
    lambda parts: "\n".join(p if isinstance(p, str) else "" for p in parts)))
def test_parse_sbverify_list_never_raises(text):
    found = usb_image.parse_sbverify_list(text)
    assert isinstance(found["signed"], bool)
    assert all(isinstance(name, str) for name in found["issuers"] + found["signers"])


def _files(kernel):
    return {"shim": usb_image.SHIM_CANDIDATES[0], "mokmanager": usb_image.MOKMANAGER_CANDIDATES[0],
            "grub": usb_image.SIGNED_GRUB_CANDIDATES[0], "kernel": kernel}


@needs_signed
def test_chain_of_the_debian_packages_verifies():
    report = usb_image.check_secure_boot_chain(_files(SIGNED_STANDIN))
    assert "Microsoft Corporation UEFI CA 2011" in report["shim"]["verified_by"]
    for role in ("mokmanager", "grub", "kernel"):
        assert report[role]["verified_by"].startswith("Debian Secure Boot CA"), report[role]
        assert report[role]["signers"][0].startswith("Debian Secure Boot Signer")
    summary = usb_image.secure_boot_summary(report)
    assert len(summary) == 4 and summary[-1].startswith("kernel signed by Debian Secure Boot Signer")


@needs_signed
def test_kernel_with_signature_removed_is_refused(tmp_path):
    stripped = str(tmp_path / "vmlinuz")
    shutil.copyfile(SIGNED_STANDIN, stripped)
    subprocess.run(["sbattach", "--remove", stripped], check=True, capture_output=True)
    with pytest.raises(usb_image.StickError) as exc:
        usb_image.check_secure_boot_chain(_files(stripped))
    msg = str(exc.value)
    assert "kernel %s is not signed" % stripped in msg and "Secure Boot would refuse it" in msg
    assert "linux-image-amd64" in msg and "uefi_loader: systemd-boot" in msg


@needs_signed
def test_kernel_signed_by_another_key_is_refused(tmp_path):
    """Signed, but not by Debian's CA (as an Ubuntu or self-built kernel would be): shim would refuse it."""
    key, cert = str(tmp_path / "k.key"), str(tmp_path / "k.crt")
    subprocess.run(["openssl", "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=Someone Else Secure Boot Signer", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    stripped = str(tmp_path / "unsigned.efi")
    shutil.copyfile(SIGNED_STANDIN, stripped)
    subprocess.run(["sbattach", "--remove", stripped], check=True, capture_output=True)
    other = str(tmp_path / "vmlinuz")
    subprocess.run(["sbsign", "--key", key, "--cert", cert, "--output", other, stripped],
                   check=True, capture_output=True)
    with pytest.raises(usb_image.StickError) as exc:
        usb_image.check_secure_boot_chain(_files(other))
    msg = str(exc.value)
    assert "signed by Someone Else Secure Boot Signer" in msg and "Debian Secure Boot CA" in msg


@needs_signed
@pytest.mark.parametrize("content", [b"", b"MZ", b"K" * 300000, b"MZ" + b"\0" * 58 + b"\xff\xff\xff\x7f"])
def test_kernel_that_is_no_pe_image_is_refused(tmp_path, content):
    bad = tmp_path / "vmlinuz"
    bad.write_bytes(content)
    with pytest.raises(usb_image.StickError) as exc:
        usb_image.check_secure_boot_chain(_files(str(bad)))
    assert "Secure Boot" in str(exc.value)


@needs_signed
def test_vendor_cert_of_a_shim_without_one(tmp_path):
    with pytest.raises(usb_image.StickError):
        usb_image.shim_vendor_cert_pem(SIGNED_STANDIN, str(tmp_path))


@needs_signed
def test_secure_boot_stick_layout(tmp_path):
    """A whole shim stick built with the real tools: the signed loaders, grub.cfg, no fallback loader."""
    kernel, initrd = str(tmp_path / "vmlinuz"), tmp_path / "initrd.img"
    shutil.copyfile(SIGNED_STANDIN, kernel)
    initrd.write_bytes(b"I" * 100000)
    spec = usb_image.StickSpec(kernel, str(initrd), KEY, "stiefel.debug", 64, 100 << 20)
    image = str(tmp_path / "stick.img")
    usb_image.build_image(spec, image)
    with open(usb_image.SHIM_CANDIDATES[0], "rb") as handle:
        assert usb_image.read_esp_file(image, "EFI/BOOT/BOOTX64.EFI") == handle.read()
    with open(usb_image.SIGNED_GRUB_CANDIDATES[0], "rb") as handle:
        assert usb_image.read_esp_file(image, "EFI/BOOT/grubx64.efi") == handle.read()
    assert usb_image.read_esp_file(image, "EFI/BOOT/fbx64.efi") is None
    assert usb_image.read_esp_file(image, "loader/loader.conf") is None
    cfg = usb_image.read_esp_file(image, "EFI/BOOT/grub.cfg").decode()
    assert "  initrd /stiefel/initrd.img /stiefel/key.cpio\n" in cfg
    assert "linux  /stiefel/vmlinuz console=tty0 console=ttyS0,115200 stiefel.role=client stiefel.debug" in cfg
    assert "6b6b6b" not in cfg
    manifest = json.loads(usb_image.read_esp_file(image, "stiefel/manifest.json"))
    assert manifest["bootloaders"]["uefi"] == "shim"
    assert "EFI/BOOT/mmx64.efi" in manifest["files"] and "stiefel/key.cpio" not in manifest["files"]
    assert usb_image.target_matches(spec, image) == (True, "")
    plan = spec.plan()
    assert plan["secure_boot"]["kernel"]["signed"] and "6b6b6b" not in json.dumps(plan)
    other = usb_image.StickSpec(kernel, str(initrd), KEY, "stiefel.debug", 64, 100 << 20, uefi_loader="systemd-boot")
    assert usb_image.target_matches(other, image)[0] is False


def test_unknown_uefi_loader_is_refused(tmp_path):
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(b"K")
    initrd.write_bytes(b"I")
    spec = usb_image.StickSpec(str(kernel), str(initrd), KEY, "", 64, 100 << 20, uefi_loader="grub")
    with pytest.raises(usb_image.StickError, match="uefi_loader 'grub' is not one of shim, systemd-boot"):
        spec.validate()
