from __future__ import annotations

import errno
import socket

import pytest
from hypothesis import given, strategies as st

from stiefel_runtime import netlink


class Msg(dict):
    """A stand-in for a pyroute2 message: dict fields plus get_attr()."""

    def __init__(self, attrs=None, **fields):
        super().__init__(**fields)
        self.attrs = attrs or {}

    def get_attr(self, name):
        return self.attrs.get(name)


def newlink(index, name, mac, flags=0, mtu=1500, event="RTM_NEWLINK"):
    return Msg({"IFLA_IFNAME": name, "IFLA_ADDRESS": mac, "IFLA_MTU": mtu}, event=event, index=index, flags=flags)


def newaddr(index, address, flags=0, event="RTM_NEWADDR", family=socket.AF_INET6):
    return Msg({"IFA_ADDRESS": address, "IFA_FLAGS": flags}, event=event, index=index, family=family, flags=flags)


def test_new_link_is_brought_up_with_mtu():
    lm = netlink.LinkManager(mtu=9000, log=lambda s: None)
    actions, notices = lm.handle(netlink.event_from_message(newlink(3, "eth0", "52:54:00:00:00:01")))
    assert actions == [("up", 3, 9000)]
    assert "appeared" in notices[0]
    # once up with the right MTU, nothing more to do
    actions, _notices = lm.handle(netlink.event_from_message(newlink(3, "eth0", "52:54:00:00:00:01", flags=1, mtu=9000)))
    assert actions == []


def test_loopback_is_left_alone():
    lm = netlink.LinkManager(log=lambda s: None)
    assert lm.handle(netlink.event_from_message(newlink(1, "lo", "00:00:00:00:00:00", flags=0x8))) == ([], [])
    assert lm.links == {}


def test_manage_predicate():
    lm = netlink.LinkManager(manage=lambda link: link.mac == "52:54:00:00:00:02", log=lambda s: None)
    assert lm.handle(netlink.event_from_message(newlink(3, "eth0", "52:54:00:00:00:01")))[0] == []
    assert lm.handle(netlink.event_from_message(newlink(4, "eth1", "52:54:00:00:00:02")))[0] == [("up", 4, None)]


def test_link_local_lifecycle():
    lm = netlink.LinkManager(log=lambda s: None)
    lm.handle(netlink.event_from_message(newlink(3, "eth0", "52:54:00:00:00:01", flags=1)))
    lm.handle(netlink.event_from_message(newaddr(3, "fe80::1", flags=netlink.IFA_F_TENTATIVE)))
    assert lm.ready_links() == []
    lm.handle(netlink.event_from_message(newaddr(3, "2001:db8::1")))  # not link-local: ignored
    assert lm.ready_links() == []
    _actions, notices = lm.handle(netlink.event_from_message(newaddr(3, "FE80::1")))
    assert [l.link_local for l in lm.ready_links()] == ["fe80::1"] and "ready" in notices[0]
    lm.handle(netlink.event_from_message(newaddr(3, "fe80::1", event="RTM_DELADDR")))
    assert lm.ready_links() == []
    _actions, notices = lm.handle(netlink.event_from_message(newlink(3, "eth0", None, event="RTM_DELLINK")))
    assert lm.links == {} and "disappeared" in notices[0]


def test_address_for_unknown_link_ignored():
    lm = netlink.LinkManager(log=lambda s: None)
    assert lm.handle(netlink.event_from_message(newaddr(9, "fe80::9"))) == ([], [])


def test_ipv4_and_routes_ignored():
    assert netlink.event_from_message(newaddr(3, "10.0.0.1", family=socket.AF_INET)) is None
    assert netlink.event_from_message(Msg(event="RTM_NEWROUTE", index=3)) is None


@pytest.mark.parametrize("value, expected", [(None, None), ("", None), ("9000", 9000), (1500, 1500)])
def test_parse_mtu(value, expected):
    assert netlink.parse_mtu(value) == expected


@pytest.mark.parametrize("value", ["jumbo", "100", "70000", "-1"])
def test_parse_mtu_rejects(value):
    with pytest.raises(netlink.NetlinkError):
        netlink.parse_mtu(value)


@given(st.lists(st.tuples(
    st.sampled_from(["RTM_NEWLINK", "RTM_DELLINK", "RTM_NEWADDR", "RTM_DELADDR", "RTM_NEWROUTE", None, "junk"]),
    st.one_of(st.integers(min_value=-5, max_value=8), st.none(), st.text(max_size=3)),
    st.one_of(st.none(), st.text(max_size=20), st.sampled_from(["fe80::1", "fe80::2", "fe80::1%x"])),
    st.integers(min_value=0, max_value=0xFFFF),
    st.one_of(st.none(), st.integers(), st.sampled_from([socket.AF_INET6, socket.AF_INET])),
), max_size=40))
def test_random_message_streams_never_break_the_table(stream):
    lm = netlink.LinkManager(mtu=9000, log=lambda s: None)
    for event, index, text, flags, family in stream:
        msg = Msg({"IFLA_IFNAME": text, "IFLA_ADDRESS": text, "IFA_ADDRESS": text, "IFA_FLAGS": flags},
                  event=event, index=index, flags=flags, family=family)
        actions, _notices = lm.handle(netlink.event_from_message(msg))
        for verb, idx, mtu in actions:
            assert verb == "up" and isinstance(idx, int) and idx > 0 and mtu in (None, 9000)
    for link in lm.links.values():
        assert not link.flags & netlink.IFF_LOOPBACK
        assert link.link_local is None or link.link_local.startswith("fe80:")


class FakeEvents(object):
    def __init__(self, batches):
        self.batches = list(batches)

    def bind(self):
        pass

    def fileno(self):
        return -1

    def get(self):
        return self.batches.pop(0)

    def close(self):
        pass


class FakeCmd(object):
    def __init__(self, links, addrs, fail=False):
        self._links, self._addrs, self.fail = links, addrs, fail
        self.calls = []

    def get_links(self):
        return self._links

    def get_addr(self, family=None):
        return self._addrs

    def link(self, verb, **kwargs):
        self.calls.append((verb, kwargs))
        if self.fail and "mtu" in kwargs:
            raise OSError("mtu refused")

    def close(self):
        pass


def test_open_and_process_through_seams():
    cmd = FakeCmd([newlink(1, "lo", "00", flags=0x8), newlink(2, "eth0", "52:54:00:00:00:01")], [], fail=True)
    events = FakeEvents([[newlink(3, "eth1", "52:54:00:00:00:03"), newaddr(2, "fe80::2")]])
    lines = []
    lm = netlink.LinkManager(mtu=9000, log=lines.append, ipr_factory=lambda: cmd, events_factory=lambda: events)
    lm.open()
    got = lm.process()
    assert [e.kind for e in got] == [netlink.LINK_ADDED, netlink.ADDR_ADDED]
    # MTU refused: retried without it, and said so
    assert ("set", {"index": 2, "state": "up"}) in cmd.calls
    assert any("MTU 9000 refused" in line for line in lines)
    assert [l.ifname for l in lm.ready_links()] == ["eth0"]


class VanishedLinkError(Exception):
    """What pyroute2 raises for a link command on a removed interface: NetlinkError(code=ENODEV)."""

    def __init__(self):
        super().__init__(errno.ENODEV, "No such device")
        self.code = errno.ENODEV


class UnpluggingCmd(FakeCmd):
    def link(self, verb, **kwargs):
        self.calls.append((verb, kwargs))
        raise VanishedLinkError()


@pytest.mark.parametrize("mtu", [None, 9000])
def test_unplugged_link_is_not_reported_as_a_failure(mtu):
    # A NIC pulled right after it appeared (or one going down on its way out) is asked to come up and the
    # kernel answers ENODEV. That is the link disappearing, which RTM_DELLINK reports, not an error to show.
    cmd = UnpluggingCmd([], [])
    events = FakeEvents([[newlink(2, "eth0", "52:54:00:00:00:01", flags=0, mtu=1500),
                          newlink(2, "eth0", "52:54:00:00:00:01", event="RTM_DELLINK")]])
    lines = []
    lm = netlink.LinkManager(mtu=mtu, log=lines.append, ipr_factory=lambda: cmd, events_factory=lambda: events)
    lm.open()
    lm.process()
    assert cmd.calls == [("set", dict({"index": 2, "state": "up"}, **({"mtu": mtu} if mtu else {})))]  # no retry
    assert lines == ["link eth0 appeared (mac 52:54:00:00:00:01)", "link eth0 disappeared"]
    assert lm.links == {}


def test_other_failures_to_bring_a_link_up_are_still_shown():
    class RefusingCmd(FakeCmd):
        def link(self, verb, **kwargs):
            raise OSError(errno.EPERM, "Operation not permitted")

    cmd = RefusingCmd([newlink(2, "eth0", "52:54:00:00:00:01")], [])
    lines = []
    netlink.LinkManager(log=lines.append, ipr_factory=lambda: cmd, events_factory=lambda: FakeEvents([])).open()
    assert any("cannot bring it up" in line and "not permitted" in line for line in lines)


def test_link_gone_knows_pyroute2s_error():
    exceptions = pytest.importorskip("pyroute2.netlink.exceptions")
    assert netlink.link_gone(exceptions.NetlinkError(errno.ENODEV, "No such device"))
    assert not netlink.link_gone(exceptions.NetlinkError(errno.EBUSY, "Device or resource busy"))
    assert netlink.link_gone(OSError(errno.ENODEV, "No such device"))
    assert not netlink.link_gone(ValueError("mtu"))
