"""The end-to-end flow in QEMU: a virtual laptop boots a virtual desktop.

Subcommands (molecule's create/converge/verify/destroy and the demo call them):
  create    laptop disk (real Debian + the project's setup_server.yml, through a
            chroot connection), client stick (the project's flash_usb.yml into an
            image file), the virtual cable (namespace, bridge, two taps)
  converge  boot the laptop from its disk, then the desktop from the stick (UEFI);
            wait for every stage of the flow; after the desktop's clean power-off, follow
            the way back (the server ramdisk kexecs into the laptop's own OS, which says
            so and powers off); print the timeline
  verify    the desktop ran the laptop's OS (machine-id, hostname from the serial
            console), the proof file is on the laptop's disk, the filesystem is clean;
            with Secure Boot, both consoles showed it on and the kernel locked down
            and the laptop's autokexec accepted the server kernel; the laptop came back
            to its own OS (same machine-id, no stiefel.* option on its command line)

Secure Boot (the default; create --no-secure-boot for the BIOS laptop): both VMs on
OVMF's Secure Boot build with Microsoft's keys (q35 + SMM), the laptop from a UEFI
disk (shim, Debian's signed GRUB, the root's Debian-signed kernel), the desktop
from the shim stick over usb-storage; the direct-boot reference boots the same way.
  destroy   stop the VMs by PID, remove the namespace, detach loop devices
Everything lives in $STIEFEL_CACHE_DIR/e2e (serial logs: *.serial.log, timeline.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

from lab import laptop_disk
from lab.netns import VirtualLink
from lab.qemu import VM, MarkerTimeout, secure_boot_missing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAPTOP_MAC = "52:54:00:5f:00:01"
DESKTOP_MAC = "52:54:00:5f:00:02"
STATE = "e2e-state.json"
# What a Secure Boot console shows (verify asserts them on both VMs).
SECURE_BOOT_LINES = (("Secure Boot on", r"secureboot: Secure boot enabled"),
                     ("kernel locked down", r"Kernel is locked down from EFI Secure Boot"))
# The laptop agent's check at start: "accepted: ...", "this kernel is not locked down ..." or "REFUSED: ...".
KEXEC_CHECK = r"stiefel-autokexec: kexec check: [^\n]*"
# The way back (seconds a dropped desktop has to come back: short here, the role's default is 120).
RETURN_WAIT = 20
RETURN_STAGES = [
    ("server saw clients gone", r"stiefel-server: way back: all NBD clients gone"),
    ("export stopped+flushed", r"stiefel-server: way back: \S+ flushed"),
    ("kexec to the laptop OS", r"stiefel-server: way back: kexec now"),
    ("laptop target again", r"E2E-TARGET multi-user reached"),
]
RETURNED = r"E2E-LAPTOP returned machine-id=(\S+) cmdline=(.*)"
# On the laptop's own OS, once the desktop wrote its proof file there: the way back worked. It says
# so with the machine-id and command line, then powers off cleanly, so verify finds the disk clean.
RETURN_PROBE = """#!/bin/sh
grep -q 'stiefel.mac=' /proc/cmdline && exit 0
[ -e /root/e2e-proof ] || exit 0
echo "E2E-LAPTOP returned machine-id=$(cat /etc/machine-id) cmdline=$(cat /proc/cmdline)" > /dev/ttyS0
systemctl --no-block poweroff
"""
RETURN_UNIT = """[Unit]
Description=stiefel end-to-end: the laptop is back in its own OS (test fixture)
After=multi-user.target stiefel-e2e-target.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/stiefel-e2e-returned

[Install]
WantedBy=multi-user.target
"""

# (label, vm, pattern): the timeline, in the order the flow passes through it.
STAGES = [
    ("desktop power-on", "desktop", None),
    ("client ramdisk up", "desktop", r"stiefel-ramdisk: starting role=client"),
    ("discovery started", "desktop", r"stiefel-client: discovery started"),
    ("laptop OS answered", "desktop", r"stiefel-client: laptop OS at .* offers autokexec"),
    ("autokexec acknowledged", "desktop", r"stiefel-client: laptop .* acknowledged"),
    ("server ramdisk up", "laptop", r"stiefel-ramdisk: starting role=server"),
    ("server ready", "laptop", r"stiefel-server: ready"),
    ("payload verified", "desktop", r"stiefel-client: payload verified"),
    ("kexec", "desktop", r"stiefel-client: kexec"),
    ("NBD attached", "desktop", r"nbd0: p\d|stiefel: nbd attached"),
    ("root mounted", "desktop", r"EXT4-fs \(nbd0p\d+\): mounted"),
    ("boot target reached", "desktop", r"E2E-TARGET multi-user reached"),
]


def log(msg):
    print("[e2e %s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


def workdir(name="e2e"):
    """$STIEFEL_CACHE_DIR/NAME: each flow's own (e2e, netboot), so the two never share state or files."""
    base = os.environ.get("STIEFEL_CACHE_DIR") or os.path.join(REPO, ".cache")
    path = os.path.join(base, name)
    os.makedirs(path, exist_ok=True)
    return path


def load_state(wd, name=STATE):
    path = os.path.join(wd, name)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def save_state(wd, state, name=STATE):
    with open(os.path.join(wd, name), "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=1)


def ansible_playbook(*args):
    argv = [os.path.join(REPO, ".venv/bin/ansible-playbook")] + list(args)
    log("$ " + " ".join(argv))
    subprocess.run(argv, check=True, cwd=REPO)


def mount_api(root):
    mounts = []
    for fs, target, opts in (("proc", "proc", []), ("sysfs", "sys", []), ("devtmpfs", "dev", [])):
        path = os.path.join(root, target)
        subprocess.run(["mount", "-t", fs, fs, path] + opts, check=True)
        mounts.append(path)
    return mounts


def umount_all(mounts):
    for path in reversed(mounts):
        subprocess.run(["umount", "-l", path], check=False)


def create(args):
    wd = workdir()
    firmware = "uefi" if args.secure_boot else "bios"
    if args.secure_boot and secure_boot_missing():
        raise SystemExit(secure_boot_missing())
    key = os.path.join(wd, "stiefel.key")
    tarball = laptop_disk.build_root_tarball(os.path.join(os.path.dirname(wd), laptop_disk.TARBALL_DIR))
    root = laptop_disk.unpack_root(tarball, os.path.join(wd, "laptop-root"))
    install_return_probe(root)
    inventory = os.path.join(wd, "laptop-inventory.yml")
    with open(inventory, "w") as handle:
        json.dump({"all": {"hosts": {"e2e-laptop": {
            "ansible_connection": "community.general.chroot",
            "ansible_host": root,
            "ansible_python_interpreter": "/usr/bin/python3",
        }}}}, handle)
    # setup_server.yml installs the ramdisk on the laptop; the project's own
    # playbook builds it (seconds when its inputs are unchanged).
    ansible_playbook("playbooks/build_image.yml")
    mounts = mount_api(root)
    try:
        ansible_playbook("-i", inventory, "playbooks/setup_server.yml",
                         "-e", "stiefel_hosts=e2e-laptop",
                         "-e", json.dumps({
                             "laptop_key_path": "/etc/stiefel/key",
                             "laptop_server_disk": "/dev/vda",
                             "laptop_trigger_macs": [],
                             "laptop_listen_macs": [LAPTOP_MAC],
                             "laptop_boot_cmdline_extra": ["systemd.swap=0", "noresume", "console=ttyS0,115200"],
                             "laptop_server_cmdline_extra": ["console=ttyS0,115200"],
                             "laptop_when_done": "return",
                             "laptop_return_wait": RETURN_WAIT,
                         }))
    finally:
        umount_all(mounts)
    # The stick carries the laptop's key: copy it out of the laptop root.
    with open(os.path.join(root, "etc/stiefel/key"), "rb") as src, open(key, "wb") as dst:
        os.fchmod(dst.fileno(), 0o600)
        dst.write(src.read())
    laptop_disk.make_image(root, os.path.join(wd, "laptop.img"), "", firmware=firmware)
    if args.secure_boot:
        print(laptop_disk.sbverify_loaders(os.path.join(wd, "laptop.img"), root, wd), flush=True)
    stick = os.path.join(wd, "stick.img")
    ansible_playbook("playbooks/flash_usb.yml", "-e", json.dumps({
        "device": stick, "confirm": stick, "image_size": "512M", "usb_stick_key_path": key,
    }))
    link = VirtualLink(suffix="e2e").create()
    save_state(wd, {"netns": link.netns, "taps": link.taps, "firmware": firmware,
                    "secure_boot": bool(args.secure_boot)})
    log("created: laptop.img (%s%s), stick.img, namespace %s"
        % (firmware, ", Secure Boot" if args.secure_boot else "", link.netns))


def install_return_probe(root):
    path = os.path.join(root, "usr/local/sbin/stiefel-e2e-returned")
    with open(path, "w") as handle:
        handle.write(RETURN_PROBE)
    os.chmod(path, 0o755)
    unit = os.path.join(root, "etc/systemd/system/stiefel-e2e-returned.service")
    with open(unit, "w") as handle:
        handle.write(RETURN_UNIT)
    link = os.path.join(root, "etc/systemd/system/multi-user.target.wants/stiefel-e2e-returned.service")
    if not os.path.lexists(link):
        os.symlink("/etc/systemd/system/stiefel-e2e-returned.service", link)


def follow_return(laptop, start, base, timeline):
    """The way back on the laptop's console, after the desktop's power-off: the stages and the probe's line."""
    for label, pattern in RETURN_STAGES:
        try:
            stamp, _match = laptop.wait_for(pattern, timeout=900, start=start, fail_patterns=(
                r"Kernel panic", r"stiefel-server: way back failed"))
        except MarkerTimeout as exc:
            log("FAILED at return stage '%s': %s" % (label, exc))
            raise SystemExit(1)
        timeline[label] = stamp + laptop.started_at - base
        log("%-22s %7.1f s" % (label, timeline[label]))
    _stamp, match = laptop.wait_for(RETURNED, timeout=300, start=start)
    log("laptop: %s" % match.group(0))
    rc = laptop.wait_exit(300)
    if rc is None:
        log("the laptop's OS did not power off within 300 s after the return")
        raise SystemExit(1)
    timeline["laptop clean power-off"] = time.monotonic() - base
    return {"machine_id": match.group(1), "cmdline": match.group(2).strip()}


def _vm_pids(wd):
    return load_state(wd).get("pids", {})


def boot_laptop(wd, link, snapshot=False, name="laptop", secure_boot=False):
    vm = VM(name, wd, memory=1536, netns=link.netns, secure_boot=secure_boot)
    vm.disk(os.path.join(wd, "laptop.img"))
    if snapshot:
        vm.add("-snapshot")
    vm.nic(link.taps[0], LAPTOP_MAC)
    return vm.start()


def converge(args):
    wd = workdir()
    state = load_state(wd)
    link = VirtualLink(suffix="e2e")
    if not link.exists():
        raise SystemExit("no virtual cable: run create first")
    secure_boot = bool(state.get("secure_boot"))
    timeline = {}
    reference = None
    if not args.no_reference:
        # Reference: the same laptop disk booting directly in the same QEMU,
        # from a copy and without a NIC, alongside the laptop's own boot (two
        # cores, one VM each) so the reference costs no extra wall time.
        ref_image = os.path.join(wd, "laptop-reference.img")
        subprocess.run(["cp", "--sparse=always", os.path.join(wd, "laptop.img"), ref_image], check=True)
        reference = VM("laptop-direct", wd, memory=1536, secure_boot=secure_boot).disk(ref_image).add(
            "-nic", "none").start()
        state["pids"] = {"laptop-direct": reference.proc.pid}
    laptop = boot_laptop(wd, link, secure_boot=secure_boot)
    state.setdefault("pids", {})["laptop"] = laptop.proc.pid
    save_state(wd, state)
    laptop_marks = {}
    if secure_boot:
        for label, pattern in SECURE_BOOT_LINES:
            stamp, match = laptop.wait_for(pattern, timeout=900, fail_patterns=(r"Kernel panic",))
            laptop_marks["laptop " + label] = stamp
            log("laptop: %s at %.1f s: %s" % (label, stamp, match.group(0)))
    laptop.wait_for(r"E2E-TARGET multi-user reached", timeout=900)
    stamp, match = laptop.wait_for(KEXEC_CHECK, timeout=300)
    laptop_marks["laptop kexec check"] = stamp
    log("laptop: %s" % match.group(0))
    if "REFUSED" in match.group(0):
        raise SystemExit(1)
    if reference is not None:
        try:
            stamp, _match = reference.wait_for(r"E2E-TARGET multi-user reached", timeout=900)
            timeline["direct boot to target"] = stamp
            log("direct boot of the laptop disk reached multi-user in %.1f s" % stamp)
        finally:
            reference.stop()
            os.unlink(os.path.join(wd, "laptop-reference.img"))
    log("laptop OS is up (autokexec should be listening)")
    desktop = VM("desktop", wd, memory=1536, netns=link.netns, uefi=True, secure_boot=secure_boot)
    desktop.disk(os.path.join(wd, "stick.img"), usb=True)
    desktop.nic(link.taps[1], DESKTOP_MAC)
    desktop.start()
    state["pids"]["desktop"] = desktop.proc.pid
    save_state(wd, state)
    vms = {"laptop": laptop, "desktop": desktop}
    base = desktop.started_at
    fails = (r"Kernel panic", r"stiefel-client: .*(error|failed)")
    stages = list(STAGES)
    if secure_boot:
        stages[1:1] = [("desktop " + label, "desktop", pattern) for label, pattern in SECURE_BOOT_LINES]
    for label, which, pattern in stages:
        vm = vms[which]
        if pattern is None:
            timeline[label] = 0.0
            continue
        try:
            stamp, _match = vm.wait_for(pattern, timeout=900, fail_patterns=fails)
        except MarkerTimeout as exc:
            log("FAILED at stage '%s': %s" % (label, exc))
            raise SystemExit(1)
        timeline[label] = stamp + vm.started_at - base
        log("%-22s %7.1f s" % (label, timeline[label]))
    # The probe writes the proof file and powers the desktop off cleanly.
    returning = laptop.position()
    desktop.wait_for(r"E2E-PROOF sha256=([0-9a-f]{64})", timeout=300)
    rc = desktop.wait_exit(300)
    timeline["desktop clean power-off"] = time.monotonic() - base
    log("%-22s %7.1f s" % ("desktop clean power-off", timeline["desktop clean power-off"]))
    if rc is None:
        log("desktop did not power off within 300 s")
        raise SystemExit(1)
    # The way back: the server ramdisk kexecs into the laptop's own OS, which powers off once up.
    returned = follow_return(laptop, returning, base, timeline)
    with open(os.path.join(wd, "timeline.json"), "w") as handle:
        json.dump(dict(timeline, laptop=laptop_marks, secure_boot=secure_boot, returned=returned), handle, indent=1)
    print_timeline(timeline, laptop_marks, secure_boot)


def print_timeline(timeline, laptop_marks=None, secure_boot=False):
    if laptop_marks:
        print("\nLaptop (seconds since laptop power-on)")
        for label, value in laptop_marks.items():
            print("  %-28s %7.1f" % (label, value))
    print("\nTimeline (seconds since desktop power-on%s)" % (", Secure Boot on both" if secure_boot else ""))
    for label, value in timeline.items():
        print("  %-28s %7.1f" % (label, value))
    total = timeline.get("boot target reached")
    direct = timeline.get("direct boot to target")
    if total and direct:
        print("  %-28s %7.2f" % ("ratio stiefel / direct boot", total / direct))
    off, back = timeline.get("desktop clean power-off"), timeline.get("laptop target again")
    if off and back:
        print("  %-28s %7.1f" % ("return: power-off to target", back - off))


def check_laptop_disk(image, firmware, proof_sha):
    """The laptop disk after a flow: its root fsck clean and the desktop's proof file on it (the problems found)."""
    problems = []
    offset = laptop_disk.root_start_sector(firmware) * 512
    loop = subprocess.run(["losetup", "--find", "--show", "--offset", str(offset), "--read-only", image],
                          check=True, capture_output=True, text=True).stdout.strip()
    try:
        fsck = subprocess.run(["e2fsck", "-fn", loop], capture_output=True, text=True, check=False)
        if fsck.returncode != 0:
            problems.append("laptop root filesystem is not clean: %s" % fsck.stdout[-500:])
        else:
            log("fsck of the laptop disk: clean (%s)" % fsck.stdout.strip().splitlines()[-1])
        dump = subprocess.run(["debugfs", "-R", "cat /root/e2e-proof", loop], capture_output=True, check=False)
        got = hashlib.sha256(dump.stdout).hexdigest()
        if got != proof_sha:
            problems.append("proof file on the laptop disk has sha256 %s, desktop wrote %s" % (got, proof_sha))
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
    return problems


def verify(args):
    wd = workdir()
    state = load_state(wd)
    log_text = open(os.path.join(wd, "desktop.serial.log"), encoding="utf-8", errors="replace").read()
    root = os.path.join(wd, "laptop-root")
    machine_id = open(os.path.join(root, "etc/machine-id")).read().strip()
    import re
    probe = re.search(r"E2E-PROBE machine-id=(\S+) hostname=(\S+)", log_text)
    proof = re.search(r"E2E-PROOF sha256=([0-9a-f]{64})", log_text)
    problems = []
    if state.get("secure_boot"):
        laptop_log = open(os.path.join(wd, "laptop.serial.log"), encoding="utf-8", errors="replace").read()
        for vm, text in (("desktop", log_text), ("laptop", laptop_log)):
            for label, pattern in SECURE_BOOT_LINES:
                found = re.search(pattern + r"[^\n]*", text)
                if not found:
                    problems.append("%s console never showed %s (%r)" % (vm, label, pattern))
                else:
                    log("%s console: %s" % (vm, found.group(0).strip()))
        check = re.search(KEXEC_CHECK, laptop_log)
        if not check or "kexec check: accepted" not in check.group(0):
            problems.append("laptop's autokexec did not accept the server kernel: %s" % (check and check.group(0)))
        else:
            log("laptop console: %s" % check.group(0).strip())
    laptop_text = open(os.path.join(wd, "laptop.serial.log"), encoding="utf-8", errors="replace").read()
    returned = re.search(RETURNED, laptop_text)
    if not returned or returned.group(1) != machine_id:
        problems.append("the laptop did not come back to its own OS (%s)" % (returned.group(0) if returned else
                                                                             "no E2E-LAPTOP line"))
    elif "stiefel." in returned.group(2):
        problems.append("the laptop came back with stiefel options on its command line: %s" % returned.group(2))
    else:
        log("laptop console: back in its own OS, machine-id %s, cmdline %s" % (machine_id, returned.group(2)))
    if not probe or probe.group(1) != machine_id or probe.group(2) != laptop_disk.HOSTNAME:
        problems.append("desktop did not run the laptop's OS (probe: %s)" % (probe.group(0) if probe else None))
    problems += check_laptop_disk(os.path.join(wd, "laptop.img"), state.get("firmware", "bios"),
                                  proof.group(1) if proof else None)
    if problems:
        for problem in problems:
            log("VERIFY FAILED: " + problem)
        raise SystemExit(1)
    log("verified: machine-id %s, hostname %s, proof file %s on the laptop disk, fsck clean"
        % (machine_id, laptop_disk.HOSTNAME, proof.group(1)[:16]))


def destroy(args):
    wd = workdir()
    state = load_state(wd)
    for name, pid in state.get("pids", {}).items():
        try:
            os.killpg(pid, signal.SIGKILL)
            log("stopped %s (pid %d)" % (name, pid))
        except ProcessLookupError:
            pass
    VirtualLink(suffix="e2e").destroy()
    state.pop("pids", None)
    save_state(wd, state)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["create", "converge", "verify", "destroy"])
    parser.add_argument("--secure-boot", action=argparse.BooleanOptionalAction, default=True,
                        help="create: both VMs on OVMF Secure Boot, the laptop on a UEFI disk (default); "
                             "--no-secure-boot: a BIOS laptop and a plain UEFI desktop")
    parser.add_argument("--no-reference", action="store_true",
                        help="converge: skip the direct boot of the laptop disk (no ratio in the timeline)")
    parser.add_argument("--laptop-generator", choices=["initramfs-tools", "dracut"], default="initramfs-tools",
                        help="the laptop root's initramfs generator (dracut: the cached bookworm-dracut root)")
    parser.add_argument("--desktop", choices=["stick", "netboot"], default="stick",
                        help="how the desktop boots: the client stick, or no stick (OVMF network boot and the "
                             "pairing code; lab/e2e_netboot.py, its own work dir and namespace)")
    args = parser.parse_args(argv)
    if (args.desktop == "netboot") != (args.laptop_generator == "dracut"):
        # two flows, each proven once: initramfs-tools with the stick, dracut with network boot
        parser.error("supported: --laptop-generator initramfs-tools --desktop stick (the default), "
                     "or --laptop-generator dracut --desktop netboot")
    if args.desktop == "netboot":
        from lab import e2e_netboot  # pylint: disable=import-outside-toplevel
        steps = {"create": e2e_netboot.create, "converge": e2e_netboot.converge, "verify": e2e_netboot.verify,
                 "destroy": e2e_netboot.destroy}
    else:
        steps = {"create": create, "converge": converge, "verify": verify, "destroy": destroy}
    steps[args.step](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
