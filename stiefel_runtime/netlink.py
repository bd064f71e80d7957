# -*- coding: utf-8 -*-
# Copyright: stiefel.system developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Links for the stiefel agents, driven by netlink events (pyroute2).

:class:`LinkManager` brings every non-loopback interface up as it appears
(optionally with a jumbo MTU), tracks IPv6 link-local addresses as the kernel
announces them, and reports links appearing and disappearing. It never
polls: the agents ``select()`` on :meth:`LinkManager.fileno` together with
their sockets and call :meth:`LinkManager.process` when netlink has news.

Only pyroute2 API common to 0.7 (Debian 12) and 0.9 is used: ``IPRoute()``
with ``.get_links()``, ``.get_addr()``, ``.link("set", ...)`` for commands, and
the low-level ``IPRSocket()`` with ``.bind()``, ``.get()``, ``.fileno()`` for
events (0.9's ``IPRoute.get()`` buffers messages internally, so a
``select()`` on its socket can miss queued RTM_NEWADDR events; ``IPRSocket``
returns everything one ``recv`` brought, which keeps ``select()`` honest). The decision logic (:func:`event_from_message`,
:meth:`LinkManager.handle`) is pure and tested without netlink.
"""

from __future__ import annotations

import errno
import select
import socket
import time

from pyroute2 import IPRoute, IPRSocket

from ansible_collections.stiefel.system.plugins.module_utils.errors import StiefelError
from stiefel_runtime.common import quiet_log

IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFA_F_TENTATIVE = 0x40
IFA_F_DADFAILED = 0x08
RT_SCOPE_LINK = 253
MIN_MTU = 1280
MAX_MTU = 65535

LINK_ADDED = "link-added"
LINK_CHANGED = "link-changed"
LINK_REMOVED = "link-removed"
ADDR_ADDED = "addr-added"
ADDR_REMOVED = "addr-removed"


class NetlinkError(StiefelError):
    """A link could not be configured."""


class LinkEvent(object):
    """What one netlink message means for the agents."""

    __slots__ = ("kind", "index", "ifname", "mac", "flags", "mtu", "address", "usable")

    def __init__(self, kind, index, ifname=None, mac=None, flags=0, mtu=None, address=None, usable=False):
        self.kind = kind
        self.index = index
        self.ifname = ifname
        self.mac = mac
        self.flags = flags
        self.mtu = mtu
        self.address = address
        self.usable = usable

    @property
    def loopback(self):
        return bool(self.flags & IFF_LOOPBACK)

    @property
    def admin_up(self):
        return bool(self.flags & IFF_UP)

    def __repr__(self):
        return "LinkEvent(%s, %s, %s)" % (self.kind, self.ifname or self.index, self.address or self.mac or "")


def _attr(msg, name):
    try:
        return msg.get_attr(name)
    except (AttributeError, KeyError, TypeError):
        return None


def _field(msg, name, default=None):
    try:
        value = msg[name]
    except (KeyError, TypeError, IndexError):
        return default
    return default if value is None else value


def event_from_message(msg):
    """Turn a pyroute2 RTM_* message into a :class:`LinkEvent`, or None if it is irrelevant."""
    kind = msg.get("event") if hasattr(msg, "get") else None
    index = _field(msg, "index")
    if not isinstance(index, int) or index <= 0:
        return None
    if kind in ("RTM_NEWLINK", "RTM_DELLINK"):
        return LinkEvent(
            LINK_ADDED if kind == "RTM_NEWLINK" else LINK_REMOVED,
            index,
            ifname=_attr(msg, "IFLA_IFNAME"),
            mac=(_attr(msg, "IFLA_ADDRESS") or None),
            flags=_field(msg, "flags", 0) or 0,
            mtu=_attr(msg, "IFLA_MTU"),
        )
    if kind in ("RTM_NEWADDR", "RTM_DELADDR"):
        if _field(msg, "family") != socket.AF_INET6:
            return None
        address = _attr(msg, "IFA_ADDRESS")
        if not isinstance(address, str) or not address.lower().startswith("fe80:"):
            return None
        flags = _attr(msg, "IFA_FLAGS")
        if flags is None:
            flags = _field(msg, "flags", 0) or 0
        usable = kind == "RTM_NEWADDR" and not flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED)
        return LinkEvent(ADDR_ADDED if kind == "RTM_NEWADDR" else ADDR_REMOVED, index,
                         address=address.lower(), flags=flags, usable=usable)
    return None


class Link(object):
    __slots__ = ("index", "ifname", "mac", "flags", "mtu", "link_local")

    def __init__(self, index, ifname, mac, flags, mtu):
        self.index = index
        self.ifname = ifname
        self.mac = mac
        self.flags = flags
        self.mtu = mtu
        self.link_local = None  # usable (non-tentative) fe80:: address

    @property
    def ready(self):
        return self.link_local is not None

    def __repr__(self):
        return "Link(%s #%d %s %s)" % (self.ifname, self.index, self.mac, self.link_local)


def link_gone(exc):
    """Whether a link command failed because the link no longer exists (pyroute2's NetlinkError has ``code``)."""
    return errno.ENODEV in (getattr(exc, "code", None), getattr(exc, "errno", None))


def parse_mtu(value):
    """The ``stiefel.mtu=`` option: None, or an int within IPv6 limits."""
    if value in (None, ""):
        return None
    try:
        mtu = int(value)
    except (TypeError, ValueError):
        raise NetlinkError("MTU %r is not a number" % (value,)) from None
    if not MIN_MTU <= mtu <= MAX_MTU:
        raise NetlinkError("MTU %d outside %d..%d" % (mtu, MIN_MTU, MAX_MTU))
    return mtu


class LinkManager(object):
    """Tracks links from netlink events; brings non-loopback links up.

    ``handle(event)`` is the pure state machine: it updates the table and
    returns ``(actions, notices)`` where actions are ``("up", index, mtu)``
    requests and notices are human-readable lines for the console. The
    netlink side (``start``/``process``) feeds it and performs the actions.
    """

    def __init__(self, mtu=None, manage=True, log=quiet_log, ipr_factory=None, events_factory=None):
        """``manage``: True (every non-loopback link), False, or a callable(Link) -> bool."""
        self.mtu = parse_mtu(mtu)
        self.manage = manage
        self.log = log
        self.links = {}
        self._ipr_factory = ipr_factory
        self._events_factory = events_factory
        self._events = None
        self._cmd = None
        self._listeners = []

    # --------------------------------------------------------- pure state machine
    def handle(self, event):
        actions = []
        notices = []
        if event is None:
            return actions, notices
        if event.kind == LINK_ADDED:
            if event.loopback:
                return actions, notices
            link = self.links.get(event.index)
            if link is None:
                link = Link(event.index, event.ifname, event.mac, event.flags, event.mtu)
                self.links[event.index] = link
                notices.append("link %s appeared (mac %s)" % (event.ifname, event.mac))
            else:
                event.kind = LINK_CHANGED
                if event.ifname:
                    link.ifname = event.ifname
                if event.mac:
                    link.mac = event.mac
                link.flags = event.flags
                if event.mtu:
                    link.mtu = event.mtu
            if self.manage is True or (callable(self.manage) and self.manage(link)):
                want_mtu = self.mtu if (self.mtu and link.mtu != self.mtu) else None
                if not event.admin_up or want_mtu:
                    actions.append(("up", event.index, want_mtu))
        elif event.kind == LINK_REMOVED:
            link = self.links.pop(event.index, None)
            if link is not None:
                notices.append("link %s disappeared" % link.ifname)
        elif event.kind == ADDR_ADDED:
            link = self.links.get(event.index)
            if link is not None and event.usable and link.link_local != event.address:
                link.link_local = event.address
                notices.append("link %s ready at %s" % (link.ifname, event.address))
        elif event.kind == ADDR_REMOVED:
            link = self.links.get(event.index)
            if link is not None and link.link_local == event.address:
                link.link_local = None
                notices.append("link %s lost %s" % (link.ifname, event.address))
        return actions, notices

    # --------------------------------------------------------- netlink side
    def _factory(self, events=False):
        custom = self._events_factory if events else self._ipr_factory
        if custom is not None:
            return custom()
        return IPRSocket() if events else IPRoute()

    def open(self):
        """Subscribe to link/address events, then read the current state (no event is lost in between)."""
        self._events = self._factory(events=True)
        self._events.bind()
        self._cmd = self._factory()
        events = []
        for msg in self._cmd.get_links():
            events.append(event_from_message(msg))
        for msg in self._cmd.get_addr(family=socket.AF_INET6):
            events.append(event_from_message(msg))
        return self._apply(events)

    def fileno(self):
        return self._events.fileno()

    def process(self):
        """Read pending netlink messages (call when fileno() is readable); return the events."""
        return self._apply(event_from_message(msg) for msg in self._events.get())

    def _apply(self, events):
        out = []
        for event in events:
            if event is None:
                continue
            actions, notices = self.handle(event)
            for notice in notices:
                self.log(notice)
            for _verb, index, mtu in actions:
                self._set_up(index, mtu)
            out.append(event)
        return out

    def _set_up(self, index, mtu):
        kwargs = {"index": index, "state": "up"}
        if mtu:
            kwargs["mtu"] = mtu
        try:
            self._cmd.link("set", **kwargs)
        except Exception as exc:  # pylint: disable=broad-except
            if link_gone(exc):
                # Unplugged (a NIC going away is taken down first, which asked for it to come up again):
                # its RTM_DELLINK follows and says it disappeared; nothing failed.
                return
            # The NIC refuses the MTU: retry without it.
            if mtu:
                self.log("link #%d: MTU %d refused (%s); bringing it up with its default MTU" % (index, mtu, exc))
                try:
                    self._cmd.link("set", index=index, state="up")
                except Exception as exc2:  # pylint: disable=broad-except
                    if not link_gone(exc2):
                        self.log("link #%d: cannot bring it up: %s" % (index, exc2))
            else:
                self.log("link #%d: cannot bring it up: %s" % (index, exc))

    def ready_links(self):
        return [link for link in self.links.values() if link.ready]

    def wait_ready(self, timeout, predicate=None):
        """Wait (event-driven) until a link is ready (and matches ``predicate``); return it or None."""
        deadline = time.monotonic() + timeout
        while True:
            for link in self.ready_links():
                if predicate is None or predicate(link):
                    return link
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            readable, _w, _x = select.select([self.fileno()], [], [], left)
            if readable:
                self.process()

    def close(self):
        for ipr in (self._events, self._cmd):
            if ipr is not None:
                try:
                    ipr.close()
                except Exception:  # pylint: disable=broad-except
                    pass
        self._events = self._cmd = None
