"""NICs that appear late: both stiefel ramdisk VMs boot with no network card, and one is plugged in while they run.

Issue 3 asks the server to bring up every interface "as it appears and
disappears, from netlink events" and the client to discover "on all
interfaces in parallel, including ones that appear late" (a USB NIC plugged
in after the stick booted). Here QEMU (TCG) boots the ramdisk twice, as in
test_agents_qemu.py, but neither VM has a NIC at boot: each gets an empty
PCIe root port and a QMP socket. Once the server says it is ready, a
virtio-net NIC is hot-added to it; once the client says discovery started
(with nothing to discover on), one is hot-added to the client. Each console
must report the new link and its link-local address; the client then finds
the server on that link, verifies the payload and kexecs into the served
marker kernel, whose command line names the hot-added NIC's MAC. Finally the
server's NIC is unplugged again and its console must say the link
disappeared (and not that it failed to bring it up), while the server keeps
running.

One pair of boots covers both sides: TCG boots are the slow part, and the
two hot-adds do not interfere (the client's card arrives after the server's).
"""

from __future__ import annotations

import time

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import keyfile
from lab.qemu import VM, Timeline, laptop_boot_image, ramdisk_with_key

# "hp" in the namespace name keeps it apart from other runs' labs on this machine
pytestmark = [pytest.mark.integration, pytest.mark.qemu_lab("hp-nic")]

SERVER_MAC = "52:54:00:57:ef:21"
CLIENT_MAC = "52:54:00:57:ef:22"
PORT = "hp0"  # the empty root port of each VM
APPEARED = r"link (\S+) appeared \(mac %s\)"
READY = r"link %s ready at (fe80::\S+)"


def nic_less_vm(name, workdir, netns, kernel, initrd, append):
    """A VM with no NIC, an empty PCIe root port to plug one into, and a QMP socket to do it with."""
    vm = VM(name, workdir, memory=1024, netns=netns).monitor().pcie_port(PORT, 1)
    vm.add("-nic", "none")  # without it q35 adds its default e1000e (user networking) at boot
    return vm.kernel(kernel, initrd, append)


def plug_and_see_link(timeline, vm, tap, mac):
    """Hot-add a NIC to ``vm``; wait for its console to report the link and its link-local address."""
    before = vm.position()
    assert vm.find(r"link \S+ appeared", 0) is None, "%s had a link before the hot-add" % vm.name
    plugged = time.monotonic()
    vm.hotplug_nic(PORT, tap, mac, "nic0")
    print("[hp] %s: virtio-net %s plugged in at %.1f s" % (vm.name, mac, plugged - timeline.t0), flush=True)
    ifname = timeline.mark(vm, APPEARED % mac, 60, start=before).group(1)
    # udev may rename the link after it appeared; the "ready" line carries the name it has then
    address = timeline.mark(vm, READY % r"\S+", 60, start=before).group(1)
    return ifname, address


def test_nics_plugged_in_late_are_found(qemu_lab, ramdisk_pair):
    workdir, link, vms = qemu_lab
    kernel, ramdisk = ramdisk_pair
    initrd = ramdisk_with_key(workdir, ramdisk, keyfile.generate_key())
    disk = laptop_boot_image(workdir, kernel)
    t0 = time.monotonic()
    server = nic_less_vm("server", workdir, link.netns, kernel, initrd,
                         "console=ttyS0 stiefel.role=server stiefel.disk=/dev/vda stiefel.boot=/dev/vda")
    vms.append(server.disk(disk).start())
    client = nic_less_vm("client", workdir, link.netns, kernel, initrd, "console=ttyS0 stiefel.role=client")
    vms.append(client.start())

    timeline = Timeline(t0)
    mark = timeline.mark
    mark(server, r"stiefel-server: ready", 240)
    server_if, server_ll = plug_and_see_link(timeline, server, link.taps[0], SERVER_MAC)

    mark(client, r"stiefel-client: discovery started", 240)
    client_if, client_ll = plug_and_see_link(timeline, client, link.taps[1], CLIENT_MAC)
    offer = mark(client, r"server (fe80::[0-9a-f:]+)%(\S+): http \d+", 60)
    assert offer.group(1) == server_ll, "the OFFER came from %s, the server's late link is %s" % (
        offer.group(1), server_ll)
    mark(client, r"stiefel-client: payload verified", 120)
    mark(client, r"stiefel-client: kexec", 60)
    timeline.served_kernel_booted(client, CLIENT_MAC, server_ll)

    # the server's card goes away again: the server notices and keeps running
    before = server.position()
    unplugged = time.monotonic()
    server.unplug("nic0", timeout=60)
    print("[hp] server: NIC unplugged (DEVICE_DELETED after %.1f s)" % (time.monotonic() - unplugged), flush=True)
    mark(server, r"link \S+ disappeared", 30, start=before)
    # going down on its way out is not a failure to bring the link up (netlink.py ignores ENODEV)
    failed = server.find(r"link \S+: cannot bring it up.*", before)
    assert failed is None, failed[1].group(0)
    timeline.show()
    print("[hp] server link %s (%s), client link %s (%s)" % (server_if, server_ll, client_if, client_ll))

    assert server.proc.poll() is None
