"""Two QEMU VMs (TCG) boot the stiefel ramdisk on a virtual cable: the client kexecs into the served kernel.

VM "server" boots the ramdisk with ``stiefel.role=server`` and a small disk
whose ext4 file system is a laptop /boot: the ramdisk's own vmlinuz, a tiny
busybox initrd whose /init prints ``STIEFEL-KEXEC-MARKER`` (plus the command
line it got and whether the NBD PSK arrived) and ``stiefel/boot.json``.
VM "client" boots the same ramdisk with ``stiefel.role=client``; it must find
the server, verify the payload and kexec into the served kernel, whose
marker appears on the client's serial console. Both VMs are on taps in a
network namespace of their own; QEMU is stopped by PID.
"""

from __future__ import annotations

import time

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import keyfile
from lab.qemu import VM, Timeline, laptop_boot_image, ramdisk_with_key

pytestmark = [pytest.mark.integration, pytest.mark.qemu_lab("agents-qemu")]


def test_client_kexecs_into_served_kernel(qemu_lab, ramdisk_pair):
    workdir, link, vms = qemu_lab
    kernel, ramdisk = ramdisk_pair
    initrd = ramdisk_with_key(workdir, ramdisk, keyfile.generate_key())
    disk = laptop_boot_image(workdir, kernel)
    t0 = time.monotonic()
    server = VM("server", workdir, memory=1024, netns=link.netns)
    server.disk(disk).nic(link.taps[0], "52:54:00:57:ef:01")
    server.kernel(kernel, initrd, "console=ttyS0 stiefel.role=server stiefel.disk=/dev/vda stiefel.boot=/dev/vda")
    vms.append(server.start())
    client = VM("client", workdir, memory=1024, netns=link.netns)
    client.nic(link.taps[1], "52:54:00:57:ef:02")
    client.kernel(kernel, initrd, "console=ttyS0 stiefel.role=client")
    vms.append(client.start())

    timeline = Timeline(t0)
    timeline.mark(server, r"stiefel-server: ready", 240)
    timeline.mark(client, r"stiefel-client: discovery started", 240)
    timeline.mark(client, r"stiefel-client: payload verified", 120)
    timeline.mark(client, r"stiefel-client: kexec", 60)
    timeline.served_kernel_booted(client, "52:54:00:57:ef:02")
    timeline.show()
    # the server is still up and serving
    assert server.proc.poll() is None
