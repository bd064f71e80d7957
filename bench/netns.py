"""A shaped virtual cable for benchmarks: two network namespaces joined by a veth pair.

Namespaces, links and addresses are made with pyroute2 (netlink); the htb
shaper is set with ``tc`` (iproute2) inside each namespace; programs run in a
namespace through ``nsenter``. Every name starts with ``stf`` plus a suffix
of this process, every process started here is tracked by PID, and
:meth:`NetnsPair.destroy` (also on Ctrl-C, via the context manager) stops them
and deletes both namespaces, which removes the veth pair with them. Nothing
can reach the outside: the namespaces hold only loopback and the veth ends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

from pyroute2 import NetNS, netns

NETNS_DIR = "/run/netns"

# TCP payload per 1500-byte frame with timestamps: 1500 - 20 (IP) - 32 (TCP + options).
MSS_TS = 1448
# htb counts each segment as its 1514-byte skb (Ethernet header, no FCS/preamble/gap);
# the wire also carries 4 (FCS) + 8 (preamble) + 12 (inter-frame gap) = 1538 bytes.
HTB_FRAME = 1514
WIRE_FRAME = 1538
# tc's default htb burst at multi-gigabit rates is about one frame (1230 B at 2.5 Gbit/s): every late
# hrtimer or softirq on a busy machine then loses line time for good, and one plain TCP stream got only
# 92-95 % of the 2.5 GbE ceiling. A real NIC never loses line time. 64 KiB (one GSO segment, 0.2 ms at
# 2.5 Gbit/s) rides over those delays; since the bucket starts full, a transfer can gain at most that
# much over the line: 0.13 % of a 50 MB payload, 0.006 % of 1 GiB.
HTB_BURST = 64 * 1024
IFA_F_TENTATIVE = 0x40


def payload_ceiling(line_bits_per_s: float, mtu: int = 1500) -> float:
    """TCP payload ceiling in bytes/s of an Ethernet line rate (117.7 MB/s for 1 GbE)."""
    mss = mtu - 52
    return line_bits_per_s / 8 * mss / (mss + 52 + 38)


def htb_rate_for(ceiling_bytes_per_s: float, mtu: int = 1500) -> int:
    """htb rate (bit/s) whose TCP payload ceiling is ``ceiling_bytes_per_s`` (htb sees mtu+14 per segment)."""
    mss = mtu - 52
    return int(ceiling_bytes_per_s * (mtu + 14) / mss * 8)


class NetnsPair:
    """server namespace <-> veth <-> client namespace."""

    def __init__(self, suffix: str | None = None, mtu: int = 1500):
        sfx = suffix or "%x" % (os.getpid() & 0xFFFFF)
        self.ns = {"server": "stfnbd-s-" + sfx, "client": "stfnbd-c-" + sfx}
        self.ifname = {"server": "stfns" + sfx, "client": "stfnc" + sfx}
        self.addr = {"server": "10.251.0.1", "client": "10.251.0.2"}
        self.mtu = mtu
        self.procs: list = []
        self.owner = os.getpid()

    # --------------------------------------------------------------- lifecycle
    def __enter__(self):
        return self.create()

    def __exit__(self, *exc):
        self.destroy()

    def create(self) -> "NetnsPair":
        self.destroy()
        for ns in self.ns.values():
            netns.create(ns)
        with NetNS(self.ns["server"]) as ipr:
            ipr.link("add", ifname=self.ifname["server"], kind="veth", peer=self.ifname["client"])
            peer = ipr.link_lookup(ifname=self.ifname["client"])[0]
            ipr.link("set", index=peer, net_ns_fd=self.ns["client"])
        for side in ("server", "client"):
            with NetNS(self.ns[side]) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                found = wait_for(lambda: ipr.link_lookup(ifname=self.ifname[side]), timeout=5)
                if not found:
                    raise RuntimeError("%s did not appear in %s" % (self.ifname[side], self.ns[side]))
                idx = found[0]
                ipr.link("set", index=idx, mtu=self.mtu)
                ipr.addr("add", index=idx, address=self.addr[side], prefixlen=24)
                ipr.link("set", index=idx, state="up")
        return self

    def destroy(self) -> None:
        if os.getpid() != self.owner:  # a forked helper (pyroute2 NetNS) must not tear down
            return
        for proc in reversed(self.procs):
            stop_process(proc)
        self.procs.clear()
        existing = set(netns.listnetns())
        for ns in self.ns.values():
            if ns in existing:
                netns.remove(ns)

    # --------------------------------------------------------------- shaping
    def shape(self, rate_bits: int, burst: int | None = HTB_BURST) -> int | None:
        """htb on both veth ends (egress), so reads and writes are limited alike.

        ``burst`` (and cburst) in bytes; None leaves tc's default, for comparison. Returns it.
        """
        extra = ["burst", "%db" % burst, "cburst", "%db" % burst] if burst else []
        for side in ("server", "client"):
            dev = self.ifname[side]
            self.run(side, ["tc", "qdisc", "del", "dev", dev, "root"], check=False)
            self.run(side, ["tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10"])
            self.run(side, ["tc", "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb",
                            "rate", "%dbit" % rate_bits, "ceil", "%dbit" % rate_bits] + extra)
        return burst or None

    def unshape(self) -> None:
        """No shaper on either end: the bare veth, the machine's own ceiling."""
        for side in ("server", "client"):
            self.run(side, ["tc", "qdisc", "del", "dev", self.ifname[side], "root"], check=False)

    def link_local(self, side: str, timeout: float = 10.0) -> str:
        """The fe80:: address of ``side``'s veth end, once duplicate address detection has let go of it."""
        def settled():
            with NetNS(self.ns[side]) as ipr:
                idx = ipr.link_lookup(ifname=self.ifname[side])[0]
                for msg in ipr.get_addr(family=socket.AF_INET6, index=idx):
                    addr = msg.get_attr("IFA_ADDRESS")
                    if addr.startswith("fe80:") and not msg["flags"] & IFA_F_TENTATIVE:
                        return addr
            return None
        found = wait_for(settled, timeout=timeout, interval=0.1)
        if not found:
            raise RuntimeError("no link-local address on %s in %s" % (self.ifname[side], self.ns[side]))
        return found

    # --------------------------------------------------------------- processes
    def argv(self, side: str, argv: list) -> list:
        return ["nsenter", "--net=%s/%s" % (NETNS_DIR, self.ns[side]), "--"] + list(argv)

    def run(self, side: str, argv: list, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("check", True)
        kwargs.setdefault("capture_output", True)
        return subprocess.run(self.argv(side, argv), **kwargs)  # pylint: disable=subprocess-run-check

    def popen(self, side: str, argv: list, **kwargs) -> subprocess.Popen:
        """Start a tracked process in a namespace (nsenter execs it: same PID)."""
        proc = subprocess.Popen(self.argv(side, argv), **kwargs)  # pylint: disable=consider-using-with
        self.procs.append(proc)
        return proc


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
