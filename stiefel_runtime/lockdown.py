# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Will this kernel start the laptop's kernel under Secure Boot lockdown? If not, say why and what to do.

A kernel booted with Secure Boot on is locked down: it only kexecs (kexec_file_load) images
signed by a key it trusts (built in, the firmware's db, or shim's MOK list), and kexec_load is
refused outright. kexec would only report an errno ("Required key not available"), so before the
client goes on it reads the lockdown state, finds the laptop kernel's signer in its PE/COFF
signature table (no signature -> refused without trying), and otherwise asks the kernel itself
with a trial ``kexec -s -l`` (unloaded again with ``kexec -s -u``: plain ``kexec -u`` is refused
under lockdown). A refusal is a :class:`LockdownRefusal` whose message is meant for the person in
front of the desktop: who signed the laptop's kernel, and the two ways out (enroll that key with
mokutil, or turn Secure Boot off in the firmware).
"""

from __future__ import annotations

import collections
import os
import struct
import subprocess
import time

from ansible_collections.stiefel.system.plugins.module_utils.errors import StiefelError
from stiefel_runtime.common import quiet_log

LOCKDOWN_PATH = "/sys/kernel/security/lockdown"
SECURE_BOOT_VAR = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"
# The ramdisk's /init mounts neither file system these live on: (type, mount point, file, options).
SYSFS_MOUNTS = (("securityfs", "/sys/kernel/security", LOCKDOWN_PATH, ()),
                ("efivarfs", "/sys/firmware/efi/efivars", SECURE_BOOT_VAR, ("-o", "ro")))
CERT_TABLE_INDEX = 4  # IMAGE_DIRECTORY_ENTRY_SECURITY
WIN_CERT_TYPE_PKCS_SIGNED_DATA = 0x0002
MAX_SIGNATURES = 16

# Errnos of kexec_file_load as kexec-tools prints them (strerror), and what they mean here.
KEXEC_REASONS = (
    ("No data available", "{kernel} carries no signature"),
    ("Required key not available", "it does not trust the key that signed {kernel}"),
    ("Key was rejected by service", "{kernel_s} signature does not match its contents"),
    ("Bad message", "{kernel_s} signature cannot be read"),
    ("Operation not permitted", "it refuses to load any kernel in this lockdown state"),
)


class Perspective(collections.namedtuple("Perspective", "machine kernel kernel_s own publisher")):
    """Who asks and about which kernel: the words of a refusal.

    The desktop's client checks the laptop's kernel before it kexecs it; the laptop checks, at setup
    and when autokexec starts, the stiefel server kernel it will kexec into when a desktop asks.
    """


DESKTOP = Perspective("desktop", "the laptop's kernel", "the laptop kernel's",
                      "this desktop's kernel (Debian's, from the stick)", "the laptop distribution publishes it")
LAPTOP = Perspective("laptop", "the stiefel server kernel", "the stiefel server kernel's",
                     "this laptop's running kernel", "the server kernel's distribution publishes it")


class PEError(StiefelError, ValueError):
    """Not a PE/COFF image, or a malformed one."""


class LockdownRefusal(StiefelError):
    """Secure Boot lockdown would refuse the kernel; the message says why and what the person can do."""


class KexecBusy(StiefelError):
    """Another kexec load held the kernel's kexec lock for the whole check: nothing was judged."""


# kexec_file_load answers EBUSY while another load holds the kexec lock (the autokexec agent's own
# check at service start ran beside a second one in QEMU): that says nothing about the signature.
BUSY_TEXT = "Device or resource busy"
BUSY_TRIES = 10
BUSY_DELAY = 3.0


def lockdown_state(path=LOCKDOWN_PATH):
    """'none', 'integrity' or 'confidentiality' (the bracketed word), or None without the LSM."""
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            text = handle.read(256)
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    if start < 0 or end < start:
        return None
    return text[start + 1:end].strip() or None


def secure_boot_enabled(path=SECURE_BOOT_VAR):
    """True/False from the EFI SecureBoot variable (4 attribute bytes, then 1), None if unreadable."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(16)
    except OSError:
        return None
    if len(data) < 5:
        return None
    return data[4] == 1


def mount_missing(run=subprocess.run, mounts=SYSFS_MOUNTS):
    """Mount securityfs / efivarfs where the kernel offers them but nobody mounted them yet."""
    for fstype, where, probe, options in mounts:
        if os.path.exists(probe) or not os.path.isdir(where) or os.path.ismount(where):
            continue
        run(["mount", "-t", fstype] + list(options) + [fstype, where], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, check=False)


def _u16(data, off):
    if off < 0 or off + 2 > len(data):
        raise PEError("truncated at offset %d" % off)
    return struct.unpack_from("<H", data, off)[0]


def _u32(data, off):
    if off < 0 or off + 4 > len(data):
        raise PEError("truncated at offset %d" % off)
    return struct.unpack_from("<I", data, off)[0]


def pe_signatures(data):
    """The PKCS#7 SignedData blobs (DER bytes) of a PE/COFF image's certificate table; [] if unsigned.

    The certificate table's data directory holds a *file offset* and size; its WIN_CERTIFICATE
    entries (dwLength, wRevision, wCertificateType, bCertificate) are 8-byte aligned.
    """
    if data[:2] != b"MZ":
        raise PEError("no MZ header")
    pe = _u32(data, 0x3C)
    if data[pe:pe + 4] != b"PE\0\0":
        raise PEError("no PE signature at offset %d" % pe)
    opt = pe + 24
    size_of_opt = _u16(data, pe + 20)
    magic = _u16(data, opt)
    if magic == 0x20B:
        dirs = opt + 112
    elif magic == 0x10B:
        dirs = opt + 96
    else:
        raise PEError("unknown optional header magic 0x%x" % magic)
    count = _u32(data, dirs - 4)
    if count <= CERT_TABLE_INDEX or dirs + (CERT_TABLE_INDEX + 1) * 8 > opt + size_of_opt:
        return []
    offset = _u32(data, dirs + CERT_TABLE_INDEX * 8)
    size = _u32(data, dirs + CERT_TABLE_INDEX * 8 + 4)
    if offset == 0 or size == 0:
        return []
    if offset + size > len(data):
        raise PEError("certificate table (%d bytes at %d) runs past the end of the file" % (size, offset))
    found = []
    pos, end = offset, offset + size
    while pos + 8 <= end and len(found) < MAX_SIGNATURES:
        length = _u32(data, pos)
        kind = _u16(data, pos + 6)
        if length < 8 or pos + length > end:
            raise PEError("bad WIN_CERTIFICATE length %d at %d" % (length, pos))
        if kind == WIN_CERT_TYPE_PKCS_SIGNED_DATA:
            found.append(bytes(data[pos + 8:pos + length]))
        pos += (length + 7) // 8 * 8
    return found


def _common_name(name):
    from cryptography.x509.oid import NameOID  # pylint: disable=import-outside-toplevel

    values = [a.value for a in name.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return str(values[0]) if values else name.rfc4514_string()


def _der_element(blob):
    """The first DER element of ``blob``: a WIN_CERTIFICATE may pad its SignedData with zero bytes."""
    if len(blob) < 2 or blob[0] != 0x30:
        return blob
    first = blob[1]
    if first < 0x80:
        return blob[:2 + first]
    width = first & 0x7F
    if width == 0 or width > 4 or len(blob) < 2 + width:
        return blob
    return blob[:2 + width + int.from_bytes(blob[2:2 + width], "big")]


def signer_of(der):
    """(signer subject CN, issuer CN) of one PKCS#7 SignedData, from the certificates it carries.

    The signer is the certificate that issued no other one in the set (the leaf).
    """
    try:
        from cryptography.hazmat.primitives.serialization import pkcs7  # pylint: disable=import-outside-toplevel

        certs = pkcs7.load_der_pkcs7_certificates(_der_element(der))
    except Exception as exc:  # pylint: disable=broad-except  # cryptography raises several types on garbage
        raise PEError("unreadable PKCS#7 signature: %s" % (str(exc) or type(exc).__name__)) from None
    if not certs:
        raise PEError("PKCS#7 signature carries no certificate")
    issuers = {c.issuer for c in certs}
    leaves = [c for c in certs if c.subject not in issuers or c.subject == c.issuer] or certs
    leaf = leaves[0]
    return _common_name(leaf.subject), _common_name(leaf.issuer)


def kernel_signers(path):
    """[(subject CN, issuer CN)] of the kernel image at ``path``; [] if it is not signed."""
    with open(path, "rb") as handle:
        data = handle.read()
    return [signer_of(der) for der in pe_signatures(data)]


def refusal_text(reason, signers, secure_boot, who=DESKTOP):
    """The person's explanation (desktop screen or setup_server.yml): why, who signed it, what to do."""
    why = "Secure Boot is on" if secure_boot else "the kernel is locked down"
    lines = ["This %s cannot start %s: %s, and %s." % (who.machine, who.kernel, why, reason)]
    if signers:
        subject, issuer = signers[0]
        lines.append("%s is signed by '%s' (issued by '%s'); %s does not trust that key."
                     % (who.kernel[0].upper() + who.kernel[1:], subject, issuer, who.own))
        lines.append("To boot it: enroll the '%s' certificate on this %s with 'mokutil --import "
                     "<certificate.der>' (%s) and confirm it in MokManager at the next start, or turn Secure "
                     "Boot off in this %s's firmware setup." % (issuer, who.machine, who.publisher, who.machine))
    else:
        lines.append("To boot it: sign %s and enroll that key with 'mokutil --import', use a signed kernel from "
                     "%s distribution, or turn Secure Boot off in this %s's firmware setup."
                     % (who.kernel, "the laptop's" if who is DESKTOP else "Debian's (linux-image-amd64) or this laptop's",
                        who.machine))
    return " ".join(lines)


def trial_argv(kernel, initrd=None, cmdline=None, kexec="kexec"):
    """``kexec -s -l``: kexec_file_load, the only load a locked-down kernel allows (it checks the signature)."""
    return ([kexec, "-s", "-l"] + (["--initrd=" + initrd] if initrd else [])
            + (["--command-line=" + cmdline] if cmdline is not None else []) + [kernel])


def unload_argv(kexec="kexec"):
    """Plain ``kexec -u`` is kexec_load's unload, refused under lockdown; ``-s -u`` is kexec_file_load's."""
    return [kexec, "-s", "-u"]


def check_kernel(kernel, run=subprocess.run, log=quiet_log, kexec="kexec", lockdown_path=LOCKDOWN_PATH,
                 secure_boot_path=SECURE_BOOT_VAR, dry_run=False, mounts=SYSFS_MOUNTS, initrd=None, cmdline=None,
                 who=DESKTOP, sleep=time.sleep):
    """Raise LockdownRefusal if a locked-down kernel would refuse to kexec ``kernel``; else say why not.

    Without lockdown this only reads one sysfs file (mounting securityfs first if need be). Under
    lockdown it loads ``kernel`` (with ``initrd`` and ``cmdline`` when given) by kexec_file_load and
    unloads it again: the running kernel is the judge. ``run`` is the subprocess seam. Returns one
    line saying what was found, for the log.
    """
    if dry_run:  # the agents' --dry-run runs on hosts (locked down or not) with stand-in kernels
        log("dry-run: would check the signature of %s if this kernel is locked down" % who.kernel)
        return "dry run: not checked"
    mount_missing(run, mounts)
    state = lockdown_state(lockdown_path)
    if state in (None, "none"):
        return "this kernel is not locked down (lockdown: %s): no signature needed" % (state or "no LSM")
    secure_boot = secure_boot_enabled(secure_boot_path)
    sb_word = {True: "on", False: "off", None: "unknown"}[secure_boot]
    log("lockdown: %s (Secure Boot %s): checking the signature of %s" % (state, sb_word, who.kernel))
    try:
        signers = kernel_signers(kernel)
    except PEError as exc:
        raise LockdownRefusal(refusal_text("%s is not a signed EFI image (%s)" % (who.kernel, exc), [],
                                           secure_boot, who)) from None
    if not signers:
        raise LockdownRefusal(refusal_text("%s carries no signature" % who.kernel, [], secure_boot, who))
    signed_by = "; ".join("%s (%s)" % s for s in signers)
    log("lockdown: %s is signed by %s" % (who.kernel, signed_by))
    for attempt in range(1, BUSY_TRIES + 1):
        proc = run(trial_argv(kernel, initrd, cmdline, kexec), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                   check=False)
        output = proc.stdout.decode("utf-8", "replace") if isinstance(proc.stdout, bytes) else str(proc.stdout or "")
        if proc.returncode == 0 or BUSY_TEXT not in output:
            break
        if attempt == BUSY_TRIES:
            raise KexecBusy("another kexec load kept the kernel busy for %d tries %.0f s apart; try again"
                            % (BUSY_TRIES, BUSY_DELAY))
        log("lockdown: another kexec load is in progress (EBUSY); trying again in %.0f s" % BUSY_DELAY)
        sleep(BUSY_DELAY)
    if proc.returncode == 0:
        run(unload_argv(kexec), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
        log("lockdown: the kernel accepts %s" % who.kernel)
        return ("accepted: lockdown %s, Secure Boot %s, %s (signed by %s) loads with kexec -s -l"
                % (state, sb_word, who.kernel, signed_by))
    reason = next((why.format(kernel=who.kernel, kernel_s=who.kernel_s) for errtext, why in KEXEC_REASONS
                   if errtext in output),
                  "kexec_file_load refused %s (%s)" % (who.kernel, output.strip()[-200:]))
    raise LockdownRefusal(refusal_text(reason, signers, secure_boot, who))
