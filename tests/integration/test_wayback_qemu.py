"""The server ramdisk in QEMU (TCG) on a low battery, then the way back after a dropped NBD connection.

One VM, "server": the cached ramdisk with ``stiefel.role=server``, a small laptop /boot disk as its export,
``stiefel.when_done=poweroff stiefel.return_wait=15`` and a battery at 5 % with the charger out (an ACPI
Control Method Battery, :mod:`lab.acpi`: QEMU has none and Debian's kernel has no ``test_power``; the
ramdisk's udev loads Debian's ``battery`` and ``ac`` drivers for it). The desktop is host processes in a
namespace of their own on the same bridge: the real client agent (``stiefel-client --stop-before-kexec``:
discovery, the session, the payload, the session PSK the boot would append) and libnbd holding the export
open with that PSK, killed with SIGKILL (the kernel closes the socket; nbdkit sees no NBD_CMD_DISC).

Checked on the consoles: the server warns of the battery and asks the desktop to shut down; the client prints
that request. The first drop starts the return wait, a second libnbd attach within it cancels the countdown;
the second drop runs it out: the export is stopped, the disk flushed, then the laptop powers off (QEMU exits),
in that order, and the blocks both clients wrote with FUA are on the disk image.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import types

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import cpio, keyfile
from lab.acpi import write_battery_ssdt
from lab.agents import run_client, write_key
from lab.netns import Namespaces
from lab.qemu import VM, Timeline, laptop_boot_image, ramdisk_with_key

pytestmark = [pytest.mark.integration, pytest.mark.qemu_lab("wayback-qemu")]

RETURN_WAIT = 15
CHARGE = 5
DISK_SIZE = 96 * 1024 * 1024
# Blocks the two clients write with FUA, near the end of the image (past the files mkfs.ext4 -d placed).
BLOCKS = (DISK_SIZE - 2 * 4096, DISK_SIZE - 4096)

# /usr/bin/python3 (Debian's python3-libnbd): attach as the hook's proxy would, write one block with FUA,
# say so, then hold the connection until killed. argv: scoped server address, PSK file, offset, marker.
HOLDER = r"""
import socket, sys, time, nbd
host, psk, offset, marker = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
sock = socket.create_connection((host, 10809), timeout=30)
h = nbd.NBD()
h.set_export_name("stiefel")
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_username("stiefel")
h.set_tls_psk_file(psk)
h.connect_socket(sock.detach())
h.pwrite(marker.ljust(4096, b"."), offset, flags=nbd.CMD_FLAG_FUA)
print("attached, wrote %d" % offset, flush=True)
while True:
    time.sleep(60)
"""


def _desk(link):
    """A namespace for the desktop's processes, its veth on the lab's bridge; returns its name."""
    name = "stf-wbd-%x" % (os.getpid() & 0xFFFF)
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    subprocess.run(["ip", "netns", "add", name], check=True)
    host_end, desk_end = "stfwbb%x" % (os.getpid() & 0xFFF), "stfwbd%x" % (os.getpid() & 0xFFF)
    subprocess.run(["ip", "-n", link.netns, "link", "add", host_end, "type", "veth", "peer", "name", desk_end,
                    "netns", name], check=True)
    subprocess.run(["ip", "-n", link.netns, "link", "set", host_end, "master", link.bridge, "up"], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    return name


def _hold(desk, server, psk_file, offset, marker):
    proc = subprocess.Popen(  # pylint: disable=consider-using-with
        Namespaces.exec_argv(desk, "/usr/bin/python3", "-c", HOLDER, server, psk_file, str(offset), marker),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    assert line.startswith("attached"), line + proc.stdout.read() if proc.poll() is not None else line
    return proc


def _drop(proc):
    """SIGKILL: no NBD_CMD_DISC, the kernel closes the socket as a power cut's reset would."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()


def test_low_battery_then_way_back_after_drops(qemu_lab, ramdisk_pair):
    workdir, link, vms = qemu_lab
    kernel, ramdisk = ramdisk_pair
    key = keyfile.generate_key()
    key_path = write_key(os.path.join(workdir, "key"), key)
    initrd = ramdisk_with_key(workdir, ramdisk, key)
    disk = laptop_boot_image(workdir, kernel)
    assert os.path.getsize(disk) == DISK_SIZE
    desk = _desk(link)
    holders = []
    try:
        t0 = time.monotonic()
        server = VM("server", workdir, memory=1024, netns=link.netns)
        server.disk(disk).nic(link.taps[0], "52:54:00:57:eb:01")
        server.add("-acpitable", "file=%s" % write_battery_ssdt(os.path.join(workdir, "battery.aml"), CHARGE))
        server.kernel(kernel, initrd, "console=ttyS0 stiefel.role=server stiefel.disk=/dev/vda stiefel.boot=/dev/vda "
                      "stiefel.when_done=poweroff stiefel.return_wait=%d" % RETURN_WAIT)
        vms.append(server.start())
        timeline = Timeline(t0)
        timeline.mark(server, r"stiefel-server: ready", 240)
        # Debian's drivers found the table's devices (udev loaded them from their modaliases)
        timeline.mark(server, r"ACPI: battery: Slot \[BAT0\] \(battery present\)", 5)
        timeline.mark(server, r"ACPI: AC: AC Adapter \[ADP0\] \(off-line\)", 5)
        timeline.mark(server, r"power: at %d%% \(laptop_shutdown_charge 10%%\): asking the desktop to shut down "
                      r"cleanly" % CHARGE, 60)

        # 1. the desktop's client agent: the session, and the server's request on its console
        proc, run_dir = run_client(types.SimpleNamespace(client=desk, exec_argv=Namespaces.exec_argv), workdir,
                                   key_path, "client", 180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert ("power: the laptop serving this disk is on battery at %d%%: it asks this desktop to shut down "
                "cleanly" % CHARGE) in proc.stdout, proc.stdout
        manifest = [l for l in proc.stdout.splitlines() if l.startswith("stiefel-client: manifest ")][0]
        where = re.search(r'"interface": "([^"]+)".*"server": "([^"]+)"', manifest)
        target = "%s%%%s" % (where.group(2), where.group(1))
        psk = [e for e in cpio.read_newc(open(os.path.join(run_dir, "nbd-psk.cpio"), "rb").read())
               if e.name == "etc/stiefel/nbd.psk"][0]
        psk_file = os.path.join(workdir, "session.psk")
        fd = os.open(psk_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(psk.data)

        # 2. attached, dropped, back within the wait: the countdown is cancelled
        start = server.position()
        holders.append(_hold(desk, target, psk_file, BLOCKS[0], "first client"))
        timeline.mark(server, r"NBD client .* connected", 30, start=start)
        start = server.position()
        _drop(holders[-1])
        drop1 = timeline.mark(server, r"way back: all NBD clients gone \(connection dropped or closed without "
                              r"NBD_CMD_DISC\): power the laptop off in %d s" % RETURN_WAIT, 30, start=start)
        assert drop1
        start = server.position()
        holders.append(_hold(desk, target, psk_file, BLOCKS[1], "second client"))
        timeline.mark(server, r"way back: an NBD client is attached again: countdown cancelled", 30, start=start)

        # 3. dropped again and not back: export stopped, disk flushed, then power off
        start = server.position()
        _drop(holders[-1])
        order = [
            r"way back: all NBD clients gone \(connection dropped or closed without NBD_CMD_DISC\)",
            r"way back: no client came back: stopping the export, then power the laptop off",
            r"way back: export stopped \(nbdkit exited\)",
            r"way back: /dev/vda flushed \(fsync, BLKFLSBUF\)",
            r"way back: powering the laptop off",
        ]
        stamps = []
        for pattern in order:
            timeline.mark(server, pattern, RETURN_WAIT + 30, start=start)
            stamps.append(timeline.marks[-1][0])
        assert stamps == sorted(stamps)
        waited = stamps[1] - stamps[0]
        assert RETURN_WAIT - 1 <= waited <= RETURN_WAIT + 6, waited  # peers are polled every 5 s
        rc = server.wait_exit(60)
        off = time.monotonic() - t0
        print("[%7.1f s] server: QEMU exited (rc %s); the countdown ran %.1f s after the drop was seen "
              "(return_wait=%d)" % (off, rc, waited, RETURN_WAIT), flush=True)
        assert rc == 0, "the laptop did not power off"
        timeline.show()
        lines = [text for _stamp, text in server.lines[start:]]
        assert not [l for l in lines if "NBD client" in l and "connected" in l and "disconnected" not in l]
    finally:
        for holder in holders:
            if holder.poll() is None:
                _drop(holder)
        subprocess.run(["ip", "netns", "del", desk], check=False)

    # the blocks both clients wrote with FUA are on the laptop's disk
    with open(disk, "rb") as handle:
        for offset, marker in zip(BLOCKS, (b"first client", b"second client")):
            handle.seek(offset)
            assert handle.read(4096).startswith(marker), offset
