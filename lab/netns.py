"""Virtual cables in network namespaces.

:class:`VirtualLink`: one namespace holding a bridge and tap devices (for
QEMU VMs). :class:`Namespaces`: two namespaces joined by a veth pair (for
agents run as host processes).

Everything is created under names the lab chooses (``stf`` + a short
suffix) and removed again by those names; nothing outside the namespaces is
touched, so no traffic can leave this machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import time


def run(*argv, check=True):
    """Run a command, its output captured as text (``ip`` and friends)."""
    return subprocess.run(list(argv), check=check, capture_output=True, text=True)


def _ip(*args, netns=None, check=True):
    return run(*(["ip"] + (["-n", netns] if netns else []) + list(args)), check=check)


def link_local(ns, dev, timeout=30):
    """The IPv6 link-local address of ``dev`` in namespace ``ns`` once it is no longer tentative (the
    agents bring their links up themselves, so a test waits for it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = json.loads(_ip("-j", "-6", "addr", "show", "dev", dev, netns=ns).stdout or "[]")
        for link in out:
            for addr in link.get("addr_info", []):
                if addr.get("scope") == "link" and not addr.get("tentative"):
                    return addr["local"]
        time.sleep(0.2)
    raise AssertionError("no link-local address on %s in %s" % (dev, ns))


class VirtualLink(object):
    def __init__(self, suffix=None, taps=2, mtu=1500):
        self.suffix = suffix or "%x" % (os.getpid() & 0xFFFFF)
        self.netns = "stf-e2e-%s" % self.suffix
        self.bridge = "stfbr0"
        self.taps = ["stftap%d" % i for i in range(taps)]
        self.mtu = mtu

    def create(self):
        self.destroy()
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        _ip("link", "set", "lo", "up", netns=self.netns)
        _ip("link", "add", self.bridge, "type", "bridge", netns=self.netns)
        _ip("link", "set", self.bridge, "mtu", str(self.mtu), "up", netns=self.netns)
        for tap in self.taps:
            _ip("tuntap", "add", "dev", tap, "mode", "tap", netns=self.netns)
            _ip("link", "set", tap, "master", self.bridge, "mtu", str(self.mtu), "up", netns=self.netns)
        return self

    def exists(self):
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
        return any(line.split()[0] == self.netns for line in out.splitlines() if line.strip())

    def destroy(self):
        if self.exists():
            subprocess.run(["ip", "netns", "del", self.netns], check=False)


class Namespaces(object):
    """Two namespaces ``stfs<pid>``/``stfc<pid>`` with a veth pair between them (links left down:
    the agents bring them up themselves, as in the ramdisk)."""

    def __init__(self):
        pid = os.getpid() & 0xFFFFF
        self.server = "stfs%x" % pid
        self.client = "stfc%x" % pid
        self.veth_s = "stfvs%x" % pid
        self.veth_c = "stfvc%x" % pid

    def create(self):
        self.destroy()
        run("ip", "netns", "add", self.server)
        run("ip", "netns", "add", self.client)
        run("ip", "link", "add", self.veth_s, "type", "veth", "peer", "name", self.veth_c)
        run("ip", "link", "set", self.veth_s, "netns", self.server)
        run("ip", "link", "set", self.veth_c, "netns", self.client)
        for ns in (self.server, self.client):
            _ip("link", "set", "lo", "up", netns=ns)
        return self

    def destroy(self):
        for ns in (self.server, self.client):
            run("ip", "netns", "del", ns, check=False)
        run("ip", "link", "del", self.veth_s, check=False)

    @staticmethod
    def exec_argv(ns, *argv):
        return ["ip", "netns", "exec", ns] + list(argv)
