from __future__ import annotations

import io
import json

import pytest
from hypothesis import given, settings, strategies as st

from ansible_collections.stiefel.system.plugins.module_utils import keyfile
from stiefel_runtime import autokexec, discovery, messages
from stiefel_runtime.common import Console
from ansible_collections.stiefel.system.plugins.module_utils.errors import ProtocolError, ReplayedMessage

KEY = bytes(range(32))

# The example of docs/dev/contracts.md, "autokexec config"
GOOD = {
    "format": "stiefel-autokexec-config", "version": 1, "key_path": "/etc/stiefel/key",
    "ramdisk_kernel": "/usr/lib/stiefel/ramdisk/vmlinuz", "ramdisk_initrd": "/usr/lib/stiefel/ramdisk/initrd.img",
    "server_cmdline": "stiefel.role=server stiefel.disk=/dev/disk/by-id/nvme-X stiefel.boot=UUID=abc console=ttyS0",
    "server": {"disk": "/dev/disk/by-id/nvme-X", "boot": "UUID=abc", "luksboot": None, "mtu": None, "debug": False,
               "extra": "console=ttyS0"},
    "trigger_macs": ["52:54:00:AB:CD:01"],
}


def test_parse_config():
    config = autokexec.parse_config(json.dumps(GOOD).encode())
    assert config["trigger_macs"] == ["52:54:00:ab:cd:01"] and config["key_path"] == "/etc/stiefel/key"
    assert config["server_cmdline"] == GOOD["server_cmdline"]


@pytest.mark.parametrize("change", [
    {"version": 2}, {"format": "other"}, {"ramdisk_kernel": "relative"}, {"trigger_macs": ["nope"]},
    {"server_cmdline": "a\nb"}, {"version": True}, {"key_path": "k"},
    {"server_cmdline": "stiefel.disk=x"}, {"server_cmdline": "stiefel.role=server stiefel.role=client"},
    {"listen_macs": "52:54:00:ab:cd:02"}, {"listen_macs": [1]},
])
def test_parse_config_rejects(change):
    with pytest.raises(autokexec.AutokexecError):
        autokexec.parse_config(json.dumps(dict(GOOD, **change)))


def test_only_configured_links_are_brought_up():
    config = autokexec.parse_config(json.dumps(dict(GOOD, listen_macs=["52:54:00:AB:CD:02"])))
    assert config["listen_macs"] == ["52:54:00:ab:cd:02"]
    manage = autokexec.stiefel_link_predicate(config)

    class Link(object):
        def __init__(self, mac):
            self.mac = mac

    assert manage(Link("52:54:00:ab:cd:02")) and manage(Link("52:54:00:AB:CD:01"))
    assert not manage(Link("52:54:00:ab:cd:03")) and not manage(Link(None))
    assert autokexec.parse_config(json.dumps(GOOD))["listen_macs"] == []


@given(st.binary(max_size=300))
def test_parse_config_hostile(raw):
    try:
        autokexec.parse_config(raw)
    except autokexec.AutokexecError:
        pass


@pytest.mark.parametrize("cmdline, stiefeled", [
    ("root=/dev/sda1 ro", False),
    ("root=/dev/nbd0 stiefel.mac=52:54:00:12:34:56 stiefel.server=fe80::1", True),
    ("root=/dev/sda1 notstiefel.mac=1", False),
])
def test_already_stiefeled(cmdline, stiefeled):
    assert autokexec.already_stiefeled(cmdline) is stiefeled


def _exchange(decider, key=KEY):
    client = discovery.ClientDiscovery(key)
    offer_bytes, trigger = decider.decide(client.discover(4), 4)
    assert trigger is None
    offer = client.handle(offer_bytes, "fe80::1", 4)
    return client, offer


def test_decider_triggers_once():
    decider = autokexec.Decider(KEY)
    client, offer = _exchange(decider)
    request = client.kexec_request(offer)
    ack, trigger = decider.decide(request, 4)
    assert trigger and messages.parse(KEY, ack).type == messages.KEXEC_ACK
    with pytest.raises(ReplayedMessage):
        decider.decide(request, 4)


def test_recorded_request_replayed_after_a_restart_never_triggers():
    """The laptop's service restarted: a recorded DISCOVER gets a new challenge, the recorded KEXEC_REQUEST
    answers none; SESSION_REQUESTs (the server's) are not autokexec's business."""
    decider = autokexec.Decider(KEY)
    client, offer = _exchange(decider)
    request = client.kexec_request(offer)
    assert decider.decide(request, 4)[1]
    restarted = autokexec.Decider(KEY)
    reply, trigger = restarted.decide(client.discover(4), 4)
    assert trigger is None and messages.parse(KEY, reply).server_nonce != offer.server_nonce
    with pytest.raises(ReplayedMessage):
        restarted.decide(request, 4)
    with pytest.raises(ProtocolError):
        restarted.decide(messages.build_session_request(KEY, offer.client_nonce, offer.server_nonce), 4)


@given(st.lists(st.binary(max_size=600), max_size=8), st.data())
@settings(max_examples=100)
def test_hostile_and_replayed_never_trigger(junk, data):
    decider = autokexec.Decider(KEY)
    client, offer = _exchange(decider)
    good = client.kexec_request(offer)
    other_key = keyfile.generate_key()
    hostile = list(junk) + [
        messages.build_kexec_request(other_key, offer.client_nonce, offer.server_nonce),  # wrong key
        messages.build_kexec_request(KEY, offer.client_nonce, messages.new_nonce()),  # unknown challenge
        messages.build_kexec_request(KEY, messages.new_nonce(), offer.server_nonce),  # another client's challenge
        good[:-1], good + b"\0",
    ]
    for datagram in data.draw(st.permutations(hostile)):
        try:
            _reply, trigger = decider.decide(datagram, 4)
        except ProtocolError:
            continue
        assert trigger is None  # at most a DISCOVER that got an OFFER
    # A request naming this challenge with another client nonce (still made with the key) spends the
    # challenge, so the genuine request may or may not trigger afterwards: never more than once.
    triggers = 0
    for _unused in range(2):
        try:
            triggers += bool(decider.decide(good, 4)[1])
        except ProtocolError:
            pass
    assert triggers <= 1


class FakeSock(object):
    def __init__(self):
        self.sent = []

    def sendto(self, data, addr):
        self.sent.append((data, addr))


def test_agent_dry_run_builds_initrd_with_key(tmp_path):
    from ansible_collections.stiefel.system.plugins.module_utils import cpio

    key_path = tmp_path / "key"
    keyfile.write_key_atomic(str(key_path), KEY)
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initrd").write_bytes(b"i" * 4096)
    config = autokexec.parse_config(json.dumps(dict(GOOD, ramdisk_kernel=str(tmp_path / "vmlinuz"),
                                                    ramdisk_initrd=str(tmp_path / "initrd"), key_path=str(key_path),
                                                    trigger_macs=[])))
    console = Console("stiefel-autokexec", stream=io.StringIO())
    agent = autokexec.AutokexecAgent(config, console, run_dir=str(tmp_path / "run"), dry_run=True)
    agent.sock = FakeSock()
    client = discovery.ClientDiscovery(KEY)
    assert agent.handle_datagram(client.discover(2), "fe80::5", 61570, 2) is None
    offer = client.handle(agent.sock.sent[-1][0], "fe80::5", 2)
    assert agent.handle_datagram(client.kexec_request(offer), "fe80::5", 61570, 2)
    out = console.stream.getvalue()
    assert "dry-run: would run: kexec -s -l" in out and "stiefel.role=server" in out
    data = (tmp_path / "run" / "ramdisk-with-key.img").read_bytes()
    assert keyfile.decode_key(cpio.read_newc(data[4096:])[-1].data) == KEY
    # garbage is logged and dropped, the agent keeps going
    assert agent.handle_datagram(b"garbage", "fe80::6", 61570, 2) is None
    assert console.dropped == 1


# ------------------------------------------------------------------ network boot and pairing (laptop_netboot)
LISTEN = "52:54:00:ab:cd:02"
NETBOOT = {"kernel": "/usr/lib/stiefel/ramdisk/vmlinuz", "initrd": "/usr/lib/stiefel/ramdisk/initrd.img",
           "cmdline": "stiefel.role=client stiefel.pair console=ttyS0,115200"}


def test_parse_config_netboot():
    config = autokexec.parse_config(json.dumps(dict(GOOD, listen_macs=[LISTEN], netboot=NETBOOT)))
    assert config["netboot"] == NETBOOT
    assert autokexec.parse_config(json.dumps(GOOD))["netboot"] is None
    assert autokexec.parse_config(json.dumps(dict(GOOD, netboot=None)))["netboot"] is None


@pytest.mark.parametrize("change", [
    {"kernel": "vmlinuz"}, {"initrd": None}, {"cmdline": "stiefel.role=client"}, {"cmdline": "stiefel.pair"},
    {"cmdline": "stiefel.role=client stiefel.pair\ninit=/bin/sh"}, {"cmdline": "stiefel.role=client stiefel.pair "
                                                                               + "x" * 1024},
    {"cmdline": 7},
])
def test_parse_config_netboot_rejects(change):
    with pytest.raises(autokexec.AutokexecError):
        autokexec.parse_config(json.dumps(dict(GOOD, listen_macs=[LISTEN], netboot=dict(NETBOOT, **change))))


@pytest.mark.parametrize("doc", [{"netboot": NETBOOT}, {"netboot": "yes", "listen_macs": [LISTEN]},
                                 {"netboot": [NETBOOT], "listen_macs": [LISTEN]}])
def test_parse_config_netboot_needs_a_listen_port_and_an_object(doc):
    """No listen MAC: dnsmasq would have no stiefel port to be confined to."""
    with pytest.raises(autokexec.AutokexecError):
        autokexec.parse_config(json.dumps(dict(GOOD, **doc)))


class FakeNetboot(object):
    """The Netboot seam: records start/stop (the real one runs dnsmasq, proven in the netns and QEMU tests)."""

    instances = []

    def __init__(self, ifname, run_dir, kernel, initrd, cmdline, log=None, log_drop=None, stdout=None):
        self.args = (ifname, run_dir, kernel, initrd, cmdline)
        self.calls = []
        self.fail = FakeNetboot.fail_next
        FakeNetboot.instances.append(self)

    fail_next = None

    def start(self, ifindex):
        self.calls.append(("start", ifindex))
        if self.fail is not None:
            raise self.fail  # pylint: disable=raising-bad-type  # set to an exception by the test that wants it

    def stop(self):
        self.calls.append(("stop",))


class Event(object):
    def __init__(self, kind, index, ifname, mac):
        self.kind, self.index, self.ifname, self.mac = kind, index, ifname, mac


def _netboot_agent(tmp_path, netboot="default"):
    netboot = dict(NETBOOT) if netboot == "default" else netboot
    key_path = tmp_path / "key"
    keyfile.write_key_atomic(str(key_path), KEY)
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initrd").write_bytes(b"i" * 4096)
    config = autokexec.parse_config(json.dumps(dict(
        GOOD, ramdisk_kernel=str(tmp_path / "vmlinuz"), ramdisk_initrd=str(tmp_path / "initrd"),
        key_path=str(key_path), trigger_macs=[], listen_macs=[LISTEN], netboot=netboot)))
    console = Console("stiefel-autokexec", stream=io.StringIO())
    agent = autokexec.AutokexecAgent(config, console, run_dir=str(tmp_path / "run"), dry_run=True)
    agent.sock = FakeSock()
    FakeNetboot.instances, FakeNetboot.fail_next = [], None
    agent.netboot_factory = FakeNetboot
    return agent, console


def test_netboot_runs_on_the_listen_link_only_and_stops_when_it_goes(tmp_path):
    from stiefel_runtime.netlink import LINK_ADDED, LINK_REMOVED

    agent, console = _netboot_agent(tmp_path)
    agent.on_link_events([Event(LINK_ADDED, 2, "wlan0", "52:54:00:ab:cd:99"), Event(LINK_ADDED, 3, "eth0", None)])
    assert FakeNetboot.instances == [] and agent.netboot is None
    agent.on_link_events([Event(LINK_ADDED, 4, "enp3s0", LISTEN.upper())])
    (service,) = FakeNetboot.instances
    assert service.calls == [("start", 4)] and service.args[0] == "enp3s0"
    assert service.args[2:] == (NETBOOT["kernel"], NETBOOT["initrd"], NETBOOT["cmdline"])
    agent.on_link_events([Event(LINK_ADDED, 4, "enp3s0", LISTEN), Event(LINK_REMOVED, 2, "wlan0", None)])
    assert len(FakeNetboot.instances) == 1 and service.calls == [("start", 4)]
    agent.on_link_events([Event(LINK_REMOVED, 4, "enp3s0", None)])
    assert service.calls[-1] == ("stop",) and agent.netboot is None
    assert "netboot stopped (link enp3s0 gone)" in console.stream.getvalue()
    # the cable comes back: served again
    agent.on_link_events([Event(LINK_ADDED, 5, "enp3s0", LISTEN)])
    assert FakeNetboot.instances[-1].calls == [("start", 5)]


def test_netboot_off_starts_nothing(tmp_path):
    from stiefel_runtime.netlink import LINK_ADDED

    agent, _console = _netboot_agent(tmp_path, netboot=None)
    agent.on_link_events([Event(LINK_ADDED, 4, "enp3s0", LISTEN)])
    assert FakeNetboot.instances == [] and agent.netboot is None


def test_netboot_that_fails_to_start_is_logged_and_the_agent_goes_on(tmp_path):
    from stiefel_runtime.netlink import LINK_ADDED
    from stiefel_runtime.netboot import NetbootError

    agent, console = _netboot_agent(tmp_path)
    FakeNetboot.fail_next = NetbootError("dnsmasq is not installed (Debian package dnsmasq-base)")
    agent.on_link_events([Event(LINK_ADDED, 4, "enp3s0", LISTEN)])
    assert agent.netboot is None and FakeNetboot.instances[0].calls == [("start", 4), ("stop",)]
    assert "netboot on enp3s0 failed: dnsmasq is not installed" in console.stream.getvalue()


def test_dnsmasq_is_stopped_before_the_kexec(tmp_path):
    """The kexec (here a dry run) happens with netboot stopped; still running afterwards, it serves again."""
    from stiefel_runtime.netlink import LINK_ADDED

    agent, console = _netboot_agent(tmp_path)
    agent.on_link_events([Event(LINK_ADDED, 4, "enp3s0", LISTEN)])
    client = discovery.ClientDiscovery(KEY)
    agent.handle_datagram(client.discover(4), "fe80::5", 61570, 4)
    offer = client.handle(agent.sock.sent[-1][0], "fe80::5", 4)
    assert agent.handle_datagram(client.kexec_request(offer), "fe80::5", 61570, 4)
    out = console.stream.getvalue()
    assert out.index("netboot stopped (kexec)") < out.index("dry-run: would run: kexec -s -l")
    first, second = FakeNetboot.instances
    assert first.calls == [("start", 4), ("stop",)] and second.calls == [("start", 4)]


def test_pairing_is_answered_with_netboot_on(tmp_path):
    from stiefel_runtime import pairing
    from ansible_collections.stiefel.system.plugins.module_utils import keyschedule

    agent, console = _netboot_agent(tmp_path)
    code = keyschedule.pairing_code(KEY)
    # a wrong code: refused, the agent says so (never the code)
    client = pairing.PairingClient("0000-0001")
    assert agent.handle_datagram(client.hello, "fe80::5", 61570, 4) is None
    proof = client.handle(agent.sock.sent[-1][0], "fe80::5")
    agent.handle_datagram(proof, "fe80::5", 61570, 4)
    with pytest.raises(pairing.PairingRefused):
        client.handle(agent.sock.sent[-1][0], "fe80::5")
    assert "wrong code (1 in a row)" in console.stream.getvalue()
    # the right one: the key, and the lockout state beside the agent's run files (0600)
    client = pairing.PairingClient(code)
    agent.handle_datagram(client.hello, "fe80::5", 61570, 4)
    agent.handle_datagram(client.handle(agent.sock.sent[-1][0], "fe80::5"), "fe80::5", 61570, 4)
    assert client.handle(agent.sock.sent[-1][0], "fe80::5") == KEY
    assert "code confirmed" in console.stream.getvalue()
    assert code not in console.stream.getvalue() and code.replace("-", "") not in console.stream.getvalue()
    assert (tmp_path / "run" / pairing.STATE_FILE).stat().st_mode & 0o777 == 0o600
    assert agent.triggered == 0


class Links(object):
    def __init__(self, links):
        self.links = links


def test_pairing_is_dropped_with_netboot_off_or_off_the_stiefel_link(tmp_path):
    from stiefel_runtime import pairing

    agent, console = _netboot_agent(tmp_path, netboot=None)
    hello = pairing.PairingClient("0000-0001").hello
    agent.handle_datagram(hello, "fe80::5", 61570, 4)
    assert agent.sock.sent == [] and console.dropped == 1
    assert "network boot (laptop_netboot) is off" in console.stream.getvalue()

    agent, console = _netboot_agent(tmp_path)

    class Link(object):
        def __init__(self, mac):
            self.mac = mac

    agent.links = Links({4: Link(LISTEN), 2: Link("52:54:00:ab:cd:99")})
    agent.handle_datagram(hello, "fe80::5", 61570, 2)
    agent.handle_datagram(hello, "fe80::5", 61570, 9)
    assert agent.sock.sent == [] and console.dropped == 2
    assert "not a stiefel link" in console.stream.getvalue()
    agent.handle_datagram(hello, "fe80::5", 61570, 4)
    assert len(agent.sock.sent) == 1


@given(st.binary(max_size=400))
@settings(max_examples=60, deadline=None)
def test_hostile_pairing_datagrams_are_dropped(junk):
    """Anything claiming to be a pairing message that is not one: dropped, nothing sent, nothing raised."""
    import tempfile
    import pathlib

    with tempfile.TemporaryDirectory() as tmp:
        agent, _console = _netboot_agent(pathlib.Path(tmp))
        datagram = messages.MAGIC + bytes([messages.VERSION, messages.PAIR_HELLO]) + junk
        agent.handle_datagram(datagram, "fe80::5", 61570, 4)
        agent.handle_datagram(datagram, "fe80::5", 61570, 4)
        assert agent.triggered == 0
