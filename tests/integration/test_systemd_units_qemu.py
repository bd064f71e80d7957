"""The nbd_serve unit and the standalone server unit under a real systemd (PID 1 here is not systemd).

A QEMU (TCG) VM boots a real Debian bookworm: the e2e's laptop root from lab/laptop_disk.py, whose
package list carries openssh-server, nbdkit and libnbd-bin for this test. It is
on a virtual cable: a bridge and tap in a network namespace this test creates (``stf-e2e-sd...``), the
bridge holding fd5d::1 and the VM fd5d::2 (systemd-networkd), so every SSH, Ansible and nbdinfo
connection from the host runs inside that namespace and nothing leaves this machine. Ansible reaches
the VM over SSH with a key made for this run.

1. ``stiefel.system.nbd_serve`` (supervisor auto = systemd there): check mode writes nothing, the
   generated unit runs (``systemctl is-active``), the export answers over the cable with the flags the
   library promises, a second run changes nothing, a changed setting restarts it (new MainPID), and
   ``state: stopped`` stops it so the export no longer answers.
2. ``playbooks/serve_standalone.yml`` against the same VM: ``stiefel-server-standalone.service`` runs,
   and it answers a DISCOVER sent from the host on the cable (ff02::1) with a standalone OFFER;
   ``systemctl stop`` leaves it inactive with Result=success (the agent's exit 143 counts as clean).

Without the cached tarball (``$STIEFEL_CACHE_DIR/laptop-root``, keyed by its package list) mmdebstrap
builds it first: 81-85 s here; the e2e scenario then reuses it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from lab import ansible_output, laptop_disk
from lab.qemu import VM, cache_dir, vm_lab

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOOLS = ("qemu-system-x86_64", "mmdebstrap", "ssh", "ssh-keygen", "nbdinfo", "grub-install")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mmdebstrap, namespaces, taps)"),
    pytest.mark.skipif(not all(shutil.which(t) for t in TOOLS),
                       reason="needs qemu-system-x86, mmdebstrap, openssh-client, libnbd-bin and grub-pc-bin"),
]

VM_ADDR = "fd5d::2"
HOST_ADDR = "fd5d::1"
VM_MAC = "52:54:00:5d:00:02"
MEMORY = 1024

NETWORK = """[Match]
Name=en*

[Network]
Address=%s/64
LinkLocalAddressing=ipv6
IPv6AcceptRA=no
""" % VM_ADDR


def _log(msg):
    print("[sd-units %s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


class Lab(object):
    """The booted VM and the ways in: ``ssh()``, ``module()`` (ad-hoc Ansible), ``playbook()``, ``host()``."""

    def __init__(self, workdir, link, vm, key):
        self.workdir = workdir
        self.link = link
        self.vm = vm
        self.key = key
        self.inventory = os.path.join(workdir, "inventory.ini")
        with open(self.inventory, "w") as handle:
            handle.write("[sd]\nsdvm ansible_host=%s ansible_user=root ansible_ssh_private_key_file=%s "
                         "ansible_python_interpreter=/usr/bin/python3 "
                         "ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'\n"
                         % (VM_ADDR, key))

    def host(self, *argv, timeout=120, check=False):
        """A command on the host side of the cable (inside the namespace)."""
        return subprocess.run(["ip", "netns", "exec", self.link.netns] + list(argv), capture_output=True,
                              text=True, timeout=timeout, check=check, cwd=REPO,
                              env=dict(os.environ, ANSIBLE_HOST_KEY_CHECKING="False", **ansible_output.NO_COLOR,
                                       # one SSH round trip per task instead of several: every
                                       # python start in the TCG guest costs seconds
                                       ANSIBLE_PIPELINING="True"))

    def ssh(self, command, timeout=60, check=True):
        proc = self.host("ssh", "-i", self.key, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                         "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR",
                         "root@" + VM_ADDR, command, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError("ssh %r: rc %d\n%s%s" % (command, proc.returncode, proc.stdout, proc.stderr))
        return proc

    def module(self, args, check=False):
        argv = [ansible_output.ansible_bin("ansible"), "sdvm", "-i", self.inventory,
                "-m", "stiefel.system.nbd_serve", "-a", json.dumps(args)]
        if check:
            argv.append("--check")
        proc = self.host(*argv, timeout=300)
        return ansible_output.module_result(proc.stdout, proc.returncode, proc.stderr)

    def unit(self, unit):
        """``(is-active, MainPID)`` of a unit in the VM."""
        active = self.ssh("systemctl is-active %s" % unit, check=False).stdout.strip()
        pid = int(self.ssh("systemctl show -p MainPID --value %s" % unit).stdout.strip() or 0)
        return active, pid


def _build_image(workdir, key_pub):
    started = time.monotonic()
    # the e2e laptop's root: it carries SSH, nbdkit and nbdinfo for this test too
    tarball = laptop_disk.build_root_tarball(os.path.join(cache_dir(), laptop_disk.TARBALL_DIR))
    _log("root tarball ready after %.0f s" % (time.monotonic() - started))
    root = laptop_disk.unpack_root(tarball, os.path.join(workdir, "root"))
    ssh_dir = os.path.join(root, "root/.ssh")
    os.makedirs(ssh_dir, mode=0o700, exist_ok=True)
    with open(os.path.join(ssh_dir, "authorized_keys"), "w") as handle:
        handle.write(key_pub)
    os.chmod(os.path.join(ssh_dir, "authorized_keys"), 0o600)
    os.makedirs(os.path.join(root, "etc/systemd/network"), exist_ok=True)
    with open(os.path.join(root, "etc/systemd/network/50-sd-cable.network"), "w") as handle:
        handle.write(NETWORK)
    # networkd-wait-online would hold network-online.target (which the nbd unit wants) for two minutes
    # when the cable has no carrier yet; this VM's network is the static cable address above.
    subprocess.run(["chroot", root, "systemctl", "enable", "systemd-networkd.service"], check=True,
                   capture_output=True)
    subprocess.run(["chroot", root, "systemctl", "mask", "systemd-networkd-wait-online.service"], check=True,
                   capture_output=True)
    image = laptop_disk.make_image(root, os.path.join(workdir, "sd.img"))
    shutil.rmtree(root)
    _log("disk image made in %.0f s (tarball included)" % (time.monotonic() - started))
    return image


@pytest.fixture(scope="module")
def lab():
    with vm_lab("sd-units") as (workdir, link, vms):
        key = os.path.join(workdir, "id_sd")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sd-units-test", "-f", key], check=True)
        os.chmod(key, 0o600)
        with open(key + ".pub") as handle:
            image = _build_image(workdir, handle.read())
        subprocess.run(["ip", "-n", link.netns, "addr", "add", HOST_ADDR + "/64", "dev", link.bridge, "nodad"],
                       check=True)
        vm = VM("sdvm", workdir, memory=MEMORY, netns=link.netns)
        vm.disk(image).nic(link.taps[0], VM_MAC)
        vms.append(vm)
        booted = time.monotonic()
        vm.start()
        stamp, _match = vm.wait_for(r"E2E-TARGET multi-user reached", 420, fail_patterns=(r"Kernel panic",))
        _log("multi-user.target after %.0f s of TCG boot" % stamp)
        this = Lab(workdir, link, vm, key)
        deadline = time.monotonic() + 120
        while this.ssh("true", timeout=30, check=False).returncode != 0:
            assert time.monotonic() < deadline, "no SSH to %s within 120 s (serial log %s)" % (VM_ADDR, vm.log_path)
            time.sleep(2)
        _log("SSH answers %.0f s after QEMU was started" % (time.monotonic() - booted))
        print(this.ssh("systemctl --version | head -1; readlink /proc/1/exe; nbdkit --version").stdout, flush=True)
        yield this


@pytest.fixture(autouse=True)
def _timing(request):
    start = time.monotonic()
    yield
    print("\n[%s took %.1f s]" % (request.node.name, time.monotonic() - start))


def _nbdinfo(lab_, name, port=10809):
    return lab_.host("nbdinfo", "--json", "nbd://[%s]:%d/%s" % (VM_ADDR, port, name), timeout=60)


def test_nbd_serve_under_systemd(lab):
    unit = "stiefel-nbd-sd.service"
    lab.ssh("head -c 1048576 /dev/urandom > /srv/sd.img && truncate -s 64M /srv/sd.img")
    args = dict(name="sd", path="/srv/sd.img", address="::", port=10809)

    result = lab.module(args, check=True)
    assert result["_rc"] == 0 and result["changed"] and result["supervisor"] == "systemd", result
    assert lab.ssh("test -e /etc/systemd/system/%s" % unit, check=False).returncode != 0
    assert lab.unit(unit)[0] != "active"

    result = lab.module(args)
    assert result["_rc"] == 0 and result["changed"], result
    assert result["unit_file"] == "/etc/systemd/system/" + unit
    assert result["export"] == dict(size=64 << 20, read_only=False, can_flush=True, can_fua=True,
                                    can_multi_conn=True, tls=False), result
    active, pid = lab.unit(unit)
    print("systemctl is-active %s: %s, MainPID %d" % (unit, active, pid))
    assert active == "active" and pid > 0
    assert lab.ssh("systemctl is-enabled %s" % unit).stdout.strip() == "enabled"
    info = _nbdinfo(lab, "sd")
    print("nbdinfo over the cable: %s" % info.stdout.strip().replace("\n", " "))
    assert info.returncode == 0, info.stderr
    export = json.loads(info.stdout)["exports"][0]
    assert export["export-size"] == 64 << 20
    assert (export["can_flush"], export["can_fua"], export["can_multi_conn"], export["is_read_only"]) == \
        (True, True, True, False)
    assert _nbdinfo(lab, "other").returncode != 0  # the export name is strict

    result = lab.module(args)
    assert result["_rc"] == 0 and not result["changed"], result
    assert lab.unit(unit) == ("active", pid)

    changed = dict(args, read_only=True)
    result = lab.module(changed, check=True)
    assert result["_rc"] == 0 and result["changed"], result
    assert lab.unit(unit) == ("active", pid)
    assert "--readonly" not in lab.ssh("cat /etc/systemd/system/%s" % unit).stdout

    result = lab.module(changed)
    assert result["_rc"] == 0 and result["changed"] and result["export"]["read_only"], result
    active, new_pid = lab.unit(unit)
    print("after read_only=true: %s, MainPID %d -> %d" % (active, pid, new_pid))
    assert active == "active" and new_pid not in (0, pid)
    info = _nbdinfo(lab, "sd")
    assert info.returncode == 0 and json.loads(info.stdout)["exports"][0]["is_read_only"], info.stdout

    result = lab.module(dict(name="sd", state="stopped"), check=True)
    assert result["_rc"] == 0 and result["changed"], result
    assert lab.unit(unit) == ("active", new_pid)

    result = lab.module(dict(name="sd", state="stopped"))
    assert result["_rc"] == 0 and result["changed"], result
    active, _pid = lab.unit(unit)
    print("after state=stopped: systemctl is-active %s: %s" % (unit, active))
    assert active in ("inactive", "unknown")
    assert lab.ssh("test -e /etc/systemd/system/%s" % unit, check=False).returncode != 0
    gone = _nbdinfo(lab, "sd")
    print("nbdinfo after stop: rc %d %s" % (gone.returncode, gone.stderr.strip()))
    assert gone.returncode != 0

    result = lab.module(dict(name="sd", state="stopped"))
    assert result["_rc"] == 0 and not result["changed"], result


DISCOVER_SCRIPT = textwrap.dedent("""
    import socket, sys, time
    from ansible_collections.stiefel.system.plugins.module_utils import keyfile
    from stiefel_runtime import discovery, messages
    key = keyfile.decode_key(sys.stdin.buffer.read())
    client = discovery.ClientDiscovery(key)
    sock = discovery.open_client_socket()
    ifindex = socket.if_nametoindex(sys.argv[1])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        discovery.send_discover(sock, client.discover(ifindex), ifindex)
        until = time.monotonic() + 2
        while time.monotonic() < until:
            for data, host, port, scope in discovery.drain(sock):
                offer = client.handle(data, host, scope, port)
                m = offer.message
                print("OFFER role=%d from %s%%%d http=%d nbd=%d export=%s"
                      % (m.role, host, scope, m.http_port, m.nbd_port, m.export_name))
                sys.exit(0 if m.role == messages.ROLE_STANDALONE else 3)
            time.sleep(0.1)
    print("no OFFER within 30 s")
    sys.exit(1)
""")


def test_standalone_server_unit_under_systemd(lab):
    unit = "stiefel-server-standalone.service"
    lab.ssh("mkdir -p /srv/sd-boot/stiefel && head -c 3145728 /dev/urandom > /srv/sd-boot/vmlinuz-sd "
            "&& head -c 1048576 /dev/urandom > /srv/sd-boot/initrd.img-sd "
            "&& head -c 1048576 /dev/urandom > /srv/sd-desktop.img && truncate -s 64M /srv/sd-desktop.img")
    boot = {"format": "stiefel-boot-config", "version": 1, "kernel": "vmlinuz-sd", "initrd": ["initrd.img-sd"],
            "cmdline": "root=UUID=1234-abcd ro quiet", "root": "UUID=1234-abcd"}
    lab.ssh("cat > /srv/sd-boot/stiefel/boot.json <<'EOF'\n%s\nEOF" % json.dumps(boot))
    argv = [ansible_output.ansible_bin("ansible-playbook"), "playbooks/serve_standalone.yml", "-i", lab.inventory,
            "-e", "stiefel_hosts=sdvm", "-e", "standalone_server_disk=/srv/sd-desktop.img",
            "-e", "standalone_server_boot_dir=/srv/sd-boot"]
    started = time.monotonic()
    proc = lab.host(*argv, timeout=600)
    print("serve_standalone.yml: rc %d in %.0f s\n%s"
          % (proc.returncode, time.monotonic() - started, proc.stdout[-1500:]))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    time.sleep(3)  # Type=simple: "active" at once; a crash right after start would show as a restart
    active, pid = lab.unit(unit)
    restarts = lab.ssh("systemctl show -p NRestarts --value %s" % unit).stdout.strip()
    print("systemctl is-active %s: %s, MainPID %d, NRestarts %s" % (unit, active, pid, restarts))
    assert active == "active" and pid > 0 and restarts == "0", lab.ssh("journalctl -u %s --no-pager | tail -30"
                                                                       % unit, check=False).stdout

    key = lab.ssh("cat /etc/stiefel/key").stdout.encode()
    proc = subprocess.run(["ip", "netns", "exec", lab.link.netns, sys.executable, "-c", DISCOVER_SCRIPT,
                           lab.link.bridge], input=key, capture_output=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=os.path.join(REPO, "collections")), check=False)
    print("discovery from the host: %s %s" % (proc.stdout.decode().strip(), proc.stderr.decode()[-2000:]))
    assert proc.returncode == 0, lab.ssh("journalctl -u %s --no-pager | tail -30" % unit, check=False).stdout

    # systemctl stop rather than a second playbook run with standalone_server_state=stopped:
    # each Ansible task costs seconds of python start in the TCG guest (that run took 132 s)
    lab.ssh("systemctl stop %s" % unit)
    active, _pid = lab.unit(unit)
    result = lab.ssh("systemctl show -p Result -p ExecMainStatus %s" % unit).stdout.split()
    print("after systemctl stop: %s %s" % (active, " ".join(result)))
    # the agent ends with 143 after SIGTERM; the unit must count that as a clean stop, not "failed"
    assert active == "inactive" and "Result=success" in result, \
        lab.ssh("journalctl -u %s --no-pager | tail -20" % unit, check=False).stdout
