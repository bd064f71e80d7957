"""A virtual cable: a network namespace holding a bridge and tap devices.

Everything is created under names the lab chooses (``stf`` + a short
suffix) and removed again by those names; nothing outside the namespace is
touched, so no traffic can leave this machine.
"""

from __future__ import annotations

import os
import subprocess


def _ip(*args, netns=None, check=True):
    argv = ["ip"] + (["-n", netns] if netns else []) + list(args)
    return subprocess.run(argv, check=check, capture_output=True, text=True)


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
