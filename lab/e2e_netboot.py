"""The no-stick flow in QEMU (issue 17 item 3): a dracut laptop answers the desktop's network boot.

``python -m lab.e2e STEP --laptop-generator dracut --desktop netboot`` runs these steps
(molecule scenario ``netboot``), in their own work directory ($STIEFEL_CACHE_DIR/netboot) and
namespace (stf-e2e-nbt), so they never collide with the e2e scenario's.

  create    the laptop: the cached Debian bookworm root with dracut in place of initramfs-tools
            (the one test_nbd_root_tls.py uses, extensions/molecule/laptop_initramfs_tools/build-root.sh),
            set up by playbooks/setup_server.yml with laptop_netboot=true through a chroot connection:
            first in check mode (must create nothing), then for real, then again (must report
            changed=0), then the initramfs smoke run; packed into a BIOS disk image. The virtual cable.
  converge  boot the laptop; boot the desktop with no stick (plain OVMF, its virtio-net NIC first:
            OVMF's own PXE, shim, GRUB, the client ramdisk over HTTP); type a wrong pairing code on its
            serial console (both consoles must say it was refused), then the right one (from the laptop
            root's key); follow the flow to the laptop's OS on the desktop, whose probe runs
            ``stiefelctl when-done poweroff`` (python3 -m stiefel_runtime.whendone) and powers off;
            the laptop must then power itself off. Prints the timeline.
  verify    both consoles showed the refusal, the desktop ran the laptop's OS, the proof file is on
            the laptop's disk, fsck is clean, the server powered the laptop off (no return).
  destroy   stop the VMs by PID, remove the namespace.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

from lab import ansible_output, laptop_disk
from lab import e2e as lab_e2e
from lab.netns import VirtualLink
from lab.qemu import VM, MarkerTimeout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUFFIX = "nbt"
LAPTOP_MAC = "52:54:00:5f:01:01"
DESKTOP_MAC = "52:54:00:5f:01:02"
STATE = "netboot-state.json"
BUILD_ROOT = os.path.join(REPO, "extensions", "molecule", "laptop_initramfs_tools", "build-root.sh")
SMOKE = os.path.join(REPO, "extensions", "molecule", "laptop_initramfs_tools", "initramfs-smoke.sh")
WRONG_CODE = "0000-0000"
PROMPT = r"Pairing code shown on the laptop"
KEXEC_CHECK = r"stiefel-autokexec: kexec check: [^\n]*"
NETBOOT_UP = r"stiefel-autokexec: netboot: PXE / UEFI HTTP boot on"
# What the check-mode run on the fresh root must not create (laptop_dracut's list, which this absorbs).
CHECK_MODE_ABSENT = (
    "etc/stiefel/key", "etc/stiefel/autokexec.json", "boot/stiefel/boot.json", "usr/lib/stiefel",
    "etc/systemd/system/stiefel-autokexec.service", "usr/lib/dracut/modules.d/95stiefel",
    "etc/dracut.conf.d/90-stiefel.conf", "etc/systemd/network/10-stiefel.network", "usr/sbin/nbd-client",
    "usr/sbin/dnsmasq",
)
# The desktop's probe, on top of the e2e one: the explicit verb of issue 16, at no extra boot.
_POWER_OFF_LINE = 'echo "E2E-PROBE powering off"'
assert _POWER_OFF_LINE in laptop_disk.PROBE_SCRIPT
WHEN_DONE_PROBE = laptop_disk.PROBE_SCRIPT.replace(_POWER_OFF_LINE, (
    "PYTHONPATH=/usr/lib/stiefel/python python3 -m stiefel_runtime.whendone poweroff > /dev/ttyS0 2>&1\n"
    'echo "E2E-WHENDONE rc=$?" > /dev/ttyS0\n') + _POWER_OFF_LINE)
FAILS = (r"Kernel panic", r"stiefel-client: .*(error|failed)")

# (label, vm, pattern): the flow after pairing, the e2e's stages from the acknowledgement on.
STAGES = lab_e2e.STAGES[[label for label, _vm, _pattern in lab_e2e.STAGES].index("autokexec acknowledged"):]
POWEROFF_STAGES = [
    ("server told: poweroff", r"stiefel-server: way back: .* asks: when done, poweroff"),
    ("server saw clients gone", r"stiefel-server: way back: all NBD clients gone"),
    ("export stopped+flushed", r"stiefel-server: way back: \S+ flushed"),
    ("laptop powering off", r"stiefel-server: way back: powering the laptop off"),
]


def log(msg):
    print("[netboot %s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


def workdir():
    return lab_e2e.workdir("netboot")


def load_state(wd):
    return lab_e2e.load_state(wd, STATE)


def save_state(wd, state):
    lab_e2e.save_state(wd, state, STATE)


def playbook(*args):
    """setup_server.yml (or another playbook) through the lab's runner; its output is printed, its recap returned."""
    log("$ ansible-playbook " + " ".join(str(a) for a in args))
    run = ansible_output.run_playbook(*args, timeout=3600)
    tail = run.stdout[-6000:] if run.returncode else run.stdout[run.stdout.rfind("PLAY RECAP"):]
    print(tail, flush=True)
    if run.returncode:
        print(run.stderr[-3000:], flush=True)
        raise SystemExit("ansible-playbook %s failed (rc %d)" % (args[0], run.returncode))
    log("took %.0f s, changed=%d, changed tasks: %s" % (run.seconds, run.changed(), run.changed_tasks()))
    return run


def _sha256(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def create(_args):
    wd = workdir()
    started = time.monotonic()
    cache = os.path.dirname(wd)
    tarball = os.path.join(cache, "laptop", "bookworm-dracut.tar.zst")
    subprocess.run(["bash", BUILD_ROOT, "dracut", tarball], check=True)
    root = laptop_disk.unpack_root(tarball, os.path.join(wd, "laptop-root"))
    with open(os.path.join(root, "usr/local/sbin/stiefel-e2e-probe"), "w", encoding="utf-8") as handle:
        handle.write(WHEN_DONE_PROBE)
    # a test fixture: zstd is quick to build and to unpack under TCG (the root's own dracut.conf is untouched)
    with open(os.path.join(root, "etc/dracut.conf.d/10-e2e-compress.conf"), "w", encoding="utf-8") as handle:
        handle.write('compress="zstd"\n')
    shutil.copy("/etc/resolv.conf", os.path.join(root, "etc/resolv.conf"))
    version = laptop_disk.kernel_version(root)
    initrd = os.path.join(root, "boot/initrd.img-%s" % version)
    before = _sha256(initrd)
    ansible_playbook_vars = json.dumps({
        "laptop_key_path": "/etc/stiefel/key",
        "laptop_server_disk": "/dev/vda",
        "laptop_trigger_macs": [],
        "laptop_listen_macs": [LAPTOP_MAC],
        "laptop_netboot": True,
        "laptop_netboot_cmdline_extra": ["console=ttyS0,115200"],
        "laptop_boot_cmdline_extra": ["systemd.swap=0", "noresume", "console=ttyS0,115200"],
        "laptop_server_cmdline_extra": ["console=ttyS0,115200"],
        "laptop_when_done": "return",
        "laptop_return_wait": 5,  # the clean disconnect waits min(30 s, this): CI time
        "laptop_logind_ignore_lid": True,
    })
    inventory = os.path.join(wd, "laptop-inventory.yml")
    with open(inventory, "w", encoding="utf-8") as handle:
        json.dump({"all": {"hosts": {"netboot-laptop": {
            "ansible_connection": "community.general.chroot", "ansible_host": root,
            "ansible_python_interpreter": "/usr/bin/python3"}}}}, handle)
    setup = ("-i", inventory, "playbooks/setup_server.yml", "-e", "stiefel_hosts=netboot-laptop",
             "-e", ansible_playbook_vars)
    playbook("playbooks/build_image.yml")
    mounts = lab_e2e.mount_api(root)
    figures = {}
    try:
        # A real laptop has package lists and python3-apt (ansible's apt module needs it in check mode);
        # this root has neither (mmdebstrap removes the lists). laptop_dracut's prepare step did the same.
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["chroot", root, "apt-get", "update", "-q"], check=True, stdout=subprocess.DEVNULL, env=env)
        subprocess.run(["chroot", root, "apt-get", "install", "-y", "-q", "python3-apt"], check=True,
                       stdout=subprocess.DEVNULL, env=env)
        run = playbook("--check", *setup)
        figures["check mode"] = run.seconds
        created = [p for p in CHECK_MODE_ABSENT if os.path.lexists(os.path.join(root, p))]
        if created or _sha256(initrd) != before:
            raise SystemExit("check mode changed the root: created %s, initrd %s" % (
                created, "regenerated" if _sha256(initrd) != before else "untouched"))
        log("check mode created nothing and left the initrd alone (%d tasks would change)" % run.changed())
        figures["converge"] = playbook(*setup).seconds
        second = playbook(*setup)
        figures["second converge"] = second.seconds
        if second.changed():
            raise SystemExit("the second converge changed %d tasks: %s" % (second.changed(), second.changed_tasks()))
        log("idempotent: the second converge reported changed=0")
        shutil.copy(SMOKE, os.path.join(root, "tmp/initramfs-smoke.sh"))
        smoke = subprocess.run(["chroot", root, "bash", "/tmp/initramfs-smoke.sh", "/boot/initrd.img-%s" % version],
                               capture_output=True, text=True, check=False)
        print(smoke.stdout + smoke.stderr, flush=True)
        if smoke.returncode or "initramfs-smoke: /boot/initrd.img-%s ok" % version not in smoke.stdout:
            raise SystemExit("initramfs smoke run failed (rc %d)" % smoke.returncode)
    finally:
        lab_e2e.umount_all(mounts)
    with open(os.path.join(root, "etc/stiefel/autokexec.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    log("autokexec netboot config: %s" % config["netboot"])
    os.unlink(os.path.join(root, "etc/resolv.conf"))
    laptop_disk.make_image(root, os.path.join(wd, "laptop.img"), "", firmware="bios")
    link = VirtualLink(suffix=SUFFIX).create()
    figures["create"] = time.monotonic() - started
    save_state(wd, {"netns": link.netns, "taps": link.taps, "create": figures})
    log("created: laptop.img (BIOS, dracut), namespace %s; %s" % (
        link.netns, ", ".join("%s %.0f s" % item for item in figures.items())))


def pairing_code(wd):
    """The right code, as ``stiefelctl pairing-code`` prints it on the laptop: derived from the root's key."""
    collections = os.path.join(REPO, "collections")  # the molecule steps run with PYTHONPATH=. only
    if collections not in sys.path:
        sys.path.insert(0, collections)
    from ansible_collections.stiefel.system.plugins.module_utils import (  # pylint: disable=import-outside-toplevel
        keyfile, keyschedule)
    return keyschedule.pairing_code(keyfile.read_key(os.path.join(wd, "laptop-root", "etc/stiefel/key")))


def _mark(timeline, label, vm, pattern, base, start=0, timeout=900, partial=False):
    try:
        stamp, match = vm.wait_for(pattern, timeout=timeout, fail_patterns=FAILS, start=start, partial=partial)
    except MarkerTimeout as exc:
        log("FAILED at stage '%s': %s" % (label, exc))
        raise SystemExit(1) from None
    timeline[label] = stamp + vm.started_at - base
    log("%-26s %7.1f s  %s" % (label, timeline[label], match.group(0)[:100]))
    return match


def converge(_args):
    wd = workdir()
    state = load_state(wd)
    link = VirtualLink(suffix=SUFFIX)
    if not link.exists():
        raise SystemExit("no virtual cable: run create first")
    code = pairing_code(wd)
    assert code != WRONG_CODE
    laptop = VM("laptop", wd, memory=1536, netns=link.netns).disk(os.path.join(wd, "laptop.img"))
    laptop.nic(link.taps[0], LAPTOP_MAC)
    laptop.start()
    state["pids"] = {"laptop": laptop.proc.pid}
    save_state(wd, state)
    laptop_marks = {}
    for label, pattern in (("laptop target", r"E2E-TARGET multi-user reached"), ("kexec check", KEXEC_CHECK),
                           ("netboot up", NETBOOT_UP)):
        try:
            stamp, match = laptop.wait_for(pattern, timeout=900, fail_patterns=(
                r"Kernel panic", r"stiefel-autokexec: netboot on .* failed"))
        except MarkerTimeout as exc:
            log("FAILED on the laptop at '%s': %s" % (label, exc))
            raise SystemExit(1) from None
        laptop_marks[label] = stamp
        log("laptop: %-14s %6.1f s  %s" % (label, stamp, match.group(0)[:100]))
    # No stick, no disk: plain OVMF boots its NIC (OVMF's own PXE, not QEMU's iPXE ROM).
    desktop = VM("desktop", wd, memory=1536, netns=link.netns, uefi=True, serial_input=True)
    desktop.nic(link.taps[1], DESKTOP_MAC, bootindex=0, romfile="")
    desktop.start()
    state["pids"]["desktop"] = desktop.proc.pid
    save_state(wd, state)
    base = desktop.started_at
    timeline = {"desktop power-on": 0.0}
    _mark(timeline, "PXE/DHCP lease", desktop, r"NBP filename is shimx64\.efi|Station IP address is", base)
    _mark(timeline, "client ramdisk up", desktop, r"stiefel-ramdisk: starting role=client", base)
    _mark(timeline, "code asked", desktop, PROMPT, base, partial=True)
    at = desktop.position()
    at_laptop = laptop.position()
    desktop.send(WRONG_CODE + "\r")
    _mark(timeline, "wrong code refused", desktop, r"pairing refused", base, start=at)
    _mark(timeline, "laptop: wrong code logged", laptop, r"stiefel-autokexec: pairing from .*wrong code", base,
          start=at_laptop)
    at = desktop.position()
    _mark(timeline, "code asked again", desktop, PROMPT, base, start=at, partial=True)
    desktop.send(code + "\r")
    _mark(timeline, "paired", desktop, r"paired: code confirmed by the laptop", base, start=at)
    _mark(timeline, "laptop: code confirmed", laptop, r"stiefel-autokexec: pairing from .*code confirmed", base,
          start=at_laptop)
    vms = {"laptop": laptop, "desktop": desktop}
    for label, which, pattern in STAGES:
        _mark(timeline, label, vms[which], pattern, base)
    at_laptop = laptop.position()
    _mark(timeline, "when-done poweroff sent", desktop, r"E2E-WHENDONE rc=0", base, timeout=300)
    rc = desktop.wait_exit(300)
    if rc is None:
        log("the desktop did not power off within 300 s")
        raise SystemExit(1)
    timeline["desktop clean power-off"] = time.monotonic() - base
    log("%-26s %7.1f s" % ("desktop clean power-off", timeline["desktop clean power-off"]))
    for label, pattern in POWEROFF_STAGES:
        _mark(timeline, label, laptop, pattern, base, start=0 if label.startswith("server told") else at_laptop,
              timeout=300)
    if laptop.wait_exit(300) is None:
        log("the laptop did not power itself off within 300 s")
        raise SystemExit(1)
    timeline["laptop powered off"] = time.monotonic() - base
    log("%-26s %7.1f s" % ("laptop powered off", timeline["laptop powered off"]))
    with open(os.path.join(wd, "timeline.json"), "w", encoding="utf-8") as handle:
        json.dump(dict(timeline, laptop=laptop_marks), handle, indent=1)
    print_timeline(timeline, laptop_marks)


def print_timeline(timeline, laptop_marks):
    print("\nLaptop (seconds since laptop power-on)")
    for label, value in laptop_marks.items():
        print("  %-28s %7.1f" % (label, value))
    print("\nTimeline, no stick (seconds since desktop power-on)")
    for label, value in timeline.items():
        print("  %-28s %7.1f" % (label, value))


def _text(wd, name):
    with open(os.path.join(wd, "%s.serial.log" % name), encoding="utf-8", errors="replace") as handle:
        return handle.read()


def verify(_args):
    wd = workdir()
    desktop, laptop = _text(wd, "desktop"), _text(wd, "laptop")
    root = os.path.join(wd, "laptop-root")
    with open(os.path.join(root, "etc/machine-id"), encoding="utf-8") as handle:
        machine_id = handle.read().strip()
    problems = []
    for vm, text, pattern in (("desktop", desktop, r"stiefel-client: pairing refused[^\n]*"),
                              ("laptop", laptop, r"stiefel-autokexec: pairing from [^\n]*wrong code[^\n]*"),
                              ("laptop", laptop, r"stiefel-server: way back: powering the laptop off[^\n]*")):
        found = re.search(pattern, text)
        if found:
            log("%s console: %s" % (vm, found.group(0).strip()))
        else:
            problems.append("%s console never showed %r" % (vm, pattern))
    if re.search(r"stiefel-server: way back: kexec now", laptop):
        problems.append("the laptop returned to its OS: the desktop's when-done poweroff was not followed")
    # The desktop's console echoes what the person types; the laptop's must never show the code.
    code = pairing_code(wd)
    if code in laptop or code.replace("-", "") in laptop:
        problems.append("the pairing code is on the laptop's console")
    probe = re.search(r"E2E-PROBE machine-id=(\S+) hostname=(\S+)", desktop)
    proof = re.search(r"E2E-PROOF sha256=([0-9a-f]{64})", desktop)
    if not probe or probe.group(1) != machine_id or probe.group(2) != laptop_disk.HOSTNAME:
        problems.append("desktop did not run the laptop's OS (probe: %s)" % (probe.group(0) if probe else None))
    problems += lab_e2e.check_laptop_disk(os.path.join(wd, "laptop.img"), "bios", proof.group(1) if proof else None)
    if problems:
        for problem in problems:
            log("VERIFY FAILED: " + problem)
        raise SystemExit(1)
    log("verified: wrong code refused on both consoles, machine-id %s on the desktop, proof %s on the laptop "
        "disk, fsck clean, the laptop powered itself off" % (machine_id, proof.group(1)[:16]))


def destroy(_args):
    wd = workdir()
    state = load_state(wd)
    for name, pid in state.get("pids", {}).items():
        try:
            os.killpg(pid, 9)
            log("stopped %s (pid %d)" % (name, pid))
        except ProcessLookupError:
            pass
    VirtualLink(suffix=SUFFIX).destroy()
    state.pop("pids", None)
    save_state(wd, state)
