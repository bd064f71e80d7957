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
