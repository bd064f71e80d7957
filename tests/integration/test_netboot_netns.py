"""Issue 17, item 1: the laptop answers PXE / UEFI HTTP boot on its stiefel port and nowhere else.

Three namespaces: the server's (the real ``stiefel_runtime.netboot`` agent: dnsmasq confined to the stiefel
veth, the static HTTP route), the desktop's at the other end of that veth, and a bystander's on a SECOND veth
of the server's namespace. Real clients only: busybox ``udhcpc`` (with the UEFI client-architecture option 93
and vendor class a firmware sends) and busybox ``tftp``; HTTP with the standard library.

* a UEFI PXE DISCOVER on the stiefel link gets an offer from the link range with ``shimx64.efi`` as boot file;
  a UEFI HTTP one gets the HTTP URL of shim;
* the same UEFI PXE DISCOVER on the other interface of the server's namespace gets nothing, and so does a
  plain (non-boot) DHCP client on the stiefel link;
* TFTP serves shim, GRUB, GRUB's config, and the kernel and initrd (GRUB's path under Secure Boot), byte for
  byte, and refuses anything else (a path out of the root); TFTP on the other interface's address gets no answer;
* HTTP serves the kernel, initrd and GRUB config from a fixed route table and 404s anything else;
* an initrd with the stiefel key appended (the stick's layout) is refused before anything listens;
* (second test, issue 17 item 3's first step) a diskless OVMF VM PXE-boots shim and GRUB from it, and GRUB
  loads its http module and fetches its config and the kernel over HTTP (Secure Boot off);
* (third test) the same with OVMF's Secure Boot build and the real ramdisk: shim refuses GRUB's unsigned http
  module, GRUB takes the Debian-signed kernel and the keyless initrd over its built-in tftp, and the client
  comes up with Secure Boot on, the kernel locked down, asking for the pairing code.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import cpio, keyfile
from lab.agents import AGENTS, ENV, PYTHON, Agent, fake_boot, write_key
from lab.netns import run
from lab.qemu import VM, Timeline, checkout_overlay, ramdisk_fixups, ramdisk_with_key, secure_boot_missing
from stiefel_runtime import kexec, netboot

pytestmark = pytest.mark.integration

UDHCPC_SCRIPT = """#!/bin/sh
[ "$1" = bound ] && echo "bound ip=$ip boot_file=$boot_file siaddr=$siaddr router=$router"
exit 0
"""


def _ns(name, *argv, timeout=60, check=False):
    return subprocess.run(["ip", "netns", "exec", name] + list(argv), capture_output=True, text=True,
                          timeout=timeout, check=check)


def _udhcpc(ns, ifname, script, arch=None, vendor=None):
    argv = ["busybox", "udhcpc", "-f", "-n", "-q", "-B", "-t", "3", "-T", "1", "-i", ifname, "-s", script]
    if arch is not None:
        argv += ["-x", "0x5d:%04x" % arch]
    if vendor is not None:
        argv += ["-V", vendor]
    done = _ns(ns, *argv)
    print("[netboot] udhcpc on %s/%s arch=%s: rc %d %s" % (
        ns, ifname, arch, done.returncode, done.stdout.strip() or "(no lease)"))
    return done


def _stand_in_initrd(path, size):
    """A keyless newc archive of ``size`` random bytes (random bytes alone are refused: not an initrd)."""
    path.write_bytes(cpio.write_newc([cpio.CpioEntry.file("blob", os.urandom(size))]))
    return path


def _start_agent(ns, log_path, run_dir, kernel, initrd, *extra):
    log_file = open(log_path, "w", encoding="utf-8")  # pylint: disable=consider-using-with
    agent = subprocess.Popen(  # pylint: disable=consider-using-with
        ["ip", "netns", "exec", ns, PYTHON, "-m", "stiefel_runtime.netboot", extra[0] if extra else "stftap0",
         str(run_dir), "--kernel", str(kernel), "--initrd", str(initrd)] + list(extra[1:]),
        env=ENV, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while "stiefel-netboot: ready" not in log_path.read_text():
        assert agent.poll() is None and time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.2)
    return agent, log_file


@pytest.fixture
def link(tmp_path):
    tag = "%x" % (os.getpid() & 0xffff)
    names = {"srv": "nbs-%s" % tag, "cli": "nbc-%s" % tag, "other": "nbo-%s" % tag}
    for ns in names.values():
        run("ip", "netns", "add", ns)
    try:
        run("ip", "link", "add", "stf0", "netns", names["srv"], "type", "veth", "peer", "name", "eth0",
            "netns", names["cli"])
        run("ip", "link", "add", "lan0", "netns", names["srv"], "type", "veth", "peer", "name", "eth0",
            "netns", names["other"])
        for ns, ifs in ((names["srv"], ("lo", "stf0", "lan0")), (names["cli"], ("lo", "eth0")),
                        (names["other"], ("lo", "eth0"))):
            for ifname in ifs:
                run("ip", "-n", ns, "link", "set", ifname, "up")
        # the other interface has an address in its own network, and the bystander one beside it
        run("ip", "-n", names["srv"], "addr", "add", "10.99.0.1/24", "dev", "lan0")
        run("ip", "-n", names["other"], "addr", "add", "10.99.0.2/24", "dev", "eth0")
        yield names
    finally:
        for ns in names.values():
            subprocess.run(["ip", "netns", "del", ns], check=False)


def test_netboot_is_confined_to_the_stiefel_port(link, tmp_path):
    script = tmp_path / "udhcpc.sh"
    script.write_text(UDHCPC_SCRIPT)
    script.chmod(0o755)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(os.urandom(300_000))
    initrd = _stand_in_initrd(tmp_path / "initrd.img", 500_000)
    run_dir = tmp_path / "run"
    # the stick's layout (the key appended as a second archive) is refused before anything listens
    keyed = tmp_path / "keyed.img"
    keyed.write_bytes(initrd.read_bytes() + cpio.key_archive(keyfile.encode_key(keyfile.generate_key())))
    refused = subprocess.run(["ip", "netns", "exec", link["srv"], PYTHON, "-m", "stiefel_runtime.netboot", "stf0",
                              str(tmp_path / "refused"), "--kernel", str(kernel), "--initrd", str(keyed)],
                             env=ENV, capture_output=True, text=True, timeout=60, check=False)
    print("[netboot] keyed initrd: rc %d %s" % (refused.returncode, refused.stderr.strip().splitlines()[-1:]))
    assert refused.returncode != 0 and "holds etc/stiefel/key" in refused.stderr + refused.stdout
    assert "ready" not in refused.stdout and not (tmp_path / "refused" / "netboot").exists()
    log = open(tmp_path / "netboot.log", "w+", encoding="utf-8")  # pylint: disable=consider-using-with
    agent = subprocess.Popen(["ip", "netns", "exec", link["srv"], PYTHON, "-m", "stiefel_runtime.netboot", "stf0",
                              str(run_dir), "--kernel", str(kernel), "--initrd", str(initrd)],
                             env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "stiefel-netboot: ready" not in (tmp_path / "netboot.log").read_text():
            assert agent.poll() is None, (tmp_path / "netboot.log").read_text()
            assert time.monotonic() < deadline, "netboot agent not ready"
            time.sleep(0.2)
        started = time.monotonic()

        pxe = _udhcpc(link["cli"], "eth0", str(script), arch=7, vendor="PXEClient:Arch:00007:UNDI:003016")
        assert pxe.returncode == 0
        assert "boot_file=shimx64.efi" in pxe.stdout and "siaddr=%s" % netboot.SERVER_ADDRESS in pxe.stdout
        leased = pxe.stdout.split("ip=")[1].split()[0]
        assert netboot.RANGE[0] <= netboot.ipaddress.IPv4Address(leased) <= netboot.RANGE[1]
        assert "router=\n" in pxe.stdout + "\n", "no router option: the desktop must not route through the laptop"

        web = _udhcpc(link["cli"], "eth0", str(script), arch=16, vendor="HTTPClient:Arch:00016:UNDI:003001")
        assert web.returncode == 0 and "boot_file=%s/shimx64.efi" % netboot.http_base() in web.stdout

        # the other interface of the same namespace: nothing, and no plain DHCP client on the stiefel link either
        other = _udhcpc(link["other"], "eth0", str(script), arch=7, vendor="PXEClient:Arch:00007:UNDI:003016")
        assert other.returncode != 0 and "bound" not in other.stdout
        plain = _udhcpc(link["cli"], "eth0", str(script))
        assert plain.returncode != 0 and "bound" not in plain.stdout

        # TFTP: the loader, nothing else
        run("ip", "-n", link["cli"], "addr", "add", "%s/29" % leased, "dev", "eth0")
        tftp_root = run_dir / "netboot" / "tftp"
        fetched = tmp_path / "fetched"
        for name in netboot.TFTP_FILES:
            got = _ns(link["cli"], "busybox", "tftp", "-g", "-r", name, "-l", str(fetched), str(netboot.SERVER_ADDRESS))
            assert got.returncode == 0, got.stderr
            assert fetched.read_bytes() == (tftp_root / name).read_bytes()
            print("[netboot] tftp %s: %d bytes" % (name, fetched.stat().st_size))
        assert (tftp_root / "shimx64.efi").read_bytes() == open(netboot.SHIM, "rb").read()
        assert (tftp_root / "initrd.img").read_bytes() == initrd.read_bytes()
        for name in ("key", "../http/vmlinuz", "/etc/passwd", "../../netboot/http/grub.cfg", "../run/dnsmasq.leases"):
            got = _ns(link["cli"], "busybox", "tftp", "-g", "-r", name, "-l", str(fetched),
                      str(netboot.SERVER_ADDRESS))
            print("[netboot] tftp %s: rc %d %s" % (name, got.returncode, got.stderr.strip()))
            assert got.returncode != 0
        # the bystander asks the server's address on its own network: dnsmasq is not bound there
        got = _ns(link["other"], "timeout", "10", "busybox", "tftp", "-g", "-r", "shimx64.efi", "-l",
                  str(tmp_path / "stolen"), "10.99.0.1")
        print("[netboot] tftp from the other interface: rc %d %s" % (got.returncode, got.stderr.strip()))
        assert got.returncode != 0 and not (tmp_path / "stolen").exists() or not (tmp_path / "stolen").stat().st_size

        # HTTP: kernel and initrd from the agent's static route, nothing else
        getter = ("import sys, urllib.request, urllib.error\n"
                  "for url in sys.argv[1:]:\n"
                  "    try:\n"
                  "        data = urllib.request.urlopen(url, timeout=30).read()\n"
                  "        print(url, 200, len(data))\n"
                  "    except urllib.error.HTTPError as exc:\n"
                  "        print(url, exc.code, 0)\n")
        base = netboot.http_base()
        urls = [base + "/vmlinuz", base + "/initrd.img", base + "/grub.cfg", base + "/../../etc/passwd",
                base + "/key", "http://%s:%d/" % (netboot.SERVER_ADDRESS, netboot.HTTP_PORT)]
        got = _ns(link["cli"], PYTHON, "-c", getter, *urls, check=True)
        print("[netboot] http:\n" + got.stdout)
        status = {line.split()[0]: (int(line.split()[1]), int(line.split()[2])) for line in got.stdout.splitlines()}
        assert status[base + "/vmlinuz"] == (200, kernel.stat().st_size)
        assert status[base + "/initrd.img"] == (200, initrd.stat().st_size)
        assert status[base + "/grub.cfg"][0] == 200
        assert [status[u][0] for u in urls[3:]] == [404, 404, 404]
        print("[netboot] DHCP, TFTP and HTTP checks took %.1f s" % (time.monotonic() - started))
        assert agent.poll() is None, "the agent keeps serving"
    finally:
        agent.terminate()
        agent.wait(30)
        log.seek(0)
        text = log.read()
        log.close()
        print(text[-6000:])
    assert "DHCPDISCOVER(stf0)" in text and "DHCPDISCOVER(lan0)" not in text
    assert "dropped input from http" in text or "404" in text


@pytest.mark.skipif(not os.path.exists("/usr/share/OVMF/OVMF_CODE_4M.fd"), reason="needs OVMF (Debian package ovmf)")
def test_ovmf_pxe_boots_shim_and_grub_from_the_confined_dnsmasq(tmp_path):
    """Issue 17, item 3 (first step): a diskless OVMF VM on a tap in the server's namespace PXE-boots shim
    and signed GRUB over TFTP, and GRUB fetches its config and the kernel over HTTP (Secure Boot off: see
    netboot.GRUB_HTTP_MOD). Stand-in kernel bytes: the point is the path, not the kernel."""
    ns = "nbq-%x" % (os.getpid() & 0xffff)
    run("ip", "netns", "add", ns)
    agent = qemu = None
    try:
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", ns, "tuntap", "add", "dev", "stftap0", "mode", "tap")
        run("ip", "-n", ns, "link", "set", "stftap0", "up")
        (tmp_path / "vmlinuz").write_bytes(os.urandom(200_000))
        _stand_in_initrd(tmp_path / "initrd.img", 200_000)
        log = tmp_path / "netboot.log"
        log_file = open(log, "w", encoding="utf-8")  # noqa: SIM115  pylint: disable=consider-using-with
        agent = subprocess.Popen(  # pylint: disable=consider-using-with
            ["ip", "netns", "exec", ns, PYTHON, "-m", "stiefel_runtime.netboot", "stftap0", str(tmp_path / "run"),
             "--kernel", str(tmp_path / "vmlinuz"), "--initrd", str(tmp_path / "initrd.img")],
            env=ENV, stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while "stiefel-netboot: ready" not in log.read_text():
            assert agent.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        variables = tmp_path / "vars.fd"
        with open("/usr/share/OVMF/OVMF_VARS_4M.fd", "rb") as handle:
            variables.write_bytes(handle.read())
        serial = tmp_path / "serial.log"
        started = time.monotonic()
        qemu = subprocess.Popen(  # pylint: disable=consider-using-with
            ["ip", "netns", "exec", ns, "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max", "-m", "512",
             "-display", "none", "-monitor", "none", "-no-reboot",
             "-drive", "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
             "-drive", "if=pflash,format=raw,unit=1,file=%s" % variables,
             "-netdev", "tap,id=n0,ifname=stftap0,script=no,downscript=no",
             "-device", "virtio-net-pci,netdev=n0,romfile=", "-boot", "n", "-serial", "file:%s" % serial],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while "netboot: sent /netboot/vmlinuz" not in log.read_text():
            assert qemu.poll() is None and time.monotonic() < deadline, serial.read_text(errors="replace")[-3000:]
            time.sleep(1)
        print("[netboot] OVMF: DHCP to kernel over HTTP in %.1f s" % (time.monotonic() - started))
        console = serial.read_text(errors="replace")
        assert "NBP filename is shimx64.efi" in console and "Fetching Netboot Image grubx64.efi" in console
        text = log.read_text()
        assert "sent %s" % os.path.join(str(tmp_path / "run"), "netboot", "tftp", "grub", "grub.cfg") in text
        assert "netboot: sent /netboot/grub.cfg" in text
    finally:
        for proc in (qemu, agent):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(30)
        subprocess.run(["ip", "netns", "del", ns], check=False)
        if agent is not None:
            log_file.close()


class _LogStamps(object):
    """When each of some lines first appeared in a growing log (dnsmasq logs a TFTP file when it is sent)."""

    def __init__(self, path, patterns):
        self.path, self.patterns, self.seen = path, patterns, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop.wait(0.25):
            text = self.path.read_text(errors="replace")
            for pattern in self.patterns:
                if pattern not in self.seen and pattern in text:
                    self.seen[pattern] = time.monotonic()

    def stop(self):
        self._stop.set()
        self._thread.join()


@pytest.mark.skipif(bool(secure_boot_missing()), reason=secure_boot_missing() or "-")
def test_secure_boot_pxe_boots_the_keyless_ramdisk_over_tftp(tmp_path, ramdisk_pair):
    """Issue 17 item 1 under Secure Boot: OVMF's Secure Boot build (Microsoft's keys enrolled) PXE-boots shim and
    Debian's signed GRUB; shim's verifier refuses GRUB's unsigned http module, so GRUB fetches the Debian-signed
    ramdisk kernel and the keyless initrd (the cached ramdisk, its fixups and this checkout's agents) over its
    built-in tftp. The client's console shows Secure Boot on, the kernel locked down, and the pairing prompt.
    The same initrd with the key appended is refused first (the real size: the check's cost is printed)."""
    kernel, ramdisk = ramdisk_pair
    ns = "nbs-%x" % (os.getpid() & 0xffff)
    run("ip", "netns", "add", ns)
    agent = vm = stamps = None
    log_file = None
    try:
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", ns, "tuntap", "add", "dev", "stftap0", "mode", "tap")
        run("ip", "-n", ns, "link", "set", "stftap0", "up")
        served = tmp_path / "client-initrd.img"
        kexec.concat_files(str(served), [ramdisk] + ramdisk_fixups(ramdisk, str(tmp_path)) +
                           [checkout_overlay(str(tmp_path))])
        served.chmod(0o644)  # concat_files writes 0600; this one holds no key, and dnsmasq sends world-readable only
        keyed = ramdisk_with_key(str(tmp_path), ramdisk, keyfile.generate_key())
        started = time.monotonic()
        refused = subprocess.run(["ip", "netns", "exec", ns, PYTHON, "-m", "stiefel_runtime.netboot", "stftap0",
                                  str(tmp_path / "refused"), "--kernel", kernel, "--initrd", keyed],
                                 env=ENV, capture_output=True, text=True, timeout=120, check=False)
        print("[netboot] the ramdisk with the key appended (%d bytes): rc %d in %.1f s: %s" % (
            os.path.getsize(keyed), refused.returncode, time.monotonic() - started, refused.stderr.strip()[-300:]))
        assert refused.returncode != 0 and "holds etc/stiefel/key" in refused.stderr

        cmdline = "console=tty0 console=ttyS0,115200 stiefel.role=client stiefel.pair"
        log = tmp_path / "netboot.log"
        agent, log_file = _start_agent(ns, log, tmp_path / "run", kernel, served, "stftap0", "--cmdline", cmdline)
        print("[netboot] " + [line for line in log.read_text().splitlines() if "holds no stiefel key" in line][0])
        tftp = tmp_path / "run" / "netboot" / "tftp"
        stamps = _LogStamps(log, ["sent %s" % (tftp / name) for name in ("grub/grub.cfg", "vmlinuz", "initrd.img")])
        vm = VM("desktop", str(tmp_path), memory=1024, netns=ns, secure_boot=True)
        vm.nic("stftap0", "52:54:00:5b:ef:07", bootindex=0, romfile="")
        t0 = time.monotonic()
        vm.start()
        timeline = Timeline(t0)
        timeline.mark(vm, r"NBP filename is shimx64\.efi", 300)
        timeline.mark(vm, r"secureboot: Secure boot enabled", 900)
        timeline.mark(vm, r"Kernel is locked down from EFI Secure Boot[^\n]*", 120)
        timeline.mark(vm, r"no key on this boot medium: pairing with the laptop by its code", 300)
        timeline.mark(vm, r"Pairing code shown on the laptop \(stiefelctl pairing-code\): ", 120, partial=True)
        timeline.show()
        stamps.stop()
        seen = {name.rsplit("/", 1)[-1]: at - t0 for name, at in stamps.seen.items()}
        print("[netboot] dnsmasq sent (s since VM start): %s" % seen)
        assert set(seen) == {"grub.cfg", "vmlinuz", "initrd.img"}, log.read_text()[-3000:]
        print("[netboot] TFTP of the initrd (%.1f MB) by GRUB under TCG: about %.1f s (kernel sent -> initrd sent)" % (
            served.stat().st_size / 1e6, seen["initrd.img"] - seen["vmlinuz"]))
        text = log.read_text()
        assert "netboot: sent /netboot/vmlinuz" not in text and "netboot: sent /netboot/initrd.img" not in text
        console = open(vm.log_path, encoding="utf-8", errors="replace").read()
        grub = [line[-90:] for line in console.splitlines() if "secure boot policy" in line or "stiefel: no http" in line]
        print("[netboot] GRUB on the console:\n  " + "\n  ".join(grub))
        # insmod http refused by the verifier, then the config's TFTP entry
        assert "error: prohibited by secure boot policy" in console
        assert "stiefel: no http module in GRUB (Secure Boot), kernel and initrd over TFTP" in console
    finally:
        if stamps is not None:
            stamps.stop()
        if vm is not None:
            vm.stop()
        if agent is not None and agent.poll() is None:
            agent.terminate()
            agent.wait(30)
        if log_file is not None:
            log_file.close()
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_standalone_server_answers_pxe_when_its_config_says_so(world, tmp_path):
    """Issue 17 item 1 for the standalone server: ``netboot = yes`` in server.conf makes ``stiefel-server
    --config`` answer a UEFI PXE DISCOVER on its named port with shim; a keyed netboot_initrd is fatal at start."""
    ns, tmp, agents = world
    key_path = write_key(os.path.join(tmp, "key"), keyfile.generate_key())
    disk = os.path.join(tmp, "desktop.img")
    with open(disk, "wb") as handle:
        handle.truncate(16 << 20)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(os.urandom(100_000))
    initrd = _stand_in_initrd(tmp_path / "initrd.img", 100_000)
    keyed = tmp_path / "keyed.img"
    keyed.write_bytes(initrd.read_bytes() + cpio.key_archive(keyfile.encode_key(keyfile.generate_key())))

    def conf(name, served):
        path = os.path.join(tmp, name)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("disk = %s\nboot_dir = %s\nkey = %s\ninterfaces = %s\nrun_dir = %s\nnetboot = yes\n"
                         "netboot_kernel = %s\nnetboot_initrd = %s\n" % (
                             disk, fake_boot(os.path.join(tmp, name + ".d")), key_path, ns.veth_s,
                             os.path.join(tmp, name + ".run"), kernel, served))
        return path

    os.makedirs(os.path.join(tmp, "keyed.conf.d"))
    refused = subprocess.run(ns.exec_argv(ns.server, PYTHON, os.path.join(AGENTS, "stiefel-server"), "--config",
                                          conf("keyed.conf", keyed), "--power-sysfs", os.path.join(tmp, "none")),
                             capture_output=True, text=True, env=ENV, timeout=60, check=False)
    print("[netboot] standalone with a keyed initrd: rc %d %s" % (refused.returncode, refused.stdout.strip()[-300:]))
    assert refused.returncode != 0 and "holds etc/stiefel/key" in refused.stdout
    assert "stiefel-server: ready" not in refused.stdout

    os.makedirs(os.path.join(tmp, "good.conf.d"))
    run("ip", "-n", ns.client, "link", "set", ns.veth_c, "up")  # the desktop's end: a carrier for the named port
    server = Agent(ns, [PYTHON, os.path.join(AGENTS, "stiefel-server"), "--config", conf("good.conf", initrd),
                        "--power-sysfs", os.path.join(tmp, "none")], os.path.join(tmp, "server.log"))
    agents.append(server)
    server.wait_for("netboot: PXE / UEFI HTTP boot on %s" % ns.veth_s, 90)
    script = tmp_path / "udhcpc.sh"
    script.write_text(UDHCPC_SCRIPT)
    script.chmod(0o755)
    pxe = _udhcpc(ns.client, ns.veth_c, str(script), arch=7, vendor="PXEClient:Arch:00007:UNDI:003016")
    assert pxe.returncode == 0 and "boot_file=shimx64.efi" in pxe.stdout, server.text()[-3000:]
    plain = _udhcpc(ns.client, ns.veth_c, str(script))
    assert plain.returncode != 0
    server.stop()
    agents.remove(server)
    text = server.text()
    print("[netboot] standalone server:\n" + "\n".join(l for l in text.splitlines() if "netboot" in l or "DHCP" in l))
    assert "netboot stopped on %s (exit)" % ns.veth_s in text
