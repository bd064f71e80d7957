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


def _netboot_values(tmp_path, initrd_bytes):
    (tmp_path / "nb-vmlinuz").write_bytes(b"kernel")
    (tmp_path / "nb-initrd.img").write_bytes(initrd_bytes)
    return {"interfaces": "eth1", "netboot": "yes", "netboot_kernel": str(tmp_path / "nb-vmlinuz"),
            "netboot_initrd": str(tmp_path / "nb-initrd.img")}


def test_a_netboot_initrd_with_a_key_is_fatal_before_any_link_is_touched(tmp_path):
    from ansible_collections.stiefel.system.plugins.module_utils import cpio
    from ansible_collections.stiefel.system.plugins.module_utils.keyfile import encode_key

    agent = make_agent(tmp_path, **_netboot_values(tmp_path, cpio.key_archive(encode_key(KEY))))
    with pytest.raises(server.netboot.NetbootError, match="holds etc/stiefel/key"):
        agent.run()
    assert agent.links is None


class FakeNetboot(object):
    started = []
    fail = False

    def __init__(self, ifname, run_dir, kernel, initrd, cmdline, log=None, log_drop=None):
        self.args = (ifname, run_dir, kernel, initrd, cmdline)
        self.stopped = False

    def start(self, ifindex):
        if FakeNetboot.fail:
            raise server.netboot.NetbootError("dnsmasq is not installed")
        FakeNetboot.started.append((ifindex,) + self.args)

    def stop(self):
        self.stopped = True


def test_netboot_runs_on_the_first_named_link_and_follows_it(tmp_path):
    from ansible_collections.stiefel.system.plugins.module_utils import cpio

    agent = make_agent(tmp_path, **_netboot_values(tmp_path, cpio.write_newc([cpio.CpioEntry.file("init", b"x")])))
    agent.netboot_factory = FakeNetboot
    FakeNetboot.started, FakeNetboot.fail = [], False
    agent.sync_netboot({(3, "fe80::3"): "wlan0"} if agent.selected is None else {})
    assert FakeNetboot.started == [] and agent.netboot is None
    agent.sync_netboot({(2, "fe80::2"): "eth1"})
    assert FakeNetboot.started == [(2, "eth1", agent.run_dir, str(tmp_path / "nb-vmlinuz"),
                                    str(tmp_path / "nb-initrd.img"), "stiefel.role=client stiefel.pair")]
    running = agent.netboot
    agent.sync_netboot({(2, "fe80::2"): "eth1"})
    assert len(FakeNetboot.started) == 1, "one dnsmasq, not one per sync"
    agent.sync_netboot({})
    assert running.stopped and agent.netboot is None
    assert "netboot stopped on eth1 (link gone)" in agent.console.stream.getvalue()
    # a failure is said once per link, not at every sync
    FakeNetboot.fail = True
    for _attempt in range(3):
        agent.sync_netboot({(4, "fe80::4"): "eth1"})
    assert agent.console.stream.getvalue().count("cannot answer network boot on eth1") == 1
    agent.close()


def test_the_ramdisk_server_has_no_netboot_unless_configured(tmp_path):
    agent = server.ServerAgent(KEY, Console("t", stream=io.StringIO()), run_dir=str(tmp_path))
    agent.netboot_factory = FakeNetboot
    FakeNetboot.started = []
    agent.sync_netboot({(2, "fe80::2"): "eth1"})
    assert FakeNetboot.started == [] and agent.netboot is None
