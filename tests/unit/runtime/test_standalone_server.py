"""server.StandaloneServer without sockets: its role, which links it touches, where it answers, what it refuses."""

from __future__ import annotations

import io
import json

import pytest

from ansible_collections.stiefel.system.plugins.module_utils import nbd_export
from ansible_collections.stiefel.system.plugins.module_utils.errors import ServerError
from stiefel_runtime import discovery, messages, server, server_config as sc
from stiefel_runtime.common import Console
from stiefel_runtime.netlink import ADDR_ADDED, LINK_ADDED, LinkEvent, LinkManager

KEY = bytes(range(32))


def make_boot(tmp_path):
    boot = tmp_path / "boot"
    (boot / "stiefel").mkdir(parents=True)
    (boot / "vmlinuz-6.1.0-9-amd64").write_bytes(b"K" * 5000)
    (boot / "initrd.img-6.1.0-9-amd64").write_bytes(b"I" * 3000)
    (boot / "stiefel" / "boot.json").write_text(json.dumps({
        "format": "stiefel-boot-config", "version": 1, "kernel": "vmlinuz-6.1.0-9-amd64",
        "initrd": ["initrd.img-6.1.0-9-amd64"], "cmdline": "root=UUID=r ro quiet", "root": "UUID=r"}))
    return boot


def make_agent(tmp_path, **values):
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 65536)
    values = dict({"disk": str(disk), "boot_dir": str(make_boot(tmp_path)), "run_dir": str(tmp_path / "run")},
                  **values)
    config = sc.build(values)
    return server.StandaloneServer(KEY, Console("test", stream=io.StringIO()), config)


class FakeSocket(object):
    def __init__(self):
        self.sent = []

    def sendto(self, data, address):
        self.sent.append((data, address))


def links_for(agent):
    """The agent's LinkManager fed with two links that appear down: eth1 (index 2) and wlan0 (index 3)."""
    links = LinkManager(mtu=agent.mtu, manage=agent.manage_links)
    actions = []
    for index, name, mac in ((2, "eth1", "52:54:00:00:00:02"), (3, "wlan0", "52:54:00:00:00:03")):
        actions += links.handle(LinkEvent(LINK_ADDED, index, ifname=name, mac=mac, flags=0, mtu=1500))[0]
        links.handle(LinkEvent(ADDR_ADDED, index, address="fe80::%d" % index, usable=True))
    return links, actions


def test_offers_say_standalone_and_clients_accept_them(tmp_path):
    agent = make_agent(tmp_path)
    assert agent.state.offer_fields()["role"] == messages.ROLE_STANDALONE
    assert server.ServerAgent(KEY, Console("t", stream=io.StringIO())).state.offer_fields()["role"] == \
        messages.ROLE_SERVER
    client = discovery.ClientDiscovery(KEY)
    offer = client.handle(agent.state.answer(client.discover(2)), "fe80::2", 2)
    assert offer.role == messages.ROLE_STANDALONE


def test_named_interfaces_only_are_brought_up_with_the_mtu(tmp_path):
    agent = make_agent(tmp_path, interfaces="52:54:00:00:00:02", mtu="9000")
    _links, actions = links_for(agent)
    assert actions == [("up", 2, 9000)]


def test_no_interface_named_touches_none(tmp_path):
    agent = make_agent(tmp_path)
    assert agent.manage_links is False
    _links, actions = links_for(agent)
    assert actions == []


@pytest.mark.parametrize("interfaces, answered", [(None, {2, 3}), ("eth1", {2}), ("52:54:00:00:00:03", {3})])
def test_discovery_answered_on_listening_interfaces_only(tmp_path, interfaces, answered):
    agent = make_agent(tmp_path, **({"interfaces": interfaces} if interfaces else {}))
    agent.links, _actions = links_for(agent)
    agent.sock = FakeSocket()
    client = discovery.ClientDiscovery(KEY)
    for scope in (1, 2, 3, 99):  # 1: lo, which the link table never holds; 99: unknown
        agent.handle_datagram(client.discover(scope), "fe80::aa", 61570, scope)
    assert {address[3] for _data, address in agent.sock.sent} == answered


def test_a_missing_disk_is_refused_before_any_link_is_touched(tmp_path):
    agent = make_agent(tmp_path, disk=str(tmp_path / "nope.img"))
    with pytest.raises(nbd_export.NbdExportError, match="does not exist"):
        agent.run()
    assert agent.links is None


def test_a_payload_that_cannot_be_read_is_fatal_before_any_link_is_touched(tmp_path):
    empty = tmp_path / "empty-boot"
    empty.mkdir()
    agent = make_agent(tmp_path, boot_dir=str(empty))
    with pytest.raises(ServerError, match="no boot config"):
        agent.run()
    assert agent.links is None and agent.state.source is None


def test_a_missing_boot_partition_is_fatal(tmp_path):
    agent = make_agent(tmp_path, boot_dir="", boot=str(tmp_path / "no-such-partition"))
    with pytest.raises(ServerError, match="not found"):
        agent.run()
    assert agent.links is None
